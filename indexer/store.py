"""Opening a gallery store from plain values: a DB URL, an index folder, a store location.

The store is put together from :mod:`indexer.metadata` (SQL: the record of
what is indexed; :mod:`indexer.db` its schema and engine), a backend factory
(:class:`indexer.faiss.backend.FaissFactory`, the default, or
:class:`indexer.milvus.factory.MilvusFactory`; the SPI is
:mod:`indexer.protocol`) and :mod:`indexer.coordinator` (locking, generation,
repair on open, the atomic switch of a re-index). A workspace's gallery is
opened by :func:`reid_search.app.session.open_workspace_gallery`, which reads
these values from the workspace.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from indexer.coordinator import Gallery
from indexer.db import make_engine
from indexer.location import StoreLocation
from indexer.locking import LOCK_FILE, WriterLock
from indexer.metadata import MetadataDB
from indexer.migrations import current_revision, head_revision, upgrade_db
from indexer.protocol import BackendFactory
from indexer.spec import IndexSpec
from reid_search.errors import GalleryError

log = logging.getLogger(__name__)


def factory_for(location: StoreLocation | None, index_dir: str | os.PathLike[str]) -> BackendFactory:
    """The factory of a resolved store location: Milvus for a Milvus location, else FAISS files in ``index_dir``.

    Each backend's modules load here, so a Milvus gallery never loads faiss (nor a FAISS one pymilvus).
    """
    if location is not None and location.kind == "milvus":
        from indexer.milvus.factory import MilvusFactory

        return MilvusFactory(location)
    from indexer.faiss.backend import FaissFactory

    return FaissFactory(index_dir)


def open_gallery(
    db_url: str | os.PathLike[str],
    index_dir: str | os.PathLike[str] | None = None,
    *,
    location: StoreLocation | None = None,
    backend_factory: BackendFactory | None = None,
    spec: IndexSpec | None = None,
    save_interval: float = 30.0,
    workspace_dir: str | os.PathLike[str] | None = None,
) -> Gallery:
    """Open (creating if needed) the gallery of a metadata DB and an index folder.

    ``db_url`` is a SQLAlchemy URL, or a plain path (a SQLite file). ``index_dir``
    holds the writer locks and the FAISS files. The vectors live where
    ``backend_factory`` says, else where ``location`` says (FAISS when ``None``).
    ``workspace_dir``: the workspace whose own store files (a Milvus Lite file)
    also count as a gallery beside an empty DB.

    Migrates the DB to the current schema, loads the vectors and repairs them from
    the DB if a crash left them behind. ``spec`` switches the index type (rebuilding).

    Raises:
        GalleryError: no ``index_dir``, an unreachable DB, an unknown schema, an unusable URL,
            or an empty DB beside an existing index (a lost or truncated DB file).
    """
    url = str(db_url)
    if "://" not in url:  # a plain path: a SQLite file
        url = f"sqlite:///{Path(url).resolve()}"
    if index_dir is None:
        raise GalleryError("open_gallery(URL) needs index_dir, the folder of the writer locks and the FAISS index files")
    index_dir = Path(index_dir)
    factory = backend_factory if backend_factory is not None else factory_for(location, index_dir)
    engine = make_engine(url)
    try:
        revision = current_revision(engine)
        reachable = True
    except Exception:  # unreachable DB: upgrade_db says so properly
        revision, reachable = None, False
    if reachable and revision is None:
        leftovers = factory.leftovers(workspace_dir)
        if leftovers:
            raise GalleryError(
                f"the metadata DB {engine.url!r} is empty (new, or a zero-byte file) but {leftovers[0]} holds a "
                f"gallery index; restore the DB from a backup, or delete {leftovers[0]} to start a new gallery")
    if not reachable or revision != head_revision():
        meta = MetadataDB(engine)
        if meta.read_only:
            raise GalleryError(f"the metadata DB {engine.url!r} is read-only and needs a schema upgrade; "
                               "run `reid-search db upgrade` once with write access")
        with WriterLock(index_dir / LOCK_FILE).hold():
            upgrade_db(engine)
    gallery = Gallery(MetadataDB(engine), index_dir, save_interval=save_interval, backend_factory=factory)
    if spec is not None and spec != gallery.spec:
        gallery.set_spec(spec)
    return gallery


__all__ = ["factory_for", "open_gallery"]
