"""Sightings: a query's hits grouped per camera or per track, best hit first."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

__all__ = ["GROUP_BY", "Sighting", "group_hits"]

GROUP_BY = ("camera", "track")
_FIELD = {"camera": "camid", "track": "track"}


@dataclass(frozen=True)
class Sighting:
    """The hits of one camera (or track): its best hit, how many hits, how many match, first/last time."""

    key: Any  # the camid or track id; None gathers hits without one
    best: Any  # the group's best hit (a reid_search.engine.Hit)
    hits: int
    matches: int | None  # None without a threshold
    first_time: Any
    last_time: Any

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (datetimes as ISO 8601 UTC)."""
        return {"key": self.key, "best": self.best.to_dict(), "hits": self.hits, "matches": self.matches,
                "first_time": _iso(self.first_time), "last_time": _iso(self.last_time)}


def _iso(t: Any) -> Any:
    if isinstance(t, datetime):
        from reid_search.timeutil import format_time

        return format_time(t)
    return t


def group_hits(hits: Sequence[Any], by: str, threshold: float | None = None) -> list[Sighting]:
    """Group ``hits`` (each with ``distance`` and ``camid``/``track``, optionally ``time``) by ``by``.

    Groups are ordered by their best hit (smallest distance, then first in ``hits``);
    ``matches`` counts hits with distance <= ``threshold``; first/last time are the
    smallest and largest known ``time`` (None when no hit of the group has one).

    Raises:
        ValueError: ``by`` is not one of :data:`GROUP_BY`.
    """
    if by not in GROUP_BY:
        raise ValueError(f"group by one of {', '.join(GROUP_BY)}, not {by!r}")
    attr = _FIELD[by]
    groups: dict[Any, list[tuple[int, Any]]] = {}
    for i, h in enumerate(hits):
        groups.setdefault(getattr(h, attr, None), []).append((i, h))
    out = []
    for key, members in groups.items():
        best_i, best = min(members, key=lambda m: (m[1].distance, m[0]))
        times = [t for _, h in members if (t := getattr(h, "time", None)) is not None]
        matches = None if threshold is None else sum(h.distance <= threshold for _, h in members)
        out.append((best.distance, best_i, Sighting(key, best, len(members), matches,
                                                     min(times) if times else None, max(times) if times else None)))
    out.sort(key=lambda x: (x[0], x[1]))
    return [s for _, _, s in out]
