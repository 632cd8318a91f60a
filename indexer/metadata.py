"""The gallery's SQL metadata: rows, roots, state, embeddings; every query the store makes.

One job: turn gallery operations into SQL over :mod:`indexer.db`'s models.
No locking, no vector index (see :mod:`indexer.coordinator`). Every method
opens its own session; the writing ones commit one transaction each, which
also bumps ``gallery_state.generation`` when the active gallery changes.

Rows belong to a gallery *version* (``images.gallery``): callers name the
version they read or write, normally ``state().active``. :class:`SqlSource`
is one version's rows and vectors as a FAISS backend reads them.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import ColumnElement, Engine, and_, delete, func, insert, or_, select, true, update
from sqlalchemy.orm import Session

from indexer.db import (STATE_ROW_ID, Embedding, GalleryRoot, GalleryState, ImageRow, from_bytes, image_meta, labels_of,
                        row_fields, to_bytes, utcnow)
from indexer.paths import abs_path, db_path, os_path
from indexer.protocol import RowFields
from indexer.spec import IndexSpec
from reid_search.errors import GalleryError
from reid_search.gallery import ImageMeta, NewImage, RemoveFilter, SearchFilter
from reid_search.timeutil import as_utc

log = logging.getLogger(__name__)

IN_CHUNK = 10_000  # ids per "IN (...)" query


def chunks(seq: Sequence[Any], n: int = IN_CHUNK) -> Iterator[Sequence[Any]]:
    """``seq`` in slices of ``n``."""
    for s in range(0, len(seq), n):
        yield seq[s : s + n]


def _where(where: SearchFilter | RemoveFilter | None) -> ColumnElement[bool]:
    """The SQL condition of a filter; same meaning as ``SearchFilter.allows`` / ``RemoveFilter.matches``."""
    if where is None:
        return true()
    conds: list[ColumnElement[bool]] = []
    if isinstance(where, RemoveFilter):
        if where.pid is not None:
            conds.append(ImageRow.pid == where.pid)
        if where.camid is not None:
            conds.append(ImageRow.camid == where.camid)
        if where.before is not None:
            conds.append(and_(ImageRow.time.is_not(None), ImageRow.time < where.before))
        if where.track is not None:
            conds.append(ImageRow.track == where.track)
        return and_(*conds)
    if where.cameras is not None:
        conds.append(ImageRow.camid.in_(sorted(where.cameras)) if where.cameras else ImageRow.id != ImageRow.id)
    if where.exclude_cameras:
        conds.append(or_(ImageRow.camid.is_(None), ImageRow.camid.not_in(sorted(where.exclude_cameras))))
    if where.since is not None:
        conds.append(and_(ImageRow.time.is_not(None), ImageRow.time >= where.since))
    if where.until is not None:
        conds.append(and_(ImageRow.time.is_not(None), ImageRow.time <= where.until))
    if where.exclude_tracks:
        conds.append(or_(ImageRow.track.is_(None), ImageRow.track.not_in(sorted(where.exclude_tracks))))
    return and_(true(), *conds)


@dataclass(frozen=True)
class State:
    """The ``gallery_state`` row."""

    generation: int = 0
    active: int = 0
    building: int | None = None
    model_fingerprint: str | None = None
    dim: int | None = None
    building_fingerprint: str | None = None
    building_dim: int | None = None
    spec: IndexSpec = IndexSpec()
    store_id: str | None = None

    def model_of(self, version: int) -> tuple[str | None, int | None]:
        """Fingerprint and dimension of a version's vectors."""
        if version == self.building and version != self.active:
            return self.building_fingerprint, self.building_dim
        return self.model_fingerprint, self.dim


@dataclass(frozen=True)
class Commit:
    """What :meth:`MetadataDB.commit` did."""

    added: np.ndarray  # int64 ids, input order
    removed: np.ndarray  # int64 ids that existed
    generation: int  # after the commit
    previous: int  # before it: differs from the caller's own when another process committed meanwhile
    fields: RowFields


