"""The gallery store: metadata DB (source of truth) + FAISS index (a cache of it).

Consistency rules:

- Every image row and its embedding are committed together; a change commits
  in one transaction that also bumps ``gallery_state.generation``. What a
  command reports as indexed is committed.
- The FAISS file (``<index_dir>/gallery.faiss``) is written atomically after
  commits (at the end of a run and at most every ``save_interval`` seconds
  during one). It may therefore lag the DB after a crash; opening a gallery
  compares the index's ids with the DB's and repairs the index from the DB
  (vectors of rows missing from the index are re-added, ids the DB no longer
  has are dropped), so DB and index never disagree in an open gallery.
- One writer at a time: mutating calls hold an exclusive lock on
  ``<index_dir>/.lock``. Readers need no lock; :meth:`Gallery.refresh` picks
  up another process's changes.

Derived structures (e.g. k-reciprocal neighbour lists of a search engine) can
follow the gallery in two ways: in-process, :meth:`Gallery.on_change` callbacks
run after each committed change with the added and removed ids; across
processes, :attr:`Gallery.generation` changes whenever the gallery does, so a
cache stamped with the generation it was built from knows when it is stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import Engine, create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from indexer.db import STATE_ROW_ID, Embedding, GalleryRoot, GalleryState, ImageRow, utcnow
from indexer.migrations import current_revision, first_line, head_revision, upgrade_db
from indexer.vectors import PARAMS_BY_KIND, SEARCH_PARAMS, IndexSpec, VectorIndex
from reid_search.data import parse_name
from reid_search.errors import GalleryError
from reid_search.workspace import Workspace

log = logging.getLogger(__name__)

INDEX_FILE = "gallery.faiss"
LOCK_FILE = ".lock"
_IN_CHUNK = 10_000  # ids per "IN (...)" query


@dataclass(frozen=True)
class ImageMeta:
    """What the gallery knows about one image (``id`` is its FAISS id)."""

    id: int
    path: Path  # absolute
    rel_path: str  # relative to ``root``, POSIX separators
    root: Path
    pid: int | None
    camid: int | None
    seq: int | None
    frame: int | None
    sha256: str
    size_bytes: int
    model_fingerprint: str
    indexed_at: datetime


@dataclass(frozen=True)
class NewImage:
    """An image to add: where it is and what its bytes hash to."""

    path: Path
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class ChangeEvent:
    """What one committed change did; passed to :meth:`Gallery.on_change` callbacks."""

    added: np.ndarray  # int64 ids
    removed: np.ndarray  # int64 ids
    generation: int


def sha256_file(path: str | os.PathLike[str], bufsize: int = 1 << 20) -> tuple[str, int]:
    """Content hash and size of a file.

    Raises:
        OSError: the file cannot be read (missing, broken link, permissions).
    """
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _to_bytes(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


def _from_bytes(rows: Sequence[bytes], dim: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, dim), np.float32)
    out = np.frombuffer(b"".join(rows), dtype="<f4").reshape(len(rows), dim)
    return out.astype(np.float32, copy=True)


def _chunks(seq: Sequence[Any], n: int = _IN_CHUNK) -> Iterator[Sequence[Any]]:
    for s in range(0, len(seq), n):
        yield seq[s : s + n]


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL, full fsync on commit and foreign keys.

    Raises:
        GalleryError: a URL SQLAlchemy cannot parse or whose driver is missing.
    """
    try:
        parsed = make_url(url)
    except Exception:
        raise GalleryError(f"--db {url!r} is not a SQLAlchemy URL (e.g. sqlite:///reid.db, postgresql+psycopg://user@host/db)") from None
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            try:
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise GalleryError(f"cannot create the folder of the SQLite DB {db} ({exc.strerror}); pass another --workspace or --db") from None
        kwargs["connect_args"] = {"timeout": 60}
    try:
        engine = create_engine(parsed, **kwargs)
    except Exception as exc:  # missing DBAPI driver, bad options
        raise GalleryError(f"cannot use the DB URL {parsed!r} ({first_line(exc)}); for PostgreSQL install psycopg (pip install 'reid-search[postgres]')") from None
    if parsed.get_backend_name() == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets a search server read while `index` writes; FULL makes
            # every commit durable (power loss must not lose a reported image).
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    return engine


