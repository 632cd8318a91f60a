"""Evaluate a query folder against the indexed gallery (Market-1501 protocol)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from reid_search.data import ImageRecord
from reid_search.engine import UNKNOWN, SearchEngine
from reid_search.errors import DataError
from reid_search.calibration import collect_pairs, tpr_at_fpr
from reid_search.metrics import evaluate
from reid_search.multiquery import FUSE_MODES, fuse_distances, fuse_features, group_queries
from reid_search.rerank import k_reciprocal

log = logging.getLogger(__name__)

RERANK_MODES = ("batch", "online")


@dataclass(frozen=True)
class EvalResult:
    """CMC/mAP/mINP and what they were computed on. Fractions in [0, 1]."""

    rank1: float
    rank5: float
    rank10: float
    mAP: float
    mINP: float
    num_query: int
    num_valid_query: int
    num_gallery: int
    rerank: str | None  # None, "batch" or "online"
    tpr_at_fpr: dict[str, float] = field(default_factory=dict)  # {"0.0001": TPR, "0.001": ..., "0.01": ...}
    multi_query: str | None = None  # None, or the fusion of each (pid, camid) group: "mean" / "max"

    def to_dict(self) -> dict:
        """The ``--json`` form."""
        return {"rank1": self.rank1, "rank5": self.rank5, "rank10": self.rank10, "mAP": self.mAP,
                "mINP": self.mINP, "num_query": self.num_query, "num_valid_query": self.num_valid_query,
                "num_gallery": self.num_gallery, "rerank": self.rerank is not None, "rerank_mode": self.rerank,
                "tpr_at_fpr": self.tpr_at_fpr, "multi_query": self.multi_query}


@dataclass(frozen=True)
class QueryDistances:
    """A query × gallery distance matrix with the labels the Market protocol needs.

    With multi-query grouping each row is one (pid, camid) group of query images.
    """

    distmat: np.ndarray
    q_pids: np.ndarray
    q_camids: np.ndarray
    g_pids: np.ndarray
    g_camids: np.ndarray


def query_distances(
    engine: SearchEngine,
    queries: Sequence[ImageRecord],
    *,
    rerank: str | None = None,
    multi_query: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> QueryDistances:
    """Embed labelled ``queries`` and compute their distances to the whole gallery.

    ``rerank``: None, ``"batch"`` or ``"online"`` (see :func:`evaluate_queries`).
    ``multi_query``: None (one row per image), or ``"mean"`` / ``"max"`` to score
    each (pid, camid) group of queries as one query, fusing its crops
    (:mod:`reid_search.multiquery`).

    Raises:
        DataError: queries or gallery lack Market pid/camid names.
    """
    if rerank is not None and rerank not in RERANK_MODES:
        raise ValueError(f"rerank must be None or one of {RERANK_MODES}, not {rerank!r}")
    if multi_query is not None and multi_query not in FUSE_MODES:
        raise ValueError(f"multi_query must be None or one of {FUSE_MODES}, not {multi_query!r}")
    unlabelled = [r.path.name for r in queries if r.pid is None or r.camid is None]
    if unlabelled:
        raise DataError(f"evaluation needs Market-style names with pid and camid (e.g. 0002_c1s1_000451_03.jpg); "
                        f"{len(unlabelled)} query files lack them (first: {unlabelled[0]})")
    snap = engine.snapshot()
    if not snap.labelled:
        n = int(((snap.pids == UNKNOWN) | (snap.camids == UNKNOWN)).sum())
        raise DataError(f"evaluation needs a labelled gallery; {n} indexed images have no pid/camid in their names")
    qf, kept, failures = engine.embed_paths([r.path for r in queries], progress=progress)
    for _, _, detail in failures:
        log.warning("query skipped: %s", detail)
    q = [queries[i] for i in kept]
    q_pids = np.array([r.pid for r in q], dtype=np.int64)
    q_cams = np.array([r.camid for r in q], dtype=np.int64)
    groups: list[np.ndarray] = []
    if multi_query is not None:
        groups, q_pids, q_cams = group_queries(q_pids, q_cams)
        if multi_query == "mean":
            qf = (np.stack([fuse_features(qf[g]) for g in groups]) if groups
                  else np.zeros((0, qf.shape[1]), np.float32))
    if rerank == "batch":
        distmat = k_reciprocal(qf, snap.feats)
    elif rerank == "online":
        rr = engine.rerank_structures()
        distmat = np.stack([rr.distances(f) for f in qf]) if len(qf) else np.zeros((0, len(snap.ids)))
    else:
        distmat = np.maximum(2.0 - 2.0 * (qf @ snap.feats.T), 0.0)
    if multi_query == "max":
        distmat = (np.stack([fuse_distances(distmat[g]) for g in groups]) if groups
                   else np.zeros((0, len(snap.ids)), distmat.dtype))
    return QueryDistances(distmat, q_pids, q_cams, snap.pids, snap.camids)


def evaluate_queries(
    engine: SearchEngine,
    queries: Sequence[ImageRecord],
    *,
    rerank: str | None = None,
    multi_query: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Embed ``queries``, rank the whole gallery for each and score it.

    ``rerank``: None, ``"batch"`` (Zhong et al.'s form over queries + gallery, the
    published protocol) or ``"online"`` (one query at a time against the cached
    gallery structures, what ``query --rerank`` does). ``multi_query``: see
    :func:`query_distances`. Also reports TPR at FPR 1e-4, 1e-3 and 1e-2 over the
    genuine and impostor pairs (:mod:`reid_search.calibration`).

    Raises:
        DataError: queries or gallery lack Market pid/camid names, or no query has a valid match.
    """
    qd = query_distances(engine, queries, rerank=rerank, multi_query=multi_query, progress=progress)
    try:
        res = evaluate(qd.distmat, qd.q_pids, qd.g_pids, qd.q_camids, qd.g_camids)
    except ValueError as exc:
        raise DataError(f"{exc}; are the query folder and the indexed gallery from the same dataset?") from None
    try:
        tpr = tpr_at_fpr(collect_pairs(qd.distmat, qd.q_pids, qd.g_pids, qd.q_camids, qd.g_camids))
    except ValueError as exc:  # e.g. a one-identity gallery has no impostor pair
        log.warning("no TPR at FPR: %s", exc)
        tpr = {}
    cmc = res["cmc"]
    at = lambda r: float(cmc[min(r, len(cmc)) - 1])  # noqa: E731
    return EvalResult(at(1), at(5), at(10), float(res["mAP"]), float(res["mINP"]),
                      len(queries) if multi_query is None else len(qd.q_pids),
                      int(res["num_valid"]), len(qd.g_pids), rerank, tpr, multi_query)
