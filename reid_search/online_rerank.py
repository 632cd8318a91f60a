"""k-reciprocal re-ranking of one query at a time against a prepared gallery.

The batch form (:func:`reid_search.rerank.k_reciprocal`) builds the
neighbour graph over queries *and* gallery together, so every new query
changes everybody's neighbours and the whole (q + g) graph is recomputed.
A search service gets one query at a time, so this module splits the work:

* :meth:`GalleryRerank.build` (at indexing time) computes, over the gallery
  alone, each item's k-NN list, its k-reciprocal sets R(g, k1) and
  R(g, k1/2) with the 2/3 expansion, the exp(-distance) weight rows ``V``,
  their local query expansion, and an inverted index of the expanded rows.
* :meth:`GalleryRerank.distances` (per query) computes the query's distances
  to the gallery (one matrix-vector product), its own expanded reciprocal set,
  its weight row and query expansion, and the Jaccard distance to every
  gallery item through the inverted index; cost O(g·d + k1²·|column|).

How it differs from the batch form, by construction:

1. The query is not part of the gallery's neighbour lists: gallery rows
   never gain the query (or other queries) as a neighbour, and a gallery
   item counts as a reciprocal neighbour of the query when the query would
   fall inside that item's k1+1 nearest (its distance ≤ the item's current
   (k1+1)-th distance), without re-sorting the item's list.
2. Other queries never influence one another (in the batch form two queries
   of one person reinforce each other through the shared graph).
3. The expansion sets R(c, k1/2) of gallery candidates are the gallery-only
   ones.

Everything else (row normalisation by the largest distance, exp weights,
local query expansion over k2 neighbours, Jaccard 1 - s/(2 - s), and the
λ mix) is the batch formula. The reciprocal sets, the 2/3 rule, the weight rows,
the gallery's query expansion and the Jaccard sums are computed by the batch
form's own functions (:mod:`reid_search._kreciprocal`). ``scripts/bench_search.py`` and BENCHMARKS.md
measure the difference on real data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from reid_search._kreciprocal import (
    expanded_pairs,
    expansion_accepts,
    expansion_matrix,
    min_sums,
    pair_distances,
    reciprocal_mask,
    weight_rows,
)
from reid_search.rerank import knn_graph

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RerankParams:
    """Zhong et al.'s parameters (Market-1501 defaults)."""

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    def __post_init__(self) -> None:
        if self.k1 < 1 or self.k2 < 1:
            raise ValueError(f"k1 and k2 must be >= 1, got k1={self.k1}, k2={self.k2}")
        if not 0.0 <= self.lambda_value <= 1.0:
            raise ValueError(f"lambda_value must lie in [0, 1], got {self.lambda_value}")


