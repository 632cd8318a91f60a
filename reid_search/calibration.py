"""Calibrated match / no-match decisions: ROC, TPR at a target FPR, the threshold, open-set rates.

Pairs follow the Market-1501 protocol used by :func:`reid_search.metrics.evaluate`:
for each query, gallery items with pid -1 (junk) and items with the query's pid
*and* camera are left out; the rest are **genuine** pairs (same pid) or
**impostor** pairs (another pid, distractors pid 0 included).

Threshold for a target false-positive rate ``f`` over ``N`` impostor pairs: a pair
is a match when ``distance <= threshold``. At most ``m = floor(f * N)`` impostor
pairs may be matches, so the threshold must stay below ``s[m]``, the ``(m+1)``-th
smallest impostor distance (0-based ``s[m]``). It is the **largest observed pair
distance** (genuine or impostor) strictly below ``s[m]``: an operating point of
the empirical ROC. Ties are thereby handled: a genuine pair at exactly ``s[m]`` is
not accepted, since accepting it would accept ``s[m]`` too. When no pair lies below
``s[m]`` the threshold is the largest float64 below it (nothing is accepted).

Open-set identification (each query asked "is this person in the gallery?"):

* detection-and-identification rate (DIR): among queries with a genuine pair,
  the fraction whose top-1 hit (ties: lower gallery index first, as ``evaluate``)
  is genuine and within the threshold;
* false-alarm rate (FAR): with the query's identity removed from the gallery, the
  fraction of queries whose top-1 hit is within the threshold; that top-1 is the
  query's nearest impostor.

Queries are processed ``block_size`` rows at a time; what is kept is every genuine
distance, the smallest ``keep`` impostor distances, two per-query numbers and a
fixed-size histogram, so memory does not grow with queries × gallery.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from reid_search.metrics import protocol_inputs

logger = logging.getLogger(__name__)

__all__ = [
    "REPORTED_FPRS",
    "PairStats",
    "OpenSet",
    "collect_pairs",
    "threshold_at_fpr",
    "tpr_at_threshold",
    "tpr_at_fpr",
    "open_set_rates",
    "roc_curve",
]

REPORTED_FPRS = (1e-4, 1e-3, 1e-2)
HIST_BINS = 2048


@dataclass(frozen=True)
class PairStats:
    """What a query × gallery distance matrix says about genuine and impostor pairs.

    ``genuine``: every genuine distance, sorted. ``impostor_low``: the smallest
    impostor distances, sorted (all of them when ``complete``). ``num_impostor``: how
    many impostor pairs there are. ``hist_edges`` / ``genuine_hist`` / ``impostor_hist``:
    counts per bin ``(edges[i], edges[i+1]]`` over the whole distance range (the first
    bin also holds ``edges[0]``). ``top1_dist``, ``top1_genuine``: each query's first
    hit among the kept gallery items. ``nearest_impostor``: each query's nearest
    impostor distance (inf when it has none). ``has_genuine``: the query has a genuine pair.
    """

    genuine: np.ndarray
    impostor_low: np.ndarray
    num_impostor: int
    complete: bool
    hist_edges: np.ndarray
    genuine_hist: np.ndarray
    impostor_hist: np.ndarray
    top1_dist: np.ndarray
    top1_genuine: np.ndarray
    nearest_impostor: np.ndarray
    has_genuine: np.ndarray

    @property
    def num_genuine(self) -> int:
        """Number of genuine pairs."""
        return int(self.genuine.size)


@dataclass(frozen=True)
class OpenSet:
    """Open-set identification rates at one threshold (fractions in [0, 1])."""

    detection_identification_rate: float
    false_alarm_rate: float
    num_known: int  # queries whose identity is in the gallery (the DIR denominator)
    num_query: int  # the FAR denominator

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"detection_identification_rate": self.detection_identification_rate,
                "false_alarm_rate": self.false_alarm_rate, "num_known": self.num_known,
                "num_query": self.num_query}


def _keep_for(num_impostor: int, fprs: Sequence[float]) -> int:
    """How many of the smallest impostor distances answer every target in ``fprs``."""
    worst = max(fprs) if fprs else 0.0
    return min(num_impostor, int(math.floor(worst * num_impostor)) + 1)


def collect_pairs(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    *,
    fprs: Sequence[float] = REPORTED_FPRS,
    block_size: int = 256,
    bins: int = HIST_BINS,
) -> PairStats:
    """Genuine and impostor pair distances of ``distmat`` (smaller = more similar), block by block.

    Keeps enough of the smallest impostor distances to answer thresholds for every
    false-positive rate in ``fprs`` exactly.

    Raises:
        ValueError: inconsistent shapes, non-integer ids, NaN distances, an FPR outside
            (0, 1), or no genuine or no impostor pair.
    """
    dist, q_pids, g_pids, q_camids, g_camids = protocol_inputs(distmat, q_pids, g_pids, q_camids, g_camids)
    for f in fprs:
        if not 0.0 < f < 1.0:
            raise ValueError(f"false-positive rates must lie in (0, 1), got {f}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    num_q = dist.shape[0]

    valid_cols = np.flatnonzero(g_pids != -1)
    gp, gc = g_pids[valid_cols], g_camids[valid_cols]
    num_impostor = _impostor_count(q_pids, gp)
    pairs = _Pairs(num_q, _hist_edges(dist, bins), _keep_for(num_impostor, fprs))
    for start in range(0, num_q, block_size):
        stop = min(start + block_size, num_q)
        block = np.asarray(dist[start:stop][:, valid_cols], dtype=np.float64)
        same = q_pids[start:stop, None] == gp[None, :]
        excluded = same & (q_camids[start:stop, None] == gc[None, :])
        pairs.add(start, block, gen=same & ~excluded, imp=~same, excluded=excluded)

    genuine = np.sort(np.concatenate(pairs.genuine_parts)) if pairs.genuine_parts else np.zeros(0)
    if genuine.size == 0:
        raise ValueError("no genuine pair: no query's identity appears in the gallery under another camera")
    if num_impostor == 0:
        raise ValueError("no impostor pair: every gallery item has the query's identity")
    low = np.sort(pairs.low)
    logger.debug("pairs: %d genuine, %d impostor (%d smallest kept)", genuine.size, num_impostor, low.size)
    return PairStats(genuine, low, num_impostor, low.size == num_impostor, pairs.edges, pairs.g_hist,
                     pairs.i_hist, pairs.top1_dist, pairs.top1_gen, pairs.nearest_imp, pairs.has_gen)


def _impostor_count(q_pids: np.ndarray, kept_pids: np.ndarray) -> int:
    """Impostor pairs without looking at distances: kept gallery items minus same-pid ones, summed."""
    uniq, counts = np.unique(kept_pids, return_counts=True)
    idx = np.searchsorted(uniq, q_pids)
    found = idx < uniq.size
    found[found] = uniq[idx[found]] == q_pids[found]
    same_pid = np.zeros(q_pids.size, np.int64)
    same_pid[found] = counts[idx[found]]
    return int((kept_pids.size - same_pid).sum())


def _hist_edges(dist: np.ndarray, bins: int) -> np.ndarray:
    """``bins + 1`` edges over the finite range of ``dist``.

    Raises:
        ValueError: ``dist`` holds a NaN.
    """
    finite = np.isfinite(dist) if dist.size else np.zeros(0, bool)
    if dist.size and np.isnan(dist).any():
        raise ValueError("distmat contains NaN")
    lo = float(dist[finite].min()) if finite.any() else 0.0
    hi = float(dist[finite].max()) if finite.any() else 1.0
    if hi <= lo:
        hi = lo + 1.0
    return np.linspace(lo, hi, bins + 1)


class _Pairs:
    """What :func:`collect_pairs` keeps while the blocks of query rows go by."""

    def __init__(self, num_q: int, edges: np.ndarray, keep: int) -> None:
        bins = edges.size - 1
        self.edges, self.keep = edges, keep
        self.g_hist = np.zeros(bins, np.int64)
        self.i_hist = np.zeros(bins, np.int64)
        self.genuine_parts: list[np.ndarray] = []
        self.low = np.zeros(0, np.float64)  # the `keep` smallest impostor distances so far
        self.top1_dist = np.full(num_q, np.inf)
        self.top1_gen = np.zeros(num_q, bool)
        self.nearest_imp = np.full(num_q, np.inf)
        self.has_gen = np.zeros(num_q, bool)

    def _binned(self, v: np.ndarray) -> np.ndarray:
        # Bin i is (edges[i], edges[i+1]]; the first also holds edges[0].
        bins = self.edges.size - 1
        return np.bincount(np.clip(np.searchsorted(self.edges, v, side="left") - 1, 0, bins - 1), minlength=bins)

    def add(self, start: int, block: np.ndarray, *, gen: np.ndarray, imp: np.ndarray, excluded: np.ndarray) -> None:
        """Take query rows ``start..`` (``block``: their distances to the kept gallery items)."""
        stop = start + block.shape[0]
        gvals = block[gen]
        ivals = block[imp]
        self.genuine_parts.append(gvals)
        self.g_hist += self._binned(gvals)
        self.i_hist += self._binned(ivals)
        if self.keep:
            cand = np.concatenate([self.low, ivals])
            if cand.size > self.keep:
                cand = np.partition(cand, self.keep - 1)[: self.keep]
            self.low = cand
        self.has_gen[start:stop] = gen.any(axis=1)
        # argmin picks the lowest index among equal minima: the stable (distance, index) order.
        kept = np.where(excluded, np.inf, block)
        if kept.shape[1]:
            first = np.argmin(kept, axis=1)
            rows = np.arange(stop - start)
            self.top1_dist[start:stop] = kept[rows, first]
            self.top1_gen[start:stop] = gen[rows, first] & np.isfinite(kept[rows, first])
            self.nearest_imp[start:stop] = np.where(imp, block, np.inf).min(axis=1)


def threshold_at_fpr(stats: PairStats, fpr: float) -> float:
    """The largest observed pair distance whose impostor rate is <= ``fpr`` (see the module docstring).

    Raises:
        ValueError: ``fpr`` outside (0, 1), or ``stats`` kept too few impostor
            distances for it (collect with this fpr in ``fprs``).
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"the target false-positive rate must lie in (0, 1), got {fpr}")
    m = int(math.floor(fpr * stats.num_impostor))
    if m >= stats.impostor_low.size:
        raise ValueError(f"fpr {fpr} needs the {m + 1} smallest impostor distances; only "
                         f"{stats.impostor_low.size} were kept (pass it in collect_pairs' fprs)")
    bound = float(stats.impostor_low[m])
    below = [stats.impostor_low[:m], stats.genuine[stats.genuine < bound]]
    cand = [float(a[a < bound].max()) for a in below if (a < bound).any()]
    if cand:
        return max(cand)
    return float(np.nextafter(bound, -np.inf))


