"""The search engine: embed a query, filtered k-NN over the gallery store, re-rank.

It sits on a :class:`~reid_search.gallery.GalleryReader` and an
:class:`~reid_search.extract.Extractor` whose fingerprint must match the
gallery's. Each query gets one :class:`~reid_search.gallery.SearchFilter` (the
user's filter plus the query's own camera, unless ``keep_same_camera``) that the
store evaluates inside its search, so ``top_k`` hits come back whenever that
many crops pass, however selective the filter.

Re-ranking uses :class:`~reid_search.online_rerank.GalleryRerank`, whose
gallery-side structures are built when indexing (:func:`refresh_rerank_cache`)
and cached beside the index, keyed by the gallery's change counter, so a query
never recomputes anything over the whole gallery; the same filter is applied to
the re-ranked distances. A cache that cannot be read, whatever the reason, is
ignored and rebuilt.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from reid_search.gallery import UNKNOWN, Filters, GalleryReader, ImageMeta, SearchFilter, per_query_filters
from reid_search.atomic import atomic_write_bytes
from reid_search.errors import GalleryError
from reid_search.extract import Extractor, extract_features
from reid_search.timeutil import epoch_micros, format_time
from reid_search.filters import filter_mask
from reid_search.online_rerank import GalleryRerank, RerankParams
from reid_search.transforms import build_eval_transform

log = logging.getLogger(__name__)

RERANK_CACHE = "rerank.npz"

@dataclass(frozen=True)
class Hit:
    """One gallery match. ``distance`` is squared Euclidean on unit features, or the re-ranked distance."""

    rank: int
    id: int
    path: str
    pid: int | None
    camid: int | None
    distance: float
    time: datetime | None = None  # capture time, UTC
    track: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``time`` as ISO 8601 UTC, e.g. ``2024-05-01T13:45:00Z``)."""
        return {"rank": self.rank, "id": self.id, "path": self.path, "pid": self.pid, "camid": self.camid,
                "distance": self.distance, "time": format_time(self.time), "track": self.track}


@dataclass(frozen=True)
class GallerySnapshot:
    """All gallery vectors and the fields filters read, sorted by id (for re-ranking and evaluation)."""

    ids: np.ndarray  # int64
    feats: np.ndarray  # float32 [g, d]
    pids: np.ndarray  # int64, UNKNOWN where none
    camids: np.ndarray  # int64, UNKNOWN where none
    times: np.ndarray  # int64 epoch microseconds, reid_search.timeutil.NO_TIME where none
    tracks: np.ndarray  # object: str or None
    generation: int
    model_fingerprint: str | None = None

    @property
    def labelled(self) -> bool:
        """True when every item has a pid and camid."""
        return bool((self.pids != UNKNOWN).all() and (self.camids != UNKNOWN).all())

    def mask(self, where: SearchFilter | None) -> np.ndarray:
        """Which items ``where`` lets through."""
        return filter_mask(where, self.camids, self.times, self.tracks)


def query_filter(where: SearchFilter | None, camid: int | None, keep_same_camera: bool = False) -> SearchFilter | None:
    """The filter one query searches with: ``where`` and, unless ``keep_same_camera``, not the query's
    own camera (when known). ``None`` when it lets everything through."""
    f = where if where is not None else SearchFilter()
    if not keep_same_camera and camid is not None:
        f = f.excluding_camera(camid)
    return None if f.is_empty else f


