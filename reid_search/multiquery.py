"""One person from several crops: fusing query features, and Market's multiple-query grouping.

``mean`` fusion averages the L2-normalised crop features and normalises again;
``max`` fusion keeps, per gallery item, the best similarity of any crop, i.e. the
smallest distance (squared Euclidean on unit vectors is ``2 - 2 cos``, so the
largest cosine is the smallest distance).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence, TypeVar

import numpy as np

__all__ = ["FUSE_MODES", "fuse_features", "fuse_distances", "group_queries", "merge_ranked", "search_crops"]

FUSE_MODES = ("mean", "max")
T = TypeVar("T")


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def fuse_features(feats: np.ndarray) -> np.ndarray:
    """The mean of the rows after L2 normalisation, normalised again (float32, shape ``[d]``).

    Raises:
        ValueError: no rows.
    """
    f = np.atleast_2d(np.asarray(feats, dtype=np.float32))
    if f.shape[0] == 0:
        raise ValueError("no features to fuse")
    return _unit(_unit(f).mean(axis=0)).astype(np.float32)


def fuse_distances(dists: np.ndarray) -> np.ndarray:
    """Per column, the smallest distance over the rows (``max`` fusion of a crops × gallery matrix)."""
    d = np.atleast_2d(np.asarray(dists))
    if d.shape[0] == 0:
        raise ValueError("no distances to fuse")
    return d.min(axis=0)


def group_queries(q_pids: np.ndarray, q_camids: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Group query rows by (pid, camid): Market-1501's multiple-query protocol.

    Returns ``(groups, pids, camids)``: row indices of each group (in row order),
    and each group's pid and camid; groups sorted by (pid, camid).
    """
    qp = np.asarray(q_pids, dtype=np.int64)
    qc = np.asarray(q_camids, dtype=np.int64)
    if qp.shape != qc.shape or qp.ndim != 1:
        raise ValueError(f"q_pids and q_camids must be 1-D of one length, got {qp.shape} and {qc.shape}")
    order = np.lexsort((np.arange(qp.size), qc, qp))
    keys = np.stack([qp[order], qc[order]], axis=1)
    starts = np.flatnonzero(np.r_[True, (np.diff(keys, axis=0) != 0).any(axis=1)]) if qp.size else np.zeros(0, int)
    groups = np.split(order, starts[1:]) if qp.size else []
    return groups, keys[starts, 0] if qp.size else qp, keys[starts, 1] if qp.size else qc


def merge_ranked(lists: Sequence[Sequence[tuple[int, float, T]]], top_k: int) -> list[tuple[int, float, T]]:
    """``max`` fusion of per-crop top-k lists of ``(id, distance, payload)``.

    Keeps each id's smallest distance and returns the ``top_k`` best by
    (distance, id). Exact: an item in the fused top-k is within the top-k of the
    crop that gives its distance, since every item ahead of it there is ahead of it
    in the fused order too.
    """
    best: dict[int, tuple[int, float, T]] = {}
    for lst in lists:
        for item in lst:
            cur = best.get(item[0])
            if cur is None or item[1] < cur[1]:
                best[item[0]] = item
    return sorted(best.values(), key=lambda x: (x[1], x[0]))[:top_k]


def search_crops(engine: Any, feats: np.ndarray, camids: Sequence[int | None], fuse: str = "mean", *, top_k: int,
                 rerank: bool = False, where: Any = None, keep_same_camera: bool = False) -> list[Any]:
    """Hits of one person given by one or several crop features, through a
    :class:`~reid_search.engine.SearchEngine`.

    One crop: the engine's search. Several: unless ``keep_same_camera``, the
    cameras of all crops are dropped; ``mean`` searches with :func:`fuse_features`,
    ``max`` merges the crops' own top-k lists with :func:`merge_ranked` (exact).

    Raises:
        ValueError: an unknown ``fuse``, or ``camids`` of another length than ``feats``.
    """
    if fuse not in FUSE_MODES:
        raise ValueError(f"fuse must be one of {FUSE_MODES}, not {fuse!r}")
    feats = np.atleast_2d(feats)
    if len(camids) != len(feats):
        raise ValueError(f"{len(feats)} crops but {len(camids)} camids")
    if len(feats) == 1:
        return engine.search(feats, top_k=top_k, camids=list(camids), rerank=rerank, where=where,
                             keep_same_camera=keep_same_camera)[0]
    if not keep_same_camera:
        from reid_search.gallery import SearchFilter

        where = where if where is not None else SearchFilter()
        for c in camids:
            where = where.excluding_camera(c)
    if fuse == "mean":
        return engine.search(fuse_features(feats)[None], top_k=top_k, rerank=rerank, where=where,
                             keep_same_camera=True)[0]
    per_crop = engine.search(feats, top_k=top_k, rerank=rerank, where=[where] * len(feats), keep_same_camera=True)
    merged = merge_ranked([[(h.id, h.distance, h) for h in hs] for hs in per_crop], top_k)
    return [replace(h, rank=r + 1, distance=d) for r, (_, d, h) in enumerate(merged)]
