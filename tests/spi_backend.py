"""A third vector backend written only against the SPI of :mod:`indexer.protocol`: numpy, one file per version.

:class:`NumpyFactory` keeps each gallery version's vectors and scalar fields in
``<folder>/<store_id>.v<version>.npz``, written atomically at every
:meth:`~indexer.protocol.VectorBackend.flush`, so that separate opens of the
gallery (one per CLI command) see the same vectors, as a pgvector or Qdrant
backend would. It can play either role the SPI names:

- ``holds_vectors=True``: the file is the only copy of the vectors (SQL keeps
  none); the coordinator flushes after every commit.
- ``holds_vectors=False``: a cache of the vectors SQL holds, filled from the
  :class:`~indexer.protocol.VectorSource` (:meth:`NumpyBackend.refill`), saved when
  :meth:`~NumpyBackend.flush_due` says so; what a crash loses is repaired from SQL.

Search is exact cosine over every row its filter passes, the filter evaluated
row by row with :meth:`reid_search.gallery.SearchFilter.allows` (the reference
semantics). Only ``flat`` is built: other index types are refused up front.
Nothing here imports the coordinator, FAISS or Milvus.

:func:`open_store` and :func:`open_cache_store` are the plug-in's entry points
(group ``reid_search.backends``, see :mod:`indexer.protocol`): each takes the
:class:`~indexer.location.StoreLocation` of ``--store numpy:[FOLDER]`` and returns
the factory, its folder the URI, else ``numpy-vectors`` in the gallery's own folder.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from indexer.location import StoreLocation
from indexer.protocol import BackendFactory, RowFields, VectorBackend, VectorSource
from reid_search.errors import GalleryError
from reid_search.gallery import UNKNOWN, SearchFilter

_FILE_RE = re.compile(r"^(?P<store>[^.]+)\.v(?P<version>\d+)\.npz$")


class NumpyBackend(VectorBackend):
    """One gallery version's rows: ids, vectors, camera, time (s since the epoch, NaN: none), track."""

    kind = "numpy"

    def __init__(self, path: Path, dim: int, holds_vectors: bool, source: VectorSource) -> None:
        self.path, self.dim, self.holds_vectors, self._source = path, dim, holds_vectors, source
        self._clear()
        self._dirty = False
        self._last_flush = float("-inf")
        self.flushes = 0
        self._load()

    def _clear(self) -> None:
        self._ids = np.zeros(0, np.int64)
        self._feats = np.zeros((0, self.dim), np.float32)
        self._camids = np.zeros(0, np.int64)
        self._times = np.zeros(0, np.float64)
        self._tracks: list[str | None] = []
        self._stamp: int | None = None

    def _load(self) -> None:
        if not self.path.is_file():
            return
        with np.load(self.path, allow_pickle=False) as z:
            feats = z["feats"]
            if feats.ndim != 2 or feats.shape[1] != self.dim:
                return  # another shape: the coordinator repairs (cache) or reports (only copy) what is missing
            self._ids, self._feats = z["ids"].astype(np.int64), feats.astype(np.float32)
            self._camids, self._times = z["camids"].astype(np.int64), z["times"].astype(np.float64)
            self._tracks = [None if not has else str(t) for t, has in zip(z["tracks"], z["has_track"])]
            self._stamp = int(z["stamp"])

    # ---- VectorBackend

    @property
    def ntotal(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        return self._ids.copy()  # kept sorted

    def add(self, fields: RowFields, feats: np.ndarray) -> None:
        feats = np.asarray(feats, np.float32).reshape(len(fields.ids), self.dim)
        tracks = list(fields.tracks) if fields.tracks else [None] * len(fields.ids)
        self.remove(fields.ids)  # the SPI says insert or overwrite
        ids = np.concatenate([self._ids, fields.ids.astype(np.int64)])
        order = np.argsort(ids, kind="stable")
        self._ids = ids[order]
        self._feats = np.concatenate([self._feats, feats])[order]
        self._camids = np.concatenate([self._camids, fields.camids.astype(np.int64)])[order]
        self._times = np.concatenate([self._times, fields.times.astype(np.float64)])[order]
        all_tracks = self._tracks + tracks
        self._tracks = [all_tracks[j] for j in order.tolist()]
        self._dirty = True

    def remove(self, ids: np.ndarray) -> None:
        keep = ~np.isin(self._ids, np.asarray(ids, np.int64))
        if keep.all():
            return
        self._ids, self._feats, self._camids, self._times = (
            self._ids[keep], self._feats[keep], self._camids[keep], self._times[keep])
        self._tracks = [t for t, k in zip(self._tracks, keep.tolist()) if k]
        self._dirty = True

    def _allowed(self, f: SearchFilter | None) -> np.ndarray:
        if f is None:
            return np.ones(len(self._ids), bool)
        return np.array([f.allows(None if c == UNKNOWN else int(c),
                                  None if np.isnan(t) else datetime.fromtimestamp(float(t), timezone.utc), tr)
                         for c, t, tr in zip(self._camids.tolist(), self._times.tolist(), self._tracks)], bool)

    def search(self, feats: np.ndarray, k: int, filters: Sequence[SearchFilter | None]) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(feats, np.float32)
        sims = np.full((len(x), k), -np.inf, np.float32)
        out = np.full((len(x), k), -1, np.int64)
        scores = x @ self._feats.T if len(self._ids) else np.zeros((len(x), 0), np.float32)
        for q, f in enumerate(filters):
            rows = np.flatnonzero(self._allowed(f))
            s = scores[q, rows]
            top = rows[np.lexsort((self._ids[rows], -s))][:k]  # best first; ties: lower id first
            sims[q, : len(top)], out[q, : len(top)] = scores[q, top], self._ids[top]
        return sims, out

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64).ravel()
        pos = np.searchsorted(self._ids, ids)
        ok = (pos < len(self._ids)) & (self._ids[np.minimum(pos, max(len(self._ids) - 1, 0))] == ids) \
            if len(self._ids) else np.zeros(len(ids), bool)
        if not ok.all():
            bad = ids[~ok]
            raise GalleryError(f"{len(bad)} id(s) not in the gallery (e.g. {bad[:5].tolist()})")
        return self._feats[pos].copy()

    def iter_vectors(self, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in range(0, len(self._ids), batch_size):
            yield self._ids[s : s + batch_size].copy(), self._feats[s : s + batch_size].copy()

    def flush(self, generation: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, ids=self._ids, feats=self._feats, camids=self._camids, times=self._times,
                         tracks=np.array([t or "" for t in self._tracks], dtype=str),
                         has_track=np.array([t is not None for t in self._tracks], bool),
                         stamp=np.int64(generation))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._stamp, self._dirty = int(generation), False
        self._last_flush = time.monotonic()
        self.flushes += 1

    def stamp(self) -> int | None:
        return self._stamp

    def drop(self) -> None:
        self._clear()
        self._dirty = False
        self.path.unlink(missing_ok=True)

    def set_spec(self, spec: Any) -> bool:
        check_flat(spec)
        return False  # exact whatever the search parameters

    def flush_due(self, now: float, interval: float) -> bool:
        return self._dirty and now - self._last_flush >= interval

    def refill(self, reason: str) -> bool:
        if self.holds_vectors:
            return False  # the only copy: nothing to refill from
        for fields, feats in self._source.iter_rows():
            self.add(fields, feats)
        return True

    def describe(self) -> str:
        return "" if self.holds_vectors else "cache of SQL"


def check_flat(spec: Any) -> None:
    """Raises GalleryError for an index type other than ``flat`` (this backend only searches exactly)."""
    if spec.kind != "flat":
        raise GalleryError(f"the numpy store builds only flat indexes, not {spec.kind}")


class NumpyFactory(BackendFactory):
    """Opens a :class:`NumpyBackend` per gallery version from ``folder`` (see the module docstring)."""

    kind = "numpy"

    def __init__(self, folder: str | os.PathLike[str], holds_vectors: bool = True) -> None:
        self.folder = Path(folder)
        self.holds_vectors = holds_vectors
        self.opened: list[NumpyBackend] = []

    def __call__(self, version: int, dim: int, spec: Any, store_id: str | None,
                 source: VectorSource) -> NumpyBackend:
        b = NumpyBackend(self.folder / f"{store_id or 'nostore'}.v{version}.npz", dim, self.holds_vectors, source)
        self.opened.append(b)
        return b

    def check_spec(self, spec: Any) -> None:
        check_flat(spec)

    def files(self) -> list[tuple[Path, str, int]]:
        """``(path, store_id, version)`` of every version file in the folder."""
        if not self.folder.is_dir():
            return []
        out = []
        for p in sorted(self.folder.iterdir()):
            m = _FILE_RE.match(p.name)
            if m is not None and p.is_file():
                out.append((p, m["store"], int(m["version"])))
        return out

    def leftovers(self, workspace_dir: str | os.PathLike[str] | None) -> list[Path]:
        return [p for p, _, _ in self.files() if p.stat().st_size > 0]

    def cleanup(self, keep: set[int]) -> None:
        for p, _, v in self.files():
            if v not in keep:
                p.unlink(missing_ok=True)
        for p in self.folder.glob(".*.tmp") if self.folder.is_dir() else ():
            p.unlink(missing_ok=True)  # an interrupted flush


# ---- the plug-in's entry points ------------------------------------------------------------------------

OPENED: list[StoreLocation] = []  # every location an entry point was called with (a test counts the opens)


def store_folder(location: StoreLocation) -> Path:
    """The folder of a ``numpy:[FOLDER]`` store: FOLDER, else ``numpy-vectors`` in the gallery's own folder."""
    if location.uri:
        return Path(location.uri).expanduser()
    return Path(location.home or ".") / "numpy-vectors"


def open_store(location: StoreLocation) -> NumpyFactory:
    """Entry point ``numpy``: the file is the only copy of the vectors."""
    OPENED.append(location)
    return NumpyFactory(store_folder(location), holds_vectors=True)


def open_cache_store(location: StoreLocation) -> NumpyFactory:
    """Entry point ``numpy-cache``: a cache of the vectors SQL holds."""
    OPENED.append(location)
    return NumpyFactory(store_folder(location), holds_vectors=False)
