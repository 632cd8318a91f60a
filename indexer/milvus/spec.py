"""A gallery's :class:`~indexer.spec.IndexSpec` in Milvus's words: index types and parameter names.

The spec itself, its parser and the automatic search parameters are
:mod:`indexer.spec`'s, shared with FAISS; this module only translates. Each kind
maps to a Milvus ``index_type`` and each of its :class:`IndexSpec` fields that Milvus
has to that parameter's Milvus name (:data:`MILVUS_NAMES`); the fields Milvus has
no counterpart for (``min_train``, ``k_factor``, ``refine_bits``) are not sent.
"""

from __future__ import annotations

from typing import NamedTuple

from reid_search.errors import GalleryError
from indexer.spec import IndexSpec, auto_ef, auto_nprobe


class MilvusNames(NamedTuple):
    """How Milvus names one kind: its ``index_type``, and ``IndexSpec`` field -> Milvus parameter."""

    index_type: str
    build: dict[str, str]
    search: dict[str, str]


MILVUS_NAMES: dict[str, MilvusNames] = {
    "flat": MilvusNames("FLAT", {}, {}),
    "ivf": MilvusNames("IVF_FLAT", {"nlist": "nlist"}, {"nprobe": "nprobe"}),
    "ivfsq8": MilvusNames("IVF_SQ8", {"nlist": "nlist"}, {"nprobe": "nprobe"}),
    "ivfpq": MilvusNames("IVF_PQ", {"nlist": "nlist", "pq_m": "m"}, {"nprobe": "nprobe"}),
    "hnsw": MilvusNames("HNSW", {"hnsw_m": "M", "ef_construction": "efConstruction"}, {"ef_search": "ef"}),
    "diskann": MilvusNames("DISKANN", {}, {"search_list": "search_list"}),
}
# What Milvus Lite (milvus-lite 3.x) builds; the rest need a Milvus server.
LITE_INDEX_TYPES = ("flat", "ivf", "ivfsq8", "hnsw")
MILVUS_DEFAULT_NLIST = 128  # what Milvus builds an IVF index with when nlist is not given


def check_milvus_spec(spec: IndexSpec, lite: bool = False) -> None:
    """Refuse, in one line, an index type the Milvus store cannot build here.

    Raises:
        GalleryError: ``ivfpq`` or ``diskann`` on Milvus Lite.
    """
    if lite and spec.kind not in LITE_INDEX_TYPES:
        raise GalleryError(
            f"Milvus Lite cannot build {index_type(spec)} (it builds {', '.join(LITE_INDEX_TYPES)}); "
            "choose one of those, or use a Milvus server: --store http://HOST:19530"
        )


def index_type(spec: IndexSpec) -> str:
    """The Milvus ``index_type`` of ``spec``, e.g. ``IVF_SQ8``."""
    return MILVUS_NAMES[spec.kind].index_type


def build_params(spec: IndexSpec) -> dict[str, int]:
    """Parameters for ``create_index`` (Milvus names; those left automatic take Milvus's defaults)."""
    return {name: int(getattr(spec, field)) for field, name in MILVUS_NAMES[spec.kind].build.items()
            if getattr(spec, field)}


def search_params(spec: IndexSpec, k: int = 0) -> dict[str, int]:
    """Parameters for a ``search`` of ``k`` hits (Milvus names), automatic ones as for FAISS.

    ``nprobe`` is :func:`~indexer.spec.auto_nprobe` (Milvus's own default, 8 of 128
    lists, misses much under a filter) and HNSW's ``ef`` :func:`~indexer.spec.auto_ef`;
    DiskANN's ``search_list``, when given, is raised to k (Milvus refuses less) and
    otherwise left to Milvus.
    """
    names = MILVUS_NAMES[spec.kind].search
    out: dict[str, int] = {}
    if "nprobe" in names:
        out[names["nprobe"]] = auto_nprobe(spec, spec.nlist or MILVUS_DEFAULT_NLIST)
    if "ef_search" in names:
        out[names["ef_search"]] = auto_ef(spec, k)
    if "search_list" in names and spec.search_list:
        out[names["search_list"]] = max(spec.search_list, k)
    return out


def describe(spec: IndexSpec) -> str:
    """E.g. ``milvus HNSW (M=16, efConstruction=80)`` (for log lines)."""
    p = ", ".join(f"{k}={v}" for k, v in build_params(spec).items())
    return f"milvus {index_type(spec)}" + (f" ({p})" if p else "")


__all__ = ["LITE_INDEX_TYPES", "MILVUS_DEFAULT_NLIST", "MILVUS_NAMES", "MilvusNames", "build_params",
           "check_milvus_spec", "describe", "index_type", "search_params"]
