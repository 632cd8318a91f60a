#!/usr/bin/env python3
"""Vector store benchmark: FAISS ``flat`` and ``ivfpq`` against Milvus Lite, side by side.

The same ``n`` synthetic 2048-d re-ID-like features as ``scripts/bench_index.py``
(identities as centres in a 256-d latent space, 20 images each, mapped to 2048-d,
L2-normalised; generated chunk by chunk, deterministically), each with a camera
``(id · 7919) mod 10``, go into each backend through the
:class:`indexer.protocol.VectorBackend` operations the gallery store uses
(``add`` in batches, then ``flush``). Measured per backend:

- ingest rows/s: the ``add`` calls plus the final ``flush`` (FAISS: training and the
  index file; Milvus: sealing and index building), not the generation of the vectors;
- queries/s and recall@10 of ``--queries`` queries sent as one batch (k = 10), without
  a filter and with a camera filter keeping 10 % of the rows (``cameras = {3}``);
  ground truth is exact search over the same rows (with the filter applied);
- bytes on disk after the flush (FAISS: the index file, which holds codes and the
  filter fields; Milvus Lite: its folder, which holds the full vectors).

FAISS ``ivfpq`` re-scores from compact codes and answers selective filters exactly
from the source vectors, as the gallery does (the source here regenerates them).

    uv run python scripts/bench_store.py --n 5000 --queries 100        # a quick check
    uv run python scripts/bench_store.py --n 100000 --out BENCHMARKS.md  # the figures

Environment: OMP_WAIT_POLICY=PASSIVE and, on AVX-512 CPUs, OPENBLAS_CORETYPE=SKYLAKEX
(set by importing bench_index.py, before numpy), both only when unset.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# bench_index sets the thread/BLAS environment (see its docstring) before numpy loads
from bench_index import DIM, Synthetic, append_report, recall_at  # noqa: E402

import argparse  # noqa: E402
import gc  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

import numpy as np  # noqa: E402

from indexer.protocol import RowFields  # noqa: E402
from reid_search.gallery import SearchFilter

CAMERAS = 10
KEEP_CAMERA = 3
K = 10


def camera_of(ids: np.ndarray) -> np.ndarray:
    """A camera per id, spread evenly and deterministically over 10 cameras."""
    return (ids * 7919) % CAMERAS


def fields_of(ids: np.ndarray) -> RowFields:
    n = len(ids)
    return RowFields(ids.astype(np.int64), camera_of(ids).astype(np.int64), (ids // 20).astype(np.int64),
                     np.full(n, np.nan), [None] * n)


class SyntheticSource:
    """A :class:`indexer.faiss.backend.VectorSource` that regenerates the synthetic rows."""

    def __init__(self, data: Synthetic) -> None:
        self.data = data
        self.upto = 0  # rows "committed" so far: the FAISS backend rebuilds from these

    def iter_rows(self, batch_size: int = 8192) -> Iterator[tuple[RowFields, np.ndarray]]:
        for ids, x in self.data.chunks():
            keep = ids < self.upto
            if keep.any():
                yield fields_of(ids[keep]), x[keep]
            if not keep.all():
                return

    def count(self) -> int:
        return self.upto

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        out = np.zeros((len(ids), DIM), np.float32)
        chunk = self.data.chunk
        for c in np.unique(ids // chunk):
            s = int(c) * chunk
            e = min(self.data.n, s + chunk)
            cid = np.arange(s, e, dtype=np.int64)
            x = self.data._make(cid // 20, np.random.default_rng([self.data.seed, 1, s]))
            m = (ids // chunk) == c
            out[m] = x[ids[m] - s]
        return out


def ground_truth(data: Synthetic, q: np.ndarray, keep: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    from indexer.topk import exact_search

    best_s = np.full((len(q), K), -np.inf, np.float32)
    best_i = np.full((len(q), K), -1, np.int64)
    for ids, x in data.chunks():
        if keep is not None:
            m = keep(ids)
            ids, x = ids[m], x[m]
        s, i = exact_search(q, x, ids, K)
        cs, ci = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
        order = np.argsort(-cs, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(cs, order, 1), np.take_along_axis(ci, order, 1)
    return best_i


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def make_faiss(kind: str, tmp: Path, data: Synthetic) -> tuple[Any, Path, Callable[[int], None]]:
    from indexer.faiss.backend import FaissBackend
    from indexer.spec import IndexSpec

    source = SyntheticSource(data)
    path = tmp / f"{kind}.faiss"
    be = FaissBackend(path, IndexSpec(kind), DIM, "bench", source)

    def committed(upto: int) -> None:
        source.upto = upto

    return be, path, committed


def make_milvus(kind: str, tmp: Path, data: Synthetic) -> tuple[Any, Path, Callable[[int], None]]:
    from indexer.milvus.backend import open_backend
    from indexer.location import parse_store
    from indexer.spec import IndexSpec

    path = tmp / f"milvus_{kind}.db"
    be = open_backend(parse_store(f"milvus:{path}"), "bench", IndexSpec(kind))
    return be, path, lambda upto: None


def run_one(label: str, make: Callable[..., tuple[Any, Path, Callable[[int], None]]], kind: str, tmp: Path,
            data: Synthetic, q: np.ndarray, truth: np.ndarray, truth_cam: np.ndarray, batch: int,
            repeats: int) -> str:
    gc.collect()
    be, path, committed = make(kind, tmp, data)
    added = 0
    seconds = 0.0
    for ids, x in data.chunks():
        for s in range(0, len(ids), batch):
            part, xp = ids[s:s + batch], x[s:s + batch]
            committed(int(part[-1]) + 1)  # as in the store: SQL holds the rows before the backend is told
            t0 = time.perf_counter()
            be.add(fields_of(part), xp)
            seconds += time.perf_counter() - t0
            added += len(part)
    t0 = time.perf_counter()
    be.flush(1)
    seconds += time.perf_counter() - t0
    assert be.ntotal == data.n, (label, be.ntotal)
    cells = [label, f"{added / seconds:,.0f}"]
    for filt, want in ((None, truth), (SearchFilter(cameras=frozenset({KEEP_CAMERA})), truth_cam)):
        filters = [filt] * len(q)
        be.search(q[: min(20, len(q))], K, filters[: min(20, len(q))])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            _, got = be.search(q, K, filters)
            best = min(best, time.perf_counter() - t0)
        if filt is not None:
            assert (camera_of(got[got >= 0]) == KEEP_CAMERA).all(), "the filter let another camera through"
        cells += [f"{len(q) / best:,.0f}", f"{recall_at(got, want):.3f}"]
    cells.append(f"{disk_bytes(path) / 1e6:,.0f} MB")
    row = "| " + " | ".join(cells) + " |"
    print(row, file=sys.stderr, flush=True)
    if hasattr(be, "close"):
        be.close()
    del be
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="gallery vectors (default 100k)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1000, help="rows per add call (the indexer commits in batches)")
    ap.add_argument("--repeats", type=int, default=3, help="search repeats; the best is kept")
    ap.add_argument("--faiss", type=lambda s: [k for k in s.split(",") if k], default=["flat", "ivfpq"])
    ap.add_argument("--milvus", type=lambda s: [k for k in s.split(",") if k], default=["flat"],
                    help="Milvus Lite index types (flat, ivf, ivfsq8, hnsw)")
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the stores (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="append the table to this file")
    args = ap.parse_args()

    import faiss

    data = Synthetic(args.n, chunk=min(50_000, args.n))
    q = data.queries(args.queries)
    t0 = time.perf_counter()
    truth = ground_truth(data, q, None)
    truth_cam = ground_truth(data, q, lambda ids: camera_of(ids) == KEEP_CAMERA)
    print(f"ground truth ready ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="reid-bench-store-", dir=args.tmp))
    rows = [
        f"Synthetic re-ID-like features (as bench_index.py): n = {args.n:,}, d = {DIM}, ingested in batches of "
        f"{args.batch}; {args.queries} queries in one batch, k = {K}; camera filter keeps 1 camera of {CAMERAS} "
        f"(10 % of rows); {faiss.omp_get_max_threads()} threads.\n",
        "| store (index) | ingest rows/s | queries/s | recall@10 | queries/s, camera filter | recall@10, camera filter | on disk |",
        "|---|---|---|---|---|---|---|",
    ]
    try:
        for kind in args.faiss:
            rows.append(run_one(f"FAISS {kind}", make_faiss, kind, tmp, data, q, truth, truth_cam, args.batch, args.repeats))
        for kind in args.milvus:
            rows.append(run_one(f"Milvus Lite {kind.upper()}", make_milvus, kind, tmp, data, q, truth, truth_cam,
                                args.batch, args.repeats))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(rows) + "\n"
    print(text)
    if args.out:
        append_report(args.out, "bench_store.py", text)


if __name__ == "__main__":
    main()
