"""The gallery indexer and store: SQL metadata plus vectors in FAISS or Milvus, incremental and crash-safe.

Public API::

    from indexer import open_gallery, index_folder, IndexSpec
    from reid_search.gallery import SearchFilter, RemoveFilter
    g = open_gallery("sqlite:///x.db", "index/")      # a workspace's: reid_search.app.session.open_workspace_gallery
    report = index_folder(g, "bounding_box_test", extractor)       # manifest="labels.csv" for time/track
    sims, ids = g.search(query_feats, k=10)           # cosine sims; Euclidean² = 2 - 2·sim
    sims, ids = g.search(query_feats, 10, SearchFilter(cameras=frozenset({1, 3})))  # filtered inside the backend
    metas = g.metadata(ids[0])                        # paths, pid, camid, time, track, ...
    g.remove_where(RemoveFilter(before=cutoff))       # retention / erasure
    index_folder(g, "bounding_box_test", other_extractor, reindex=True)  # built beside, switched atomically

The contract it implements (data types, filters, the reader and writer
protocols) is :mod:`reid_search.gallery`. Modules, top down: ``store``
(``open_gallery``) and ``pipeline`` (folder and manifest indexing);
``coordinator`` (SQL and vectors kept consistent: repair, refresh, atomic
re-index); the backends ``faiss`` (index types, files, the FAISS backend and
factory) and ``milvus`` (spec, filter expressions, client, backend, factory);
``metadata`` (SQL queries) and ``migrations`` (Alembic); ``db`` (schema and
engine); and at the bottom ``protocol`` (the backend SPI), ``spec`` (index
specs), ``location`` (``--store`` values), ``locking`` (the writer lock) and
``paths`` (how paths are stored).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names load on first use (PEP 562), so importing one submodule (e.g. for a
# constant) does not pull in faiss, SQLAlchemy and torch through the others.
_HOME = {
    "IndexReport": "pipeline", "index_folder": "pipeline",
    "Gallery": "coordinator",
    "open_gallery": "store", "sha256_file": "pipeline",
    "INDEX_KINDS": "spec", "IndexSpec": "spec", "VectorIndex": "faiss.index", "exact_search": "topk",
    "parse_index_spec": "spec",
}

if TYPE_CHECKING:
    from indexer.coordinator import Gallery
    from indexer.faiss.index import VectorIndex
    from indexer.pipeline import IndexReport, index_folder, sha256_file
    from indexer.spec import INDEX_KINDS, IndexSpec, parse_index_spec
    from indexer.store import open_gallery
    from indexer.topk import exact_search


def __getattr__(name: str) -> Any:
    """Import an exported name's submodule on first access."""
    if name not in _HOME:
        raise AttributeError(f"module 'indexer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"indexer.{_HOME[name]}"), name)
    globals()[name] = value
    return value


# Spelled out (not derived from _HOME) so that type checkers and linters see the exports.
__all__ = [
    "INDEX_KINDS", "Gallery", "IndexReport", "IndexSpec", "VectorIndex",
    "exact_search", "index_folder", "open_gallery", "parse_index_spec", "sha256_file",
]
