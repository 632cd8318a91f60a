"""The index type of a gallery, as its SQL state records it: plain data, no faiss.

:class:`IndexSpec` says which index a gallery's vectors are searched with and its
parameters (0 = automatic). The FAISS store builds ``flat``, ``ivf``, ``ivfpq`` and
``hnsw`` (see :mod:`indexer.faiss.index`); the Milvus store builds those as FLAT,
IVF_FLAT, IVF_PQ and HNSW, and also the Milvus-only ``ivfsq8`` (IVF_SQ8: 8-bit
scalar-quantised inverted lists, dim bytes per vector) and ``diskann`` (DISKANN: a
graph on SSD; Milvus servers only) -- see :mod:`indexer.milvus.spec`, which holds the
Milvus names of each kind and parameter. Each store refuses with one line what it
cannot build, before anything is recorded.

:func:`parse_index_spec` is the one reader of ``--index-param KEY=VALUE``, and the
automatic search parameters (:func:`auto_nprobe`, :func:`auto_ef`) are the same rules
for both stores. The metadata DB and the Milvus store import this module without
loading faiss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Iterable

from reid_search.errors import GalleryError
from reid_search.limits import INDEX_KINDS

MILVUS_ONLY_KINDS = ("ivfsq8", "diskann")
"""Index types only the Milvus store builds (``diskann`` only on a Milvus server, not on Lite)."""
FAISS_KINDS = tuple(k for k in INDEX_KINDS if k not in MILVUS_ONLY_KINDS)
"""Index types the FAISS store builds."""

# Which IndexSpec fields each kind understands (besides ``kind``).
PARAMS_BY_KIND: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf": ("nlist", "nprobe", "min_train"),
    "ivfpq": ("nlist", "nprobe", "pq_m", "refine_bits", "k_factor", "min_train"),
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
    "ivfsq8": ("nlist", "nprobe"),
    "diskann": ("search_list",),
}
# The IndexSpec fields that only steer the search: changing them needs no rebuild.
SEARCH_PARAMS = frozenset({"nprobe", "k_factor", "ef_search", "search_list"})


@dataclass(frozen=True)
class IndexSpec:
    """How the gallery's index is built and searched; 0 means "automatic".

    Attributes:
        kind: ``flat``, ``ivf``, ``ivfpq``, ``hnsw``; Milvus only: ``ivfsq8``, ``diskann``.
        nlist: inverted lists; auto ≈ √n rounded to a power of two, ≥ 39 vectors per list.
        nprobe: lists visited per query; auto = max(32, nlist/5), at most nlist (:func:`auto_nprobe`).
        pq_m: 4-bit sub-quantizers of the ivfpq first stage; auto = dim/32 (at least 8).
        refine_bits: bits per dimension of the ivfpq re-scoring codes: 2 or 3 (RaBitQ),
            4, 6 or 8 (scalar quantizer); auto = 8 up to 512 dimensions, else 2
            (4 where the installed faiss lacks multi-bit RaBitQ).
        k_factor: ivfpq candidates per result; auto = 8.
        hnsw_m: graph degree of hnsw.
        ef_construction: hnsw build beam width.
        ef_search: hnsw search beam width for k hits; auto = max(128, 2k), a given one is raised
            to k (:func:`auto_ef`).
        min_train: ivf/ivfpq stay exact (flat) below this many vectors (FAISS).
        search_list: diskann search list size (Milvus); auto = Milvus's default.
    """

    kind: str = "flat"
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    refine_bits: int = 0
    k_factor: int = 0
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 0
    min_train: int = 10_000
    search_list: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise GalleryError(f"unknown index type {self.kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        for f in fields(self):
            if f.name == "kind":
                continue
            if int(getattr(self, f.name)) < 0:
                raise GalleryError(f"index parameter {f.name} must be ≥ 0, not {getattr(self, f.name)}")
            if f.name not in PARAMS_BY_KIND[self.kind]:  # canonical form: other kinds' knobs at defaults
                object.__setattr__(self, f.name, f.default)

    def params(self) -> dict[str, int]:
        """The parameters of this kind that differ from the defaults."""
        default = IndexSpec(self.kind)
        return {k: getattr(self, k) for k in PARAMS_BY_KIND[self.kind] if getattr(self, k) != getattr(default, k)}

    def to_json(self) -> str:
        """Compact form stored in the DB and in index files."""
        return json.dumps({"kind": self.kind, **self.params()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "IndexSpec":
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})

    def build_key(self) -> tuple[Any, ...]:
        """The parameters that shape the index; a change means a rebuild."""
        return (self.kind,) + tuple(
            (k, getattr(self, k)) for k in PARAMS_BY_KIND[self.kind] if k not in SEARCH_PARAMS
        )

    def describe(self) -> str:
        """E.g. ``ivfpq (nlist=1024)``."""
        p = self.params()
        return self.kind + (" (" + ", ".join(f"{k}={v}" for k, v in p.items()) + ")" if p else "")


def parse_index_spec(kind: str, params: Iterable[str] = (), base: IndexSpec | None = None) -> IndexSpec:
    """Build a spec from ``--index-type`` and ``--index-param KEY=VALUE`` strings.

    ``base`` (the gallery's current spec) supplies parameters not given when the kind is unchanged.

    Raises:
        GalleryError: unknown kind, unknown key for this kind, or a non-integer value.
    """
    values: dict[str, int] = dict(base.params()) if base is not None and base.kind == kind else {}
    allowed = PARAMS_BY_KIND.get(kind)
    if allowed is None:
        raise GalleryError(f"unknown index type {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    for item in params:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in allowed:
            valid = ", ".join(allowed) or "none"
            raise GalleryError(f"--index-param {item!r}: {kind} takes KEY=VALUE with KEY one of: {valid}")
        try:
            values[key] = int(value)
        except ValueError:
            raise GalleryError(f"--index-param {item!r}: the value must be an integer (0 = automatic)") from None
    return IndexSpec(kind, **values)


# ---- automatic search parameters (both stores) ---------------------------------


def auto_nprobe(spec: IndexSpec, nlist: int) -> int:
    """Inverted lists an ivf-like search of ``nlist`` lists visits: ``spec.nprobe`` (at most ``nlist``),
    else a fifth of the lists, at least 32.

    A fifth gives recall@10 ≈ 0.97 on a million re-ID-like 2048-d features
    (scripts/bench_index.py); Milvus's own default (8 of 128 lists) misses many
    hits under a filter. Fewer lists trade recall for speed.
    """
    return min(spec.nprobe or max(32, nlist // 5), nlist)


def auto_ef(spec: IndexSpec, k: int) -> int:
    """hnsw search beam width for ``k`` hits: ``spec.ef_search`` raised to ``k``, else max(128, 2k).

    A beam only k wide returns its own edge as the last hits, so the tail of a long
    list (``query``/``POST /query`` allow k up to 1000) is its least reliable part;
    twice k keeps slack there. Up to k = 64 both give the benchmarked 128
    (BENCHMARKS.md). Milvus refuses an ``ef`` below k.
    """
    return max(spec.ef_search, k) if spec.ef_search else max(128, 2 * k)


__all__ = ["FAISS_KINDS", "INDEX_KINDS", "MILVUS_ONLY_KINDS", "PARAMS_BY_KIND", "SEARCH_PARAMS", "IndexSpec",
           "auto_ef", "auto_nprobe", "parse_index_spec"]
