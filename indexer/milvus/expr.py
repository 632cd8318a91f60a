"""A :class:`~reid_search.gallery.SearchFilter` as a Milvus boolean expression."""

from __future__ import annotations

from reid_search.gallery import UNKNOWN, SearchFilter


# Literals are quoted by hand: Milvus Lite 3.x rejects pymilvus's filter_params templates ("unexpected character '{'").
def quote(s: str) -> str:
    """A Milvus expression string literal for ``s``."""
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{out}"'


def _num(x: float) -> str:
    return repr(float(x))


def filter_expr(f: SearchFilter | None) -> str | None:
    """The Milvus boolean expression for ``f``: ``""`` lets everything through, ``None`` nothing.

    Mirrors :meth:`SearchFilter.allows` exactly: crops without a camera never pass a
    camera list nor match an excluded camera; crops without a time never pass a
    time bound; crops without a track are never dropped by ``exclude_tracks``.
    """
    if f is None or f.is_empty:
        return ""
    parts: list[str] = []
    if f.cameras is not None:
        cams = sorted(c for c in f.cameras if c != UNKNOWN and c not in f.exclude_cameras)
        if not cams:
            return None
        parts.append(f"camid in [{', '.join(str(c) for c in cams)}]")
    else:
        excl = sorted(c for c in f.exclude_cameras if c != UNKNOWN)
        if excl:
            parts.append(f"camid not in [{', '.join(str(c) for c in excl)}]")
    if f.since is not None or f.until is not None:
        lo = f.since.timestamp() if f.since is not None else None
        hi = f.until.timestamp() if f.until is not None else None
        if lo is not None and hi is not None and lo > hi:
            return None
        parts.append("has_ts == true")
        if lo is not None:
            parts.append(f"ts >= {_num(lo)}")
        if hi is not None:
            parts.append(f"ts <= {_num(hi)}")
    if f.exclude_tracks:
        names = ", ".join(quote(t) for t in sorted(f.exclude_tracks))
        parts.append(f"(has_track == false or track not in [{names}])")
    return " and ".join(parts)