class SearchEngine:
    """Queries against one gallery store with one extractor.

    Raises:
        GalleryError: the gallery is empty or was indexed with another model.
    """

    def __init__(self, store: GalleryReader, extractor: Extractor, *, rerank_params: RerankParams = RerankParams(),
                 cache_dir: Path | None = None) -> None:
        if store.ntotal == 0:
            raise GalleryError("the gallery is empty: run `reid-search index FOLDER` first")
        if store.model_fingerprint != extractor.fingerprint:
            raise GalleryError(
                f"the gallery was indexed with model {store.model_fingerprint}, not {extractor.fingerprint}; "
                "query with that model, or re-index with `reid-search index FOLDER --reindex`"
            )
        self.store, self.extractor, self.params = store, extractor, rerank_params
        self.cache_dir = cache_dir
        self._snapshot: GallerySnapshot | None = None
        self._rerank: GalleryRerank | None = None
        self._transform = build_eval_transform(extractor.preprocess)

    @property
    def gallery(self) -> GalleryReader:
        """The store searched (old name)."""
        return self.store

    # ------------------------------------------------------------ gallery data

    def snapshot(self) -> GallerySnapshot:
        """All gallery vectors and fields (loaded once per gallery generation)."""
        gen = self.store.generation
        if self._snapshot is None or self._snapshot.generation != gen:
            self._snapshot = load_snapshot(self.store)
            self._rerank = None
        return self._snapshot

    def rerank_structures(self) -> GalleryRerank:
        """The gallery's re-ranking structures: from the cache when current, else built (and cached)."""
        snap = self.snapshot()
        if self._rerank is None:
            self._rerank = load_or_build_rerank(snap, self.params, self.cache_dir)
        return self._rerank

    # ------------------------------------------------------------ embedding

    def embed_paths(self, paths: Sequence[str | os.PathLike[str]], progress: Callable[[int], None] | None = None
                    ) -> tuple[np.ndarray, list[int], list[tuple[int, str, str]]]:
        """Features of image files (see :func:`reid_search.extract.extract_features`)."""
        return extract_features(paths, self.extractor, progress=progress)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Features of decoded RGB images, as one batch."""
        if not images:
            return np.zeros((0, self.extractor.dim), np.float32)
        return self.extractor.embed(torch.stack([self._transform(im) for im in images]))

    # ------------------------------------------------------------ search

    def search(self, feats: np.ndarray, *, top_k: int = 10, camids: Sequence[int | None] | None = None,
               rerank: bool = False, where: Filters = None, keep_same_camera: bool = False) -> list[list[Hit]]:
        """Top-k gallery hits per query feature that pass the query's filter.

        The filter of query ``i`` is ``where`` (or ``where[i]``) and, unless
        ``keep_same_camera``, not the query's own camera ``camids[i]`` (when known).
        Fewer than ``top_k`` hits only when fewer crops pass (exact indexes).

        Raises:
            ValueError: ``top_k`` < 1, or ``camids``/``where`` of another length than ``feats``.
        """
        feats = np.atleast_2d(np.asarray(feats, dtype=np.float32))
        n = len(feats)
        cams = list(camids) if camids is not None else [None] * n
        if len(cams) != n:
            raise ValueError(f"{n} queries but {len(cams)} camids")
        wheres = per_query_filters(where, n)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, not {top_k}")
        filters = [query_filter(w, c, keep_same_camera) for w, c in zip(wheres, cams)]
        if rerank:
            return [self._hits(*self._rerank_one(f, flt, top_k)) for f, flt in zip(feats, filters)]
        if n == 0:
            return []
        sims, ids = self.store.search(feats, top_k, filters)
        out = []
        for s, i in zip(sims, ids):
            ok = i >= 0
            out.append(self._hits(i[ok], np.maximum(2.0 - 2.0 * s[ok].astype(np.float64), 0.0)))
        return out

    def _rerank_one(self, f: np.ndarray, where: SearchFilter | None, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        snap, rr = self.snapshot(), self.rerank_structures()
        d = np.where(snap.mask(where), rr.distances(f), np.inf)
        k = min(top_k, int(np.isfinite(d).sum()))
        top = np.argpartition(d, k - 1)[:k] if 0 < k < len(d) else np.flatnonzero(np.isfinite(d))[:k]
        top = top[np.lexsort((top, d[top]))]  # ties: lower id first (rows are in id order)
        return snap.ids[top], d[top]

    def _metadata(self, ids: np.ndarray) -> list[ImageMeta | None]:
        try:
            return list(self.store.metadata(ids))
        except GalleryError:
            # Removed by another process between the search and this read: leave it out.
            out: list[ImageMeta | None] = []
            for i in ids.tolist():
                try:
                    out.append(self.store.metadata([i])[0])
                except GalleryError:
                    out.append(None)
            return out

    def _hits(self, ids: np.ndarray, dists: np.ndarray) -> list[Hit]:
        metas = self._metadata(np.asarray(ids, np.int64))
        kept = [(int(i), m, float(d)) for i, m, d in zip(ids, metas, dists) if m is not None]
        return [Hit(r + 1, i, str(m.path), m.pid, m.camid, d, m.time, m.track) for r, (i, m, d) in enumerate(kept)]


def load_snapshot(store: GalleryReader) -> GallerySnapshot:
    """Read every gallery vector and the fields filters need, sorted by id (streamed from the store)."""
    gen, fingerprint = store.generation, store.model_fingerprint
    id_parts, feat_parts = [], []
    for ids, feats in store.iter_vectors():
        id_parts.append(np.asarray(ids, np.int64))
        feat_parts.append(np.asarray(feats, np.float32))
    dim = store.dim or 0
    ids = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int64)
    feats = np.concatenate(feat_parts) if feat_parts else np.zeros((0, dim), np.float32)
    order = np.argsort(ids, kind="stable")
    ids, feats = ids[order], feats[order]
    metas = [m for batch in store.iter_metadata() for m in batch]
    if len(metas) != len(ids) or any(m.id != i for m, i in zip(metas, ids.tolist())):
        metas = list(store.metadata(ids))  # another process changed the gallery between the two reads
    pids = np.array([UNKNOWN if m.pid is None else m.pid for m in metas], dtype=np.int64)
    camids = np.array([UNKNOWN if m.camid is None else m.camid for m in metas], dtype=np.int64)
    times = epoch_micros([m.time for m in metas])
    tracks = np.empty(len(metas), dtype=object)
    tracks[:] = [m.track for m in metas]
    return GallerySnapshot(ids, feats, pids, camids, times, tracks, gen, fingerprint)


def _cache_key(snap: GallerySnapshot, params: RerankParams) -> np.ndarray:
    return np.array([snap.generation, params.k1, params.k2, params.lambda_value, len(snap.ids)], dtype=np.float64)


def _read_cache(path: Path, snap: GallerySnapshot, params: RerankParams) -> GalleryRerank | None:
    """The cached structures when ``path`` holds ones for this gallery state and params, else ``None``.

    Whatever is wrong with the file (truncated, not a zip, another type, arrays
    missing or malformed) it is ignored: the caller rebuilds it.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            if not (np.array_equal(z["key"], _cache_key(snap, params)) and np.array_equal(z["ids"], snap.ids)
                    and str(z["model"]) == str(snap.model_fingerprint)):
                log.info("re-ranking cache %s is stale; rebuilding it", path)
                return None
            rr = GalleryRerank.from_arrays({k: z[k] for k in z.files})
        if rr.size != len(snap.ids):
            raise ValueError(f"{rr.size} items cached, {len(snap.ids)} in the gallery")
        log.info("re-ranking structures loaded from %s", path)
        return rr
    except Exception as exc:  # noqa: BLE001 - a cache is never worth a failed query
        log.warning("ignoring unreadable re-ranking cache %s (%s: %s); rebuilding it", path, type(exc).__name__, exc)
        return None


