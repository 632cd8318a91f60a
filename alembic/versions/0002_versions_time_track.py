"""Capture time and track of each crop; gallery versions for atomic re-index; DB identity.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

``images`` gains ``gallery`` (the version a row belongs to; existing rows are
version 0, the active one), ``time`` and ``track``; the unique (root, path)
becomes unique per version. ``gallery_state`` gains the active and building
versions and ``store_id``. Nothing is rewritten except on SQLite, where the
``images`` table is copied (batch mode): its embeddings and its AUTOINCREMENT
high-water mark are kept explicitly, because dropping the old table with
foreign keys on would cascade into ``embeddings``.
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _images(recreate: str) -> None:
    with op.batch_alter_table("images", recreate=recreate, table_kwargs={"sqlite_autoincrement": True}) as b:
        b.add_column(sa.Column("gallery", sa.Integer(), server_default="0", nullable=False))
        b.add_column(sa.Column("time", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("track", sa.String(length=255), nullable=True))
        b.drop_constraint("uq_images_root_id_rel_path", type_="unique")
        b.create_unique_constraint("uq_images_gallery_root_id_rel_path", ["gallery", "root_id", "rel_path"])
        b.create_index("ix_images_camid", ["camid"], unique=False)
        b.create_index("ix_images_time", ["time"], unique=False)
        b.create_index("ix_images_track", ["track"], unique=False)


def _restore_sequence(bind: sa.Connection, seq: int | None) -> None:
    """Put back the AUTOINCREMENT high-water mark of the copied SQLite ``images`` table: ids of
    deleted rows must never come back."""
    if seq is None:
        return
    op.execute(sa.text("UPDATE sqlite_sequence SET seq = max(seq, :s) WHERE name = 'images'").bindparams(s=int(seq)))
    if bind.execute(sa.text("SELECT count(*) FROM sqlite_sequence WHERE name = 'images'")).scalar() == 0:
        op.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('images', :s)").bindparams(s=int(seq)))


def upgrade() -> None:
    bind = op.get_bind()
    sqlite = bind.dialect.name == "sqlite"
    seq = None
    if sqlite:
        op.execute("CREATE TABLE _embeddings_0002 AS SELECT image_id, vector FROM embeddings")
        seq = bind.execute(sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'images'")).scalar()
    _images("always" if sqlite else "auto")
    if sqlite:
        op.execute("INSERT INTO embeddings (image_id, vector) SELECT b.image_id, b.vector FROM _embeddings_0002 b "
                   "WHERE b.image_id NOT IN (SELECT image_id FROM embeddings)")
        op.execute("DROP TABLE _embeddings_0002")
        _restore_sequence(bind, seq)
    with op.batch_alter_table("gallery_state") as b:
        b.add_column(sa.Column("active_gallery", sa.Integer(), server_default="0", nullable=False))
        b.add_column(sa.Column("building_gallery", sa.Integer(), nullable=True))
        b.add_column(sa.Column("building_fingerprint", sa.String(length=64), nullable=True))
        b.add_column(sa.Column("building_dim", sa.Integer(), nullable=True))
        b.add_column(sa.Column("store_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    bind = op.get_bind()
    sqlite = bind.dialect.name == "sqlite"
    # Only the active version survives a downgrade: after a re-index that is not version 0.
    active = "COALESCE((SELECT active_gallery FROM gallery_state WHERE id = 1), 0)"
    op.execute(f"DELETE FROM embeddings WHERE image_id IN (SELECT id FROM images WHERE gallery <> {active})")
    op.execute(f"DELETE FROM images WHERE gallery <> {active}")
    with op.batch_alter_table("gallery_state") as b:
        for col in ("store_id", "building_dim", "building_fingerprint", "building_gallery", "active_gallery"):
            b.drop_column(col)
    seq = None
    if sqlite:
        op.execute("CREATE TABLE _embeddings_0002 AS SELECT image_id, vector FROM embeddings")
        seq = bind.execute(sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'images'")).scalar()
    with op.batch_alter_table("images", recreate="always" if sqlite else "auto",
                              table_kwargs={"sqlite_autoincrement": True}) as b:
        b.drop_index("ix_images_track")
        b.drop_index("ix_images_time")
        b.drop_index("ix_images_camid")
        b.drop_constraint("uq_images_gallery_root_id_rel_path", type_="unique")
        b.create_unique_constraint("uq_images_root_id_rel_path", ["root_id", "rel_path"])
        b.drop_column("track")
        b.drop_column("time")
        b.drop_column("gallery")
    if sqlite:
        op.execute("INSERT INTO embeddings (image_id, vector) SELECT b.image_id, b.vector FROM _embeddings_0002 b "
                   "WHERE b.image_id NOT IN (SELECT image_id FROM embeddings)")
        op.execute("DROP TABLE _embeddings_0002")
        _restore_sequence(bind, seq)