class MetadataDB:
    """The SQL side of a gallery (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def read_only(self) -> bool:
        """True when the DB file could only be opened for reading."""
        return bool(getattr(self.engine, "info", {}).get("read_only"))

    # ---- state ----------------------------------------------------------------------

    def _state_row(self, s: Session) -> GalleryState:
        st = s.get(GalleryState, STATE_ROW_ID, with_for_update=True)
        if st is None:
            st = GalleryState(id=STATE_ROW_ID, index_spec=IndexSpec().to_json(), generation=0, updated_at=utcnow(),
                              active_gallery=0, store_id=uuid.uuid4().hex)
            s.add(st)
            s.flush()
        elif st.store_id is None:  # a DB made before store ids
            st.store_id = uuid.uuid4().hex
        return st

    def state(self) -> State:
        """The state row as it is now (defaults when there is none yet)."""
        with Session(self.engine) as s:
            st = s.get(GalleryState, STATE_ROW_ID)
            if st is None:
                return State()
            return State(int(st.generation), int(st.active_gallery or 0), st.building_gallery, st.model_fingerprint,
                         st.dim, st.building_fingerprint, st.building_dim, IndexSpec.from_json(st.index_spec), st.store_id)

    def ensure_state(self) -> State:
        """Create the state row (and the DB's identity) if missing; returns the state."""
        st = self.state()
        if st.store_id is not None:
            return st  # nothing to write: a reader must not queue behind a writer's transaction
        with Session(self.engine) as s, s.begin():
            self._state_row(s)
        return self.state()

    def generation(self) -> int:
        """The change counter in the DB now."""
        with Session(self.engine) as s:
            return int(s.scalar(select(GalleryState.generation).where(GalleryState.id == STATE_ROW_ID)) or 0)

    def set_spec(self, spec: IndexSpec) -> IndexSpec:
        """Store the index spec; returns the previous one."""
        with Session(self.engine) as s, s.begin():
            st = self._state_row(s)
            old = IndexSpec.from_json(st.index_spec)
            st.index_spec = spec.to_json()
            return old

    # ---- reading ----------------------------------------------------------------------

    def ids(self, version: int) -> np.ndarray:
        """Ids of a version, sorted."""
        with Session(self.engine) as s:
            return np.fromiter(s.scalars(select(ImageRow.id).where(ImageRow.gallery == version).order_by(ImageRow.id)),
                               dtype=np.int64)

    def fields(self, version: int, ids: Sequence[int] | None = None) -> RowFields:
        """Scalar fields of a version's rows (all, or ``ids``), id order."""
        cols = select(ImageRow.id, ImageRow.pid, ImageRow.camid, ImageRow.time, ImageRow.track).where(ImageRow.gallery == version)
        rows: list[Any] = []
        with Session(self.engine) as s:
            if ids is None:
                rows = list(s.execute(cols.order_by(ImageRow.id)))
            else:
                for part in chunks(sorted({int(i) for i in ids})):
                    rows += list(s.execute(cols.where(ImageRow.id.in_(part)).order_by(ImageRow.id)))
        return row_fields(rows)

    def metadata(self, ids: Iterable[int] | np.ndarray, version: int) -> list[ImageMeta]:
        """Metadata of ``ids`` in the same order.

        Raises:
            GalleryError: an id not in this version (e.g. -1 padding, or removed meanwhile).
        """
        wanted = [int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).ravel()]
        found: dict[int, ImageMeta] = {}
        with Session(self.engine) as s:
            for part in chunks(sorted(set(wanted))):
                q = (select(ImageRow, GalleryRoot.path).join(GalleryRoot)
                     .where(ImageRow.id.in_(part), ImageRow.gallery == version))
                for row, root in s.execute(q):
                    found[row.id] = image_meta(row, root)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise GalleryError(f"{len(missing)} id(s) not in the gallery (e.g. {missing[:5]}); they were removed or never existed")
        return [found[i] for i in wanted]

    def iter_metadata(self, version: int, batch_size: int = 10_000,
                      where: SearchFilter | RemoveFilter | None = None) -> Iterator[list[ImageMeta]]:
        """A version's metadata (those ``where`` selects) in id order, a batch at a time."""
        last = -(1 << 62)
        while True:
            with Session(self.engine) as s:
                q = (select(ImageRow, GalleryRoot.path).join(GalleryRoot)
                     .where(ImageRow.gallery == version, ImageRow.id > last, _where(where))
                     .order_by(ImageRow.id).limit(batch_size))
                batch = [image_meta(r, p) for r, p in s.execute(q)]
            if not batch:
                return
            yield batch
            last = batch[-1].id

    def count(self, version: int, where: SearchFilter | RemoveFilter | None = None) -> int:
        """Rows of a version that ``where`` selects."""
        with Session(self.engine) as s:
            q = select(func.count()).select_from(ImageRow).where(ImageRow.gallery == version, _where(where))
            return int(s.scalar(q) or 0)

    def labels(self, version: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, pids, camids)`` of a version in id order (int64, UNKNOWN where none)."""
        f = self.fields(version)
        return f.ids, f.pids, f.camids

    def vectors(self, ids: Iterable[int] | np.ndarray, dim: int) -> np.ndarray:
        """Stored features of ``ids`` in the given order.

        Raises:
            GalleryError: an id with no stored vector.
        """
        wanted = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).ravel()
        found: dict[int, bytes] = {}
        with Session(self.engine) as s:
            for part in chunks(sorted(set(wanted.tolist()))):
                for i, v in s.execute(select(Embedding.image_id, Embedding.vector).where(Embedding.image_id.in_(part))):
                    found[i] = v
        missing = [int(i) for i in wanted if int(i) not in found]
        if missing:
            raise GalleryError(f"{len(missing)} id(s) not in the gallery (e.g. {missing[:5]}); they were removed or never existed")
        return from_bytes([found[int(i)] for i in wanted], dim)

    def iter_vectors(self, version: int, dim: int, batch_size: int = 8192,
                     with_fields: bool = False) -> Iterator[tuple[Any, np.ndarray]]:
        """A version's ``(ids, feats)`` (or ``(RowFields, feats)``) in id order, a batch at a time."""
        last = -(1 << 62)
        while True:
            with Session(self.engine) as s:
                q = (select(Embedding.image_id, Embedding.vector, ImageRow.pid, ImageRow.camid, ImageRow.time, ImageRow.track)
                     .join(ImageRow, ImageRow.id == Embedding.image_id)
                     .where(ImageRow.gallery == version, Embedding.image_id > last)
                     .order_by(Embedding.image_id).limit(batch_size))
                rows = s.execute(q).all()
            if not rows:
                return
            x = from_bytes([r[1] for r in rows], dim)
            if with_fields:
                yield row_fields([(r[0], r[2], r[3], r[4], r[5]) for r in rows]), x
            else:
                yield np.array([r[0] for r in rows], dtype=np.int64), x
            last = int(rows[-1][0])

    def roots(self) -> list[Path]:
        """The registered gallery folders."""
        with Session(self.engine) as s:
            return [Path(os_path(p)) for p in s.scalars(select(GalleryRoot.path).order_by(GalleryRoot.path))]

    def existing(self, folder: Path, version: int) -> dict[str, tuple[int, str]]:
        """A version's images under ``folder``: path relative to ``folder`` → (id, sha256)."""
        folder = abs_path(folder)
        out: dict[str, tuple[int, str]] = {}
        with Session(self.engine) as s:
            for rid, stored in s.execute(select(GalleryRoot.id, GalleryRoot.path)):
                rp = Path(os_path(stored))
                base = select(ImageRow.rel_path, ImageRow.id, ImageRow.sha256).where(
                    ImageRow.root_id == rid, ImageRow.gallery == version)
                if folder.is_relative_to(rp):
                    prefix = folder.relative_to(rp).as_posix()
                    q = base if prefix == "." else base.where(ImageRow.rel_path.startswith(db_path(prefix) + "/", autoescape=True))
                    for rel, i, sha in s.execute(q):
                        rel = os_path(rel)
                        out[rel if prefix == "." else rel[len(prefix) + 1 :]] = (i, sha)
                elif rp.is_relative_to(folder):
                    prefix = rp.relative_to(folder).as_posix()
                    for rel, i, sha in s.execute(base):
                        out[f"{prefix}/{os_path(rel)}"] = (i, sha)
        return out

    def ids_under(self, paths: Iterable[str | os.PathLike[str]], version: int) -> tuple[set[int], list[str], list[int]]:
        """Ids of a version at or below each path: ``(ids, paths matching nothing, roots wholly selected)``."""
        ids: set[int] = set()
        unmatched: list[str] = []
        whole: list[int] = []
        with Session(self.engine) as s:
            roots = [(rid, Path(os_path(p))) for rid, p in s.execute(select(GalleryRoot.id, GalleryRoot.path))]
            for raw in paths:
                p = abs_path(Path(raw))
                hit = False
                for rid, rp in roots:
                    base = select(ImageRow.id).where(ImageRow.root_id == rid, ImageRow.gallery == version)
                    if p == rp or rp.is_relative_to(p):
                        found = list(s.scalars(base))
                        whole.append(rid)
                        hit = True
                    elif p.is_relative_to(rp):
                        rel = db_path(p.relative_to(rp).as_posix())
                        found = list(s.scalars(base.where(
                            (ImageRow.rel_path == rel) | ImageRow.rel_path.startswith(rel + "/", autoescape=True))))
                        hit = hit or bool(found)
                    else:
                        continue
                    ids.update(found)
                if not hit:
                    unmatched.append(str(raw))
        return ids, unmatched, whole

    def versions_present(self) -> list[int]:
        """Every gallery version that has rows."""
        with Session(self.engine) as s:
            return sorted(int(v) for v in s.scalars(select(ImageRow.gallery).distinct()))

    # ---- writing ----------------------------------------------------------------------

    def _root_for(self, s: Session, folder: Path) -> tuple[int, Path]:
        """The registered root holding ``folder`` (registering it if none does); roots never nest."""
        folder = abs_path(folder)
        roots = [(rid, Path(os_path(p))) for rid, p in s.execute(select(GalleryRoot.id, GalleryRoot.path))]
        for rid, rpath in roots:
            if folder.is_relative_to(rpath):
                return rid, rpath
        rid = s.scalar(insert(GalleryRoot).values(path=db_path(folder.as_posix()), added_at=utcnow()).returning(GalleryRoot.id))
        for old_id, rpath in roots:
            if rpath.is_relative_to(folder):  # an old root inside the new one: absorb it
                prefix = db_path(rpath.relative_to(folder).as_posix()) + "/"
                s.execute(update(ImageRow).where(ImageRow.root_id == old_id)
                          .values(root_id=rid, rel_path=prefix + ImageRow.rel_path))
                s.execute(delete(GalleryRoot).where(GalleryRoot.id == old_id))
                log.info("root %s now lies under the new root %s", rpath, folder)
        log.info("registered gallery root %s", folder)
        return int(rid), folder  # type: ignore[arg-type]

    def register_root(self, folder: Path) -> Path:
        """Register ``folder`` as a gallery root (no-op inside an existing root); returns the root."""
        with Session(self.engine) as s, s.begin():
            self._state_row(s)
            return self._root_for(s, folder)[1]

    def commit(self, version: int, images: Sequence[NewImage], feats: np.ndarray | None, fingerprint: str,
               dim: int, replace_ids: Iterable[int], store_vectors: bool, building: bool = False) -> Commit:
        """One transaction: delete ``replace_ids`` (and rows at the same paths), insert ``images``.

        ``feats`` are stored as embeddings when ``store_vectors``. The generation is
        bumped when ``version`` is the active gallery and something changed.

        Raises:
            GalleryError: the version holds another model's vectors.
            VersionMoved: ``version`` is no longer what the caller thinks (the active
                gallery, or the one being built): another process switched galleries.
        """
        now = utcnow()
        with Session(self.engine) as s, s.begin():
            st = self._state_row(s)
            previous = int(st.generation)
            expected = st.building_gallery if building else (st.active_gallery or 0)
            if version != expected:
                raise VersionMoved(f"gallery version {version} is no longer {'being built' if building else 'active'}")
            cur_fp, cur_dim = (st.building_fingerprint, st.building_dim) if building else (st.model_fingerprint, st.dim)
            if images and cur_fp is not None and (cur_fp != fingerprint or cur_dim != dim):
                n = s.scalar(select(func.count()).select_from(ImageRow).where(ImageRow.gallery == version)) or 0
                if n:
                    raise model_mismatch(cur_fp, cur_dim, fingerprint, dim)
            rows: list[dict[str, Any]] = []
            removed: set[int] = {int(i) for i in replace_ids}
            # Shallowest folders first: registering a root may absorb roots below it,
            # so deeper folders must be resolved after that.
            parents = sorted({abs_path(img.path).parent for img in images}, key=lambda p: len(p.parts))
            roots = {p: self._root_for(s, p) for p in parents}
            by_root: dict[int, list[str]] = {}
            for img in images:
                parent = abs_path(img.path).parent
                rid, root = roots[parent]
                rel = db_path((parent / img.path.name).relative_to(root).as_posix())
                by_root.setdefault(rid, []).append(rel)
                pid, camid, seq, frame = labels_of(img)
                rows.append({
                    "gallery": version, "root_id": rid, "rel_path": rel, "sha256": img.sha256,
                    "size_bytes": img.size_bytes, "pid": pid, "camid": camid, "seq": seq,
                    "frame": frame, "time": None if img.time is None else as_utc(img.time), "track": img.track,
                    "model_fingerprint": fingerprint, "indexed_at": now,
                })
            for rid, rels in by_root.items():  # a path already in the gallery is replaced
                for part in chunks(rels):
                    removed.update(s.scalars(select(ImageRow.id).where(
                        ImageRow.gallery == version, ImageRow.root_id == rid, ImageRow.rel_path.in_(part))))
            existing_removed: list[int] = []
            for part in chunks(sorted(removed)):
                existing_removed += list(s.scalars(select(ImageRow.id).where(ImageRow.id.in_(part), ImageRow.gallery == version)))
            for part in chunks(existing_removed):
                s.execute(delete(Embedding).where(Embedding.image_id.in_(part)))
                s.execute(delete(ImageRow).where(ImageRow.id.in_(part)))
            new_ids: list[int] = []
            if rows:
                new_ids = list(s.scalars(insert(ImageRow).returning(ImageRow.id, sort_by_parameter_order=True), rows))
                if store_vectors:
                    assert feats is not None
                    s.execute(insert(Embedding), [{"image_id": i, "vector": to_bytes(v)} for i, v in zip(new_ids, feats)])
            if not rows and not existing_removed:
                s.rollback()
                return Commit(np.zeros(0, np.int64), np.zeros(0, np.int64), previous, previous, row_fields([]))
            if rows:
                if building:
                    st.building_fingerprint, st.building_dim = fingerprint, dim
                else:
                    st.model_fingerprint, st.dim = fingerprint, dim
            if not building:
                st.generation += 1
                st.updated_at = now
            generation = int(st.generation)
        fields = row_fields([(i, r["pid"], r["camid"], r["time"], r["track"]) for i, r in zip(new_ids, rows)])
        return Commit(np.asarray(new_ids, np.int64), np.asarray(sorted(existing_removed), np.int64), generation, previous, fields)

    def drop_empty_roots(self, root_ids: Iterable[int] | None = None) -> None:
        """Unregister roots (these, or all) that hold no rows of any version."""
        with Session(self.engine) as s, s.begin():
            q = select(GalleryRoot.id)
            if root_ids is not None:
                q = q.where(GalleryRoot.id.in_(list(root_ids)))
            for rid in list(s.scalars(q)):
                if not s.scalar(select(func.count()).select_from(ImageRow).where(ImageRow.root_id == rid)):
                    s.execute(delete(GalleryRoot).where(GalleryRoot.id == rid))

    def clear(self, version: int) -> tuple[np.ndarray, int]:
        """Drop every row of the active ``version`` and its model (old ``--reindex``): ``(ids, generation)``."""
        with Session(self.engine) as s, s.begin():
            st = self._state_row(s)
            removed = np.fromiter(s.scalars(select(ImageRow.id).where(ImageRow.gallery == version)), dtype=np.int64)
            self._delete_version(s, version)
            st.model_fingerprint, st.dim = None, None
            st.generation += 1
            st.updated_at = utcnow()
            gen = int(st.generation)
        self.drop_empty_roots()
        return removed, gen

    def _delete_version(self, s: Session, version: int) -> None:
        sub = select(ImageRow.id).where(ImageRow.gallery == version)
        s.execute(delete(Embedding).where(Embedding.image_id.in_(sub)))
        s.execute(delete(ImageRow).where(ImageRow.gallery == version))

    def delete_version(self, version: int) -> int:
        """Delete every row of a version that is neither active nor building; returns how many."""
        with Session(self.engine) as s, s.begin():
            st = self._state_row(s)
            if version in (st.active_gallery, st.building_gallery):
                raise ValueError(f"gallery version {version} is in use")
            n = int(s.scalar(select(func.count()).select_from(ImageRow).where(ImageRow.gallery == version)) or 0)
            self._delete_version(s, version)
        self.drop_empty_roots()
        return n

    def begin_build(self) -> int:
        """Start a new gallery version (dropping an abandoned one first); returns it."""
        with Session(self.engine) as s, s.begin():
            st = self._state_row(s)
            if st.building_gallery is not None:
                self._delete_version(s, st.building_gallery)
            top = s.scalar(select(func.max(ImageRow.gallery))) or 0
            version = max(int(top), int(st.active_gallery or 0), int(st.building_gallery or 0)) + 1
            st.building_gallery, st.building_fingerprint, st.building_dim = version, None, None
            return version

    def abandon_build(self, version: int) -> None:
        """Delete a building version's rows and forget it."""
        with Session(self.engine) as s, s.begin():
            st = self._state_row(s)
            self._delete_version(s, version)
            if st.building_gallery == version:
                st.building_gallery, st.building_fingerprint, st.building_dim = None, None, None
        self.drop_empty_roots()

    def switch(self, version: int) -> tuple[int, int]:
        """Make the building ``version`` the active gallery in one transaction: ``(old version, generation)``.

        Raises:
            GalleryError: ``version`` is not the version being built (another re-index took over).
        """
        with Session(self.engine) as s, s.begin():
            st = self._state_row(s)
            if st.building_gallery != version:
                raise GalleryError(f"the re-index into gallery version {version} was abandoned by another process; run it again")
            old = int(st.active_gallery or 0)
            st.active_gallery = version
            st.model_fingerprint, st.dim = st.building_fingerprint, st.building_dim
            st.building_gallery, st.building_fingerprint, st.building_dim = None, None, None
            st.generation += 1
            st.updated_at = utcnow()
            return old, int(st.generation)


class SqlSource:
    """One gallery version's vectors as stored in SQL (what a cache backend is filled from)."""

    def __init__(self, meta: MetadataDB, version: int, dim: int) -> None:
        self.meta, self.version, self.dim = meta, version, dim

    def iter_rows(self, batch_size: int = 8192) -> Iterator[tuple[RowFields, np.ndarray]]:
        """Every row's fields and feature, id order."""
        return self.meta.iter_vectors(self.version, self.dim, batch_size, with_fields=True)

    def count(self) -> int:
        """Rows in the version."""
        return self.meta.count(self.version)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored features of ``ids``."""
        return self.meta.vectors(ids, self.dim)


class VersionMoved(GalleryError):
    """A write aimed at a gallery version that another process has replaced or abandoned."""


def model_mismatch(have_fp: str | None, have_dim: int | None, fingerprint: str, dim: int) -> GalleryError:
    """The error for features of another model than the gallery's."""
    return GalleryError(
        f"the gallery was indexed with model {have_fp} ({have_dim}-d) but this model is "
        f"{fingerprint} ({dim}-d); re-index with `reid-search index DIR --reindex` (replaces this gallery), "
        "or use another --workspace to keep both"
    )
