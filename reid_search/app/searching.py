"""What the CLI and the service ask of a workspace's gallery: search it, evaluate it, calibrate it.

One implementation for both front ends (``query`` and POST /query, ``eval``, ``calibrate``),
over the engine :func:`reid_search.app.session.open_engine` builds. The functions return
results and raise :class:`~reid_search.errors.ReidSearchError`; printing is the caller's.
Heavy modules are imported inside the functions (the CLI imports this module for ``--help``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from reid_search.app.session import Progress, calibrated_threshold, default_query_dir, no_progress, open_engine
from reid_search.app.workspace import Workspace

if TYPE_CHECKING:
    from reid_search.evaluation import EvalResult
    from reid_search.gallery import SearchFilter


# ---- searching and evaluating ------------------------------------------------------------------------------


@dataclass
class SearchAnswer:
    """What :func:`search_images` found for IMAGES (one person), judged by ``threshold``."""

    images: tuple[Path, ...]
    camids: list[int | None]  # per image: the given camid, else its Market name's
    rerank: bool
    where: SearchFilter
    keep_same_camera: bool
    fuse: str
    top_k: int
    threshold: float | None
    hits: list[Any]
    flags: list[bool | None]  # per hit: distance <= threshold (None uncalibrated)
    decision: str
    query_pid: int | None  # the images' common pid from their names, if any
    group_by: str | None = None
    sightings: list[Any] | None = None

    @property
    def camid(self) -> int | None | list[int]:
        """The query's camera: one image's, else the sorted cameras of all of them."""
        return self.camids[0] if len(self.images) == 1 else sorted({c for c in self.camids if c is not None})

    def to_json(self) -> dict[str, Any]:
        """``reid-search query --json``'s object (``POST /query`` answers the same fields)."""
        out = answer_json([str(p) for p in self.images], self.camids, self.rerank, self.where,
                          self.keep_same_camera, self.threshold, self.decision, self.hits, self.flags, self.fuse)
        if self.sightings is not None:
            out["group_by"] = self.group_by
            out["sightings"] = [s.to_dict() for s in self.sightings]
        return out


def answer_json(names: Sequence[str], camids: Sequence[int | None], rerank: bool, where: SearchFilter,
                keep_same_camera: bool, threshold: float | None, decision: str, hits: Sequence[Any],
                flags: Sequence[bool | None], fuse: str) -> dict[str, Any]:
    """The answer to one query of one or several crops, as ``query --json`` and ``POST /query`` give it."""
    from reid_search.filters import filter_dict

    one = len(names) == 1
    out = {"query": names[0] if one else list(names),
           "camid": camids[0] if one else sorted({c for c in camids if c is not None}),
           "rerank": rerank, "filter": filter_dict(where, keep_same_camera), "threshold": threshold,
           "decision": decision, "hits": [{**h.to_dict(), "match": m} for h, m in zip(hits, flags)]}
    if not one:
        out["fuse"] = fuse
    return out


def search_images(ws: Workspace, images: Sequence[Path], *, top_k: int = 10, rerank: bool = False,
                  camid: int | None = None, where: SearchFilter | None = None, keep_same_camera: bool = False,
                  fuse: str = "mean", threshold: float | None = None, group_by: str | None = None,
                  model: Path | None = None, device: str = "auto", precision: str = "auto",
                  preprocess: Mapping[str, Any] | None = None) -> SearchAnswer:
    """Find the person in ``images`` (one crop, or several of one person fused by ``fuse``) in the gallery.

    ``threshold`` None: the one calibrated for this model and distance kind, if any. With
    ``group_by`` (``camera``, ``track``) ``top_k`` counts sightings, taken from the best
    ``max(20 x top_k, 200)`` hits (at most 1000). ``preprocess``: see :func:`open_extractor`.

    Raises:
        DataError: a missing or unusable image.
        GalleryError: an empty gallery, one of another model, an unreadable thresholds file.
        ModelError: no usable model, or a calibration of another model.
    """
    from reid_search.data import record_for
    from reid_search.errors import DataError
    from reid_search.gallery import SearchFilter
    from reid_search.images import load_image
    from reid_search.multiquery import search_crops
    from reid_search.thresholds import decide

    where = where if where is not None else SearchFilter()
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise DataError(f"no such image: {missing[0]}")
    imgs = [load_image(p) for p in images]
    recs = [record_for(p) for p in images]
    cams = [camid if camid is not None else r.camid for r in recs]
    engine = open_engine(ws, model, device, precision, preprocess)
    try:
        if threshold is None:
            threshold = calibrated_threshold(ws, engine.extractor.fingerprint, rerank)
        want = top_k if group_by is None else min(1000, max(20 * top_k, 200))
        hits = search_crops(engine, engine.embed_images(imgs), cams, fuse, top_k=want, rerank=rerank, where=where,
                            keep_same_camera=keep_same_camera)
    finally:
        engine.store.close()
    flags, decision = decide([h.distance for h in hits], threshold)
    sightings = None
    if group_by is not None:
        from reid_search.sightings import group_hits

        sightings = group_hits(hits, group_by, threshold)[:top_k]
    query_pid = recs[0].pid if len({r.pid for r in recs}) == 1 else None
    return SearchAnswer(tuple(images), cams, rerank, where, keep_same_camera, fuse, top_k, threshold, hits, flags,
                        decision, query_pid, group_by, sightings)


