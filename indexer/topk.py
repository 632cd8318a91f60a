"""Exact top-k on numpy arrays, shared by the vector backends (no faiss here).

:func:`exact_search` is brute-force inner-product k-NN streamed in blocks,
:func:`merge_topk` keeps the k best of two candidate sets, and :func:`fill_short`
is the exact fallback of an approximate index under a filter: the queries it
answered with fewer than ``min(k, passing)`` hits are answered again by exact
search over the vectors that pass. The FAISS and the Milvus backends both use it.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)


def exact_search(x: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int,
                 max_block_floats: int = 1 << 25) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product k-NN of queries ``x`` among rows ``xb`` (labelled ``ids``).

    Streams ``xb`` in blocks so memory stays at ~``max_block_floats`` scores.
    Returns ``(sims [q, k], ids [q, k])`` best first, padded with -inf / -1.
    """
    q, n = len(x), len(xb)
    best_s = np.full((q, k), -np.inf, np.float32)
    best_i = np.full((q, k), -1, np.int64)
    if n == 0 or q == 0:
        return best_s, best_i
    block = max(1024, max_block_floats // max(q, 1))
    for s in range(0, n, block):
        sims = x @ xb[s : s + block].T
        kk = min(k, sims.shape[1])
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < sims.shape[1] else np.broadcast_to(np.arange(kk), sims.shape).copy()
        best_s, best_i = merge_topk(best_s, best_i, np.take_along_axis(sims, part, 1),
                                    np.asarray(ids[s : s + block], np.int64)[part], k)
    best_i[~np.isfinite(best_s)] = -1
    return best_s.astype(np.float32, copy=False), best_i


def merge_topk(best_s: np.ndarray, best_i: np.ndarray, cand_s: np.ndarray, cand_i: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two ``(sims, ids)`` candidate sets per row, best first (ties keep ``best`` first)."""
    cat_s = np.concatenate([best_s, cand_s], axis=1)
    cat_i = np.concatenate([best_i, cand_i], axis=1)
    order = np.argsort(-cat_s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cat_s, order, 1), np.take_along_axis(cat_i, order, 1)


def fill_short(x: np.ndarray, k: int, sims: np.ndarray, ids: np.ndarray, passing: int | Callable[[], int],
               iter_passing: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]) -> int:
    """Re-answer exactly, in place, the queries an approximate filtered search left short.

    A selective filter can leave a graph or inverted-list search with fewer hits
    than the crops that pass (an HNSW beam or the probed lists hold few of them).
    Rows of ``ids`` (``[q, k]``, padding -1) with fewer than ``min(k, passing)``
    hits get the exact top k over the passing vectors instead, which
    ``iter_passing()`` yields as ``(ids, vectors)`` batches, so memory stays at one
    batch. ``passing`` is their count, or a function that counts them (called only
    when some row is short of k). Returns how many queries were re-answered.
    """
    found = (ids >= 0).sum(axis=1)
    if not (found < k).any():
        return 0
    n = passing() if callable(passing) else int(passing)
    short = np.flatnonzero(found < min(k, n))
    if not len(short):
        return 0
    log.debug("%d filtered queries fell back to exact search over %d crops", len(short), n)
    q = np.ascontiguousarray(x[short], np.float32)
    best_s = np.full((len(short), k), -np.inf, np.float32)
    best_i = np.full((len(short), k), -1, np.int64)
    for part_ids, xb in iter_passing():
        best_s, best_i = merge_topk(best_s, best_i, *exact_search(q, xb, part_ids, k), k)
    best_i[~np.isfinite(best_s)] = -1
    sims[short], ids[short] = best_s, best_i
    return len(short)


__all__ = ["exact_search", "fill_short", "merge_topk"]
