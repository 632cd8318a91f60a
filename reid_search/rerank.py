"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in memory linear in (q + g)·k.

The result equals the dense algorithm popularised by reid-strong-baseline
(``utils/re_ranking.py``), step for step:

1. ``d`` = squared Euclidean distances over all N = q + g features (queries first);
   ``O[i, j] = d[i, j] / max_j' d[i, j']`` (the reference divides columns by their
   maxima and transposes, which for a symmetric ``d`` is this row normalisation).
2. ``rank[i]`` = all N items ordered by increasing ``d[i, :]``.
3. ``R(i, k)`` = items ``j`` among the first ``k + 1`` of ``rank[i]`` whose own first
   ``k + 1`` contain ``i``.
4. Expansion: for each ``c`` in ``R(i, k1)``, add ``R(c, round(k1 / 2))`` when more
   than 2/3 of it lies in ``R(i, k1)`` (``round`` is numpy's half-to-even).
5. ``V[i, j] = exp(-O[i, j])`` over the expanded set, rows normalised to sum 1.
6. Query expansion (``k2 > 1``): ``V[i] <- mean(V[rank[i, :k2]])``.
7. ``s[i, j] = sum_c min(V[i, c], V[j, c])``; ``jaccard = 1 - s / (2 - s)``.
8. ``final = (1 - lambda) * jaccard + lambda * O`` on the query × gallery block.

What differs is how it is computed, never what. The N × N distance matrix is never
held: distances are produced in pairs of row blocks, each pair once (half the FLOPs of
the full matrix), and streamed into per-row candidate lists that keep only entries at
or below the row's current k-th distance; what survives is the k nearest of every
row, the row maxima and the query × gallery block (the output). ``V`` is a sparse CSR
matrix with O(k1²) non-zeros per row, and step 7 walks, for each query non-zero, the
gallery non-zeros of the same column (the reference's inverted index, vectorised) and
sums the minima with ``np.bincount``. Peak memory is the q × g output plus
O(N·k1² + block_size²); at Market-1501 size that is about 0.5 GB against 8 GB.
Steps 3-7 are shared with :mod:`reid_search.online_rerank` and live in
:mod:`reid_search._kreciprocal`; this module owns the streamed k-NN graph and the batch
driver.

The reference stores ``V``, the Jaccard sums and the Jaccard distance in float16, so
its output carries float16 rounding (a few 1e-3 at most); this module works in float32
and float64 and agrees with the same algorithm in float32 to about 1e-6.

Conventions the reference leaves to chance, fixed here:

* **Ties** in the initial ranking go to the lower index (queries first, then gallery,
  in input order), as ``np.argsort(d, kind="stable")`` would. Ties are judged on the
  computed float32 distances: two pairs at exactly the same true distance can differ
  by GEMM rounding (as in the reference), except near zero, see the next point.
* ``d`` is clamped at 0, its diagonal is exactly 0, and distances small enough to be
  mostly rounding (below ~4·D·eps_float32 of ``|x_i|² + |x_j|²``) are recomputed from
  ``x_i - x_j``, so duplicate features tie exactly at 0 and their order is by index.
* ``k1 + 1``, ``round(k1 / 2) + 1`` and ``k2`` larger than N are truncated to N, as
  the reference's slicing does. A row whose maximum distance is 0 (all features equal)
  is left unnormalised instead of dividing by zero.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from reid_search._kreciprocal import (
    ELEMENTS_PER_CHUNK,
    Pool,
    expanded_pairs,
    expansion_matrix,
    min_sums,
    pair_distances,
    reciprocal_mask,
    weight_rows,
)

logger = logging.getLogger(__name__)

__all__ = ["KnnGraph", "k_reciprocal", "knn_graph"]

_KEY_MAX = np.iinfo(np.int64).max
# Candidate lists hold at most this many times k entries per row before compaction.
_CAPACITY_FACTOR = 4  # >= 3: a compacted row (k) plus one visit (<= 2k) must fit
# Target number of (query non-zero, gallery non-zero) pairs per Jaccard chunk, and the
# largest dense (rows × gallery) float64 chunk; one chunk per worker thread is live.
_PAIRS_PER_CHUNK = 1_000_000
_DENSE_CHUNK_BYTES = 16 << 20
# Elements of the (rows × k × k [× k]) temporaries of the reciprocal-set steps per chunk;
# read at each call (not bound as a default) so that a test can shrink it.
_ELEMENTS_PER_CHUNK = ELEMENTS_PER_CHUNK
# Feature values gathered per chunk when near-zero distances are recomputed (16 MB of float32).
_REFINE_CHUNK_VALUES = 4 << 20


@dataclass(frozen=True)
class KnnGraph:
    """Exact k nearest neighbours of every row of a feature set, under squared L2.

    ``indices[i]`` lists the k nearest items of row i (itself included) by increasing
    distance, ties by lower index; ``distances`` are the matching squared distances;
    ``row_max[i]`` is the largest squared distance from row i to any item.
    """

    indices: np.ndarray  # (N, k) int64
    distances: np.ndarray  # (N, k) float32
    row_max: np.ndarray  # (N,) float64


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_features(name: str, x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num × dim), got shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be real-valued, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.ascontiguousarray(a, dtype=np.float32)


def _keys(vals: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """int64 keys ordering (value, column) lexicographically; values must be >= +0.0."""
    # The bit pattern of a non-negative float32 read as int32 is monotone in its value.
    bits = np.ascontiguousarray(vals, dtype=np.float32).view(np.int32).astype(np.int64)
    return (bits << 32) | cols.astype(np.int64)


def _key_values(keys: np.ndarray) -> np.ndarray:
    return (keys >> 32).astype(np.int32).view(np.float32)


class _Candidates:
    """Per-row candidate lists for an exact streamed top-k by (distance, index).

    Each row keeps up to ``cap`` int64 keys and a threshold: the k-th smallest distance
    seen so far in that row (an upper bound of the final k-th), so later blocks only
    hand over entries at or below it. Entries equal to the threshold are kept too, which
    makes the final selection by key exact under ties.

    It is not the store's ``merge_topk`` (``indexer/faiss/index.py``) in another shape:
    that one merges ranked similarity lists by id for a few query rows, while this one
    keeps every row of the graph exact under (distance, index) ties over many visits
    per row, with near-zero distances recomputed, in O(N·k) memory.
    """

    def __init__(self, n: int, k: int, feats: np.ndarray, sq: np.ndarray) -> None:
        self.k = k
        self.feats = feats
        self.sq = sq
        # Below eps·(|x_i|² + |x_j|²) the expansion |x_i|² + |x_j|² - 2 x_i·x_j is mostly
        # float32 rounding (a generous bound for a length-D dot product), so such
        # distances are recomputed from x_i - x_j: duplicates then tie exactly at 0.
        self.eps = 4.0 * feats.shape[1] * float(np.finfo(np.float32).eps)
        self.cap = _CAPACITY_FACTOR * k
        self.buf = np.full((n, self.cap), _KEY_MAX, dtype=np.int64)
        self.fill = np.zeros(n, dtype=np.int64)
        self.thr = np.full(n, np.inf, dtype=np.float32)

    def _compact(self, rows: np.ndarray) -> None:
        part = np.partition(self.buf[rows], self.k - 1, axis=1)[:, : self.k]
        self.buf[rows] = _KEY_MAX
        self.buf[rows, : self.k] = part
        self.fill[rows] = np.minimum(self.fill[rows], self.k)
        full = self.fill[rows] >= self.k
        self.thr[rows[full]] = _key_values(part[full].max(axis=1))

    def refine(self, vals: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Clamped distances, with near-zero ones recomputed as |x_i - x_j|²."""
        vals = np.maximum(vals, 0.0)
        near = np.flatnonzero(vals <= self.eps * (self.sq[rows] + self.sq[cols]))
        near = near[rows[near] != cols[near]]  # self-distances are already exactly 0
        # In chunks: when most pairs are near (an untrained model's features all agree to
        # cos > 0.999), gathering them at once took pairs x dim x 8 bytes (16 GB for 1,000 crops).
        step = max(1, _REFINE_CHUNK_VALUES // max(1, self.feats.shape[1]))
        for s in range(0, near.size, step):
            idx = near[s : s + step]
            # float32 differences of nearby values are exact or within an ulp (Sterbenz);
            # the squares add up in float64. x - y = -(y - x) exactly: (i, j) and (j, i) agree.
            diff = self.feats[rows[idx]] - self.feats[cols[idx]]
            vals[idx] = np.einsum("ij,ij->i", diff, diff, dtype=np.float64)
        return vals + np.float32(0.0)  # adding +0.0 turns -0.0 into +0.0 for the keys

    def add(self, rows: np.ndarray, keys: np.ndarray) -> None:
        """Append keys; ``rows`` sorted ascending, at most 2k entries per row."""
        if rows.size == 0:
            return
        uniq, first, counts = np.unique(rows, return_index=True, return_counts=True)
        over = uniq[self.fill[uniq] + counts > self.cap]
        if over.size:
            self._compact(over)
        pos = self.fill[rows] + (np.arange(rows.size) - np.repeat(first, counts))
        self.buf[rows, pos] = keys
        self.fill[uniq] += counts

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        keys = np.sort(self.buf, axis=1)[:, : self.k]
        return (keys & 0xFFFFFFFF).astype(np.int64), _key_values(keys)


def _sparse_nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.nonzero for a C-contiguous 2-D bool array with few True entries.

    Scans 8 bytes at a time and only looks inside non-zero words: several times faster
    than np.nonzero, which visits every byte.
    """
    flat = mask.reshape(-1)
    n = flat.size
    n8 = n - n % 8
    words = np.flatnonzero(flat[:n8].view(np.uint64))
    word_i, byte_i = np.nonzero(flat[:n8].reshape(-1, 8)[words])
    idx = words[word_i] * 8 + byte_i
    if n8 < n:
        idx = np.concatenate([idx, n8 + np.flatnonzero(flat[n8:])])
    return np.divmod(idx, mask.shape[1])


def _visit(cands: _Candidates, block: np.ndarray, row0: int, col0: int, transposed: bool) -> None:
    """Offer a block of distances to the candidate lists of its rows (or columns).

    ``block`` holds d[row0 + i, col0 + j]; with ``transposed`` the lists of items
    col0 + j (the block's columns) are updated instead of those of its rows.
    """
    k = cands.k
    view = block.T if transposed else block
    own0, other0 = (col0, row0) if transposed else (row0, col0)
    nown, nother = view.shape
    thr = cands.thr[own0 : own0 + nown]  # a view: updated in place
    fresh = np.flatnonzero(np.isinf(thr))
    if nother > k and fresh.size:
        # First sight of these rows: their k-th smallest in this block bounds the row's.
        kth = np.partition(np.ascontiguousarray(view[fresh]), k - 1, axis=1)[:, k - 1]
        thr[fresh] = np.maximum(kth, 0.0)
    # Entries in refine()'s near-zero range pass whatever their rounded value says.
    sq_own = cands.sq[own0 : own0 + nown]
    sq_other = cands.sq[other0 : other0 + nother]
    limit = np.maximum(thr, np.float32(cands.eps) * (sq_own + sq_other.max()))
    if transposed:
        other, own = _sparse_nonzero(block <= limit[None, :])
        vals = block[other, own]
        order = np.argsort(own, kind="stable")
        own, other, vals = own[order], other[order], vals[order]
    else:
        own, other = _sparse_nonzero(block <= limit[:, None])
        vals = block[own, other]
    vals = cands.refine(vals, own + own0, other + other0)
    keys = _keys(vals, other + other0)
    counts = np.bincount(own, minlength=nown)
    over = np.flatnonzero(counts > 2 * k)
    if over.size:
        # Ties at the threshold let many through: keep each such row's k smallest keys.
        drop = np.isin(own, over)
        cols = np.broadcast_to(np.arange(nother) + other0, (over.size, nother))
        sub = cands.refine(view[over].ravel(), np.repeat(over + own0, nother), cols.ravel())
        sub_keys = _keys(sub.reshape(over.size, nother), cols)
        best = np.partition(sub_keys, k - 1, axis=1)[:, :k]
        own = np.concatenate([own[~drop], np.repeat(over, k)])
        keys = np.concatenate([keys[~drop], best.ravel()])
        order = np.argsort(own, kind="stable")
        own, keys = own[order], keys[order]
    cands.add(own + own0, keys)


def _stream_distances(
    feats: np.ndarray,
    k: int,
    block_size: int,
    device: torch.device,
    pool: Pool,
    out: np.ndarray | None = None,
    num_query: int = 0,
) -> KnnGraph:
    """Exact kNN graph and row maxima; optionally writes d[:q, q:] into ``out``.

    Each pair of blocks (R, C) with R <= C is computed once and offered both to the rows
    of R and (transposed) to the rows of C. Only the matrix products run on ``device``
    (through torch); the element-wise passes run in numpy on ``pool``'s threads (numpy
    releases the GIL), which on small shared machines is much faster than torch's own
    CPU threading.
    """
    n = feats.shape[0]
    sq = np.einsum("ij,ij->i", feats, feats)
    x = torch.from_numpy(feats).to(device)
    t_sq = torch.from_numpy(sq).to(device)
    cands = _Candidates(n, k, feats, sq)
    row_max = np.zeros(n, dtype=np.float32)
    bs = min(block_size, n)
    # One reused buffer: fresh multi-MB allocations page-fault on every block.
    buf = torch.empty(bs * bs, dtype=torch.float32)
    if device.type == "cuda":
        buf = buf.pin_memory()

    def add_col_norms(block: np.ndarray, c0: int, c1: int, a: int, b: int) -> None:
        block[a:b] += sq[None, c0:c1]

    def row_side(block: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> None:
        np.maximum(row_max[r0:r1], block.max(axis=1), out=row_max[r0:r1])
        _visit(cands, block, r0, c0, transposed=False)
        if out is not None and r0 < num_query and c1 > num_query:
            # Query rows against gallery columns; C >= R means the transposed part
            # never holds query rows against gallery columns.
            qr1 = min(r1, num_query)
            gc0 = max(c0, num_query)
            np.maximum(
                block[: qr1 - r0, gc0 - c0 :], 0.0, out=out[r0:qr1, gc0 - num_query : c1 - num_query]
            )

    def col_side(block: np.ndarray, r0: int, c0: int, c1: int) -> None:
        np.maximum(row_max[c0:c1], block.max(axis=0), out=row_max[c0:c1])
        _visit(cands, block, r0, c0, transposed=True)

    starts = list(range(0, n, bs))
    for bi, r0 in enumerate(starts):
        r1 = min(r0 + bs, n)
        xr = x[r0:r1]
        for c0 in starts[bi:]:
            c1 = min(c0 + bs, n)
            t_block = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            # d = |x_r|^2 + |x_c|^2 - 2 x_r . x_c, the same expansion the reference uses.
            if device.type == "cpu":
                torch.addmm(t_sq[r0:r1, None], xr, x[c0:c1].T, alpha=-2.0, out=t_block)
            else:
                t_block.copy_(torch.addmm(t_sq[r0:r1, None], xr, x[c0:c1].T, alpha=-2.0))
            block = t_block.numpy()
            cuts = np.linspace(0, r1 - r0, pool.workers + 1).astype(int)
            pool.run_all([(add_col_norms, (block, c0, c1, a, b)) for a, b in zip(cuts, cuts[1:])])
            if r0 == c0:
                # GEMM rounding differs between (i, j) and (j, i); give both one value.
                block[...] = (block + block.T) * np.float32(0.5)
                np.fill_diagonal(block, 0.0)
                row_side(block, r0, r1, c0, c1)
            else:
                pool.run_all([(row_side, (block, r0, r1, c0, c1)), (col_side, (block, r0, c0, c1))])
    indices, distances = cands.finish()
    return KnnGraph(indices=indices, distances=distances, row_max=row_max.astype(np.float64))


def knn_graph(
    feats: np.ndarray | torch.Tensor,
    k: int,
    *,
    block_size: int = 2048,
    device: str | torch.device | None = None,
) -> KnnGraph:
    """Exact k nearest neighbours (squared L2, ties by lower index) of every row.

    Memory is O(N·k + block_size²); the N × N matrix is never formed. ``k`` larger than
    N is truncated to N. Uses ``device`` (default: CUDA when available) for the
    distance blocks. Raises ValueError on a non-2-D or non-finite input or k < 1.
    """
    x = _as_features("feats", feats)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if x.shape[0] == 0:
        raise ValueError("feats is empty")
    with Pool() as pool:
        return _stream_distances(x, min(k, x.shape[0]), block_size, _resolve_device(device), pool)


def k_reciprocal(
    q_feats: np.ndarray | torch.Tensor,
    g_feats: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    block_size: int = 2048,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Re-ranked query × gallery distances (float32), k-reciprocal encoding.

    Same result as reid-strong-baseline's ``re_ranking(q, g, k1, k2, lambda_value)``
    up to that code's float16 rounding, with memory O(q·g + (q + g)·k1² +
    block_size²) instead of O((q + g)²); see the module docstring for the algorithm
    and the tie rule. ``device`` (default: CUDA when available, else CPU) runs the
    distance matrix products; everything else runs on the CPU with as many threads as
    ``torch.get_num_threads()``.

    Raises ValueError when the features are not 2-D, are empty, non-finite or of
    different dimensions, when k1 < 1 or k2 < 1, lambda_value is outside [0, 1], or
    block_size < 1.
    """
    q = _as_features("q_feats", q_feats)
    g = _as_features("g_feats", g_feats)
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"q_feats and g_feats differ in dimension: {q.shape[1]} vs {g.shape[1]}"
        )
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise ValueError(f"need at least one query and one gallery item, got {q.shape[0]} and {g.shape[0]}")
    for name, v in (("k1", k1), ("k2", k2)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"lambda_value must lie in [0, 1], got {lambda_value}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    dev = _resolve_device(device)

    num_q, num_g = q.shape[0], g.shape[0]
    n = num_q + num_g
    feats = np.concatenate([q, g])
    del q, g
    w1 = min(k1 + 1, n)
    wh = min(int(round(k1 / 2)) + 1, n)  # Python's round is half-to-even, like np.around
    wq = min(k2, n)
    lam = float(lambda_value)

    final = np.empty((num_q, num_g), dtype=np.float32)
    with Pool() as pool:
        _rerank_into(final, feats, num_q, w1, wh, wq, k2, lam, block_size, dev, pool)
    return final


def _rerank_into(
    final: np.ndarray,
    feats: np.ndarray,
    num_q: int,
    w1: int,
    wh: int,
    wq: int,
    k2: int,
    lam: float,
    block_size: int,
    dev: torch.device,
    pool: Pool,
) -> None:
    n = feats.shape[0]
    # Keeping 2·(k1 + 1) neighbours (not k1 + 1) finds most expansion-set distances in
    # the lists; the rest are recomputed from the features.
    width = min(max(2 * w1, wq), n)
    graph = _stream_distances(feats, width, block_size, dev, pool, out=final, num_query=num_q)
    scale = np.where(graph.row_max > 0, graph.row_max, 1.0)
    inv_scale = (1.0 / scale[:num_q, None]).astype(np.float32)
    bounds = np.linspace(0, num_q, pool.workers + 1).astype(int)
    pool.run_all([(_scale_rows, (final, inv_scale, a, b)) for a, b in zip(bounds, bounds[1:])])
    if lam == 1.0:
        return

    # Steps 3-5: expanded k-reciprocal sets and their exp(-O) weights.
    per_chunk = _ELEMENTS_PER_CHUNK
    fwd1 = graph.indices[:, :w1].astype(np.int32)
    fwdh = graph.indices[:, :wh].astype(np.int32)
    rec1 = reciprocal_mask(fwd1, pool, elements_per_chunk=per_chunk)
    rech = reciprocal_mask(fwdh, pool, elements_per_chunk=per_chunk)
    rows, items = expanded_pairs(fwd1, rec1, fwdh, rech, pool, elements_per_chunk=per_chunk)
    dist = pair_distances(feats, rows, items, pool, known=(graph.indices, graph.distances))
    v = weight_rows(rows, items, dist, scale, n)

    # Step 6: local query expansion over the k2 nearest (itself included).
    if k2 != 1:
        v = (expansion_matrix(graph.indices, wq) @ v).tocsr()

    # Steps 7-8: Jaccard distance of query rows to gallery rows, in chunks of rows.
    vq = v[:num_q]
    vg = v[num_q:].tocsc()
    del v

    def run(chunk: tuple[int, int]) -> None:
        r0, r1 = chunk
        s = min_sums(vq.indptr, vq.indices, vq.data, vg, r0, r1)
        # final = lam * O + (1 - lam) * (1 - s / (2 - s)), in place on the chunk.
        np.divide(s, 2.0 - s, out=s)
        np.subtract(1.0, s, out=s)
        s *= 1.0 - lam
        final[r0:r1] *= np.float32(lam)
        final[r0:r1] += s

    pool.map(run, _row_chunks(vq, vg))


def _row_chunks(vq: sp.csr_matrix, vg: sp.csc_matrix) -> list[tuple[int, int]]:
    """Query row ranges of about ``_PAIRS_PER_CHUNK`` (non-zero, non-zero) pairs each,
    and at most ``_DENSE_CHUNK_BYTES`` of dense (rows × gallery) float64 output."""
    num_q, num_g = vq.shape[0], vg.shape[0]
    col_len = np.diff(vg.indptr)
    pairs_per_row = np.bincount(
        np.repeat(np.arange(num_q), np.diff(vq.indptr)),
        weights=col_len[vq.indices],
        minlength=num_q,
    )
    max_rows = max(1, _DENSE_CHUNK_BYTES // (8 * num_g))
    cum = np.concatenate([[0.0], np.cumsum(pairs_per_row)])
    chunks = []
    r0 = 0
    while r0 < num_q:
        r1 = int(np.searchsorted(cum, cum[r0] + _PAIRS_PER_CHUNK, side="right")) - 1
        r1 = min(max(r1, r0 + 1), r0 + max_rows, num_q)
        chunks.append((r0, r1))
        r0 = r1
    return chunks


def _scale_rows(final: np.ndarray, inv_scale: np.ndarray, a: int, b: int) -> None:
    final[a:b] *= inv_scale[a:b]