def evaluate_workspace(ws: Workspace, query_dir: Path | None = None, *, rerank: str | None = None,
                       multi_query: str | None = None, model: Path | None = None, device: str = "auto",
                       precision: str = "auto", progress: Progress | None = None,
                       preprocess: Mapping[str, Any] | None = None) -> tuple[Path, EvalResult]:
    """Score a labelled query folder (default: ``query/`` beside the indexed gallery) against the gallery.

    ``rerank``: None, ``"batch"`` or ``"online"`` (see :func:`reid_search.evaluation.evaluate_queries`);
    ``preprocess``: see :func:`open_extractor`. Returns the query folder and the metrics.

    Raises:
        DataError: no query folder.
        GalleryError: an empty gallery or one of another model.
        ModelError: no usable model.
    """
    from reid_search.data import list_images
    from reid_search.evaluation import evaluate_queries

    engine = open_engine(ws, model, device, precision, preprocess)
    try:
        if query_dir is None:
            query_dir = default_query_dir(engine, "pass --query DIR")
        queries = list_images(query_dir, recursive=False)
        with (progress or no_progress)(len(queries), "embed queries") as advance:
            res = evaluate_queries(engine, queries, rerank=rerank, multi_query=multi_query, progress=advance)
    finally:
        engine.store.close()
    return query_dir, res


@dataclass
class CalibrationRun:
    """What :func:`calibrate_workspace` measured (``saved``: the thresholds file, when it saved)."""

    query_dir: Path
    target_fpr: float
    rerank: bool
    fingerprint: str
    stats: Any  # reid_search.calibration's pair statistics
    threshold: float
    tpr: float
    tpr_at_fpr: dict[str, float]
    open_set: Any  # reid_search.calibration's open-set rates
    saved: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """``reid-search calibrate --json``'s object."""
        return {"threshold": self.threshold, "target_fpr": self.target_fpr, "tpr_at_fpr": self.tpr_at_fpr,
                "genuine_pairs": self.stats.num_genuine, "impostor_pairs": self.stats.num_impostor,
                "open_set": self.open_set.to_dict(), "rerank": self.rerank}


def calibrate_workspace(ws: Workspace, query_dir: Path | None, target_fpr: float, *, rerank: bool = False,
                        save: bool = True, model: Path | None = None, device: str = "auto", precision: str = "auto",
                        progress: Progress | None = None, preprocess: Mapping[str, Any] | None = None
                        ) -> CalibrationRun:
    """The distance threshold at ``target_fpr`` on a labelled query folder (default: ``query/`` beside
    the indexed gallery), saved in the workspace for this model and distance kind with ``save``.
    ``preprocess``: see :func:`open_extractor`.

    Raises:
        DataError: no query folder, no images in it, or labels that do not pair with the gallery's.
        GalleryError: an empty gallery, one of another model, an unreadable thresholds file.
        ModelError: no usable model.
    """
    from reid_search.calibration import (
        REPORTED_FPRS,
        collect_pairs,
        open_set_rates,
        threshold_at_fpr,
        tpr_at_fpr,
        tpr_at_threshold,
    )
    from reid_search.data import list_images
    from reid_search.errors import DataError
    from reid_search.evaluation import query_distances
    from reid_search.thresholds import Calibration, save_calibration

    engine = open_engine(ws, model, device, precision, preprocess)
    try:
        if query_dir is None:
            query_dir = default_query_dir(engine, "pass the query folder as an argument")
        if not query_dir.is_dir():
            raise DataError(f"no such query folder: {query_dir}")
        queries = list_images(query_dir, recursive=False)
        if not queries:
            raise DataError(f"no images in {query_dir}: pass a folder of labelled query crops")
        with (progress or no_progress)(len(queries), "embed queries") as advance:
            qd = query_distances(engine, queries, rerank="online" if rerank else None, progress=advance)
    finally:
        engine.store.close()
    try:
        stats = collect_pairs(qd.distmat, qd.q_pids, qd.g_pids, qd.q_camids, qd.g_camids,
                              fprs=(*REPORTED_FPRS, target_fpr))
    except ValueError as exc:
        raise DataError(f"{exc}; are the query folder and the indexed gallery from the same dataset?") from None
    threshold = threshold_at_fpr(stats, target_fpr)
    tpr = tpr_at_threshold(stats, threshold)
    fp = engine.extractor.fingerprint
    run = CalibrationRun(query_dir, target_fpr, rerank, fp, stats, threshold, tpr, tpr_at_fpr(stats, REPORTED_FPRS),
                         open_set_rates(stats, threshold))
    if save:
        cal = Calibration(threshold, target_fpr, fp, rerank, tpr, stats.num_genuine, stats.num_impostor,
                          str(query_dir.resolve()), len(qd.g_pids))
        run.saved = save_calibration(ws.root, cal)
    return run
