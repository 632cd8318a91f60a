"""Click parameter types for the filter options, on the parsers the HTTP service uses too.

A bad value raises :class:`~reid_search.errors.DataError` (not click's usage error), so the
group prints the same one-line ``Error: --cameras ...`` with exit code 1 that the parsers
in :mod:`reid_search.filters` word for both front ends, and it fails while the command
line is parsed, before any model or gallery loads.
"""

from __future__ import annotations

from typing import Any, Callable

import click

from reid_search.errors import DataError
from reid_search.filters import check_label, parse_cameras, parse_time


def _option(param: click.Parameter | None) -> str:
    """The option as the user wrote it, e.g. ``--exclude-cameras``."""
    if param is None:
        return "value"
    return param.opts[0] if param.opts else str(param.name)


class CameraList(click.ParamType):
    """``1,3``: a set of camera ids."""

    name = "cameras"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> frozenset[int]:
        if isinstance(value, frozenset):
            return value
        return parse_cameras(str(value), _option(param))


class IsoTime(click.ParamType):
    """An ISO 8601 time (no zone = UTC), as an aware datetime."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        return parse_time(value, _option(param))


class Label(click.ParamType):
    """An integer label (camera or person id) the gallery's columns can hold."""

    name = "integer"

    def __init__(self, low: int = 0) -> None:
        self.low = low

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return check_label(value, _option(param), low=self.low)
        try:
            number = int(value)
        except ValueError:
            self.fail(f"{value!r} is not a valid integer.", param, ctx)  # click's own wording for type=int
        return check_label(number, _option(param), low=self.low)


class TrackName(click.ParamType):
    """A non-empty track name."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not value:
            raise DataError(f"{_option(param)} needs a non-empty track name")
        return str(value)


def filter_options(fn: Callable) -> Callable:
    """The filter options of `query` (the same fields as POST /query)."""
    opts = [
        click.option("--cameras", metavar="1,3", type=CameraList(), default=None,
                     help="Only gallery crops from these cameras."),
        click.option("--exclude-cameras", metavar="4,5", type=CameraList(), default=None,
                     help="No gallery crops from these cameras."),
        click.option("--since", metavar="TIME", type=IsoTime(), default=None,
                     help="Only crops captured at or after TIME (ISO 8601, e.g. 2024-05-01T13:45:00Z; no zone = UTC)."),
        click.option("--until", metavar="TIME", type=IsoTime(), default=None,
                     help="Only crops captured at or before TIME."),
        click.option("--exclude-track", "exclude_tracks", metavar="T", type=TrackName(), multiple=True,
                     help="No crops of track T (repeatable), e.g. the query's own tracklet."),
        click.option("--keep-same-camera", is_flag=True,
                     help="Keep gallery crops from the query's own camera (dropped by default)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn
