"""Coordination of a gallery store: locking, generation, repair on open, refresh, atomic re-index.

:class:`Gallery` implements :class:`~reid_search.gallery.GalleryWriter` on two
parts it drives: the SQL metadata (:class:`~indexer.metadata.MetadataDB`, the
record of what is indexed) and the vector backends (:class:`~indexer.protocol.VectorBackend`)
that a :class:`~indexer.protocol.BackendFactory` opens (FAISS, Milvus; any
implementation of that SPI plugs in). What differs between backends is asked
of the factory and the backend, never probed for; only :meth:`Gallery.describe`
names one, the default (FAISS), to leave it out of the line.

Consistency rules:

- Every change commits in one SQL transaction that also bumps
  ``gallery_state.generation``; only then is the backend brought along.
  What a command reports as indexed is committed.
- A backend that is a cache (``holds_vectors = False``, FAISS) may lag the DB
  after a crash: opening or refreshing compares its ids with the DB's and
  repairs it from the DB's vectors. A backend that holds the only copy of the
  vectors (``holds_vectors = True``) gets no vectors stored in SQL; its repair
  drops SQL rows that have no vector and vectors that have no row.
- A backend stamped with a later generation than the DB's, or (FAISS) made
  against another DB, is refilled from the DB.
- One writer at a time: writes hold an exclusive lock on ``<index_dir>/.lock``
  (:mod:`indexer.locking`).
  Readers take no lock; :meth:`Gallery.refresh` loads every row other
  processes committed (their vectors included) and drops what they removed.
- A re-index (:meth:`Gallery.replacing`) fills a new gallery version beside the
  active one and switches to it in one transaction; until then readers see the
  old one. An exception or a kill leaves the old one whole; the next open
  deletes what the aborted build left.

This module imports no backend: each factory loads its own (faiss, pymilvus).
It is longer than the project's ~500 lines on purpose: it is one class with one
job, and its rules (what commits first, what a repair trusts, what a switch
keeps) are checked most easily read together. What was not that job lives
beside it: the writer lock (:mod:`indexer.locking`), the SQL source of a cache
backend (:class:`indexer.metadata.SqlSource`), FAISS files and their save policy
(:mod:`indexer.faiss.backend`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy.exc import OperationalError

from indexer.locking import BUILD_LOCK_FILE, LOCK_FILE, WriterLock
from indexer.metadata import MetadataDB, SqlSource, State, VersionMoved, model_mismatch
from indexer.paths import abs_path
from indexer.protocol import BackendFactory, VectorBackend
from indexer.spec import IndexSpec
from reid_search.errors import GalleryError
from reid_search.gallery import ChangeEvent, Filters, ImageMeta, NewImage, RemoveFilter, SearchFilter, per_query_filters

log = logging.getLogger(__name__)


class Gallery:
    """A gallery store (see the module docstring); open one with :func:`indexer.store.open_gallery`.

    Reading: :meth:`search`, :meth:`count`, :meth:`metadata`, :meth:`iter_metadata`,
    :meth:`vectors`, :meth:`iter_vectors`, :meth:`all_vectors`, :meth:`labels`.
    Writing: :meth:`add_images`, :meth:`remove_ids`, :meth:`remove_where`,
    :meth:`remove`, :meth:`prune`, :meth:`replacing`, :meth:`set_spec`, :meth:`clear`.
    Folders are indexed by :func:`indexer.pipeline.index_folder`.

    ``index_dir`` holds the writer locks (and, for FAISS, the factory's index files).
    """

    def __init__(self, meta: MetadataDB, index_dir: Path, *, backend_factory: BackendFactory,
                 save_interval: float = 30.0, building: int | None = None, lock: WriterLock | None = None) -> None:
        self.meta = meta
        self.index_dir = Path(index_dir)
        self.save_interval = save_interval
        self._factory = backend_factory
        self._lock = lock or WriterLock(self.index_dir / LOCK_FILE)
        self._building = building is not None
        self.replaced_count = 0  # see GalleryWriter.replaced_count
        self._version = building if building is not None else 0
        self._listeners: dict[str, Callable[[ChangeEvent], None]] = {}
        self._backend: VectorBackend | None = None
        self._backend_key: tuple[int, int] | None = None  # (version, dim) of _backend
        self._state = State()
        self._generation = 0
        if not meta.read_only and not self._building:
            try:
                meta.ensure_state()
            except OperationalError as exc:  # a DB file we may not write
                log.warning("cannot write the metadata DB (%s); opening it read-only", str(exc).splitlines()[0])
        self._sync(repair=not self._building)

    # ---- state --------------------------------------------------------------

    @property
    def engine(self) -> Any:
        """The SQLAlchemy engine of the metadata DB."""
        return self.meta.engine

    @property
    def kind(self) -> str:
        """The vector backend, e.g. ``faiss``."""
        return self._backend.kind if self._backend is not None else self._factory.kind

    @property
    def ntotal(self) -> int:
        """Crops (= vectors) in the gallery."""
        return self._read(lambda: self._backend.ntotal if self._backend is not None else 0)

    @property
    def dim(self) -> int | None:
        """Feature dimension, ``None`` until the first crop is added."""
        return self._state.model_of(self._version)[1]

    @property
    def model_fingerprint(self) -> str | None:
        """Fingerprint of the model every vector was embedded with (``None`` when empty)."""
        return self._state.model_of(self._version)[0]

    @property
    def generation(self) -> int:
        """Change counter of the state this object reflects; grows with every committed change."""
        return self._generation

    @property
    def version(self) -> int:
        """The gallery version this object reads and writes."""
        return self._version

    @property
    def spec(self) -> IndexSpec:
        """The index type and parameters."""
        return self._state.spec

    @property
    def backend(self) -> VectorBackend | None:
        """The vector backend (``None`` while the gallery has no dimension)."""
        return self._backend

    @property
    def search_device(self) -> str:
        """Where searches run, e.g. ``CPU (2 threads)``."""
        return self._backend.device() if self._backend is not None else "CPU"

    def describe(self) -> str:
        """One line: size, index, model."""
        note = self._backend.describe() if self._backend is not None else ""
        trained = f" ({note})" if note else ""
        kind = "" if self.kind == "faiss" else f" in {self.kind}"  # the default store goes unnamed
        return (f"{self.ntotal} images, {self.spec.describe()} index{trained}{kind}, dim {self.dim or '-'}, "
                f"model {self.model_fingerprint or 'none yet'}")

    def roots(self) -> list[Path]:
        """The registered gallery folders."""
        return self.meta.roots()

    def db_generation(self) -> int:
        """The generation in the DB now (another process may have moved it on)."""
        return self.meta.generation()

    def refresh(self) -> bool:
        """Load every change other processes committed; True if there were any."""
        if self._building:
            return False
        st = self.meta.state()
        if st.generation == self._generation and st.active == self._version:
            return False
        self._sync(repair=False)
        return True

    def check_model(self, fingerprint: str, dim: int) -> None:
        """Refuse a model that is not the one the gallery was indexed with.

        Raises:
            GalleryError: the gallery holds vectors of another model or dimension.
        """
        fp, have = self._state.model_of(self._version)
        if fp is None or self.ntotal == 0:
            return
        if fingerprint != fp or (have is not None and dim != have):
            raise model_mismatch(fp, have, fingerprint, dim)

    # ---- listeners ------------------------------------------------------------

    def on_change(self, name: str, callback: Callable[[ChangeEvent], None]) -> None:
        """Call ``callback(event)`` after every committed change made through this object
        (replacing any callback registered under ``name``). Exceptions are logged, not raised.
        """
        self._listeners[name] = callback

    def remove_listener(self, name: str) -> None:
        """Forget the callback registered under ``name`` (no error if there is none)."""
        self._listeners.pop(name, None)

    def _emit(self, added: np.ndarray, removed: np.ndarray) -> None:
        ev = ChangeEvent(np.asarray(added, np.int64), np.asarray(removed, np.int64), self._generation)
        for name, cb in list(self._listeners.items()):
            try:
                cb(ev)
            except Exception:
                log.exception("gallery change listener %r failed; whatever it maintains is now stale", name)

    # ---- reading ----------------------------------------------------------------

    def search(self, feats: np.ndarray, k: int, filters: Filters = None) -> tuple[np.ndarray, np.ndarray]:
        """k best gallery crops per query feature (L2-normalised rows) among those its filter passes.

        ``filters``: one :class:`SearchFilter` for all queries, one per query, or ``None``.
        Returns ``(sims, ids)``, both ``[q, k]``, best first: cosine similarities
        (float32; squared Euclidean distance = 2 - 2·sim) and ids (int64); padding is
        id -1 and similarity -inf. On ``flat`` the result is exact, filter included.

        Raises:
            GalleryError: features of another dimension than the gallery's.
        """
        feats = np.asarray(feats, np.float32)
        if feats.ndim == 1:
            feats = feats[None, :]
        flist = per_query_filters(filters, len(feats))
        if k < 1:
            raise ValueError("k must be ≥ 1")
        if self._backend is None:
            return np.full((len(feats), k), -np.inf, np.float32), np.full((len(feats), k), -1, np.int64)
        if self.dim is not None and feats.shape[1] != self.dim:
            raise GalleryError(f"features of shape {tuple(feats.shape)} do not fit this {self.dim}-d gallery; "
                               "use the model the gallery was indexed with")
        return self._read(lambda: self._backend.search(feats, k, flist) if self._backend is not None
                          else (np.full((len(feats), k), -np.inf, np.float32), np.full((len(feats), k), -1, np.int64)))

    def count(self, where: SearchFilter | RemoveFilter | None = None) -> int:
        """Crops that pass ``where`` (all of them for ``None``), from the DB."""
        return self.meta.count(self._version, where)

    def ids(self) -> np.ndarray:
        """All crop ids, sorted (from the DB)."""
        return self.meta.ids(self._version)

    def metadata(self, ids: Iterable[int] | np.ndarray) -> list[ImageMeta]:
        """Metadata of ``ids``, in the same order.

        Raises:
            GalleryError: an id that is not in the gallery (e.g. -1 padding, or removed meanwhile).
        """
        return self.meta.metadata(ids, self._version)

    def iter_metadata(self, batch_size: int = 10_000) -> Iterator[list[ImageMeta]]:
        """Every crop's metadata in id order, ``batch_size`` at a time."""
        return self.meta.iter_metadata(self._version, batch_size)

    def labels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, pids, camids)`` of every crop in id order (int64; -2 where unknown)."""
        return self.meta.labels(self._version)

    def vectors(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """The exact stored features of ``ids`` (``[n, dim]`` float32, in the given order).

        Raises:
            GalleryError: an id that is not in the gallery.
        """
        wanted = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).ravel()

        def read() -> np.ndarray:
            if self._backend is None:
                if len(wanted):
                    raise GalleryError(f"{len(wanted)} id(s) not in the gallery (e.g. {wanted[:5].tolist()}); it is empty")
                return np.zeros((0, 0), np.float32)
            return self._backend.vectors(wanted)

        return self._read(read)

    def iter_vectors(self, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every ``(ids, feats)`` in id order, ``batch_size`` rows at a time (exact)."""
        if self._backend is None:
            return iter(())
        return self._iter_vectors(batch_size)

    def _iter_vectors(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        started = False
        try:
            for part in self._backend.iter_vectors(batch_size):  # type: ignore[union-attr]
                started = True
                yield part
        except GalleryError:
            if started or not self._replaced_meanwhile():
                raise
            self._sync(repair=False)
            if self._backend is not None:
                yield from self._backend.iter_vectors(batch_size)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [n], feats [n, dim])`` of the whole gallery, id order."""
        parts = list(self.iter_vectors())
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self.dim or 0), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # ---- writing ----------------------------------------------------------------

    def register_root(self, folder: str | os.PathLike[str]) -> Path:
        """Register ``folder`` as a gallery root (no-op inside an existing root); returns the root."""
        with self._lock.hold():
            return self.meta.register_root(Path(folder))

    def existing(self, folder: str | os.PathLike[str]) -> dict[str, tuple[int, str]]:
        """Crops under ``folder``: path relative to ``folder`` → (id, sha256)."""
        return self.meta.existing(Path(folder), self._version)

    def add_images(self, images: Sequence[NewImage], feats: np.ndarray, model_fingerprint: str,
                   replace_ids: Iterable[int] = ()) -> np.ndarray:
        """Commit new crops with their features (and delete ``replace_ids``) in one transaction.

        Crops outside every registered root register their parent folder. A path
        already in the gallery is replaced. Returns the new ids, in input order.

        Raises:
            GalleryError: another model's gallery, or features of the wrong shape.
        """
        feats = np.asarray(feats, np.float32)
        if feats.ndim != 2 or len(feats) != len(images):
            raise GalleryError(f"{len(images)} images but features of shape {feats.shape}")
        self.check_model(model_fingerprint, int(feats.shape[1]))
        with self._lock.hold():
            return self._commit(images, feats, model_fingerprint, list(replace_ids))[0]

    def remove_ids(self, ids: Iterable[int]) -> int:
        """Delete crops by id from the DB and the backend; returns how many existed."""
        ids = sorted({int(i) for i in ids})
        if not ids:
            return 0
        with self._lock.hold():
            return len(self._commit([], np.zeros((0, self.dim or 0), np.float32), self.model_fingerprint or "", ids)[1])

    def remove_where(self, where: RemoveFilter, dry_run: bool = False) -> list[ImageMeta]:
        """Delete the crops ``where`` selects (retention, erasure) in one transaction; returns their metadata.

        With ``dry_run`` nothing is deleted (the metadata says what would be).
        """
        with self._lock.hold():
            metas = [m for batch in self.meta.iter_metadata(self._version, where=where) for m in batch]
            if metas and not dry_run:
                self._commit([], np.zeros((0, self.dim or 0), np.float32), self.model_fingerprint or "",
                             [m.id for m in metas])
        return metas

    def remove(self, paths: Iterable[str | os.PathLike[str]]) -> tuple[int, list[str]]:
        """Delete crops by path; a folder removes everything under it (a removed root is unregistered).

        Returns ``(crops removed, paths that matched nothing)``.
        """
        ids, unmatched, whole = self.meta.ids_under(paths, self._version)
        removed = self.remove_ids(ids) if ids else 0
        if whole:
            with self._lock.hold():
                self.meta.drop_empty_roots(whole)
        return removed, unmatched

    def prune(self, under: str | os.PathLike[str] | None = None) -> int:
        """Delete crops whose files are gone from disk (only below ``under`` if given)."""
        base = abs_path(Path(under)) if under is not None else None
        gone: list[int] = []
        for batch in self.iter_metadata():
            for m in batch:
                if base is not None and not m.path.is_relative_to(base):
                    continue
                if not m.path.is_file():
                    gone.append(m.id)
        return self.remove_ids(gone)

    def clear(self) -> int:
        """Drop every crop of this gallery at once; returns how many. Prefer :meth:`replacing`."""
        with self._lock.hold():
            removed, gen = self.meta.clear(self._version)
            if self._backend is not None:
                self._backend.drop()
            self._backend, self._backend_key = None, None
            self._state = self.meta.state()
            self._generation = gen
            self._emit(np.zeros(0, np.int64), removed)
            log.info("dropped %d images", len(removed))
            return len(removed)

    @contextlib.contextmanager
    def replacing(self) -> Iterator["Gallery"]:
        """A re-index: the block writes to a new gallery version beside this one; when it
        exits cleanly that version becomes the gallery in one transaction (this object
        follows it). An exception, or a crash, leaves the old gallery whole.

        Raises:
            GalleryError: another re-index of this gallery is running.
        """
        if self._building:
            raise GalleryError("a re-index cannot start inside another re-index")
        with self._lock.hold():
            pass  # a read-only workspace fails here, with the message that says so
        build_lock = WriterLock(self.index_dir / BUILD_LOCK_FILE)
        with build_lock.try_hold() as held:
            if not held:
                raise GalleryError("another re-index of this gallery is running; wait for it to finish and try again")
            with self._lock.hold():
                self._cleanup(build_lock_held=True)
                version = self.meta.begin_build()
            log.info("re-indexing into gallery version %d beside version %d", version, self._version)
            builder = Gallery(self.meta, self.index_dir, save_interval=self.save_interval,
                              backend_factory=self._factory, building=version, lock=self._lock)
            ok = False
            try:
                yield builder
                ok = True
            finally:
                if not ok:
                    log.warning("the re-index failed; the gallery is unchanged")
                    with self._lock.hold():
                        if builder._backend is not None:
                            builder._backend.drop()
                        self.meta.abandon_build(version)
            with self._lock.hold():
                gen_after = self.meta.generation() + 1
                if builder._backend is not None:
                    builder._backend.flush(gen_after)
                old, gen = self.meta.switch(version)
                removed = self.meta.ids(old)
                self.replaced_count = len(removed)
                old_backend = self._backend
                if old_backend is None and self._state.dim is not None:
                    old_backend = self._make_backend(old, self._state.dim)
                if old_backend is not None:
                    old_backend.drop()
                self.meta.delete_version(old)
                self._version = version
                self._backend, self._backend_key = builder._backend, builder._backend_key
                builder._backend = None
                self._state = self.meta.state()
                self._generation = gen
            log.info("gallery version %d replaced version %d (%d images)", version, old, self.ntotal)
            self._emit(self.ids(), removed)

    def set_spec(self, spec: IndexSpec) -> bool:
        """Switch the index type/parameters; rebuilds the index (FAISS: from the stored vectors;
        Milvus: the collection's index) when the build changes.

        Returns True when the index was rebuilt.

        Raises:
            GalleryError: an index type this store cannot build (nothing is recorded then).
        """
        self._factory.check_spec(spec)
        with self._lock.hold():
            old = self.meta.set_spec(spec)
            self._state = self.meta.state()
            if self._backend is None:
                return False
            try:
                rebuilt = bool(self._backend.set_spec(spec))
            except Exception:
                self.meta.set_spec(old)  # the old index is what the backend still has
                self._state = self.meta.state()
                raise
            if rebuilt:
                self._flush()
            return rebuilt

    def save(self) -> None:
        """Make the backend durable now (the FAISS file, atomically) if it lags the DB.

        A gallery being built by :meth:`replacing` is saved once, at the switch.
        """
        if self._backend is None or self._building:
            return
        with self._lock.hold():
            self._flush()

    def maybe_save(self) -> None:
        """Save if the backend's save policy says it is due (see :meth:`VectorBackend.flush_due`;
        FAISS: ``save_interval`` seconds since the last save, or 10× its duration)."""
        b = self._backend
        if b is not None and b.flush_due(time.monotonic(), self.save_interval):
            self.save()

    def close(self) -> None:
        """Write pending backend changes and release the DB connections."""
        if self._backend is not None and not self.meta.read_only and self._backend.flush_due(math.inf, 0.0):
            with self._lock.try_hold() as held:
                if held:
                    self._flush()
        if not self._building:
            self.meta.engine.dispose()

    def __enter__(self) -> "Gallery":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------

    def _flush(self) -> None:
        if self._backend is not None:
            self._backend.flush(self._generation)

    def _make_backend(self, version: int, dim: int) -> VectorBackend:
        return self._factory(version, dim, self._state.spec, self._state.store_id, SqlSource(self.meta, version, dim))

    def _commit(self, images: Sequence[NewImage], feats: np.ndarray, fingerprint: str,
                replace_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Commit in SQL, then bring the backend along. Returns ``(new ids, ids deleted)``."""
        dim = int(feats.shape[1]) if len(images) else (self.dim or 0)
        holds = self._backend.holds_vectors if self._backend is not None else self._factory.holds_vectors
        try:
            c = self.meta.commit(self._version, images, feats, fingerprint, dim, replace_ids, store_vectors=not holds,
                                 building=self._building)
        except VersionMoved:
            if self._building:
                raise GalleryError("this re-index was abandoned (another process cleaned it up); run it again") from None
            # Another process re-indexed: write into the gallery that replaced ours.
            log.warning("the gallery was replaced by another process; continuing on the new one")
            self._sync(repair=False)
            if len(images):
                self.check_model(fingerprint, dim)
            holds = self._backend.holds_vectors if self._backend is not None else self._factory.holds_vectors
            c = self.meta.commit(self._version, images, feats, fingerprint, dim, replace_ids, store_vectors=not holds)
        if not len(c.added) and not len(c.removed):
            return c.added, c.removed
        others = not self._building and c.previous != self._generation
        self._state = self.meta.state()
        self._generation = c.generation if not self._building else self._generation + 1
        try:
            if self._backend is None or self._backend_key != (self._version, dim):
                if len(c.added):
                    self._backend = self._make_backend(self._version, dim)
                    self._backend_key = (self._version, dim)
            if self._backend is not None:
                if len(c.removed):
                    self._backend.remove(c.removed)
                if len(c.added):
                    self._backend.add(c.fields, feats)
            if others:  # another process committed since our last look: load its changes too
                self._sync(repair=False)
        except Exception:
            if holds:
                raise  # the rows without vectors are dropped by the next repair
            log.exception("updating the vector index failed; re-syncing it from the DB")
            self._sync(repair=True)
        if holds and self._backend is not None:
            self._flush()
        self._emit(c.added, c.removed)
        return c.added, c.removed

    def _read(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried once on the current gallery when it failed because another process replaced
        or cleared this one meanwhile (a backend holding the only copy, Milvus, has then dropped the
        collection this object reads; a FAISS backend keeps the old vectors in memory until refreshed)."""
        try:
            return fn()
        except GalleryError:
            if not self._replaced_meanwhile():
                raise
            log.warning("another process replaced this gallery meanwhile; reading the new one")
            self._sync(repair=False)
            return fn()

    def _replaced_meanwhile(self) -> bool:
        """Whether another process switched or cleared this gallery since it was loaded (``False`` while building)."""
        if self._building:
            return False
        try:
            st = self.meta.state()
        except Exception:  # the DB is unreachable: the original error says more
            return False
        return st.active != self._version or st.model_of(st.active)[1] != self._state.model_of(self._version)[1]

    def _sync(self, repair: bool) -> None:
        """Load the state and make the backend agree with the DB (saving the repair if allowed)."""
        st = self.meta.state()
        if not self._building:
            self._version = st.active
        self._state = st
        if not self._building:
            self._generation = st.generation
        fp, dim = st.model_of(self._version)
        changed = False
        db_ids = self.meta.ids(self._version)
        if dim is None:  # an empty gallery: whatever vectors are left of it are stale
            if self._backend is not None:
                self._backend.drop()
            self._backend, self._backend_key = None, None
            if repair and not self.meta.read_only:
                with self._lock.try_hold() as held:
                    if held:  # this version has no rows: what the store kept of it outside a backend is stale
                        self._factory.cleanup(_in_use(st) - {self._version})
                if not self._building:
                    self._cleanup(build_lock_held=False)
            return
        if self._backend is None or self._backend_key != (self._version, dim):
            self._backend = self._make_backend(self._version, dim)
            self._backend_key = (self._version, dim)
        b = self._backend
        stamp = b.stamp()
        if stamp is not None and stamp > self._generation and not self._building:
            log.warning("the %s vectors are stamped with generation %d, later than the DB's %d (another DB, or "
                        "a DB restored from a backup); refilling them from the DB", b.kind, stamp, self._generation)
            if b.holds_vectors:
                raise GalleryError(f"the {b.kind} collection is newer than the metadata DB (generation {stamp} > "
                                   f"{self._generation}); restore the matching DB or re-index with --reindex")
            b.drop()
            changed = True
        b_ids = b.ids()
        extra = np.setdiff1d(b_ids, db_ids, assume_unique=True)
        missing = np.setdiff1d(db_ids, b_ids, assume_unique=True)
        if len(extra) or len(missing):
            log.log(logging.WARNING if repair else logging.DEBUG,
                    "the %s vectors lag the DB (%d to drop, %d to add); bringing them along", b.kind, len(extra), len(missing))
            changed = True
            if len(extra):
                b.remove(extra)
            if len(missing):
                if b.holds_vectors:
                    if repair:
                        with self._lock.try_hold() as held:
                            if held:
                                log.warning("%d rows have no vector in %s (a crash mid-commit); deleting them", len(missing), b.kind)
                                self.meta.commit(self._version, [], None, fp or "", dim, missing.tolist(), store_vectors=False)
                elif b.ntotal == 0 and b.refill("no usable index"):
                    pass  # filled in one pass (FAISS: built, and trained, from every vector in SQL)
                else:
                    for s in range(0, len(missing), 8192):
                        part = missing[s : s + 8192]
                        b.add(self.meta.fields(self._version, part.tolist()), self.meta.vectors(part, dim))
        if stamp != self._generation:
            changed = True
        if repair and not self._building:
            self._cleanup(build_lock_held=False)
        if changed and repair and not self.meta.read_only:
            # A reader must not wait for a long-running writer: it keeps the repaired
            # vectors in memory and leaves the file to the writer.
            with self._lock.try_hold() as held:
                if held:
                    self._flush()

    def _cleanup(self, build_lock_held: bool) -> None:
        """Delete what crashed re-indexes and saves left behind (only with the writer lock; never blocks)."""
        if self.meta.read_only:
            return
        with self._lock.try_hold() as held:
            if not held:
                return
            st = self.meta.state()
            keep = _in_use(st)
            if st.building is not None and not build_lock_held:
                with WriterLock(self.index_dir / BUILD_LOCK_FILE).try_hold() as free:
                    if free:
                        log.warning("removing gallery version %d left by an interrupted re-index", st.building)
                        if st.building_dim is not None:
                            self._make_backend(st.building, st.building_dim).drop()
                        self.meta.abandon_build(st.building)
                        keep.discard(st.building)
            for v in self.meta.versions_present():
                if v not in keep:
                    log.warning("removing gallery version %d, replaced by version %d", v, st.active)
                    if st.dim is not None:
                        self._make_backend(v, st.dim).drop()
                    self.meta.delete_version(v)
            self._factory.cleanup(keep)


def _in_use(st: State) -> set[int]:
    """The gallery versions whose vectors must stay: the active one and the one being built."""
    return {st.active} | ({st.building} if st.building is not None else set())
