#!/usr/bin/env python3
"""Gallery indexing and search benchmarks. Prints Markdown tables; --out appends them to a file.

Part ``throughput``: end-to-end ``index_folder`` (hashing, decoding, ResNet50 BNNeck
256×128 forward, DB commits, index file writes) against the model-only forward
pass of the same extractor on tensors in memory, on a few hundred 64×128 JPEGs.

Part ``ann``: ``n`` synthetic 2048-d features (default one million) searched with
``k = 10`` by ``--queries`` queries in one batch, per index type at its defaults:
resident memory, queries/s and recall@10 against exact search. The features are
made to look like re-ID embeddings: identities are centres in a 256-d latent
space (20 images each), each image is its centre plus noise of a per-image spread
(uniform 0.3-1.0, standing for crop quality), mapped to 2048-d by a fixed random
matrix plus isotropic noise, L2-normalised. Queries are new images of random
gallery identities. The vectors are generated in chunks, deterministically, so
nothing but the index under test holds them all; ground truth comes from exact
blockwise search (the same numpy code the ``flat`` index runs on the CPU), which
also gives flat's queries/s. Ground truth is cached in --cache.

    uv run python scripts/bench_index.py throughput --images 256
    uv run python scripts/bench_index.py ann --n 1000000 --kinds flat,ivfpq
    uv run python scripts/bench_index.py ann --n 200000 --kinds ivf,hnsw

Environment: this sets OMP_WAIT_POLICY=PASSIVE before faiss loads (on a
shared machine, spinning OpenMP threads of faiss slow k-means by 10×) and, on
AVX-512 CPUs that faiss-cpu's bundled OpenBLAS 0.3.15 does not recognise,
OPENBLAS_CORETYPE=SKYLAKEX (4× faster BLAS there); both only when unset.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
try:
    if "avx512f" in open("/proc/cpuinfo").read():
        os.environ.setdefault("OPENBLAS_CORETYPE", "SKYLAKEX")
except OSError:
    pass

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM, LATENT, PER_ID = 2048, 256, 20
# --sweep: search-time settings tried on the built index besides its defaults
SWEEP = {
    "ivf": [{"nprobe": p} for p in (16, 64)],
    "ivfpq": [{"nprobe": p, "k_factor": f} for p, f in ((32, 8), (64, 8), (128, 8), (128, 4), (256, 8))],
    "hnsw": [{"ef_search": e} for e in (32, 64, 256)],
}


# ---- part 1: indexing throughput -------------------------------------------------


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (128, 64, 3), dtype=np.uint8)
        arr[:64] = rng.integers(0, 255, 3, dtype=np.uint8)
        p = folder / f"{i // 8 + 1:04d}_c{i % 6 + 1}s1_{i:06d}_00.jpg"
        Image.fromarray(arr).save(p, quality=95)
        paths.append(p)
    return paths


def bench_throughput(args: argparse.Namespace) -> str:
    import torch

    from indexer import index_folder, open_gallery
    from reid_search.checkpoint import save_checkpoint
    from reid_search.extract import default_num_workers
    from reid_search.extractors import load_extractor
    from reid_search.model import build_model
    from reid_search.transforms import Preprocess

    torch.manual_seed(0)
    workers = default_num_workers("cpu") if args.workers is None else args.workers
    fwd, e2e = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "r50.pt"
        save_checkpoint(ckpt, build_model("resnet50"), Preprocess())
        ex = load_extractor(ckpt, device="cpu")
        (tmp / "gallery").mkdir()
        write_jpegs(tmp / "gallery", args.images)
        x = torch.randn(args.batch, 3, 256, 128)
        ex.embed(x)  # warm-up: oneDNN picks its kernels
        for r in range(args.repeats):  # interleaved so load drift hits both alike
            t0 = time.perf_counter()
            done = 0
            while done < args.images:
                ex.embed(x[: min(args.batch, args.images - done)])
                done += args.batch
            fwd.append(args.images / (time.perf_counter() - t0))
            g = open_gallery(f"sqlite:///{tmp / f'r{r}.db'}", tmp / f"index{r}")
            t0 = time.perf_counter()
            rep = index_folder(g, tmp / "gallery", ex, batch_size=args.batch, num_workers=workers)
            g.close()
            e2e.append(rep.indexed / (time.perf_counter() - t0))
            assert rep.indexed == args.images and g.ntotal == args.images
    f, e = statistics.median(fwd), statistics.median(e2e)
    return (
        f"| ResNet50 BNNeck 256×128, CPU, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"{workers} decode worker(s), {args.images} JPEGs | images/s (median of {args.repeats}) |\n"
        f"|---|---|\n"
        f"| model-only forward (tensors in memory) | {f:.1f} |\n"
        f"| `index_folder` end to end (hash, decode, forward, SQLite commits, index file) | {e:.1f} |\n"
        f"| ratio | **{e / f:.2f}** |\n"
    )


# ---- part 2: search at scale -------------------------------------------------------


class Synthetic:
    """Deterministic re-ID-like features, regenerated chunk by chunk on demand."""

    def __init__(self, n: int, seed: int = 0, chunk: int = 50_000) -> None:
        self.n, self.seed, self.chunk = n, seed, chunk
        rng = np.random.default_rng(seed)
        self.proj = (rng.standard_normal((LATENT, DIM)) / np.sqrt(LATENT)).astype(np.float32)
        self.centres = rng.standard_normal((max(1, n // PER_ID), LATENT)).astype(np.float32)

    def _make(self, ident: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        m = len(ident)
        spread = rng.uniform(0.3, 1.0, (m, 1)).astype(np.float32)
        z = self.centres[ident] + spread * rng.standard_normal((m, LATENT), dtype=np.float32)
        x = z @ self.proj + 0.3 * spread * rng.standard_normal((m, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in range(0, self.n, self.chunk):
            e = min(self.n, s + self.chunk)
            ids = np.arange(s, e, dtype=np.int64)
            yield ids, self._make(ids // PER_ID, np.random.default_rng([self.seed, 1, s]))

    def queries(self, nq: int) -> np.ndarray:
        ident = np.random.default_rng([self.seed, 2]).integers(0, len(self.centres), nq)
        return self._make(ident, np.random.default_rng([self.seed, 3]))


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ground_truth(data: Synthetic, q: np.ndarray, k: int, cache: Path) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Exact top-k (ids, sims) by streaming the chunks, the pure search seconds and the generation seconds."""
    from indexer.topk import exact_search

    path = cache / f"gt_n{data.n}_q{len(q)}_k{k}_s{data.seed}.npz"
    if path.is_file():
        z = np.load(path)
        return z["ids"], z["sims"], float(z["seconds"]), float(z["generate"])
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    seconds = 0.0
    t_pass = time.perf_counter()
    for ids, x in data.chunks():
        t0 = time.perf_counter()
        s, i = exact_search(q, x, ids, k)
        cs, ci = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
        order = np.argsort(-cs, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cs, order, 1), np.take_along_axis(ci, order, 1)
        seconds += time.perf_counter() - t0
    generate = time.perf_counter() - t_pass - seconds
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, ids=best_i, sims=best_s, seconds=seconds, generate=generate)
    return best_i, best_s, seconds, generate


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def bench_ann(args: argparse.Namespace) -> str:
    import faiss

    from indexer.faiss.index import VectorIndex
    from indexer.faiss.params import auto_k_factor, resolve_build
    from indexer.spec import IndexSpec, auto_nprobe

    data = Synthetic(args.n)
    q = data.queries(args.queries)
    k = 10
    t0 = time.perf_counter()
    truth, true_sims, flat_seconds, generate = ground_truth(data, q, k, args.cache)
    print(f"ground truth ready ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    top = true_sims
    rows = [
        f"Synthetic re-ID-like features: n = {args.n:,}, d = {DIM}, {args.queries} queries in one batch, k = 10, "
        f"{faiss.omp_get_max_threads()} threads. Exact neighbours: mean top-1 similarity {top[:, 0].mean():.3f}, "
        f"10th {top[:, 9].mean():.3f}. Build times include generating the vectors twice (a training-sample "
        f"pass and an adding pass; one pass takes {generate:.0f} s).\n",
        "| index (defaults) | parameters | memory | build s | queries/s | recall@10 |",
        "|---|---|---|---|---|---|",
    ]
    for kind in args.kinds:
        if kind == "flat":
            mem = args.n * (4 * DIM + 8)
            rows.append(f"| flat | exact (numpy BLAS, streamed) | {mem / 1e9:.2f} GB (n·(4d+8)) | – | "
                        f"{args.queries / flat_seconds:.1f} | 1.000 |")
            print(rows[-1], file=sys.stderr, flush=True)
            continue
        spec = IndexSpec(kind, **dict(args.param.get(kind, {})))
        gc.collect()
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        idx = VectorIndex.build(spec, DIM, data.chunks, args.n)
        build = time.perf_counter() - t0
        gc.collect()
        rss = rss_bytes() - rss0
        params = resolve_build(spec, DIM, args.n)
        if kind in ("ivf", "ivfpq"):
            params["nprobe"] = auto_nprobe(spec, idx.nlist)
        if kind == "ivfpq":
            params["k_factor"] = auto_k_factor(spec)
        if kind == "hnsw":
            params["ef_search"] = spec.ef_search or 128
        idx.search(q[:50], k)  # warm-up
        best = float("inf")
        for _ in range(args.search_repeats):
            t0 = time.perf_counter()
            _, got = idx.search(q, k)
            best = min(best, time.perf_counter() - t0)
        pstr = ", ".join(f"{a}={b}" for a, b in params.items())
        rows.append(f"| {kind} | {pstr} | {idx.memory_bytes() / 1e9:.2f} GB (RSS +{rss / 1e9:.2f}) | {build:.0f} | "
                    f"{args.queries / best:.0f} | {recall_at(got, truth):.3f} |")
        print(rows[-1], file=sys.stderr, flush=True)
        if args.sweep:
            for sp in SWEEP[kind]:
                idx.set_search_params(**sp)
                idx.search(q[:50], k)
                t0 = time.perf_counter()
                _, got = idx.search(q, k)
                dt = time.perf_counter() - t0
                tag = ", ".join(f"{a}={b}" for a, b in sp.items())
                rows.append(f"| ↳ {kind} | {tag} | same | – | {args.queries / dt:.0f} | {recall_at(got, truth):.3f} |")
                print(rows[-1], file=sys.stderr, flush=True)
        del idx
        gc.collect()
    return "\n".join(rows) + "\n"


def parse_params(items: list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for item in items:  # kind:key=value
        kind, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        out.setdefault(kind, {})[key] = int(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["throughput", "ann", "all"])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=["flat", "ivf", "ivfpq", "hnsw"])
    ap.add_argument("--param", action="append", default=[], metavar="KIND:KEY=VALUE",
                    help="override a default, e.g. ivfpq:refine_bits=8 (repeatable)")
    ap.add_argument("--search-repeats", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="also try other search-time settings (rows marked ↳)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "reid-bench-index")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.param = parse_params(args.param)
    out = []
    if args.part in ("throughput", "all"):
        out.append(bench_throughput(args))
    if args.part in ("ann", "all"):
        out.append(bench_ann(args))
    text = "\n".join(out)
    print(text)
    if args.out:
        append_report(args.out, "bench_index.py", text)


def append_report(out: Path, script: str, text: str) -> None:
    """Append ``text`` to ``out`` under the command line that made it."""
    with out.open("a") as fh:
        fh.write(f"```\nuv run python scripts/{script} {' '.join(sys.argv[1:])}\n```\n\n{text}\n")


if __name__ == "__main__":
    main()
