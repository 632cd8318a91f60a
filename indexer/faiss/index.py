"""The FAISS side of a gallery: index types, training, id-mapped search, files.

Every index searches by inner product on L2-normalised features, so the
returned scores are cosine similarities; the squared Euclidean distance of
unit vectors is ``2 - 2 * sim`` and ranks identically. FAISS ids are the
``images.id`` primary keys of the metadata DB.

Index types (``IndexSpec.kind``):

``flat``
    Exact search (``IndexIDMap2(IndexFlatIP)``): 4·dim bytes per image.
``ivf``
    Inverted file with full vectors (``IndexIVFFlat``, ids stored in the lists).
    Scores are exact; only the candidate set is approximate.
``ivfpq``
    Two stages in one ``IndexRefine``: an inverted file with 4-bit fast-scan
    PQ codes (``IndexIVFPQFastScan``, ``pq_m`` sub-quantizers) proposes
    ``k_factor · k`` candidates, which are re-scored with compact copies of
    the vectors, ``refine_bits`` per dimension: 2 or 3 bits use multi-bit
    RaBitQ (``IndexRaBitQ``: a per-vector scale plus bit codes, better than
    a scalar quantizer at the same size), 4, 6 or 8 bits a per-dimension
    scalar quantizer. At the defaults for 2048-d features (``pq_m`` = 64,
    2-bit RaBitQ) an image costs 32 + 532 + 16 bytes: 0.58 GB per million.
    Scores are approximate (from the codes). Searches run on the CPU
    (fast-scan codes have no GPU version).
``hnsw``
    Graph search over full vectors (``IndexIDMap2(IndexHNSWFlat)``); needs
    no training, but removing images rebuilds the graph.

What the automatic (0) build parameters become is :mod:`indexer.faiss.params`;
the automatic search parameters (``nprobe``, ``ef_search``) are shared with the
Milvus store (:mod:`indexer.spec`).

``ivf`` and ``ivfpq`` need training. Until the gallery holds ``min_train``
vectors (and at least 39 per list), they keep an exact flat index and report
``trained = False``; :meth:`VectorIndex.rebuild_reason` tells the owner when to
rebuild (train) from the full vectors, and again when the gallery has grown
16-fold since training (the automatic ``nlist`` ∝ √n would then be 4× larger).

Search runs on all GPUs (sharded) when faiss has GPU support and sees a GPU,
else on the CPU; the choice is made at the first search and logged once.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

import faiss
import numpy as np

from reid_search.atomic import atomic_write
from reid_search.devices import why_no_gpu
from indexer.faiss.params import auto_k_factor, auto_nlist, refine_codes, resolve_build, train_threshold
from indexer.spec import PARAMS_BY_KIND, SEARCH_PARAMS, IndexSpec, auto_ef, auto_nprobe
from indexer.topk import exact_search
from reid_search.errors import GalleryError

log = logging.getLogger(__name__)

FILE_MAGIC = b"reid-search faiss index v1\n"
GROWTH_RETRAIN = 16  # retrain ivf/ivfpq (automatic nlist) once the gallery is this many times larger
DEAD_FRACTION = 0.25  # ivfpq: rebuild once this share of the re-scoring codes belongs to removed images


# ---- GPU placement ----------------------------------------------------------


def gpu_count() -> int:
    """GPUs faiss can use here (0 with faiss-cpu); looked up at call time, never at import."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # a broken driver must not break CPU search
        return 0


def no_gpu_reason() -> str:
    """Why faiss search stays on the CPU: a CPU-only faiss build, or no GPU visible."""
    if not hasattr(faiss, "StandardGpuResources"):
        return "this faiss build has no GPU support (the cpu variant is installed)"
    return why_no_gpu()


def to_search_device(index: faiss.Index) -> tuple[faiss.Index, str]:
    """A copy of ``index`` sharded over all GPUs when possible, else ``index`` itself.

    Returns the index to search and a description of where it runs.
    """
    ngpu = gpu_count()
    if ngpu > 0:
        try:
            co = faiss.GpuMultipleClonerOptions()
            co.shard = True  # each GPU holds 1/ngpu of the vectors
            return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=ngpu), f"{ngpu} GPU(s), sharded"
        except Exception as exc:  # e.g. fast-scan or HNSW indexes have no GPU version
            return index, f"CPU ({faiss.omp_get_max_threads()} threads; {type(index).__name__} cannot go to the GPU: {str(exc).splitlines()[0][:120]})"
    return index, f"CPU ({faiss.omp_get_max_threads()} threads; {no_gpu_reason()})"


