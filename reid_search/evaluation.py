"""Evaluate a query folder against the indexed gallery (Market-1501 protocol)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from reid_search.data import ImageRecord
from reid_search.engine import UNKNOWN, SearchEngine
from reid_search.errors import DataError
from reid_search.metrics import evaluate
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

    def to_dict(self) -> dict:
        """The ``--json`` form."""
        return {"rank1": self.rank1, "rank5": self.rank5, "rank10": self.rank10, "mAP": self.mAP,
                "mINP": self.mINP, "num_query": self.num_query, "num_valid_query": self.num_valid_query,
                "num_gallery": self.num_gallery, "rerank": self.rerank is not None, "rerank_mode": self.rerank}


def evaluate_queries(
    engine: SearchEngine,
    queries: Sequence[ImageRecord],
    *,
    rerank: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Embed ``queries``, rank the whole gallery for each and score it.

    ``rerank``: None, ``"batch"`` (Zhong et al.'s form over queries + gallery, the
    published protocol) or ``"online"`` (one query at a time against the cached
    gallery structures, what ``query --rerank`` does).

    Raises:
        DataError: queries or gallery lack Market pid/camid names, or no query has a valid match.
    """
    if rerank is not None and rerank not in RERANK_MODES:
        raise ValueError(f"rerank must be None or one of {RERANK_MODES}, not {rerank!r}")
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
    if rerank == "batch":
        distmat = k_reciprocal(qf, snap.feats)
    elif rerank == "online":
        rr = engine.rerank_structures()
        distmat = np.stack([rr.distances(f) for f in qf]) if len(qf) else np.zeros((0, len(snap.ids)))
    else:
        distmat = np.maximum(2.0 - 2.0 * (qf @ snap.feats.T), 0.0)
    try:
        res = evaluate(distmat, q_pids, snap.pids, q_cams, snap.camids)
    except ValueError as exc:
        raise DataError(f"{exc}; are the query folder and the indexed gallery from the same dataset?") from None
    cmc = res["cmc"]
    at = lambda r: float(cmc[min(r, len(cmc)) - 1])  # noqa: E731
    return EvalResult(at(1), at(5), at(10), float(res["mAP"]), float(res["mINP"]), len(queries),
                      int(res["num_valid"]), len(snap.ids), rerank)