def tpr_at_threshold(stats: PairStats, threshold: float) -> float:
    """Fraction of genuine pairs with distance <= ``threshold``."""
    return float(np.searchsorted(stats.genuine, threshold, side="right") / stats.genuine.size)


def fpr_at_threshold(stats: PairStats, threshold: float) -> float:
    """Fraction of impostor pairs with distance <= ``threshold`` (exact while within the kept ones).

    Raises:
        ValueError: the threshold lies beyond the kept impostor distances.
    """
    n = int(np.searchsorted(stats.impostor_low, threshold, side="right"))
    if n == stats.impostor_low.size and not stats.complete:
        raise ValueError("threshold beyond the kept impostor distances; collect with a larger fpr")
    return n / stats.num_impostor


def tpr_at_fpr(stats: PairStats, fprs: Sequence[float] = REPORTED_FPRS) -> dict[str, float]:
    """``{str(fpr): TPR at that fpr's threshold}``, keys as Python prints the floats ("0.001")."""
    return {str(float(f)): tpr_at_threshold(stats, threshold_at_fpr(stats, f)) for f in fprs}


def open_set_rates(stats: PairStats, threshold: float) -> OpenSet:
    """Open-set detection-and-identification and false-alarm rates at ``threshold``."""
    known = stats.has_genuine
    hit = stats.top1_genuine & (stats.top1_dist <= threshold)
    dir_ = float(hit[known].mean()) if known.any() else 0.0
    far = float((stats.nearest_impostor <= threshold).mean()) if stats.nearest_impostor.size else 0.0
    return OpenSet(dir_, far, int(known.sum()), int(stats.nearest_impostor.size))


def roc_curve(stats: PairStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, threshold)`` points, by increasing threshold.

    Exact at every histogram edge and, below the largest kept impostor distance, at
    every genuine distance (where the low-FPR part of the curve lives).
    """
    edges = stats.hist_edges
    tpr_e = np.cumsum(stats.genuine_hist) / stats.genuine.size
    fpr_e = np.cumsum(stats.impostor_hist) / stats.num_impostor
    limit = stats.impostor_low[-1] if stats.impostor_low.size else -np.inf
    g = stats.genuine if stats.complete else stats.genuine[stats.genuine < limit]
    tpr_g = np.searchsorted(stats.genuine, g, side="right") / stats.genuine.size
    fpr_g = np.searchsorted(stats.impostor_low, g, side="right") / stats.num_impostor
    # edges[i+1] closes bin i.
    t = np.concatenate([edges[1:], g])
    order = np.argsort(t, kind="stable")
    return np.concatenate([fpr_e, fpr_g])[order], np.concatenate([tpr_e, tpr_g])[order], t[order]