# ---- the index --------------------------------------------------------------


def _as_matrix(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise GalleryError(f"features of shape {tuple(x.shape)} do not fit this {dim}-d gallery; use the model the gallery was indexed with")
    return x


def _as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).ravel())


def _index_bytes(index: faiss.Index) -> int:
    index = faiss.downcast_index(index)
    n = int(index.ntotal)
    if isinstance(index, faiss.IndexIDMap2):
        # id_map (8 B) + the reverse hash map (~32 B per entry in libstdc++)
        return _index_bytes(index.index) + 40 * n
    if isinstance(index, faiss.IndexRefine):
        return _index_bytes(index.base_index) + _index_bytes(index.refine_index)
    if isinstance(index, faiss.IndexIVF):
        return n * (int(index.code_size) + 8) + _index_bytes(index.quantizer)
    if isinstance(index, faiss.IndexHNSW):
        h = index.hnsw
        graph = 4 * h.neighbors.size() + 8 * h.offsets.size() + 4 * h.levels.size()
        return graph + _index_bytes(index.storage)
    if isinstance(index, faiss.IndexFlatCodes):
        return n * int(index.code_size)
    return n * 4 * int(index.d)  # unknown kinds: as if flat


def _ivf_ids(ivf: faiss.Index) -> np.ndarray:
    inv = ivf.invlists
    parts = []
    for lst in range(ivf.nlist):
        size = inv.list_size(lst)
        if size:
            ptr = inv.get_ids(lst)
            parts.append(faiss.rev_swig_ptr(ptr, size).copy())
            inv.release_ids(lst, ptr)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class VectorIndex:
    """An id-mapped FAISS index of one :class:`IndexSpec`.

    ``base`` is ``IndexIDMap2(flat | HNSW)``, an ``IndexIVFFlat`` holding the ids
    in its lists, or for ivfpq an ``IndexRefine(IndexIVFPQFastScan, IndexScalarQuantizer)``
    addressed by *positions*, with ``positions`` mapping each position to its id
    (-1 once removed: the re-scoring codes stay until the next rebuild, which is
    requested when a quarter of them are dead).

    Not thread-safe for mutation; concurrent :meth:`search` calls are fine.
    """

    def __init__(self, spec: IndexSpec, dim: int, base: faiss.Index, trained_n: int = 0,
                 positions: np.ndarray | None = None) -> None:
        self.spec, self.dim = spec, dim
        self.base = base
        self.trained_n = trained_n  # gallery size when trained (0: not trained)
        self.positions = positions  # ivfpq only: position -> id
        self._searcher: faiss.Index | None = None
        self._device: str | None = None
        self._cpu_flat = False
        self._configure()

    # -- construction

    @classmethod
    def empty(cls, spec: IndexSpec, dim: int) -> "VectorIndex":
        """An index with no vectors; ivf/ivfpq start as exact flat indexes."""
        if spec.kind == "hnsw":
            p = resolve_build(spec, dim, 0)
            base = faiss.index_factory(dim, f"IDMap2,HNSW{p['hnsw_m']},Flat", faiss.METRIC_INNER_PRODUCT)
            faiss.downcast_index(base.index).hnsw.efConstruction = p["ef_construction"]
            return cls(spec, dim, base)
        return cls(spec, dim, faiss.index_factory(dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT))

    @classmethod
    def build(cls, spec: IndexSpec, dim: int, source: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
              n: int, seed: int = 0) -> "VectorIndex":
        """Build from all vectors: ``source()`` yields ``(ids, feats)`` batches and may be called twice
        (a training sample pass, then the adding pass); ``n`` is how many it yields in all.
        """
        if spec.kind not in ("ivf", "ivfpq") or n < train_threshold(spec):
            idx = cls.empty(spec, dim)
            for ids, x in source():
                idx.add(ids, x)
            return idx
        p = resolve_build(spec, dim, n)
        nlist = p["nlist"]
        sample = _sample(source, n, min(n, max(40 * nlist, 10_000)), seed)
        log.info("training %s on %d of %d vectors (%s)", spec.kind, len(sample), n, p)
        if spec.kind == "ivf":
            base = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
            faiss.extract_index_ivf(base).cp.niter = 10  # plenty for coarse lists; k-means is the costly part
            base.train(sample)
            idx = cls(spec, dim, base, trained_n=n)
        else:
            ivf = faiss.index_factory(dim, f"IVF{nlist},PQ{p['pq_m']}x4fs", faiss.METRIC_INNER_PRODUCT)
            faiss.extract_index_ivf(ivf).cp.niter = 10
            ivf.train(sample)
            codes = refine_codes(dim, p["refine_bits"])
            codes.train(sample)  # per-dimension ranges or the centroid: cheap
            base = faiss.IndexRefine(ivf, codes)
            base.own_fields = True  # the refine wrapper frees both parts
            ivf.this.disown()
            codes.this.disown()
            idx = cls(spec, dim, base, trained_n=n, positions=np.zeros(0, np.int64))
        for ids, x in source():
            idx.add(ids, x)
        return idx

    # -- properties

    def _ivf(self) -> faiss.Index:
        return faiss.extract_index_ivf(self.base)

    @property
    def ntotal(self) -> int:
        """Vectors in the index."""
        if self.positions is not None:
            return int(self._ivf().ntotal)
        return int(self.base.ntotal)

    @property
    def trained(self) -> bool:
        """True once ivf/ivfpq are really inverted files (always True for flat/hnsw)."""
        return self.spec.kind not in ("ivf", "ivfpq") or self.trained_n > 0

    @property
    def nlist(self) -> int:
        """Inverted lists of a trained ivf/ivfpq, else 0."""
        return int(self._ivf().nlist) if self.trained and self.spec.kind in ("ivf", "ivfpq") else 0

    def ids(self) -> np.ndarray:
        """All ids in the index, sorted."""
        if self.positions is not None:
            ids = self.positions[self.positions >= 0]
        elif isinstance(self.base, faiss.IndexIDMap2):
            ids = faiss.vector_to_array(self.base.id_map)
        else:
            ids = _ivf_ids(self._ivf())
        return np.sort(ids.astype(np.int64))

    def memory_bytes(self) -> int:
        """Estimated resident size: codes, ids, id maps, graphs and coarse centroids."""
        extra = 8 * len(self.positions) if self.positions is not None else 0
        return _index_bytes(self.base) + extra

    def rebuild_reason(self) -> str | None:
        """Why the owner should :meth:`build` again from all vectors, or ``None``."""
        if self.spec.kind not in ("ivf", "ivfpq"):
            return None
        n = self.ntotal
        if not self.trained:
            return f"{n} vectors reached the training threshold {train_threshold(self.spec)}" if n >= train_threshold(self.spec) else None
        if not self.spec.nlist and n >= GROWTH_RETRAIN * self.trained_n:
            return f"the gallery grew from {self.trained_n} to {n} vectors since training (nlist {self.nlist} → {auto_nlist(n)})"
        if self.positions is not None and len(self.positions) - n > DEAD_FRACTION * max(len(self.positions), 1):
            return f"{len(self.positions) - n} removed vectors still hold re-scoring codes"
        return None

    # -- mutation

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        """Add vectors under the given ids (ids must not be present already)."""
        x = _as_matrix(x, self.dim)
        ids = _as_ids(ids)
        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} ids for {len(x)} vectors")
        if not len(ids):
            return
        if self.positions is not None:
            codes = faiss.downcast_index(self.base.refine_index)
            start = int(codes.ntotal)
            self._ivf().add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
            codes.add(x)
            self.base.ntotal = codes.ntotal
            self.positions = np.concatenate([self.positions, ids])
        else:
            self.base.add_with_ids(x, ids)
        self._searcher = None

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ids (absent ones are ignored). False when this index type cannot remove
        in place (hnsw) or has accumulated too many dead codes (ivfpq): the owner should rebuild.
        """
        ids = _as_ids(ids)
        if not len(ids):
            return True
        if self.spec.kind == "hnsw":
            return False
        self._searcher = None
        if self.positions is not None:
            pos = np.nonzero(np.isin(self.positions, ids))[0].astype(np.int64)
            self._ivf().remove_ids(faiss.IDSelectorBatch(pos))
            self.positions[pos] = -1
            return self.rebuild_reason() is None
        self.base.remove_ids(faiss.IDSelectorBatch(ids))
        return True

    # -- search

    def _configure(self) -> None:
        if self.trained and self.spec.kind in ("ivf", "ivfpq"):
            self._ivf().nprobe = auto_nprobe(self.spec, self.nlist)
        if self.positions is not None:
            self.base.k_factor = float(auto_k_factor(self.spec))

    def set_search_params(self, **params: int) -> None:
        """Change ``nprobe``, ``k_factor`` or ``ef_search`` for later searches (no rebuild).

        Raises:
            GalleryError: a parameter that is not a search parameter of this kind.
        """
        bad = [k for k in params if k not in SEARCH_PARAMS or k not in PARAMS_BY_KIND[self.spec.kind]]
        if bad:
            ok = sorted(SEARCH_PARAMS & set(PARAMS_BY_KIND[self.spec.kind]))
            raise GalleryError(f"{self.spec.kind} has no search parameter {', '.join(bad)}; it has: {', '.join(ok) or 'none'}")
        self.spec = replace(self.spec, **params)
        self._configure()
        self._searcher = None

    @property
    def device(self) -> str:
        """Where searches run (decided at the first search)."""
        self._get_searcher()
        return self._device or "CPU"

    def _is_flat(self) -> bool:
        return isinstance(self.base, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(self.base.index), faiss.IndexFlat)

    def _get_searcher(self) -> faiss.Index | None:
        """The index to search (None: exact numpy search over the flat storage)."""
        if self._device is None or (self._searcher is None and not self._cpu_flat):
            threads = faiss.omp_get_max_threads()
            if self.spec.kind == "hnsw":
                searcher, device = self.base, f"CPU ({threads} threads; hnsw has no GPU version)"
            elif self.positions is not None:
                searcher, device = self.base, f"CPU ({threads} threads; ivfpq's fast-scan codes have no GPU version)"
            elif self._is_flat() and gpu_count() == 0:
                # numpy's BLAS is often much faster than the one bundled with faiss-cpu.
                searcher, device = None, f"CPU (exact, numpy BLAS; {no_gpu_reason()})"
            else:
                searcher, device = to_search_device(self.base)
            self._cpu_flat = searcher is None
            if device != self._device:
                log.info("faiss %s search runs on %s", self.spec.kind, device)
            self._searcher, self._device = searcher, device
        return self._searcher

    def search(self, x: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k-NN by inner product. Returns ``(sims [q, k] float32, ids [q, k] int64)``, best first;
        missing neighbours (k > ntotal) have id -1 and similarity -inf.

        ``allowed`` (sorted int64 ids) restricts the results to those ids inside the
        search (a FAISS ``IDSelector``; exact masking on the numpy flat path).

        Raises:
            GalleryError: features of the wrong dimension.
        """
        x = _as_matrix(x, self.dim)
        q = len(x)
        if k < 1:
            raise ValueError("k must be ≥ 1")
        n = self.ntotal if allowed is None else min(self.ntotal, len(allowed))
        if q == 0 or n == 0:
            return np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64)
        searcher = self._get_searcher()
        kk = min(k, n)
        if searcher is None:
            flat = faiss.downcast_index(self.base.index)
            xb = faiss.rev_swig_ptr(flat.get_xb(), self.ntotal * self.dim).reshape(self.ntotal, self.dim)
            ids_all = faiss.rev_swig_ptr(self.base.id_map.data(), self.ntotal)
            if allowed is not None:
                mask = np.isin(ids_all, allowed)
                xb, ids_all = xb[mask], ids_all[mask]
            sims, ids = exact_search(x, xb, ids_all, kk)
        elif allowed is not None:
            sims, ids = self._search_selected(x, kk, allowed)
        elif self.spec.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=auto_ef(self.spec, kk))
            sims, ids = searcher.search(x, kk, params=params)
        else:
            sims, ids = searcher.search(x, kk)
        sims = np.asarray(sims, np.float32)
        ids = np.asarray(ids, np.int64)
        if self.positions is not None:
            ids = np.where(ids >= 0, self.positions[np.maximum(ids, 0)], -1)
        sims[ids < 0] = -np.inf
        if kk < k:
            sims = np.pad(sims, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
        return sims, ids

    def _search_selected(self, x: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Search the CPU index with an ``IDSelector`` over ``allowed`` (positions for ivfpq)."""
        if self.positions is not None:
            sel = faiss.IDSelectorBatch(np.nonzero(np.isin(self.positions, allowed))[0].astype(np.int64))
            base_params = faiss.SearchParametersIVF(sel=sel, nprobe=self._filtered_nprobe(len(allowed)))
            # the true neighbours that pass lie farther out, where the 4-bit codes rank less
            # surely: re-score as many more candidates as the filter is selective
            boost = min(16.0, self.ntotal / max(len(allowed), 1))
            params: Any = faiss.IndexRefineSearchParameters(k_factor=float(auto_k_factor(self.spec)) * max(1.0, boost),
                                                            base_index_params=base_params)
        else:
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, np.int64))
            if self.spec.kind == "hnsw":
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=auto_ef(self.spec, k))
            elif self.trained and self.spec.kind in ("ivf", "ivfpq"):
                params = faiss.SearchParametersIVF(sel=sel, nprobe=self._filtered_nprobe(len(allowed)))
            else:
                params = faiss.SearchParameters(sel=sel)
        return self.base.search(x, k, params=params)

    def _filtered_nprobe(self, n_allowed: int) -> int:
        """``nprobe`` for a search restricted to ``n_allowed`` crops: the unfiltered one divided by
        the filter's selectivity (up to every list), so the lists probed still hold about as many
        candidates that pass. A filter unrelated to where the query lies (a camera, a time
        window) leaves few passing crops near it: with the plain ``nprobe``, recall@10 fell
        from 0.95 to 0.50 at a 10 % camera filter (scripts/bench_store.py, 100k vectors)."""
        ivf = self._ivf()
        frac = max(n_allowed, 1) / max(self.ntotal, 1)
        return int(min(ivf.nlist, max(ivf.nprobe, np.ceil(ivf.nprobe / frac))))

    # -- files

    def save(self, path: str | os.PathLike[str], meta: dict[str, Any], trailer: bytes = b"") -> None:
        """Write the index, ``meta`` (JSON-able) and ``trailer`` (the owner's bytes) to ``path`` atomically."""
        npos = -1 if self.positions is None else len(self.positions)
        header = dict(meta, spec=json.loads(self.spec.to_json()), dim=self.dim, ntotal=self.ntotal,
                      trained_n=self.trained_n, positions=npos)
        with atomic_write(path, "wb") as fh:
            fh.write(FILE_MAGIC)
            fh.write(json.dumps(header, sort_keys=True).encode() + b"\n")
            faiss.write_index(self.base, faiss.PyCallbackIOWriter(fh.write))
            if self.positions is not None:
                fh.write(np.ascontiguousarray(self.positions, dtype="<i8").tobytes())
            fh.write(trailer)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> tuple["VectorIndex", dict[str, Any]]:
        """Read an index written by :meth:`save`; returns it and its header (the trailer under ``"trailer"``).

        Raises:
            GalleryError: not an index file of this format, or truncated.
        """
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                if fh.readline() != FILE_MAGIC:
                    raise GalleryError(f"{path} is not a reid-search index file; delete it and it will be rebuilt from the DB")
                header = json.loads(fh.readline())
                base = faiss.read_index(faiss.PyCallbackIOReader(fh.read))
                positions = None
                if header.get("positions", -1) >= 0:
                    raw = fh.read(8 * header["positions"])
                    if len(raw) != 8 * header["positions"]:
                        raise EOFError("truncated id table")
                    positions = np.frombuffer(raw, dtype="<i8").astype(np.int64)
                header["trailer"] = fh.read()
        except GalleryError:
            raise
        except Exception as exc:
            raise GalleryError(f"cannot read the index file {path} ({type(exc).__name__}); delete it and it will be rebuilt from the DB") from None
        spec = IndexSpec.from_json(json.dumps(header["spec"]))
        return cls(spec, int(header["dim"]), base, trained_n=int(header.get("trained_n", 0)), positions=positions), header


def _sample(source: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], n: int, size: int, seed: int) -> np.ndarray:
    """About ``size`` vectors drawn uniformly from one pass over ``source()``."""
    rng = np.random.default_rng(seed)
    p = min(1.0, 1.1 * size / max(n, 1))
    parts = []
    for _, x in source():
        parts.append(np.asarray(x, np.float32)[rng.random(len(x)) < p])
    sample = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return np.ascontiguousarray(sample[:size])


__all__ = ["VectorIndex", "gpu_count", "no_gpu_reason", "to_search_device"]