class _WriterLock:
    """Exclusive advisory lock on a file: one writing process per gallery."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._depth = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self._depth == 0:
            self._acquire()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._release()

    @contextlib.contextmanager
    def try_hold(self) -> Iterator[bool]:
        """Like :meth:`hold` without waiting; yields whether the lock is held."""
        if self._depth == 0 and not self._acquire(wait=False):
            yield False
            return
        self._depth += 1
        try:
            yield True
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._release()

    def _acquire(self, wait: bool = True) -> bool:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no cross-process lock
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                return False
            log.warning("another reid-search process is changing this gallery; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        return True

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class Gallery:
    """A searchable gallery: open it with :func:`open_gallery`.

    Reading: :meth:`search`, :meth:`metadata`, :meth:`vectors`, :meth:`iter_vectors`,
    :meth:`all_vectors`, :meth:`labels`, :attr:`ntotal`, :attr:`dim`,
    :attr:`model_fingerprint`, :attr:`generation`.
    Writing: :meth:`add_folder`, :meth:`add_images`, :meth:`remove`, :meth:`remove_ids`,
    :meth:`prune`, :meth:`clear`, :meth:`set_spec`.
    """

    def __init__(self, engine: Engine, index_dir: Path, save_interval: float = 30.0) -> None:
        self.engine = engine
        self.index_dir = Path(index_dir)
        self.index_path = self.index_dir / INDEX_FILE
        self.save_interval = save_interval
        self._lock = _WriterLock(self.index_dir / LOCK_FILE)
        self._listeners: dict[str, Callable[[ChangeEvent], None]] = {}
        self._vindex: VectorIndex | None = None
        self._spec = IndexSpec()
        self._fingerprint: str | None = None
        self._dim: int | None = None
        self._generation = 0
        self._dirty = False
        self._last_save = time.monotonic()
        self._save_cost = 0.0
        self._sync(repair=True)

    # ---- state --------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        """Images (= vectors) in the gallery."""
        return self._vindex.ntotal if self._vindex is not None else 0

    @property
    def dim(self) -> int | None:
        """Feature dimension, ``None`` until the first image is added."""
        return self._dim

    @property
    def model_fingerprint(self) -> str | None:
        """Fingerprint of the model every vector was embedded with (``None`` when empty)."""
        return self._fingerprint

    @property
    def generation(self) -> int:
        """Change counter of the state this object reflects; grows with every committed change."""
        return self._generation

    @property
    def spec(self) -> IndexSpec:
        """The index type and parameters."""
        return self._spec

    @property
    def index(self) -> VectorIndex | None:
        """The underlying :class:`VectorIndex` (``None`` while the gallery is empty and has no dim)."""
        return self._vindex

    @property
    def search_device(self) -> str:
        """Where searches run, e.g. ``CPU (2 threads)`` or ``4 GPU(s), sharded``."""
        return self._vindex.device if self._vindex is not None else "CPU"

    def describe(self) -> str:
        """One line: size, index, model."""
        trained = ""
        if self._vindex is not None and not self._vindex.trained:
            trained = " (exact until trained)"
        model = self._fingerprint or "none yet"
        return f"{self.ntotal} images, {self._spec.describe()} index{trained}, dim {self._dim or '-'}, model {model}"

    def roots(self) -> list[Path]:
        """The registered gallery folders."""
        with Session(self.engine) as s:
            return [Path(p) for p in s.scalars(select(GalleryRoot.path).order_by(GalleryRoot.path))]

    def db_generation(self) -> int:
        """The generation in the DB now (another process may have moved it on)."""
        with Session(self.engine) as s:
            return int(s.scalar(select(GalleryState.generation).where(GalleryState.id == STATE_ROW_ID)) or 0)

    def refresh(self) -> bool:
        """Pick up changes committed by other processes; True if there were any."""
        if self.db_generation() == self._generation:
            return False
        self._sync(repair=False)
        return True

    def check_model(self, fingerprint: str, dim: int) -> None:
        """Refuse a model that is not the one the gallery was indexed with.

        Raises:
            GalleryError: the gallery holds vectors of another model or dimension.
        """
        if self._fingerprint is None or self.ntotal == 0:
            return
        if fingerprint != self._fingerprint or (self._dim is not None and dim != self._dim):
            raise GalleryError(
                f"the gallery was indexed with model {self._fingerprint} ({self._dim}-d) but this model is "
                f"{fingerprint} ({dim}-d); re-index with `reid-search index DIR --reindex` (drops this gallery), "
                "or use another --workspace to keep both"
            )

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

    def search(self, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest gallery images of each query feature (L2-normalised rows).

        Returns ``(sims, ids)``, both ``[q, k]``, best first: cosine similarities
        (float32; squared Euclidean distance = 2 - 2·sim) and image ids (int64).
        Positions beyond the gallery size hold id -1 and similarity -inf. Scores are
        exact for flat/ivf/hnsw and estimates from the compact re-scoring codes for ivfpq.

        Raises:
            GalleryError: features of another dimension than the gallery's.
        """
        feats = np.asarray(feats, np.float32)
        if feats.ndim == 1:
            feats = feats[None, :]
        if self._vindex is None:
            return np.full((len(feats), k), -np.inf, np.float32), np.full((len(feats), k), -1, np.int64)
        return self._vindex.search(feats, k)

    def ids(self) -> np.ndarray:
        """All image ids, sorted (from the DB)."""
        with Session(self.engine) as s:
            return np.fromiter(s.scalars(select(ImageRow.id).order_by(ImageRow.id)), dtype=np.int64)

    def metadata(self, ids: Iterable[int] | np.ndarray) -> list[ImageMeta]:
        """Metadata of ``ids``, in the same order.

        Raises:
            GalleryError: an id that is not in the gallery (e.g. -1 padding, or removed meanwhile).
        """
        wanted = [int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).ravel()]
        found: dict[int, ImageMeta] = {}
        with Session(self.engine) as s:
            for part in _chunks(sorted(set(wanted))):
                q = select(ImageRow, GalleryRoot.path).join(GalleryRoot).where(ImageRow.id.in_(part))
                for row, root in s.execute(q):
                    found[row.id] = _meta(row, root)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise GalleryError(f"{len(missing)} id(s) not in the gallery (e.g. {missing[:5]}); they were removed or never existed")
        return [found[i] for i in wanted]

    def iter_metadata(self, batch_size: int = 10_000) -> Iterator[list[ImageMeta]]:
        """All images' metadata in id order, ``batch_size`` at a time."""
        last = -(1 << 62)
        while True:
            with Session(self.engine) as s:
                q = (select(ImageRow, GalleryRoot.path).join(GalleryRoot).where(ImageRow.id > last)
                     .order_by(ImageRow.id).limit(batch_size))
                batch = [_meta(r, p) for r, p in s.execute(q)]
            if not batch:
                return
            yield batch
            last = batch[-1].id

    def labels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, pids, camids)`` of every image in id order (int64; -2 where the name had none)."""
        with Session(self.engine) as s:
            rows = s.execute(select(ImageRow.id, ImageRow.pid, ImageRow.camid).order_by(ImageRow.id)).all()
        arr = np.array([(i, -2 if p is None else p, -2 if c is None else c) for i, p, c in rows], dtype=np.int64).reshape(-1, 3)
        return arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy()

    def vectors(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """The exact stored features of ``ids`` (``[n, dim]`` float32, in the given order).

        Raises:
            GalleryError: an id that is not in the gallery.
        """
        wanted = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).ravel()
        dim = self._dim or 0
        found: dict[int, bytes] = {}
        with Session(self.engine) as s:
            for part in _chunks(sorted(set(wanted.tolist()))):
                for i, v in s.execute(select(Embedding.image_id, Embedding.vector).where(Embedding.image_id.in_(part))):
                    found[i] = v
        missing = [int(i) for i in wanted if int(i) not in found]
        if missing:
            raise GalleryError(f"{len(missing)} id(s) not in the gallery (e.g. {missing[:5]}); they were removed or never existed")
        return _from_bytes([found[int(i)] for i in wanted], dim)

    def iter_vectors(self, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every ``(ids, feats)`` in id order, ``batch_size`` rows at a time (exact, from the DB)."""
        dim = self._dim or 0
        last = -(1 << 62)
        while True:
            with Session(self.engine) as s:
                rows = s.execute(select(Embedding.image_id, Embedding.vector).where(Embedding.image_id > last)
                                 .order_by(Embedding.image_id).limit(batch_size)).all()
            if not rows:
                return
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            yield ids, _from_bytes([r[1] for r in rows], dim)
            last = int(ids[-1])

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [n], feats [n, dim])`` of the whole gallery, id order."""
        parts = list(self.iter_vectors())
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self._dim or 0), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # ---- writing ----------------------------------------------------------------

    def add_folder(self, folder: str | os.PathLike[str], extractor: Any, **kwargs: Any) -> Any:
        """Index a folder incrementally; see :func:`indexer.pipeline.index_folder` for options.

        Returns an :class:`indexer.pipeline.IndexReport`.
        """
        from indexer.pipeline import index_folder

        return index_folder(self, folder, extractor, **kwargs)

    def add_images(self, images: Sequence[NewImage], feats: np.ndarray, model_fingerprint: str,
                   replace_ids: Iterable[int] = ()) -> np.ndarray:
        """Commit new images with their features (and delete ``replace_ids``) in one transaction.

        Images outside every registered root register their parent folder. A path
        already in the gallery is replaced. Returns the new ids, in input order.

        Raises:
            GalleryError: another model's gallery, or features of the wrong shape.
        """
        feats = np.asarray(feats, np.float32)
        if feats.ndim != 2 or len(feats) != len(images):
            raise GalleryError(f"{len(images)} images but features of shape {feats.shape}")
        dim = int(feats.shape[1])
        self.check_model(model_fingerprint, dim)
        with self._lock.hold():
            return self._commit(images, feats, model_fingerprint, list(replace_ids))[0]

    def remove_ids(self, ids: Iterable[int]) -> int:
        """Delete images by id from the DB and the index; returns how many existed."""
        ids = sorted({int(i) for i in ids})
        if not ids:
            return 0
        with self._lock.hold():
            return len(self._commit([], np.zeros((0, self._dim or 0), np.float32), self._fingerprint or "", ids)[1])

    def remove(self, paths: Iterable[str | os.PathLike[str]]) -> tuple[int, list[str]]:
        """Delete images by path; a folder removes everything under it (a removed root is unregistered).

        Returns ``(images removed, paths that matched nothing)``.
        """
        ids: set[int] = set()
        unmatched: list[str] = []
        drop_roots: list[int] = []
        with Session(self.engine) as s:
            roots = list(s.execute(select(GalleryRoot.id, GalleryRoot.path)))
            for raw in paths:
                p = _abs(Path(raw))
                hit = False
                for rid, rpath in roots:
                    rp = Path(rpath)
                    if p == rp:
                        ids.update(s.scalars(select(ImageRow.id).where(ImageRow.root_id == rid)))
                        drop_roots.append(rid)
                        hit = True
                    elif p.is_relative_to(rp):
                        rel = p.relative_to(rp).as_posix()
                        q = select(ImageRow.id).where(ImageRow.root_id == rid).where(
                            (ImageRow.rel_path == rel) | ImageRow.rel_path.startswith(rel + "/", autoescape=True))
                        found = list(s.scalars(q))
                        ids.update(found)
                        hit = hit or bool(found)
                    elif rp.is_relative_to(p):  # a parent of roots: all of them
                        ids.update(s.scalars(select(ImageRow.id).where(ImageRow.root_id == rid)))
                        drop_roots.append(rid)
                        hit = True
                if not hit:
                    unmatched.append(str(raw))
        removed = self.remove_ids(ids) if ids else 0
        if drop_roots:
            with self._lock.hold(), Session(self.engine) as s, s.begin():
                for rid in drop_roots:
                    if not s.scalar(select(func.count()).select_from(ImageRow).where(ImageRow.root_id == rid)):
                        s.execute(delete(GalleryRoot).where(GalleryRoot.id == rid))
        return removed, unmatched

    def prune(self, under: str | os.PathLike[str] | None = None) -> int:
        """Delete images whose files are gone from disk (only below ``under`` if given)."""
        base = _abs(Path(under)) if under is not None else None
        gone: list[int] = []
        for batch in self.iter_metadata():
            for m in batch:
                if base is not None and not m.path.is_relative_to(base):
                    continue
                if not m.path.is_file():
                    gone.append(m.id)
        return self.remove_ids(gone)

    def clear(self) -> int:
        """Drop every image, vector and root (``--reindex``); returns how many images were dropped."""
        with self._lock.hold():
            with Session(self.engine) as s, s.begin():
                n = int(s.scalar(select(func.count()).select_from(ImageRow)) or 0)
                removed = np.fromiter(s.scalars(select(ImageRow.id)), dtype=np.int64)
                s.execute(delete(Embedding))
                s.execute(delete(ImageRow))
                s.execute(delete(GalleryRoot))
                st = self._state(s)
                st.model_fingerprint, st.dim = None, None
                st.generation += 1
                st.updated_at = utcnow()
                gen = st.generation
            self._fingerprint, self._dim, self._generation = None, None, gen
            self._vindex = None
            with contextlib.suppress(FileNotFoundError):
                self.index_path.unlink()
            self._emit(np.zeros(0, np.int64), removed)
            log.info("dropped %d images", n)
            return n

    def set_spec(self, spec: IndexSpec) -> bool:
        """Switch the index type/parameters; rebuilds from the DB's vectors when the build changes.

        Returns True when the index was rebuilt.
        """
        with self._lock.hold():
            with Session(self.engine) as s, s.begin():
                st = self._state(s)
                old = IndexSpec.from_json(st.index_spec)
                st.index_spec = spec.to_json()
            self._spec = spec
            if self._vindex is None:
                return False
            if old.build_key() == spec.build_key() and self._vindex.spec.build_key() == spec.build_key():
                self._vindex.set_search_params(**{k: getattr(spec, k) for k in SEARCH_PARAMS if k in PARAMS_BY_KIND[spec.kind]})
                return False
            self._rebuild(f"index type changed from {old.describe()} to {spec.describe()}")
            self.save()
            return True

    def save(self) -> None:
        """Write the index file now (atomically) if it lags the DB."""
        with self._lock.hold():
            self._save()

    def maybe_save(self) -> None:
        """Write the index file if it lags and ``save_interval`` seconds have passed since the last
        write (or 10× the last write's duration, so big indexes spend ≤ 10 % of the time saving)."""
        wait = max(self.save_interval, 10 * self._save_cost)
        if self._dirty and time.monotonic() - self._last_save >= wait:
            self.save()

    def close(self) -> None:
        """Write pending index changes and release the DB connections."""
        if self._dirty:
            self.save()
        self.engine.dispose()

    def __enter__(self) -> "Gallery":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------

    def _state(self, s: Session) -> GalleryState:
        st = s.get(GalleryState, STATE_ROW_ID, with_for_update=True)
        if st is None:
            st = GalleryState(id=STATE_ROW_ID, index_spec=IndexSpec().to_json(), generation=0, updated_at=utcnow())
            s.add(st)
            s.flush()
        return st

    def _root_for(self, s: Session, folder: Path) -> tuple[int, Path]:
        """The registered root holding ``folder`` (registering it if none does); roots never nest."""
        folder = _abs(folder)
        roots = list(s.execute(select(GalleryRoot.id, GalleryRoot.path)))
        for rid, rpath in roots:
            if folder.is_relative_to(Path(rpath)):
                return rid, Path(rpath)
        rid = s.scalar(insert(GalleryRoot).values(path=str(folder), added_at=utcnow()).returning(GalleryRoot.id))
        for old_id, rpath in roots:
            if Path(rpath).is_relative_to(folder):  # an old root inside the new one: absorb it
                prefix = Path(rpath).relative_to(folder).as_posix() + "/"
                s.execute(update(ImageRow).where(ImageRow.root_id == old_id)
                          .values(root_id=rid, rel_path=prefix + ImageRow.rel_path))
                s.execute(delete(GalleryRoot).where(GalleryRoot.id == old_id))
                log.info("root %s now lies under the new root %s", rpath, folder)
        log.info("registered gallery root %s", folder)
        return int(rid), folder  # type: ignore[arg-type]

    def register_root(self, folder: str | os.PathLike[str]) -> Path:
        """Register ``folder`` as a gallery root (no-op inside an existing root); returns the root."""
        with self._lock.hold(), Session(self.engine) as s, s.begin():
            self._state(s)
            return self._root_for(s, Path(folder))[1]

    def existing(self, folder: str | os.PathLike[str]) -> dict[str, tuple[int, str]]:
        """Images under ``folder``: path relative to ``folder`` → (id, sha256)."""
        folder = _abs(Path(folder))
        out: dict[str, tuple[int, str]] = {}
        with Session(self.engine) as s:
            for rid, rpath in s.execute(select(GalleryRoot.id, GalleryRoot.path)):
                rp = Path(rpath)
                if folder.is_relative_to(rp):
                    prefix = folder.relative_to(rp).as_posix()
                    q = select(ImageRow.rel_path, ImageRow.id, ImageRow.sha256).where(ImageRow.root_id == rid)
                    if prefix != ".":
                        q = q.where(ImageRow.rel_path.startswith(prefix + "/", autoescape=True))
                    for rel, i, sha in s.execute(q):
                        key = rel if prefix == "." else rel[len(prefix) + 1 :]
                        out[key] = (i, sha)
                elif rp.is_relative_to(folder):
                    prefix = rp.relative_to(folder).as_posix()
                    for rel, i, sha in s.execute(select(ImageRow.rel_path, ImageRow.id, ImageRow.sha256)
                                                 .where(ImageRow.root_id == rid)):
                        out[f"{prefix}/{rel}"] = (i, sha)
        return out

    def _commit(self, images: Sequence[NewImage], feats: np.ndarray, fingerprint: str,
                replace_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """One transaction: delete ``replace_ids`` (and rows at the same paths), insert ``images``.

        Returns ``(new ids, ids that were deleted)``.
        """
        dim = int(feats.shape[1]) if len(images) else (self._dim or 0)
        now = utcnow()
        with Session(self.engine) as s, s.begin():
            st = self._state(s)
            if images and st.model_fingerprint is not None and (st.model_fingerprint != fingerprint or st.dim != dim):
                n = s.scalar(select(func.count()).select_from(ImageRow)) or 0
                if n:
                    self._fingerprint, self._dim = st.model_fingerprint, st.dim
                    self.check_model(fingerprint, dim)
            rows: list[dict[str, Any]] = []
            removed: set[int] = set(replace_ids)
            # Shallowest folders first: registering a root may absorb roots below it,
            # so deeper folders must be resolved after that.
            parents = sorted({_abs(img.path).parent for img in images}, key=lambda p: len(p.parts))
            roots = {p: self._root_for(s, p) for p in parents}
            by_root: dict[int, list[str]] = {}
            for img in images:
                parent = _abs(img.path).parent
                rid, root = roots[parent]
                rel = (parent / img.path.name).relative_to(root).as_posix()
                by_root.setdefault(rid, []).append(rel)
                info = parse_name(img.path.name)
                rows.append({
                    "root_id": rid, "rel_path": rel, "sha256": img.sha256, "size_bytes": img.size_bytes,
                    "pid": info.pid if info else None, "camid": info.camid if info else None,
                    "seq": info.seq if info else None, "frame": info.frame if info else None,
                    "model_fingerprint": fingerprint, "indexed_at": now,
                })
            for rid, rels in by_root.items():  # a path already in the gallery is replaced
                for part in _chunks(rels):
                    removed.update(s.scalars(select(ImageRow.id).where(ImageRow.root_id == rid, ImageRow.rel_path.in_(part))))
            existing_removed: list[int] = []
            for part in _chunks(sorted(removed)):
                existing_removed += list(s.scalars(select(ImageRow.id).where(ImageRow.id.in_(part))))
                s.execute(delete(Embedding).where(Embedding.image_id.in_(part)))
                s.execute(delete(ImageRow).where(ImageRow.id.in_(part)))
            new_ids: list[int] = []
            if rows:
                new_ids = list(s.scalars(insert(ImageRow).returning(ImageRow.id, sort_by_parameter_order=True), rows))
                s.execute(insert(Embedding), [{"image_id": i, "vector": _to_bytes(v)} for i, v in zip(new_ids, feats)])
            if not rows and not existing_removed:
                return np.zeros(0, np.int64), np.zeros(0, np.int64)
            if rows:
                st.model_fingerprint, st.dim = fingerprint, dim
            st.generation += 1
            st.updated_at = now
            generation = st.generation
            spec = IndexSpec.from_json(st.index_spec)
        # Committed: now bring the in-memory index along (the file follows in save()).
        added = np.asarray(new_ids, np.int64)
        gone = np.asarray(existing_removed, np.int64)
        self._generation = generation
        if rows:
            self._fingerprint, self._dim = fingerprint, dim
        try:
            if self._dim is not None and (self._vindex is None or self._vindex.dim != self._dim):
                self._spec = spec
                self._vindex = VectorIndex.empty(spec, self._dim)
            if self._vindex is not None:
                if len(gone) and not self._vindex.remove(gone):
                    self._rebuild(f"{len(gone)} removals ({self._spec.kind} cannot remove in place)", exclude_new=added)
                self._vindex.add(added, feats)
                reason = self._vindex.rebuild_reason()
                if reason:
                    self._rebuild(reason)
            self._dirty = True
        except Exception:
            log.exception("updating the in-memory index failed; re-syncing it from the DB")
            self._sync(repair=True)
        self._emit(added, gone)
        return added, gone

    def _rebuild(self, reason: str, exclude_new: np.ndarray | None = None) -> None:
        """Rebuild the index from all vectors in the DB."""
        assert self._dim is not None
        with Session(self.engine) as s:
            n = int(s.scalar(select(func.count()).select_from(Embedding)) or 0)
        skip = set(exclude_new.tolist()) if exclude_new is not None and len(exclude_new) else set()

        def source() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for ids, x in self.iter_vectors():
                if skip:
                    keep = np.array([i not in skip for i in ids.tolist()], dtype=bool)
                    ids, x = ids[keep], x[keep]
                yield ids, x

        log.info("rebuilding the %s index of %d vectors: %s", self._spec.kind, n - len(skip), reason)
        t0 = time.perf_counter()
        self._vindex = VectorIndex.build(self._spec, self._dim, source, n - len(skip))
        log.info("rebuilt the index in %.1fs", time.perf_counter() - t0)
        self._dirty = True

    def _save(self) -> None:
        t0 = time.monotonic()
        if self._vindex is None:
            with contextlib.suppress(FileNotFoundError):
                self.index_path.unlink()
        else:
            self._vindex.save(self.index_path, {"generation": self._generation, "model_fingerprint": self._fingerprint})
        self._dirty = False
        self._last_save = time.monotonic()
        self._save_cost = self._last_save - t0

    def _sync(self, repair: bool) -> None:
        """Load state and index from disk; make the index agree with the DB (repairing the file if allowed)."""
        with Session(self.engine) as s:
            st = s.get(GalleryState, STATE_ROW_ID)
            spec = IndexSpec.from_json(st.index_spec) if st is not None else IndexSpec()
            fp, dim, gen = (st.model_fingerprint, st.dim, int(st.generation)) if st is not None else (None, None, 0)
            db_ids = np.fromiter(s.scalars(select(ImageRow.id).order_by(ImageRow.id)), dtype=np.int64)
        self._spec, self._fingerprint, self._dim, self._generation = spec, fp, dim, gen
        vi: VectorIndex | None = None
        header: dict[str, Any] = {}
        if self.index_path.is_file():
            try:
                vi, header = VectorIndex.load(self.index_path)
            except GalleryError as exc:
                log.warning("%s; rebuilding it from the DB", exc)
        changed = False
        if dim is None or not len(db_ids):
            changed = vi is not None and vi.ntotal > 0
            vi = VectorIndex.empty(spec, dim) if dim is not None else None
        elif vi is None or vi.dim != dim or header.get("model_fingerprint") != fp or vi.spec.build_key() != spec.build_key():
            if vi is not None:
                log.warning("the index file %s does not match the DB (model, dimension or type); rebuilding it", self.index_path)
            self._vindex = None
            self._rebuild("no usable index file")
            vi, changed = self._vindex, True
        else:
            ix_ids = vi.ids()
            extra = np.setdiff1d(ix_ids, db_ids, assume_unique=True)
            missing = np.setdiff1d(db_ids, ix_ids, assume_unique=True)
            if len(extra) or len(missing):
                log.warning("index file %s lags the DB (%d vectors to drop, %d to add); repairing it from the DB",
                            self.index_path, len(extra), len(missing))
                changed = True
                if len(extra) and not vi.remove(extra):
                    self._vindex = None
                    self._rebuild("stale vectors in an index type that cannot remove")
                    vi = self._vindex
                elif len(missing):
                    vi.add(missing, self.vectors(missing))
            # Search-time parameters may differ from the file's: the DB's spec wins.
            vi.spec = spec
            vi._configure()
            if vi.rebuild_reason():
                self._vindex = vi
                self._rebuild(vi.rebuild_reason() or "")
                vi, changed = self._vindex, True
        self._vindex = vi
        self._dirty = changed
        if changed and repair:
            # A reader must not wait for a long-running writer: it keeps the repaired
            # index in memory and leaves the file to the writer.
            with self._lock.try_hold() as held:
                if held:
                    self._save()


def _abs(p: Path) -> Path:
    """Absolute path: folders fully resolved; for anything else the parent folder is
    resolved and the last component kept as named (a symlinked crop keeps its name)."""
    p = Path(os.path.abspath(p))
    if p.is_dir() or not p.name:
        return p.resolve()
    return p.parent.resolve() / p.name


def _meta(row: ImageRow, root: str) -> ImageMeta:
    rootp = Path(root)
    return ImageMeta(
        id=row.id, path=rootp / PurePosixPath(row.rel_path), rel_path=row.rel_path, root=rootp,
        pid=row.pid, camid=row.camid, seq=row.seq, frame=row.frame, sha256=row.sha256,
        size_bytes=row.size_bytes, model_fingerprint=row.model_fingerprint, indexed_at=row.indexed_at,
    )


def open_gallery(
    target: Workspace | str | os.PathLike[str],
    index_dir: str | os.PathLike[str] | None = None,
    *,
    spec: IndexSpec | None = None,
    save_interval: float = 30.0,
) -> Gallery:
    """Open (creating if needed) the gallery of a workspace, or of a DB URL plus an index folder.

    Migrates the DB to the current schema, loads the index and repairs it from
    the DB if a crash left it behind. ``spec`` switches the index type (rebuilding).

    Raises:
        GalleryError: unreachable DB, unknown schema, or an unusable URL.
    """
    if isinstance(target, Workspace):
        url = target.db_url
        index_dir = Path(index_dir) if index_dir is not None else target.index_dir
    else:
        url = str(target)
        if "://" not in url:  # a plain path: a SQLite file
            url = f"sqlite:///{Path(url).resolve()}"
        if index_dir is None:
            raise GalleryError("open_gallery(URL) needs index_dir, the folder of the FAISS index file")
        index_dir = Path(index_dir)
    engine = make_engine(url)
    try:
        at_head = current_revision(engine) == head_revision()
    except Exception:  # unreachable DB: upgrade_db says so properly
        at_head = False
    if not at_head:
        with _WriterLock(index_dir / LOCK_FILE).hold():
            upgrade_db(engine)
    gallery = Gallery(engine, index_dir, save_interval=save_interval)
    if spec is not None and spec != gallery.spec:
        gallery.set_spec(spec)
    return gallery
