"""Search and removal filters as users write them: parsing, checking, and masks over arrays.

The CLI (``query --cameras ...``, ``remove --before ...``) and the HTTP service
(``POST /query``, ``DELETE /gallery``) take the same fields; this module turns
their text into :class:`~reid_search.gallery.SearchFilter` and
:class:`~reid_search.gallery.RemoveFilter`, raising :class:`~reid_search.errors.DataError`
with a one-line remedy for a bad value. It imports nothing heavy (numpy only),
so the CLI parses before loading torch or faiss.

:func:`filter_mask` evaluates a :class:`SearchFilter` over whole columns: the one
numpy form of the filter, used by re-ranking (which scores every gallery item) and
by the FAISS store's field table. It must agree with :meth:`SearchFilter.allows`,
row by row (tested).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from reid_search.errors import DataError
from reid_search.gallery import UNKNOWN, RemoveFilter, SearchFilter
from reid_search.limits import MAX_LABEL, MIN_PID
from reid_search.timeutil import NO_TIME, as_utc, format_time, parse_iso, to_micros

MAX_ID = 2**63 - 1  # gallery ids are int64

TIME_EXAMPLE = "2024-05-01T13:45:00Z"


def parse_time(text: str, option: str) -> datetime:
    """An ISO 8601 time as an aware UTC datetime; a naive one is taken as UTC, a ``Z`` is read on 3.10 too.

    Raises:
        DataError: not ISO 8601, with an example of what is.
    """
    try:
        return parse_iso(text)
    except ValueError:
        raise DataError(f"{option} {text!r} is not an ISO 8601 time; write e.g. {TIME_EXAMPLE} "
                        "(no zone means UTC)") from None


def check_label(value: int, option: str, low: int = 0, high: int = MAX_LABEL) -> int:
    """``value`` when ``low <= value <= high``.

    Raises:
        DataError: out of range (the DB column could not hold it).
    """
    if not low <= value <= high:
        raise DataError(f"{option} {value} is out of range; give an integer from {low} to {high}")
    return int(value)


def parse_cameras(text: str | Iterable[int], option: str) -> frozenset[int]:
    """Camera ids from ``"1,3"`` (or an iterable of ints).

    Raises:
        DataError: an empty list, a non-integer, or a camera out of range.
    """
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise DataError(f"{option} needs a comma-separated list of camera ids, e.g. 1,3")
        values = []
        for p in parts:
            try:
                values.append(int(p))
            except ValueError:
                raise DataError(f"{option}: {p!r} is not a camera id; write a comma-separated list such as 1,3") from None
    else:
        values = [int(v) for v in text]
    return frozenset(check_label(v, option) for v in values)


def _opt(field: str, cli: bool) -> str:
    """How a field is named to the user: ``--exclude-cameras`` on the command line, ``exclude_cameras`` over HTTP."""
    return "--" + field.replace("_", "-") if cli else field


def make_search_filter(
    cameras: str | Iterable[int] | None = None,
    exclude_cameras: str | Iterable[int] | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    exclude_tracks: Sequence[str] = (),
    *,
    cli: bool = True,
) -> SearchFilter:
    """A :class:`SearchFilter` from user-given fields (errors name CLI options, or HTTP fields with ``cli=False``).

    Raises:
        DataError: a bad camera list or time, or ``since`` after ``until``.
    """
    cams = parse_cameras(cameras, _opt("cameras", cli)) if cameras is not None else None
    excl = parse_cameras(exclude_cameras, _opt("exclude_cameras", cli)) if exclude_cameras is not None else frozenset()
    t0 = parse_time(since, _opt("since", cli)) if isinstance(since, str) else since
    t1 = parse_time(until, _opt("until", cli)) if isinstance(until, str) else until
    if t0 is not None and t1 is not None and as_utc(t0) > as_utc(t1):
        raise DataError(f"{_opt('since', cli)} {format_time(t0)} is after {_opt('until', cli)} {format_time(t1)}; "
                        "swap them")
    tracks = list(exclude_tracks)
    if any(not t for t in tracks):
        raise DataError(f"{_opt('exclude_track', cli)} needs a non-empty track name")
    return SearchFilter(cams, excl, t0, t1, frozenset(tracks))


def make_remove_filter(pid: int | None = None, camid: int | None = None, before: str | datetime | None = None,
                       track: str | None = None, *, cli: bool = True) -> RemoveFilter:
    """A :class:`RemoveFilter` from user-given fields (errors name CLI options, or HTTP fields with ``cli=False``).

    Raises:
        DataError: no field given, or a bad value.
    """
    names = [_opt(f, cli) for f in ("pid", "camid", "before", "track")]
    if pid is None and camid is None and before is None and track is None:
        raise DataError(f"say what to remove: give {', '.join(names[:3])} and/or {names[3]} (they are ANDed)")
    if pid is not None:
        check_label(pid, names[0], low=MIN_PID)
    if camid is not None:
        check_label(camid, names[1])
    t = parse_time(before, names[2]) if isinstance(before, str) else before
    if track is not None and not track:
        raise DataError(f"{names[3]} needs a non-empty track name")
    return RemoveFilter(pid, camid, t, track)


def filter_dict(where: SearchFilter, keep_same_camera: bool) -> dict[str, Any]:
    """The ``filter`` object of ``query --json`` and of ``POST /query``'s answer."""
    return {"cameras": None if where.cameras is None else sorted(where.cameras),
            "exclude_cameras": sorted(where.exclude_cameras), "since": format_time(where.since),
            "until": format_time(where.until), "exclude_tracks": sorted(where.exclude_tracks),
            "keep_same_camera": keep_same_camera}


