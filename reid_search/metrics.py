"""Retrieval metrics under the Market-1501 protocol: CMC, mAP and mINP.

`evaluate` gives the same numbers as torchreid's ``eval_market1501`` and fast-reid's
``evaluate_rank`` (CMC, mAP, and fast-reid's mINP), with two deliberate definitions:

* **Ties.** Gallery items are ranked by ``(distance, gallery index)``: equal distances
  keep gallery order, exactly as ``np.argsort(distmat, axis=1, kind="stable")``.
  The references call ``np.argsort`` with its default unstable kind, whose tie order
  depends on the numpy build and the CPU (numpy 2.x on AVX-512 reorders ties even in
  five-element rows), so on inputs with ties they are not reproducible; without ties
  (the usual case for real distances) the results are identical.
* **Junk.** Gallery items with pid -1 are dropped for every query, as in the official
  Market-1501 protocol. torchreid and fast-reid never see them because their dataset
  loaders skip those images; their evaluation equals this one on the gallery with the
  pid -1 items removed. pid 0 (distractors) stays as an ordinary negative.

Instead of arg-sorting whole rows, each block of query rows is value-sorted (the
SIMD sort numpy ships is several times faster than argsort) and only the few gallery
items that share the query's pid are located in it by binary search; their rank in
the stable order is ``#(smaller distances) + #(equal distances at lower gallery index)``.
Memory is a few ``block_size × num_gallery`` arrays per worker thread.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["evaluate", "protocol_inputs"]


def _as_ids(name: str, arr: Any, length: int) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.shape[0] != length:
        raise ValueError(f"{name} has {a.shape[0]} entries but distmat implies {length}")
    return a.astype(np.int64, copy=False)


def protocol_inputs(
    distmat: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(distmat, q_pids, g_pids, q_camids, g_camids)`` as arrays, the ids as int64.

    The input checks :func:`evaluate` and :func:`reid_search.calibration.collect_pairs`
    share.

    Raises:
        ValueError: ``distmat`` is not 2-D or not real-valued, or an id array is not
            1-D integers of the length ``distmat`` implies.
    """
    dist = np.asarray(distmat)
    if dist.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_query × num_gallery), got shape {dist.shape}")
    if dist.dtype.kind not in "fiu":
        raise ValueError(f"distmat must be real-valued, got dtype {dist.dtype}")
    num_q, num_g = dist.shape
    q_pids = _as_ids("q_pids", q_pids, num_q)
    q_camids = _as_ids("q_camids", q_camids, num_q)
    g_pids = _as_ids("g_pids", g_pids, num_g)
    g_camids = _as_ids("g_camids", g_camids, num_g)
    return dist, q_pids, g_pids, q_camids, g_camids


