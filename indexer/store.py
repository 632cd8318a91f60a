"""Opening a gallery store from plain values: a DB URL, an index folder, a store location.

The store is put together from :mod:`indexer.metadata` (SQL: the record of
what is indexed; :mod:`indexer.db` its schema and engine), a backend factory
(:class:`indexer.faiss.backend.FaissFactory`, the default,
:class:`indexer.milvus.factory.MilvusFactory`, or a plug-in's: see
:func:`backend_factories`; the SPI is :mod:`indexer.protocol`) and
:mod:`indexer.coordinator` (locking, generation, repair on open, the atomic
switch of a re-index). A workspace's gallery is opened by
:func:`reid_search.app.session.open_workspace_gallery`, which reads these
values from the workspace.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Callable

from indexer.coordinator import Gallery
from indexer.db import make_engine
from indexer.location import StoreLocation, plugin_entry_points, unknown_store
from indexer.locking import LOCK_FILE, WriterLock
from indexer.metadata import MetadataDB, SqlSource
from indexer.migrations import current_revision, head_revision, upgrade_db
from indexer.protocol import BackendFactory
from indexer.spec import IndexSpec
from reid_search.errors import GalleryError

log = logging.getLogger(__name__)

OpenFactory = Callable[[StoreLocation], BackendFactory]  # what a store name maps to


def _faiss(location: StoreLocation) -> BackendFactory:
    from indexer.faiss.backend import FaissFactory

    return FaissFactory(location.home or ".")


def _milvus(location: StoreLocation) -> BackendFactory:
    from indexer.milvus.factory import MilvusFactory

    return MilvusFactory(location)


def _plugin(name: str, ep: metadata.EntryPoint) -> OpenFactory:
    """The opener of plug-in ``name``: loads its entry point and calls it with the location."""

    def open_plugin(location: StoreLocation) -> BackendFactory:
        where = f"{ep.value}" + (f" from {ep.dist.name}" if ep.dist is not None else "")
        try:
            make = ep.load()
        except Exception as exc:  # the plug-in's own import failed: say which, in one line
            why = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise GalleryError(f"the store plug-in {name!r} ({where}) failed to load ({why}); "
                               f"reinstall it, or choose another --store") from None
        factory = make(location)
        if not isinstance(factory, BackendFactory):
            raise GalleryError(f"the store plug-in {name!r} ({where}) returned a {type(factory).__name__}, "
                               "not an indexer.protocol.BackendFactory")
        return factory

    return open_plugin


def backend_factories() -> dict[str, OpenFactory]:
    """Every store name and the function that opens its factory from a :class:`StoreLocation`.

    The built-ins (faiss, milvus), then the plug-ins installed in the entry-point group
    ``reid_search.backends``, read now (see :mod:`indexer.protocol`); nothing is imported
    until a factory is opened. Each backend's modules load only then, so a Milvus gallery
    never loads faiss (nor a FAISS one pymilvus).
    """
    table: dict[str, OpenFactory] = {"faiss": _faiss, "milvus": _milvus}  # location.BUILTIN_STORES
    for name, ep in plugin_entry_points().items():
        table[name] = _plugin(name, ep)
    return table


def factory_for(location: StoreLocation | None, index_dir: str | os.PathLike[str]) -> BackendFactory:
    """The factory of a resolved store location (FAISS files in ``index_dir`` when ``None``).

    The location's ``home`` is ``index_dir`` unless it names one.

    Raises:
        GalleryError: a store name that is neither built in nor installed (listing the names there are),
            a plug-in that fails to load, or what the factory raises.
    """
    location = location or StoreLocation("faiss")
    if location.home is None:
        location = dataclasses.replace(location, home=str(Path(index_dir)))
    table = backend_factories()
    if location.kind not in table:
        raise unknown_store(location.to_str(), list(table))
    return table[location.kind](location)


def _held_elsewhere(meta: MetadataDB, factory: BackendFactory) -> str | None:
    """Why the active version's rows cannot be this store's (their vectors are in another kind of store), or ``None``.

    A store that holds the vectors commits none to SQL; a cache commits every one. Rows of the
    other kind, with the factory's backend holding none of them, would open as an empty gallery
    (a cache refills from SQL, which has no vectors) or lose their rows (the only copy's repair
    deletes rows without a vector).
    """
    st = meta.state()
    dim = st.model_of(st.active)[1]
    if dim is None:
        return None
    if next(meta.iter_metadata(st.active, batch_size=1), None) is None:  # one-row reads: cheap on every open
        return None
    sql_has = next(meta.iter_vectors(st.active, dim, batch_size=1), None) is not None
    if sql_has != factory.holds_vectors:
        return None  # the rows are of this kind of store
    if factory(st.active, dim, st.spec, st.store_id, SqlSource(meta, st.active, dim)).ntotal:
        return None  # it holds vectors of them after all: the coordinator reconciles
    rows = meta.count(st.active)
    if sql_has:
        return f"keeps the vectors of its {rows} images itself (a cache store such as faiss indexed them)"
    return f"records {rows} images whose vectors live in a store that holds them (SQL has none)"


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
            an empty DB beside an existing index (a lost or truncated DB file), a store name
            that is not built in nor installed, a plug-in that fails to load, or rows whose
            vectors live in another kind of store than this one (which holds none of them).
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
    meta = MetadataDB(engine)
    elsewhere = _held_elsewhere(meta, factory)
    if elsewhere is not None:
        raise GalleryError(
            f"the metadata DB {engine.url!r} {elsewhere}, but the {factory.kind} store holds none of them; "
            "open it with the store that indexed it (--store), or delete the DB to start a new gallery")
    gallery = Gallery(meta, index_dir, save_interval=save_interval, backend_factory=factory)
    if spec is not None and spec != gallery.spec:
        gallery.set_spec(spec)
    return gallery


__all__ = ["backend_factories", "factory_for", "open_gallery"]