class GalleryRerank:
    """Gallery-side k-reciprocal structures; answers one query in milliseconds.

    Build with :meth:`build`; persist with :meth:`to_arrays` /
    :meth:`from_arrays` (plain numpy arrays, so ``np.savez`` stores them).
    """

    def __init__(self, feats: np.ndarray, params: RerankParams, *, knn_idx: np.ndarray, knn_dist: np.ndarray,
                 half_sets: sp.csr_matrix, v: sp.csr_matrix, v_qe_csc: sp.csc_matrix) -> None:
        self.feats = np.ascontiguousarray(feats, dtype=np.float32)
        self.sq = (self.feats.astype(np.float64) ** 2).sum(1)
        self.params = params
        self.knn_idx, self.knn_dist = knn_idx, knn_dist
        self.half_sets, self.v, self.v_qe_csc = half_sets, v, v_qe_csc
        n = self.feats.shape[0]
        self.w1 = min(params.k1 + 1, n + 1)
        self.wq = min(params.k2, n + 1)
        self.half_size = np.diff(half_sets.indptr)

    @property
    def size(self) -> int:
        """Number of gallery items."""
        return self.feats.shape[0]

    @classmethod
    def build(cls, feats: np.ndarray, params: RerankParams = RerankParams(), *, device: str | None = "cpu") -> "GalleryRerank":
        """Compute the gallery-only structures (memory O(g·k1²), never g²).

        Raises:
            ValueError: empty or non-2-D features.
        """
        x = np.ascontiguousarray(feats, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"gallery features must be a non-empty 2-D array, got shape {x.shape}")
        n = x.shape[0]
        w1 = min(params.k1 + 1, n)
        wh = min(int(round(params.k1 / 2)) + 1, n)
        wq = min(params.k2, n)
        graph = knn_graph(x, max(w1, wq), device=device)
        fwd1, fwdh = graph.indices[:, :w1], graph.indices[:, :wh]
        rec1, rech = reciprocal_mask(fwd1), reciprocal_mask(fwdh)
        rows, items = expanded_pairs(fwd1, rec1, fwdh, rech)
        d = pair_distances(x, rows, items)
        scale = np.where(graph.row_max > 0, graph.row_max, 1.0)
        v = weight_rows(rows, items, d, scale, n)
        qe = expansion_matrix(graph.indices, wq)
        v_qe = (qe @ v).tocsc()
        v_qe.sort_indices()
        hr, hc = np.nonzero(rech)
        half_sets = sp.csr_matrix((np.ones(hr.size, bool), graph.indices[:, :wh][hr, hc], np.searchsorted(hr, np.arange(n + 1))),
                                  shape=(n, n))
        log.info("re-ranking structures for %d gallery items: %d weights, %d after query expansion", n, v.nnz, v_qe.nnz)
        # knn_dist[:, w1-1] is the radius a query must fall within to be a reciprocal neighbour.
        return cls(x, params, knn_idx=graph.indices[:, : max(w1, wq)], knn_dist=graph.distances[:, : max(w1, wq)],
                   half_sets=half_sets, v=v.tocsr(), v_qe_csc=v_qe)

    # ------------------------------------------------------------ persistence

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for ``np.savez``."""
        out = {"feats": self.feats, "knn_idx": self.knn_idx, "knn_dist": self.knn_dist,
               "params": np.array([self.params.k1, self.params.k2, self.params.lambda_value])}
        for name, m in (("half", self.half_sets), ("v", self.v), ("vqe", self.v_qe_csc)):
            out[f"{name}_data"], out[f"{name}_indices"], out[f"{name}_indptr"] = m.data, m.indices, m.indptr
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "GalleryRerank":
        """Inverse of :meth:`to_arrays`."""
        n = a["feats"].shape[0]
        p = a["params"]
        params = RerankParams(int(p[0]), int(p[1]), float(p[2]))
        half = sp.csr_matrix((a["half_data"], a["half_indices"], a["half_indptr"]), shape=(n, n))
        v = sp.csr_matrix((a["v_data"], a["v_indices"], a["v_indptr"]), shape=(n, n))
        vqe = sp.csc_matrix((a["vqe_data"], a["vqe_indices"], a["vqe_indptr"]), shape=(n, n))
        return cls(a["feats"], params, knn_idx=a["knn_idx"], knn_dist=a["knn_dist"], half_sets=half, v=v, v_qe_csc=vqe)

    # ------------------------------------------------------------ per query

    def original_distances(self, q: np.ndarray) -> np.ndarray:
        """Squared Euclidean distances of one query to every gallery item."""
        q = np.asarray(q, dtype=np.float32).ravel()
        d = float(q.astype(np.float64) @ q) + self.sq - 2.0 * (self.feats @ q).astype(np.float64)
        return np.maximum(d, 0.0)

    def distances(self, q: np.ndarray) -> np.ndarray:
        """Re-ranked distances of one query feature to every gallery item (float64)."""
        n, p = self.size, self.params
        d = self.original_distances(q)
        row_max = float(d.max()) if d.size else 0.0
        scale = row_max if row_max > 0 else 1.0
        orig = d / scale
        if p.lambda_value == 1.0:
            return orig
        order = np.argsort(d, kind="stable")
        # The query's own first w1 in (gallery ∪ {query}): itself, then w1-1 gallery items.
        top = order[: self.w1 - 1]
        radius = self.knn_dist[top, self.w1 - 1] if self.knn_dist.shape[1] >= self.w1 else np.full(top.size, np.inf)
        recip = top[d[top] <= radius]
        r_set = set(recip.tolist())
        expanded = set(r_set)
        # 2/3 expansion with the candidates' gallery-only half sets; |R(q)| counts the query itself.
        hs = self.half_sets
        for c in recip:
            members = hs.indices[hs.indptr[c]: hs.indptr[c + 1]]
            if members.size == 0:
                continue
            inside = sum(1 for m in members.tolist() if m in r_set)
            if expansion_accepts(inside, members.size):
                expanded.update(members.tolist())
        cols = np.fromiter(sorted(expanded), dtype=np.int64, count=len(expanded))
        w = np.exp(-orig[cols])
        total = w.sum() + 1.0  # + exp(-0): the query's own column
        vq_cols, vq_vals = cols, w / total
        # Local query expansion: the query's row and the rows of its k2-1 nearest gallery items.
        if self.wq > 1:
            nn = order[: self.wq - 1]
            acc = np.zeros(n)
            acc[vq_cols] += vq_vals
            block = self.v[nn]
            np.add.at(acc, block.indices, block.data)
            acc /= self.wq
            vq_cols = np.flatnonzero(acc)
            vq_vals = acc[vq_cols]
        # The query's own column holds 1/total (divided by wq under expansion); no gallery row has it.
        # Jaccard through the inverted index of the expanded gallery rows.
        csc = self.v_qe_csc
        s = min_sums(np.array([0, vq_cols.size]), vq_cols, vq_vals, csc, 0, 1)[0]
        jaccard = 1.0 - s / (2.0 - s)
        return p.lambda_value * orig + (1.0 - p.lambda_value) * jaccard