def load_or_build_rerank(snap: GallerySnapshot, params: RerankParams, cache_dir: Path | None) -> GalleryRerank:
    """Load the cached structures when they match the gallery state and params, else build and cache them.

    The cache is best effort: an unreadable one is rebuilt, one that cannot be
    written (e.g. a read-only workspace) is logged and skipped.
    """
    path = cache_dir / RERANK_CACHE if cache_dir is not None else None
    if path is not None and path.is_file():
        rr = _read_cache(path, snap, params)
        if rr is not None:
            return rr
    log.info("building re-ranking structures for %d gallery items", len(snap.ids))
    rr = GalleryRerank.build(snap.feats, params)
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, key=_cache_key(snap, params), ids=snap.ids, model=np.array(str(snap.model_fingerprint)),
                 **rr.to_arrays())
        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError as exc:
            log.warning("cannot write the re-ranking cache %s (%s); queries will rebuild it", path, exc)
    return rr


def refresh_rerank_cache(store: GalleryReader, cache_dir: Path, params: RerankParams = RerankParams()
                         ) -> GalleryRerank | None:
    """Rebuild the cached re-ranking structures after the gallery changed (no-op when current; removed when empty)."""
    if store.ntotal == 0:
        (cache_dir / RERANK_CACHE).unlink(missing_ok=True)
        return None
    return load_or_build_rerank(load_snapshot(store), params, cache_dir)