def describe_filter(where: SearchFilter) -> str:
    """A filter in the words of the command line, e.g. ``cameras 1,3; since 2024-05-01T08:00:00Z``."""
    parts = []
    if where.cameras is not None:
        parts.append("cameras " + ",".join(map(str, sorted(where.cameras))))
    if where.exclude_cameras:
        parts.append("not cameras " + ",".join(map(str, sorted(where.exclude_cameras))))
    if where.since is not None:
        parts.append(f"since {format_time(where.since)}")
    if where.until is not None:
        parts.append(f"until {format_time(where.until)}")
    if where.exclude_tracks:
        parts.append("not tracks " + ",".join(sorted(where.exclude_tracks)))
    return "; ".join(parts)


def filter_mask(where: SearchFilter | None, camids: np.ndarray, times: np.ndarray, tracks: np.ndarray,
                vocab: Mapping[str, int] | None = None) -> np.ndarray:
    """Boolean mask of the rows ``where`` lets through (all rows for ``None``), as :meth:`SearchFilter.allows`.

    Args:
        camids: int64, :data:`~reid_search.gallery.UNKNOWN` where none.
        times: int64 epoch microseconds, :data:`~reid_search.timeutil.NO_TIME` where none
            (see :func:`~reid_search.timeutil.epoch_micros`).
        tracks: object array of ``str`` or ``None``; with ``vocab``, integer codes into it
            (any code not in ``vocab``, e.g. -1, for none).
        vocab: track name -> code, when ``tracks`` holds codes.
    """
    n = len(camids)
    ok = np.ones(n, dtype=bool)
    if where is None or where.is_empty:
        return ok
    known = camids != UNKNOWN
    if where.cameras is not None:
        ok &= known & np.isin(camids, np.fromiter(where.cameras, np.int64, len(where.cameras)))
    if where.exclude_cameras:
        ok &= ~(known & np.isin(camids, np.fromiter(where.exclude_cameras, np.int64, len(where.exclude_cameras))))
    if where.since is not None or where.until is not None:
        ok &= times != NO_TIME
        if where.since is not None:
            ok &= times >= to_micros(where.since)
        if where.until is not None:
            ok &= times <= to_micros(where.until)
    if where.exclude_tracks:
        if vocab is None:
            ok &= ~np.fromiter((t is not None and t in where.exclude_tracks for t in tracks), bool, n)
        else:
            codes = [vocab[t] for t in where.exclude_tracks if t in vocab]
            if codes:
                ok &= ~np.isin(tracks, np.asarray(codes, np.asarray(tracks).dtype))
    return ok
