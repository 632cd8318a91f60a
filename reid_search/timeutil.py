"""Capture times: one parser, one formatter and one integer encoding for the whole system.

Times are aware UTC datetimes inside the library (a naive time is taken to be UTC);
they leave the CLI and the service as ISO 8601 with a ``Z``; backends and filter
masks compare them as exact int64 microseconds since the epoch, with
:data:`NO_TIME` standing for "no capture time". Free of heavy imports.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Sequence

import numpy as np

NO_TIME = np.iinfo(np.int64).min  # in :func:`epoch_micros` arrays: the crop has no capture time
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICRO = timedelta(microseconds=1)


def as_utc(t: datetime) -> datetime:
    """``t`` as an aware UTC datetime (a naive one is taken to be UTC already)."""
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def parse_iso(text: str) -> datetime:
    """An ISO 8601 time as aware UTC; a naive one is UTC, and a trailing ``Z`` is read on every Python.

    ``datetime.fromisoformat`` reads ``Z`` only from Python 3.11; the package
    supports 3.10, so the zone letter is rewritten first.

    Raises:
        ValueError: not ISO 8601.
    """
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    return as_utc(datetime.fromisoformat(t))


def format_time(t: datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z`` (``None`` stays ``None``): how times leave the CLI and the service."""
    if t is None:
        return None
    return as_utc(t).isoformat().replace("+00:00", "Z")


def to_micros(t: datetime) -> int:
    """Microseconds since the epoch (UTC), exactly (floats lose microseconds at today's dates)."""
    return (as_utc(t) - _EPOCH) // _MICRO


def time_us(t: datetime | None) -> int | None:
    """:func:`to_micros`, with ``None`` for no time."""
    return None if t is None else to_micros(t)


def epoch_micros(times: Sequence[datetime | None]) -> np.ndarray:
    """Capture times as int64 microseconds since the epoch (UTC), :data:`NO_TIME` where none."""
    return np.array([NO_TIME if t is None else to_micros(t) for t in times], dtype=np.int64)
