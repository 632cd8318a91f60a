"""Opening a gallery store, and the names older code imports from here.

The store is three modules with one job each: :mod:`indexer.metadata` (SQL
metadata, the source of truth), :mod:`indexer.faiss.backend` (the FAISS
vectors and the fields filters read) and :mod:`indexer.coordinator`
(locking, generation, repair on open, the atomic switch of a re-index).
:func:`open_gallery` puts them together.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from indexer.coordinator import LOCK_FILE, BackendFactory, Gallery, WriterLock
from indexer.metadata import MetadataDB, make_engine
from indexer.migrations import current_revision, head_revision, upgrade_db
from reid_search.gallery import ChangeEvent, ImageMeta, NewImage, RemoveFilter, SearchFilter
from indexer.spec import IndexSpec
from reid_search.errors import GalleryError
from reid_search.app.workspace import Workspace

log = logging.getLogger(__name__)

INDEX_FILE = "gallery.faiss"


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


def _index_files(index_dir: Path) -> list[Path]:
    if not index_dir.is_dir():
        return []
    from indexer.faiss.backend import file_version  # loads faiss: only where there are files to look at

    return sorted(p for p in index_dir.iterdir() if file_version(p) is not None and p.is_file() and p.stat().st_size > 0)


def open_gallery(
    target: Workspace | str | os.PathLike[str],
    index_dir: str | os.PathLike[str] | None = None,
    *,
    spec: IndexSpec | None = None,
    save_interval: float = 30.0,
    backend_factory: BackendFactory | None = None,
) -> Gallery:
    """Open (creating if needed) the gallery of a workspace, or of a DB URL plus an index folder.

    Migrates the DB to the current schema, loads the vectors and repairs them from
    the DB if a crash left them behind. ``spec`` switches the index type (rebuilding).
    ``backend_factory`` opens another vector backend than FAISS (see
    :data:`indexer.coordinator.BackendFactory`).

    Raises:
        GalleryError: unreachable DB, unknown schema, an unusable URL, or an empty
            DB beside an existing index (a lost or truncated DB file).
    """
    factory = backend_factory
    if factory is None and isinstance(target, Workspace):  # --store: FAISS (default) or Milvus; the workspace remembers it
        from indexer.milvus.factory import factory_for

        location = target.store()  # before anything creates the workspace's files
        factory = factory_for(location)
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
        revision = current_revision(engine)
        reachable = True
    except Exception:  # unreachable DB: upgrade_db says so properly
        revision, reachable = None, False
    if reachable and revision is None:
        leftovers = _index_files(index_dir)
        if not leftovers and isinstance(target, Workspace) and hasattr(factory, "leftovers"):
            leftovers = factory.leftovers(target.root)  # type: ignore[union-attr]  # the workspace's Milvus Lite file
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
    if isinstance(target, Workspace) and backend_factory is None and not gallery.meta.read_only:
        target.record_store(location)
    if spec is not None and spec != gallery.spec:
        gallery.set_spec(spec)
    return gallery


__all__ = [
    "INDEX_FILE", "ChangeEvent", "Gallery", "ImageMeta", "IndexSpec", "NewImage", "RemoveFilter", "SearchFilter",
    "make_engine", "open_gallery", "sha256_file",
]
