"""Build parameters of the FAISS index types: what "automatic" (0) means for ``nlist``, ``pq_m``,
``refine_bits``, ``k_factor``, and when ``ivf``/``ivfpq`` are trained.

Pure functions of an :class:`~indexer.spec.IndexSpec`, the dimension and the gallery
size (plus what the installed faiss can build). The automatic *search* parameters
shared with Milvus (``nprobe``, ``ef``) are :mod:`indexer.spec`'s.
"""

from __future__ import annotations

import functools
import math

import faiss

from indexer.spec import IndexSpec
from reid_search.errors import GalleryError

# bits per dimension of the ivfpq re-scoring codes -> faiss scalar quantizer (4, 6, 8) or multi-bit RaBitQ (2, 3)
SQ_CODES = {4: faiss.ScalarQuantizer.QT_4bit, 6: faiss.ScalarQuantizer.QT_6bit, 8: faiss.ScalarQuantizer.QT_8bit}
RABITQ_BITS = (2, 3)
REFINE_BITS = tuple(sorted((*SQ_CODES, *RABITQ_BITS)))


def auto_nlist(n: int) -> int:
    """≈ √n as a power of two, between 16 and 65536, with ≥ 39 training points per list."""
    if n < 39 * 16:
        return 16
    target = math.sqrt(n)
    nlist = 2 ** int(round(math.log2(target)))
    while nlist > 16 and 39 * nlist > n:
        nlist //= 2
    return int(min(max(nlist, 16), 65536))


def _divisor_near(d: int, target: int, even: bool = False) -> int:
    """The divisor of ``d`` closest to ``target`` (even if asked), ≥ 1."""
    cands = [m for m in range(1, d + 1) if d % m == 0 and (not even or m % 2 == 0)]
    if not cands:
        return 1
    return min(cands, key=lambda m: (abs(m - target), -m))


def resolve_build(spec: IndexSpec, dim: int, n: int) -> dict[str, int]:
    """Concrete build parameters of ``spec`` for ``n`` vectors of ``dim`` (auto → numbers).

    Raises:
        GalleryError: a parameter that does not divide ``dim``.
    """
    out: dict[str, int] = {}
    if spec.kind in ("ivf", "ivfpq"):
        out["nlist"] = spec.nlist or auto_nlist(n)
    if spec.kind == "ivfpq":
        pq_m = spec.pq_m or _divisor_near(dim, max(8, dim // 32), even=True)
        if dim % pq_m:
            raise GalleryError(f"index parameter pq_m={pq_m} must divide the feature dimension {dim}")
        if pq_m % 2:
            raise GalleryError(f"index parameter pq_m={pq_m} must be even (4-bit fast-scan codes come in pairs)")
        bits = spec.refine_bits or (8 if dim <= 512 else 2 if has_multibit_rabitq() else 4)
        if bits not in REFINE_BITS:
            raise GalleryError(f"index parameter refine_bits={bits}: choose 2 or 3 (RaBitQ), 4, 6 or 8 bits per dimension")
        if bits in RABITQ_BITS and not has_multibit_rabitq():
            raise GalleryError(f"index parameter refine_bits={bits} needs faiss ≥ 1.13 (multi-bit RaBitQ), "
                               f"this is faiss {faiss.__version__}; upgrade faiss or use refine_bits=4")
        out["pq_m"], out["refine_bits"] = pq_m, bits
    if spec.kind == "hnsw":
        out["hnsw_m"], out["ef_construction"] = spec.hnsw_m or 32, spec.ef_construction or 80
    return out


@functools.cache
def has_multibit_rabitq() -> bool:
    """Whether the installed faiss has multi-bit RaBitQ codes (``IndexRaBitQ(d, metric, bits)``)."""
    try:
        faiss.IndexRaBitQ(8, faiss.METRIC_INNER_PRODUCT, 2)
    except Exception:  # older faiss: no class, or a 1-bit-only constructor
        return False
    return True


def refine_codes(dim: int, bits: int) -> faiss.Index:
    """The untrained re-scoring index of ivfpq: RaBitQ for 2-3 bits, a scalar quantizer for 4-8."""
    if bits in RABITQ_BITS:
        return faiss.IndexRaBitQ(dim, faiss.METRIC_INNER_PRODUCT, bits)
    return faiss.IndexScalarQuantizer(dim, SQ_CODES[bits], faiss.METRIC_INNER_PRODUCT)


def train_threshold(spec: IndexSpec) -> int:
    """Vectors needed before ``ivf``/``ivfpq`` are trained (0 for the other kinds)."""
    if spec.kind not in ("ivf", "ivfpq"):
        return 0
    return max(spec.min_train, 39 * spec.nlist, 2)


def auto_k_factor(spec: IndexSpec) -> int:
    """ivfpq candidates per wanted neighbour."""
    return spec.k_factor or 8


__all__ = ["RABITQ_BITS", "REFINE_BITS", "SQ_CODES", "auto_k_factor", "auto_nlist", "has_multibit_rabitq",
           "refine_codes", "resolve_build", "train_threshold"]
