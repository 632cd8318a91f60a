"""Alembic environment of the gallery metadata DB.

Called two ways:
- by the application (indexer.migrations.upgrade_db), which hands over an open
  connection in ``config.attributes["connection"]`` and configures no logging;
- by a developer (``uv run alembic ...`` with the repo's alembic.ini), where the
  URL comes from ``-x db=URL``, ``sqlalchemy.url``, $REID_SEARCH_DB or the
  workspace's SQLite file.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection

from indexer.db import Base

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("db") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    import os
    from pathlib import Path

    from reid_search.app.workspace import DEFAULT_WORKSPACE, WORKSPACE_ENV, Workspace

    return Workspace(Path(os.environ.get(WORKSPACE_ENV, DEFAULT_WORKSPACE))).db_url


def _configure(**kw: object) -> None:
    # Batch mode lets ALTERs run on SQLite (copy-and-move of the table).
    context.configure(target_metadata=target_metadata, render_as_batch=True, compare_type=True, **kw)  # type: ignore[arg-type]


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade head --sql``)."""
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate through the given connection, or a throwaway engine on the URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
