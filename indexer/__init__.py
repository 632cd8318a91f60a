"""The gallery indexer and store: FAISS vectors + SQL metadata, incremental and crash-safe.

Public API::

    from indexer import open_gallery, IndexSpec, SearchFilter, RemoveFilter
    g = open_gallery(workspace)                       # or open_gallery("sqlite:///x.db", "index/")
    report = g.add_folder("bounding_box_test", extractor)          # manifest="labels.csv" for time/track
    sims, ids = g.search(query_feats, k=10)           # cosine sims; Euclidean² = 2 - 2·sim
    sims, ids = g.search(query_feats, 10, SearchFilter(cameras=frozenset({1, 3})))  # filtered inside FAISS
    metas = g.metadata(ids[0])                        # paths, pid, camid, time, track, ...
    g.remove_where(RemoveFilter(before=cutoff))       # retention / erasure
    with g.replacing() as new:                        # re-index beside the old gallery, switch atomically
        new.add_folder("bounding_box_test", other_extractor)

Modules: ``protocol`` (the GalleryStore / VectorBackend protocols and filters),
``metadata`` (SQL), ``faiss_backend`` (FAISS vectors + filter fields),
``coordinator`` (locking, repair, refresh, atomic re-index), ``store`` (``open_gallery``),
``pipeline`` (folder and manifest indexing), ``vectors`` (FAISS index types).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names load on first use (PEP 562), so importing one submodule (e.g. for a
# constant) does not pull in faiss, SQLAlchemy and torch through the others.
_HOME = {
    "IndexReport": "pipeline", "index_folder": "pipeline",
    "ChangeEvent": "store", "Gallery": "store", "ImageMeta": "store", "NewImage": "store",
    "RemoveFilter": "protocol", "SearchFilter": "protocol", "GalleryStore": "protocol",
    "open_gallery": "store", "sha256_file": "store",
    "KINDS": "spec", "IndexSpec": "spec", "VectorIndex": "vectors", "exact_search": "vectors",
    "parse_index_spec": "spec",
}

if TYPE_CHECKING:
    from indexer.pipeline import IndexReport, index_folder
    from indexer.protocol import GalleryStore, RemoveFilter, SearchFilter
    from indexer.store import ChangeEvent, Gallery, ImageMeta, NewImage, open_gallery, sha256_file
    from indexer.spec import KINDS, IndexSpec, parse_index_spec
    from indexer.vectors import VectorIndex, exact_search


def __getattr__(name: str) -> Any:
    """Import an exported name's submodule on first access."""
    if name not in _HOME:
        raise AttributeError(f"module 'indexer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"indexer.{_HOME[name]}"), name)
    globals()[name] = value
    return value


# Spelled out (not derived from _HOME) so that type checkers and linters see the exports.
__all__ = [
    "KINDS", "ChangeEvent", "Gallery", "GalleryStore", "ImageMeta", "IndexReport", "IndexSpec", "NewImage",
    "RemoveFilter", "SearchFilter", "VectorIndex",
    "exact_search", "index_folder", "open_gallery", "parse_index_spec", "sha256_file",
]
