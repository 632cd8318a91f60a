"""Gallery metadata: roots, images, embeddings, state.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "gallery_roots",
        sa.Column("id", IdType, nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gallery_roots")),
        sa.UniqueConstraint("path", name=op.f("uq_gallery_roots_path")),
    )
    op.create_table(
        "images",
        sa.Column("id", IdType, nullable=False),
        sa.Column("root_id", IdType, nullable=False),
        sa.Column("rel_path", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("camid", sa.Integer(), nullable=True),
        sa.Column("seq", sa.Integer(), nullable=True),
        sa.Column("frame", sa.Integer(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("model_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("indexed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["root_id"], ["gallery_roots.id"], name=op.f("fk_images_root_id_gallery_roots"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("root_id", "rel_path", name=op.f("uq_images_root_id_rel_path")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_images_pid"), "images", ["pid"], unique=False)
    op.create_index(op.f("ix_images_root_id"), "images", ["root_id"], unique=False)
    op.create_table(
        "embeddings",
        sa.Column("image_id", IdType, nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_embeddings_image_id_images"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_embeddings")),
    )
    op.create_table(
        "gallery_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("dim", sa.Integer(), nullable=True),
        sa.Column("index_spec", sa.Text(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gallery_state")),
    )


def downgrade() -> None:
    op.drop_table("gallery_state")
    op.drop_table("embeddings")
    op.drop_index(op.f("ix_images_root_id"), table_name="images")
    op.drop_index(op.f("ix_images_pid"), table_name="images")
    op.drop_table("images")
    op.drop_table("gallery_roots")
