"""The search engine: embed a query, k-NN over the gallery, camera filter, re-rank.

It sits on a gallery opened by :mod:`indexer` (FAISS vectors + SQL metadata)
and an :class:`~reid_search.extract.Extractor` whose fingerprint must match
the gallery's. Re-ranking uses :class:`~reid_search.online_rerank.GalleryRerank`,
whose gallery-side structures are built when indexing
(:func:`refresh_rerank_cache`) and cached beside the index, keyed by the
gallery's change counter, so a query never recomputes anything over the
whole gallery.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from reid_search.atomic import atomic_write_bytes
from reid_search.errors import GalleryError
from reid_search.extract import Extractor, extract_features
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class GallerySnapshot:
    """All gallery vectors and labels, in one consistent order (for re-ranking and evaluation)."""

    ids: np.ndarray  # int64
    feats: np.ndarray  # float32 [g, d]
    pids: np.ndarray  # int64, -2 where unknown
    camids: np.ndarray  # int64, -2 where unknown
    generation: int

    @property
    def labelled(self) -> bool:
        """True when every item has a pid and camid."""
        return bool((self.pids != -2).all() and (self.camids != -2).all())


UNKNOWN = -2


class SearchEngine:
    """Queries against one gallery with one extractor.

    Raises:
        GalleryError: the gallery is empty or was indexed with another model.
    """

    def __init__(self, gallery: Any, extractor: Extractor, *, rerank_params: RerankParams = RerankParams(),
                 cache_dir: Path | None = None) -> None:
        if gallery.ntotal == 0:
            raise GalleryError("the gallery is empty: run `reid-search index FOLDER` first")
        if gallery.model_fingerprint != extractor.fingerprint:
            raise GalleryError(
                f"the gallery was indexed with model {gallery.model_fingerprint}, not {extractor.fingerprint}; "
                "query with that model, or re-index with `reid-search index FOLDER --reindex`"
            )
        self.gallery, self.extractor, self.params = gallery, extractor, rerank_params
        self.cache_dir = cache_dir
        self._snapshot: GallerySnapshot | None = None
        self._rerank: GalleryRerank | None = None
        self._transform = build_eval_transform(extractor.preprocess)

    # ------------------------------------------------------------ gallery data

    def snapshot(self) -> GallerySnapshot:
        """All gallery vectors and labels (loaded once per gallery generation)."""
        gen = self.gallery.generation
        if self._snapshot is None or self._snapshot.generation != gen:
            self._snapshot = load_snapshot(self.gallery)
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
               rerank: bool = False) -> list[list[Hit]]:
        """Top-k gallery hits per query feature, dropping the query's own camera when its camid is known."""
        feats = np.atleast_2d(np.asarray(feats, dtype=np.float32))
        cams = list(camids) if camids is not None else [None] * len(feats)
        if len(cams) != len(feats):
            raise ValueError(f"{len(feats)} queries but {len(cams)} camids")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, not {top_k}")
        out = []
        for f, cam in zip(feats, cams):
            ids, dists = self._rerank_one(f, cam, top_k) if rerank else self._knn_one(f, cam, top_k)
            out.append(self._hits(ids, dists))
        return out

    def _knn_one(self, f: np.ndarray, cam: int | None, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.gallery.ntotal
        want = min(n, top_k if cam is None else top_k * 4)
        while True:
            sims, ids = self.gallery.search(f[None], want)
            sims, ids = sims[0], ids[0]
            ok = ids >= 0
            sims, ids = sims[ok], ids[ok]
            if cam is not None:
                keep = self._camids_of(ids) != cam
                sims, ids = sims[keep], ids[keep]
            if len(ids) >= top_k or want >= n:
                break
            want = min(n, want * 4)
        return ids[:top_k], (2.0 - 2.0 * sims[:top_k]).clip(min=0.0)

    def _rerank_one(self, f: np.ndarray, cam: int | None, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        snap, rr = self.snapshot(), self.rerank_structures()
        d = rr.distances(f)
        if cam is not None:
            d = np.where(snap.camids == cam, np.inf, d)
        k = min(top_k, int(np.isfinite(d).sum()))
        top = np.argpartition(d, k - 1)[:k] if 0 < k < len(d) else np.arange(len(d))[:k]
        top = top[np.lexsort((top, d[top]))]
        return snap.ids[top], d[top]

    def _camids_of(self, ids: np.ndarray) -> np.ndarray:
        snap = self._snapshot
        if snap is not None and snap.generation == self.gallery.generation:
            pos = np.searchsorted(snap.ids, ids)
            return snap.camids[pos]
        metas = self.gallery.metadata(ids.tolist())
        return np.array([UNKNOWN if m.camid is None else m.camid for m in metas], dtype=np.int64)

    def _hits(self, ids: np.ndarray, dists: np.ndarray) -> list[Hit]:
        metas = self.gallery.metadata(ids.tolist())
        return [Hit(r + 1, int(i), str(m.path), m.pid, m.camid, float(d))
                for r, (i, m, d) in enumerate(zip(ids, metas, dists))]


def load_snapshot(gallery: Any) -> GallerySnapshot:
    """Read every gallery vector and label, sorted by id."""
    ids, feats = gallery.all_vectors()
    order = np.argsort(ids)
    ids, feats = np.asarray(ids, np.int64)[order], np.asarray(feats, np.float32)[order]
    metas = gallery.metadata(ids.tolist())
    pids = np.array([UNKNOWN if m.pid is None else m.pid for m in metas], dtype=np.int64)
    camids = np.array([UNKNOWN if m.camid is None else m.camid for m in metas], dtype=np.int64)
    return GallerySnapshot(ids, feats, pids, camids, gallery.generation)


def load_or_build_rerank(snap: GallerySnapshot, params: RerankParams, cache_dir: Path | None) -> GalleryRerank:
    """Load the cached structures when they match the gallery generation and params, else build and cache."""
    path = cache_dir / RERANK_CACHE if cache_dir is not None else None
    key = np.array([snap.generation, params.k1, params.k2, params.lambda_value, len(snap.ids)], dtype=np.float64)
    if path is not None and path.is_file():
        try:
            with np.load(path) as z:
                if np.array_equal(z["key"], key) and np.array_equal(z["ids"], snap.ids):
                    log.info("re-ranking structures loaded from %s", path)
                    return GalleryRerank.from_arrays({k: z[k] for k in z.files})
        except (OSError, KeyError, ValueError) as exc:
            log.warning("ignoring unreadable re-ranking cache %s (%s)", path, exc)
    log.info("building re-ranking structures for %d gallery items", len(snap.ids))
    rr = GalleryRerank.build(snap.feats, params)
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, key=key, ids=snap.ids, **rr.to_arrays())
        atomic_write_bytes(path, buf.getvalue())
    return rr


def refresh_rerank_cache(gallery: Any, cache_dir: Path, params: RerankParams = RerankParams()) -> GalleryRerank | None:
    """Rebuild the cached re-ranking structures after the gallery changed (no-op when current or empty)."""
    if gallery.ntotal == 0:
        (cache_dir / RERANK_CACHE).unlink(missing_ok=True)
        return None
    return load_or_build_rerank(load_snapshot(gallery), params, cache_dir)
