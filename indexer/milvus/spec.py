"""Milvus index types and their parameters, and the translation from a FAISS-style :class:`~indexer.spec.IndexSpec`."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable


from reid_search.errors import GalleryError

log = logging.getLogger(__name__)

# ---- index types -----------------------------------------------------------

# --index-type name -> Milvus index_type
MILVUS_INDEX_TYPES: dict[str, str] = {
    "flat": "FLAT",
    "ivf": "IVF_FLAT",
    "ivfsq8": "IVF_SQ8",
    "ivfpq": "IVF_PQ",
    "hnsw": "HNSW",
    "diskann": "DISKANN",
}
# What Milvus Lite (milvus-lite 3.x) builds; the rest need a Milvus server.
LITE_INDEX_TYPES = ("flat", "ivf", "ivfsq8", "hnsw")
MILVUS_DEFAULT_NLIST = 128  # what Milvus builds an IVF index with when nlist is not given
# Parameters each type takes at build time and at search time (Milvus names).
BUILD_PARAMS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf": ("nlist",),
    "ivfsq8": ("nlist",),
    "ivfpq": ("nlist", "m", "nbits"),
    "hnsw": ("M", "efConstruction"),
    "diskann": (),
}
SEARCH_PARAMS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf": ("nprobe",),
    "ivfsq8": ("nprobe",),
    "ivfpq": ("nprobe",),
    "hnsw": ("ef",),
    "diskann": ("search_list",),
}
# The FAISS-style names reid-search uses for the same knobs.
PARAM_ALIASES = {"hnsw_m": "M", "m_hnsw": "M", "ef_construction": "efConstruction", "ef_search": "ef",
                 "pq_m": "m", "search_list_size": "search_list"}


@dataclass(frozen=True)
class MilvusIndexSpec:
    """How a Milvus collection's vector index is built and searched.

    ``kind`` is a key of :data:`MILVUS_INDEX_TYPES`; ``params`` are Milvus
    parameter names with integer values (``nlist``, ``M``, ``ef``, ...); a
    parameter not given takes Milvus's default.
    """

    kind: str = "flat"
    params: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in MILVUS_INDEX_TYPES:
            raise GalleryError(f"unknown Milvus index type {self.kind!r}; choose one of {', '.join(MILVUS_INDEX_TYPES)}")
        object.__setattr__(self, "params", tuple(sorted((str(k), int(v)) for k, v in self.params)))

    @property
    def index_type(self) -> str:
        """The Milvus ``index_type``, e.g. ``IVF_SQ8``."""
        return MILVUS_INDEX_TYPES[self.kind]

    def build_params(self) -> dict[str, int]:
        """Parameters for ``create_index``."""
        return {k: v for k, v in self.params if k in BUILD_PARAMS[self.kind]}

    def search_params(self, k: int | None = None) -> dict[str, int]:
        """Parameters for a ``search`` of ``k`` hits; those not given are automatic, as for FAISS.

        ``nprobe`` = max(32, nlist/5) (Milvus's own default, 8 of 128 lists, misses
        much under a filter); HNSW ``ef`` = max(128, 2k); ``ef`` and DiskANN's
        ``search_list`` are raised to k where smaller (Milvus refuses less).
        """
        out = {name: v for name, v in self.params if name in SEARCH_PARAMS[self.kind]}
        if "nprobe" in SEARCH_PARAMS[self.kind] and "nprobe" not in out:
            nlist = dict(self.params).get("nlist", MILVUS_DEFAULT_NLIST)
            out["nprobe"] = min(nlist, max(32, nlist // 5))
        if self.kind == "hnsw":
            out["ef"] = max(out.get("ef", max(128, 2 * (k or 0))), k or 0)
        if self.kind == "diskann" and "search_list" in out:
            out["search_list"] = max(out["search_list"], k or 0)
        return out

    def to_json(self) -> str:
        """Compact form (stored beside the gallery)."""
        return json.dumps({"kind": self.kind, **dict(self.params)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MilvusIndexSpec":
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        kind = d.pop("kind", "flat")
        return cls(kind, tuple(d.items()))

    def describe(self) -> str:
        """E.g. ``milvus HNSW (M=16)``."""
        p = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"milvus {self.index_type}" + (f" ({p})" if p else "")


def parse_milvus_spec(kind: str, params: Iterable[str] = (), lite: bool = False) -> MilvusIndexSpec:
    """A spec from ``--index-type`` and ``--index-param KEY=VALUE`` strings.

    Raises:
        GalleryError: unknown type or key, a non-integer value, or a type Milvus Lite cannot build.
    """
    kind = kind.lower().replace("_", "")
    kind = {"ivfflat": "ivf"}.get(kind, kind)
    if kind not in MILVUS_INDEX_TYPES:
        raise GalleryError(f"unknown Milvus index type {kind!r}; choose one of {', '.join(MILVUS_INDEX_TYPES)}")
    if lite and kind not in LITE_INDEX_TYPES:
        raise GalleryError(
            f"Milvus Lite cannot build {MILVUS_INDEX_TYPES[kind]} (it builds {', '.join(LITE_INDEX_TYPES)}); "
            "choose one of those, or use a Milvus server: --store http://HOST:19530"
        )
    allowed = BUILD_PARAMS[kind] + SEARCH_PARAMS[kind]
    values: dict[str, int] = {}
    for item in params:
        key, sep, value = item.partition("=")
        key = key.strip()
        key = PARAM_ALIASES.get(key, key)
        if not sep or key not in allowed:
            raise GalleryError(f"--index-param {item!r}: Milvus {MILVUS_INDEX_TYPES[kind]} takes KEY=VALUE with KEY one of: "
                               f"{', '.join(allowed) or 'none'}")
        try:
            values[key] = int(value)
        except ValueError:
            raise GalleryError(f"--index-param {item!r}: the value must be an integer") from None
        if values[key] <= 0:
            raise GalleryError(f"--index-param {item!r}: the value must be positive")
    return MilvusIndexSpec(kind, tuple(values.items()))



# ---- plugging into the coordinator ----------------------------------------------

# FAISS-style index kinds (what the SQL state records) -> Milvus kinds; parameters renamed alike.
_FROM_FAISS_KIND = {"flat": "flat", "ivf": "ivf", "ivfpq": "ivfpq", "hnsw": "hnsw", "ivfsq8": "ivfsq8",
                    "diskann": "diskann"}
_FROM_FAISS_PARAM = {"nlist": "nlist", "nprobe": "nprobe", "pq_m": "m", "hnsw_m": "M",
                     "ef_construction": "efConstruction", "ef_search": "ef", "search_list": "search_list"}


def spec_from_index_spec(spec: Any, lite: bool = False) -> MilvusIndexSpec:
    """The Milvus index for a gallery's recorded :class:`indexer.spec.IndexSpec`.

    ``flat``/``ivf``/``ivfpq``/``hnsw``/``ivfsq8``/``diskann`` become
    FLAT/IVF_FLAT/IVF_PQ/HNSW/IVF_SQ8/DISKANN with the parameters that have a
    Milvus counterpart (0 = automatic: see :meth:`MilvusIndexSpec.search_params`).

    Raises:
        GalleryError: an unknown type, or one Milvus Lite cannot build, on Lite.
    """
    if spec is None:
        return MilvusIndexSpec()
    kind = getattr(spec, "kind", "flat")
    if kind not in _FROM_FAISS_KIND:
        raise GalleryError(f"unknown index type {kind!r} for the Milvus store; choose one of {', '.join(_FROM_FAISS_KIND)}")
    kind = _FROM_FAISS_KIND[kind]
    params = []
    for name, milvus_name in _FROM_FAISS_PARAM.items():
        v = int(getattr(spec, name, 0) or 0)
        if v > 0 and milvus_name in BUILD_PARAMS[kind] + SEARCH_PARAMS[kind]:
            params.append(f"{milvus_name}={v}")
    return parse_milvus_spec(kind, params, lite=lite)


