"""The gallery's metadata schema: SQLAlchemy 2.0 typed models.

Alembic owns the schema (``alembic/versions``); these models are its target,
and a test checks that the migrations produce exactly them.

The DB is the gallery's source of truth: every image row carries its
embedding (float32 bytes in :class:`Embedding`), so the FAISS index is a
cache that can always be rebuilt or reconciled from the DB.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, LargeBinary, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

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
    ``rel_path`` is stored in the DB-safe form of :func:`indexer.metadata.db_path`
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
    track: Mapped[str | None] = mapped_column(String(255), index=True)
    seq: Mapped[int | None] = mapped_column(Integer)
    frame: Mapped[int | None] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    indexed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Embedding(Base):
    """The float32 feature of an image (``dim`` × 4 bytes, native little-endian)."""

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
