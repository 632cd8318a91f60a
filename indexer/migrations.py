"""Applying the Alembic migrations of the metadata DB from code.

The scripts live in ``alembic/`` at the repository root (or, in a wheel that
force-includes them, in ``indexer/alembic``); the URL or connection is passed
programmatically, so no alembic.ini is needed at run time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.engine import Connection

from reid_search.errors import GalleryError, first_line

log = logging.getLogger(__name__)

_CANDIDATES = (
    Path(__file__).resolve().parent / "alembic",  # packaged copy
    Path(__file__).resolve().parents[1] / "alembic",  # source checkout
)


def script_location() -> Path:
    """The folder holding ``env.py`` and ``versions/``.

    Raises:
        GalleryError: no migration scripts are installed.
    """
    for cand in _CANDIDATES:
        if (cand / "env.py").is_file():
            return cand
    raise GalleryError(
        f"the DB migration scripts are missing (looked in {', '.join(map(str, _CANDIDATES))}); "
        "reinstall reid-search from a source checkout"
    )


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic config pointing at the scripts and, if given, a connection or URL."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["connection"] = connection
    cfg.attributes["configure_logger"] = False
    return cfg


def head_revision() -> str | None:
    """The newest revision of the scripts."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the DB is at (``None`` for an empty DB)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_db(engine: Engine) -> tuple[str | None, str | None]:
    """Migrate the DB to head; a no-op when it is there already.

    Returns ``(revision before, revision after)``.

    Raises:
        GalleryError: the DB is newer than this code, or unreachable.
    """
    head = head_revision()
    try:
        before = current_revision(engine)
    except Exception as exc:  # OperationalError & co: bad URL, server down, permissions
        raise GalleryError(f"cannot open the metadata DB {engine.url!r} ({first_line(exc)}); check --db / REID_SEARCH_DB") from None
    if before == head:
        return before, head
    known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if before is not None and before not in known:
        raise GalleryError(
            f"the metadata DB {engine.url!r} is at schema revision {before}, which this version of reid-search "
            "does not know; upgrade reid-search"
        )
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")
    log.info("migrated the metadata DB %s from %s to %s", engine.url, before or "empty", head)
    return before, head