def _same_pid_pairs(
    q_pids: np.ndarray, g_order: np.ndarray, g_sorted_pids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """All (query row, gallery column) pairs sharing a pid, sorted by row then column."""
    lo = np.searchsorted(g_sorted_pids, q_pids, side="left")
    hi = np.searchsorted(g_sorted_pids, q_pids, side="right")
    lens = hi - lo
    total = int(lens.sum())
    rows = np.repeat(np.arange(q_pids.size), lens)
    offsets = np.repeat(lo - (np.cumsum(lens) - lens), lens) + np.arange(total)
    return rows, g_order[offsets]


def _block_ranks(
    dist: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    junk: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-based ranks (among kept gallery items) of every positive in a block of rows.

    ``rows, cols`` are the block's same-pid (query row, gallery column) pairs, sorted by
    row, and ``junk`` marks those seen from the query's own camera. Returns
    ``(row, rank, n_pos)``: positives sorted by row then rank, and the number of
    positives of each row.
    """
    nrows = dist.shape[0]
    empty = np.zeros(0, dtype=np.int64)
    if dist.shape[1] == 0:
        return empty, empty, np.zeros(nrows, dtype=np.int64)
    sorted_rows = np.sort(dist, axis=1)
    # NaN sorts last, so the last column tells whether a row holds one.
    if np.isnan(sorted_rows[:, -1]).any():
        raise ValueError("distmat contains NaN")
    if rows.size == 0:
        return empty, empty, np.zeros(nrows, dtype=np.int64)
    vals = dist[rows, cols]

    # Rank of each same-pid item in the stable (distance, index) order over all
    # non-junk gallery items: smaller distances, then equal ones at lower indices.
    left = np.empty(rows.size, dtype=np.int64)
    bounds = np.searchsorted(rows, np.arange(nrows + 1))
    for r in np.flatnonzero(np.diff(bounds)):
        lo, hi = bounds[r], bounds[r + 1]
        left[lo:hi] = np.searchsorted(sorted_rows[r], vals[lo:hi], side="left")
    rank_all = left + 1
    # The item itself sits at sorted position `left`; a tie exists iff the next equals it.
    nxt = np.minimum(left + 1, dist.shape[1] - 1)
    tied = (left + 1 < dist.shape[1]) & (sorted_rows[rows, nxt] == vals)
    for t in np.flatnonzero(tied):
        rank_all[t] += np.count_nonzero(dist[rows[t], : cols[t]] == vals[t])

    # Same-pid items seen from the query's own camera are removed; shift the ranks of
    # the positives behind them.
    order = np.lexsort((rank_all, rows))
    rows, rank_all, junk = rows[order], rank_all[order], junk[order]
    junk_before = np.cumsum(junk) - junk
    junk_before = junk_before - junk_before[np.searchsorted(rows, rows, side="left")]
    keep = ~junk
    rows = rows[keep]
    rank = rank_all[keep] - junk_before[keep]
    n_pos = np.bincount(rows, minlength=nrows)
    return rows, rank, n_pos


def evaluate(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    *,
    block_size: int = 256,
    workers: int | None = None,
) -> dict[str, Any]:
    """CMC, mAP and mINP of a query × gallery distance matrix (smaller = more similar).

    Per query, gallery items with the query's pid and camera, and gallery items with
    pid -1, are ignored; queries left without a positive are skipped. Ties rank the
    lower gallery index first (see the module docstring).

    Returns ``{"cmc", "mAP", "mINP", "num_valid", "num_query"}``: ``cmc[r-1]`` is the
    fraction of valid queries whose first correct match has rank <= r, for r up to
    ``min(max_rank, number of non-junk gallery items)``; ``mAP`` is the mean over valid
    queries of the mean precision at each positive; ``mINP`` the mean of
    ``num_positives / rank_of_last_positive``.

    Query rows are processed ``block_size`` at a time on ``workers`` threads (default:
    up to 4, bounded by the CPU count); neither changes the result.

    Raises ValueError on inconsistent shapes, non-integer ids, NaN distances, a
    ``max_rank`` below 1, or when no query has a valid positive.
    """
    dist, q_pids, g_pids, q_camids, g_camids = protocol_inputs(distmat, q_pids, g_pids, q_camids, g_camids)
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be an integer >= 1, got {max_rank!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    num_q, num_g = dist.shape
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    rows, rank, n_pos, num_kept = _positive_ranks(dist, q_pids, g_pids, q_camids, g_camids, block_size, workers)
    result = _summarise(rows, rank, n_pos, num_kept, max_rank)
    logger.debug("evaluated %d queries (%d valid) against %d gallery items", num_q, result["num_valid"], num_g)
    return result


def _positive_ranks(
    dist: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    block_size: int,
    workers: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(row, rank, n_pos, num_kept)``: every positive's rank, block by block (see :func:`_block_ranks`).

    Junk columns (pid -1) are dropped first; ``num_kept`` is how many remain.
    """
    num_q, num_g = dist.shape
    # Other dtypes are converted block by block: float16 exactly to float32, the rest
    # to float64.
    work_dtype = {np.dtype(np.float16): np.float32}.get(dist.dtype, np.float64)
    if dist.dtype in (np.float32, np.float64):
        work_dtype = dist.dtype

    valid_cols = np.flatnonzero(g_pids != -1)
    has_junk = valid_cols.size < num_g
    if has_junk:
        g_pids, g_camids = g_pids[valid_cols], g_camids[valid_cols]

    g_order = np.argsort(g_pids, kind="stable")
    g_sorted_pids = g_pids[g_order]

    def run(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stop = min(start + block_size, num_q)
        block = dist[start:stop]
        if has_junk:
            block = block[:, valid_cols]
        block = block.astype(work_dtype, copy=False)
        rows, cols = _same_pid_pairs(q_pids[start:stop], g_order, g_sorted_pids)
        junk = g_camids[cols] == q_camids[start:stop][rows]
        rows, rank, n_pos = _block_ranks(block, rows, cols, junk)
        return rows + start, rank, n_pos

    starts = range(0, num_q, block_size)
    if workers > 1 and len(starts) > 1:
        # np.sort releases the GIL, so threads overlap the bulk of the work.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(run, starts))
    else:
        parts = [run(s) for s in starts]

    empty = np.zeros(0, np.int64)
    rows = np.concatenate([p[0] for p in parts]) if parts else empty
    rank = np.concatenate([p[1] for p in parts]) if parts else empty
    n_pos = np.concatenate([p[2] for p in parts]) if parts else empty
    return rows, rank, n_pos, int(valid_cols.size)


def _summarise(
    rows: np.ndarray, rank: np.ndarray, n_pos: np.ndarray, num_kept: int, max_rank: int
) -> dict[str, Any]:
    """CMC, mAP and mINP from the positives' ranks (sorted by row, then rank)."""
    num_q = n_pos.size
    valid = n_pos > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            "no query has a valid gallery match (every query's identity is absent from "
            "the gallery, or appears only under the query's own camera or as pid -1)"
        )

    # rows/rank are sorted by row then rank: the k-th entry of a row is its k-th hit.
    first_of_row = np.searchsorted(rows, rows, side="left")
    hit_no = np.arange(rows.size) - first_of_row + 1
    ap = np.bincount(rows, weights=hit_no / rank, minlength=num_q)[valid] / n_pos[valid]
    row_ids = np.flatnonzero(valid)
    first_rank = rank[np.searchsorted(rows, row_ids, side="left")]
    last_rank = rank[np.searchsorted(rows, row_ids, side="right") - 1]
    inp = n_pos[valid] / last_rank

    length = min(max_rank, num_kept)
    hist = np.bincount(np.minimum(first_rank, length + 1), minlength=length + 2)
    cmc = np.cumsum(hist[1 : length + 1]) / num_valid
    return {
        "cmc": cmc,
        "mAP": float(ap.mean()),
        "mINP": float(inp.mean()),
        "num_valid": num_valid,
        "num_query": num_q,
    }
