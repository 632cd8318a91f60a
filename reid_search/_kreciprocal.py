"""The steps of k-reciprocal re-ranking that the batch and the online form share.

:mod:`reid_search.rerank` (queries and gallery in one neighbour graph) and
:mod:`reid_search.online_rerank` (a gallery-only graph, one query at a time) differ in
which neighbour lists they build, not in what they do with them. The steps written
here, once, are numbered as in :mod:`reid_search.rerank`'s docstring:

* step 3, :func:`reciprocal_mask`: which of a row's first neighbours have the row among
  their own first;
* step 4, :func:`expanded_pairs`: the expanded sets as (row, item) pairs, with the 2/3
  rule in :func:`expansion_accepts`;
* step 5, :func:`pair_distances` and :func:`weight_rows`: the sets' squared distances and
  their ``exp(-O)`` weights, rows normalised to sum 1;
* step 6, :func:`expansion_matrix`: local query expansion as a sparse averaging matrix;
* step 7, :func:`min_sums`: ``sum_c min(V[i, c], V[j, c])`` through an inverted index.

Each takes an optional :class:`Pool`; without one it runs on the calling thread. The
chunk sizes bound the temporaries and never change a result.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ELEMENTS_PER_CHUNK",
    "Pool",
    "expanded_pairs",
    "expansion_accepts",
    "expansion_matrix",
    "min_sums",
    "pair_distances",
    "reciprocal_mask",
    "weight_rows",
]

# Elements of the (rows × k × k [× k]) temporaries of the reciprocal-set steps per chunk.
ELEMENTS_PER_CHUNK = 8_000_000


class Pool:
    """A few threads for numpy work (numpy releases the GIL in its array loops)."""

    def __init__(self) -> None:
        # torch's thread count is the user's knob for CPU parallelism; follow it.
        self.workers = max(1, min(os.cpu_count() or 1, torch.get_num_threads()))
        self._executor = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown()

    def run_all(self, calls: list[tuple[Any, tuple]]) -> list[Any]:
        """Run ``fn(*args)`` for each call concurrently; results in order."""
        if self._executor is None or len(calls) == 1:
            return [fn(*args) for fn, args in calls]
        futures = [self._executor.submit(fn, *args) for fn, args in calls]
        return [f.result() for f in futures]

    def map(self, fn: Any, items: list[Any]) -> list[Any]:
        """``[fn(item) for item in items]``, concurrently; results in order."""
        return self.run_all([(fn, (item,)) for item in items])


def expansion_accepts(overlap: Any, size: Any) -> Any:
    """The 2/3 rule: a candidate's ``R(c, k1/2)`` of ``size`` members, ``overlap`` of them
    in the row's ``R(i, k1)``, joins the row's set when more than 2/3 are inside."""
    return overlap > (2.0 / 3.0) * size


def _map(pool: Pool | None, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    return pool.map(fn, items) if pool is not None else [fn(item) for item in items]


def reciprocal_mask(
    fwd: np.ndarray, pool: Pool | None = None, *, elements_per_chunk: int = ELEMENTS_PER_CHUNK
) -> np.ndarray:
    """``mask[i, j]``: item ``fwd[i, j]`` has ``i`` among its own first ``fwd.shape[1]``.

    ``fwd`` holds every row's first neighbours (row ``i`` of the items ``0..n-1``), so
    ``R(i, k)`` is ``fwd[i][mask[i]]`` for ``fwd`` of width ``k + 1``.
    """
    n, width = fwd.shape
    chunk = max(1, elements_per_chunk // (width * width))
    mask = np.empty((n, width), dtype=bool)

    def run(s: int) -> None:
        e = min(s + chunk, n)
        back = fwd[fwd[s:e]]  # (rows, width, width)
        mask[s:e] = (back == np.arange(s, e)[:, None, None]).any(axis=2)

    _map(pool, run, list(range(0, n, chunk)))
    return mask


def expanded_pairs(
    fwd1: np.ndarray,
    rec1: np.ndarray,
    fwdh: np.ndarray,
    rech: np.ndarray,
    pool: Pool | None = None,
    *,
    elements_per_chunk: int = ELEMENTS_PER_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs of every row's expanded k-reciprocal set, sorted, unique (int64).

    ``fwd1``/``rec1`` are the first ``k1 + 1`` neighbours and their :func:`reciprocal_mask`
    (so ``R(i, k1)``), ``fwdh``/``rech`` the same for ``round(k1 / 2) + 1`` (``R(c, k1/2)``).
    The set of row ``i`` is ``R(i, k1)`` plus every ``R(c, k1/2)`` of a ``c`` in
    ``R(i, k1)`` that has more than 2/3 of its members in ``R(i, k1)``.
    """
    n, w1 = fwd1.shape
    wh = fwdh.shape[1]
    chunk = max(1, elements_per_chunk // (w1 * wh * w1))
    size_h = rech.sum(axis=1)

    def run(s: int) -> tuple[np.ndarray, np.ndarray]:
        e = min(s + chunk, n)
        f1 = fwd1[s:e]  # candidates c = f1[p, j], relevant where r1[p, j]
        r1 = rec1[s:e]
        sets = fwdh[f1]  # (b, w1, wh): elements of R(c, kh) where set_mask
        set_mask = rech[f1]
        # Membership of each element in R(p, k1).
        inside = (sets[:, :, :, None] == f1[:, None, None, :]) & r1[:, None, None, :]
        overlap = (inside.any(axis=3) & set_mask).sum(axis=2)
        accept = r1 & expansion_accepts(overlap, size_h[f1])
        members = np.concatenate(
            [
                np.where(r1, f1, -1),
                np.where(accept[:, :, None] & set_mask, sets, -1).reshape(e - s, -1),
            ],
            axis=1,
        )
        members.sort(axis=1)
        first = np.ones_like(members, dtype=bool)
        first[:, 1:] = members[:, 1:] != members[:, :-1]
        rr, cc = np.nonzero(first & (members >= 0))
        return rr.astype(np.int64) + s, members[rr, cc].astype(np.int64)

    parts = _map(pool, run, list(range(0, n, chunk)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def pair_distances(
    feats: np.ndarray,
    rows: np.ndarray,
    items: np.ndarray,
    pool: Pool | None = None,
    *,
    known: tuple[np.ndarray, np.ndarray] | None = None,
    chunk: int = 1024,
) -> np.ndarray:
    """Squared distances (float64) of ``feats[rows]`` to ``feats[items]``; exactly 0 where equal.

    ``known``, the ``(indices, distances)`` of a k-NN graph over ``feats``, supplies the
    pairs it lists (the distances the ranking used); the others are recomputed as
    ``|x_r - x_i|²`` in float32.
    """
    out = np.empty(rows.size, dtype=np.float64)
    if known is None:
        miss = np.arange(rows.size)
    else:
        indices, distances = known
        n = indices.shape[0]
        known_keys = (np.arange(n)[:, None] * n + indices).ravel()
        order = np.argsort(known_keys)
        known_sorted = known_keys[order]
        want = rows * n + items
        pos = np.minimum(np.searchsorted(known_sorted, want), known_sorted.size - 1)
        found = known_sorted[pos] == want
        out[found] = distances.ravel()[order[pos[found]]]
        miss = np.flatnonzero(~found)
        logger.debug("re-ranking: %d of %d expansion distances recomputed", miss.size, rows.size)

    def run(part: np.ndarray) -> None:
        size = min(chunk, part.size)
        buf_a = np.empty((size, feats.shape[1]), dtype=feats.dtype)
        buf_b = np.empty_like(buf_a)
        for s in range(0, part.size, chunk):
            m = part[s : s + chunk]
            a = np.take(feats, rows[m], axis=0, out=buf_a[: m.size])
            b = np.take(feats, items[m], axis=0, out=buf_b[: m.size])
            np.subtract(a, b, out=a)
            out[m] = np.einsum("ij,ij->i", a, a)

    if miss.size:
        workers = pool.workers if pool is not None else 1
        _map(pool, run, [p for p in np.array_split(miss, workers) if p.size])
    out[rows == items] = 0.0
    return out


def weight_rows(
    rows: np.ndarray, items: np.ndarray, dist: np.ndarray, scale: np.ndarray, n: int
) -> sp.csr_matrix:
    """``V`` (n × n CSR): ``exp(-dist / scale[row])`` at each sorted (row, item), rows summing to 1."""
    weights = np.exp(-dist / scale[rows])
    weights /= np.bincount(rows, weights=weights, minlength=n)[rows]
    return sp.csr_matrix((weights, items, np.searchsorted(rows, np.arange(n + 1))), shape=(n, n))


def expansion_matrix(indices: np.ndarray, wq: int) -> sp.csr_matrix:
    """The n × n matrix averaging each row's first ``wq`` neighbours: ``(E @ V)[i]`` is step 6."""
    n = indices.shape[0]
    return sp.csr_matrix(
        (np.full(n * wq, 1.0 / wq), indices[:, :wq].ravel(), np.arange(0, n * wq + 1, wq)),
        shape=(n, n),
    )


def min_sums(
    q_indptr: np.ndarray,
    q_indices: np.ndarray,
    q_data: np.ndarray,
    g_csc: sp.csc_matrix,
    row0: int,
    row1: int,
) -> np.ndarray:
    """``s[i, j] = sum_c min(Vq[i, c], Vg[j, c])`` for query rows row0..row1-1, every gallery row.

    ``Vq`` is given by its CSR arrays, ``Vg`` as CSC: for each query non-zero the gallery
    non-zeros of the same column are visited (an inverted index), never the whole row.
    """
    num_g = g_csc.shape[0]
    a, b = q_indptr[row0], q_indptr[row1]
    cols = q_indices[a:b]
    vals = q_data[a:b]
    local_row = np.repeat(np.arange(row1 - row0), np.diff(q_indptr[row0 : row1 + 1]))
    starts = g_csc.indptr[cols]
    lens = g_csc.indptr[cols + 1] - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros((row1 - row0, num_g))
    # Position of each (query non-zero, gallery non-zero of the same column) pair.
    pos = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total)
    gal = g_csc.indices[pos]
    mins = np.minimum(np.repeat(vals, lens), g_csc.data[pos])
    flat = np.repeat(local_row * num_g, lens) + gal
    s = np.bincount(flat, weights=mins, minlength=(row1 - row0) * num_g)
    return s.reshape(row1 - row0, num_g)
