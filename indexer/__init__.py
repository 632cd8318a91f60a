"""The gallery indexer and store: FAISS vectors + SQL metadata, incremental and crash-safe.

Public API::

    from indexer import open_gallery, IndexSpec
    g = open_gallery(workspace)                       # or open_gallery("sqlite:///x.db", "index/")
    report = g.add_folder("bounding_box_test", extractor)
    sims, ids = g.search(query_feats, k=10)           # cosine sims; Euclidean² = 2 - 2·sim
    metas = g.metadata(ids[0])                        # paths, pid, camid, ...
    ids, feats = g.all_vectors()                      # exact stored features
"""

from indexer.pipeline import IndexReport, index_folder
from indexer.store import ChangeEvent, Gallery, ImageMeta, NewImage, open_gallery, sha256_file
from indexer.vectors import KINDS, IndexSpec, VectorIndex, exact_search, parse_index_spec

__all__ = [
    "KINDS", "ChangeEvent", "Gallery", "ImageMeta", "IndexReport", "IndexSpec", "NewImage", "VectorIndex",
    "exact_search", "index_folder", "open_gallery", "parse_index_spec", "sha256_file",
]
