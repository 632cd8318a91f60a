"""The gallery's metadata DB: SQLAlchemy 2.0 typed models, the row codecs, and the engine factory.

Alembic owns the schema (``alembic/versions``); these models are its target,
and a test checks that the migrations produce exactly them.

The DB is the record of what the gallery holds: paths, labels, hashes, the
model, the index spec and the change counter. Where the vectors live depends
on the store: with FAISS every image row also carries its embedding (float32
bytes in :class:`Embedding`), so the FAISS index is a cache rebuilt or
reconciled from the DB; with Milvus the collection holds the only copy of the
vectors and ``embeddings`` stays empty (see :mod:`indexer.coordinator`).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from sqlalchemy import (BigInteger, DateTime, Engine, ForeignKey, Integer, LargeBinary, MetaData, String, Text,
                        UniqueConstraint, create_engine, event)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from indexer.paths import os_path
from indexer.protocol import RowFields
from reid_search.data import labels_from_name
from reid_search.errors import GalleryError, first_line
from reid_search.gallery import UNKNOWN, ImageMeta, NewImage
from reid_search.limits import MAX_TRACK_CHARS
from reid_search.timeutil import as_utc, to_micros

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only makes INTEGER PRIMARY KEY an alias of the rowid (and honours
# AUTOINCREMENT on it); elsewhere ids are 64-bit like FAISS ids.
IdType = BigInteger().with_variant(Integer(), "sqlite")

STATE_ROW_ID = 1


def utcnow() -> datetime:
    """Timezone-aware now, for the ``*_at`` columns."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base with a naming convention so constraint names are stable across backends."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class GalleryRoot(Base):
    """A registered gallery folder; image paths are stored relative to it. Roots never nest."""

    __tablename__ = "gallery_roots"

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ImageRow(Base):
    """One indexed crop. ``id`` is also its vector id in the backend.

    ``gallery`` is the version of the gallery the row belongs to: readers see
    only the active one (``gallery_state.active_gallery``); a re-index fills
    the next version beside it and switches in one transaction.
    ``rel_path`` is stored in the DB-safe form of :func:`indexer.paths.db_path`
    (a file name that is not UTF-8 is kept losslessly, escaped).
    """

    __tablename__ = "images"
    # AUTOINCREMENT: SQLite must never hand a deleted row's id to a new image,
    # or a stale FAISS vector (or a derived cache) could be taken for the new one.
    __table_args__ = (UniqueConstraint("gallery", "root_id", "rel_path"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    gallery: Mapped[int] = mapped_column(Integer, server_default="0")
    root_id: Mapped[int] = mapped_column(IdType, ForeignKey("gallery_roots.id", ondelete="RESTRICT"), index=True)
    rel_path: Mapped[str] = mapped_column(Text)
    pid: Mapped[int | None] = mapped_column(Integer, index=True)
    camid: Mapped[int | None] = mapped_column(Integer, index=True)
    time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)  # capture time, UTC
    track: Mapped[str | None] = mapped_column(String(MAX_TRACK_CHARS), index=True)
    seq: Mapped[int | None] = mapped_column(Integer)
    frame: Mapped[int | None] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    indexed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Embedding(Base):
    """The float32 feature of an image (``dim`` × 4 bytes, little-endian ``<f4``)."""

    __tablename__ = "embeddings"

    image_id: Mapped[int] = mapped_column(IdType, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class GalleryState(Base):
    """The single row describing the gallery: model, dimension, index spec, change counter."""

    __tablename__ = "gallery_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_fingerprint: Mapped[str | None] = mapped_column(String(64))
    dim: Mapped[int | None] = mapped_column(Integer)
    index_spec: Mapped[str] = mapped_column(Text, default='{"kind": "flat"}')
    # Bumped in the same transaction as every change of images, so a reader
    # (another process, a derived cache) can tell it is stale by comparing.
    generation: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The gallery version readers see, and the one a re-index is filling (NULL: none).
    active_gallery: Mapped[int] = mapped_column(Integer, server_default="0")
    building_gallery: Mapped[int | None] = mapped_column(Integer)
    building_fingerprint: Mapped[str | None] = mapped_column(String(64))
    building_dim: Mapped[int | None] = mapped_column(Integer)
    # Identity of this DB: saved with each vector index, so an index made against
    # another DB (same model, same ids) is told apart and rebuilt.
    store_id: Mapped[str | None] = mapped_column(String(32))


# ---- conversions between rows and the gallery's types ------------------------------------


def _utc(t: datetime | None) -> datetime | None:
    """A stored time as aware UTC (SQLite hands back naive UTC)."""
    return None if t is None else as_utc(t)


def image_meta(row: ImageRow, root: str) -> ImageMeta:
    """The :class:`ImageMeta` of a row, given its root's stored path."""
    rootp = Path(os_path(root))
    rel = os_path(row.rel_path)
    return ImageMeta(
        id=row.id, path=rootp / PurePosixPath(rel), rel_path=rel, root=rootp,
        pid=row.pid, camid=row.camid, seq=row.seq, frame=row.frame, sha256=row.sha256,
        size_bytes=row.size_bytes, model_fingerprint=row.model_fingerprint, indexed_at=_utc(row.indexed_at),  # type: ignore[arg-type]
        time=_utc(row.time), track=row.track,
    )


def to_bytes(v: np.ndarray) -> bytes:
    """A feature as stored in ``embeddings.vector`` (float32 little-endian)."""
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


def from_bytes(rows: Sequence[bytes], dim: int) -> np.ndarray:
    """Stored features back as a ``[n, dim]`` float32 matrix."""
    if not rows:
        return np.zeros((0, dim), np.float32)
    out = np.frombuffer(b"".join(rows), dtype="<f4").reshape(len(rows), dim)
    return out.astype(np.float32, copy=True)


def row_fields(rows: Sequence[tuple[int, int | None, int | None, datetime | None, str | None]]) -> RowFields:
    """``RowFields`` of ``(id, pid, camid, time, track)`` tuples."""
    n = len(rows)
    ids = np.fromiter((r[0] for r in rows), np.int64, n)
    pids = np.fromiter((UNKNOWN if r[1] is None else r[1] for r in rows), np.int64, n)
    camids = np.fromiter((UNKNOWN if r[2] is None else r[2] for r in rows), np.int64, n)
    times = np.fromiter((np.nan if r[3] is None else to_micros(r[3]) / 1e6 for r in rows), np.float64, n)
    return RowFields(ids, camids, pids, times, [r[4] for r in rows])


def labels_of(img: NewImage) -> tuple[int | None, int | None, int | None, int | None]:
    """``(pid, camid, seq, frame)`` of a crop: as given, or, when it carries none of them,
    parsed from a Market/Duke-style file name (older callers pass no labels)."""
    if img.pid is not None or img.camid is not None or img.seq is not None or img.frame is not None:
        return img.pid, img.camid, img.seq, img.frame
    return labels_from_name(img.path.name)


# ---- engine -------------------------------------------------------------------------

# The DBAPI driver each dialect needs when the URL names none, and how to get it.
_DRIVERS = {
    "postgresql": "install psycopg (pip install 'reid-search[postgres]') and use postgresql+psycopg://",
    "mysql": "install PyMySQL (pip install pymysql) and use mysql+pymysql://",
    "mariadb": "install PyMySQL (pip install pymysql) and use mariadb+pymysql://",
    "mssql": "install pyodbc (pip install pyodbc) and use mssql+pyodbc://",
    "oracle": "install python-oracledb (pip install oracledb) and use oracle+oracledb://",
}


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL, full fsync on commit and foreign keys.

    A SQLite file that cannot be written (a read-only workspace) is opened read-only.

    Raises:
        GalleryError: a URL SQLAlchemy cannot parse or whose driver is missing.
    """
    try:
        parsed = make_url(url)
    except Exception:
        raise GalleryError(f"--db {url!r} is not a SQLAlchemy URL (e.g. sqlite:///reid.db, postgresql+psycopg://user@host/db)") from None
    kwargs: dict[str, Any] = {}
    backend = parsed.get_backend_name()
    read_only = False
    if backend == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            folder = Path(db).parent
            read_only = (Path(db).is_file() and not os.access(db, os.W_OK)) or (
                folder.is_dir() and not os.access(folder, os.W_OK))
            if not read_only:
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise GalleryError(f"cannot create the folder of the SQLite DB {db} ({exc.strerror}); pass another --workspace or --db") from None
            elif Path(db).is_file():
                # A read-only folder cannot hold WAL's -shm file: read the file as immutable.
                parsed = parsed.set(database=f"file:{Path(db).resolve()}?mode=ro&immutable=1")
                parsed = parsed.update_query_dict({"uri": "true"})
        kwargs["connect_args"] = {"timeout": 60}
    try:
        engine = create_engine(parsed, **kwargs)
    except Exception as exc:  # missing DBAPI driver, bad options
        hint = _DRIVERS.get(backend, f"install the DBAPI driver of {backend}")
        raise GalleryError(f"cannot use the DB URL {parsed!r} ({first_line(exc)}); {hint}") from None
    if backend == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            if not read_only:
                # WAL lets a search server read while `index` writes; FULL makes
                # every commit durable (power loss must not lose a reported image).
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    engine.info = {"read_only": read_only}  # type: ignore[attr-defined]
    return engine
