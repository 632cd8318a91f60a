"""Filtered search in the FAISS store: latency and recall@k against exact filtered search.

Builds a synthetic gallery (random unit features, cameras 0..C-1, capture times
over 30 days) in a temporary workspace, then queries it with camera / time
filters of decreasing selectivity, through the store's own filtered search
(an IDSelector inside FAISS, exact masking on flat). Recall compares with
brute-force filtering of every vector.

Example (small, a minute):
    python scripts/bench_filter.py --n 20000 --dim 128 --kinds flat hnsw
Example (figures for BENCHMARKS.md, an idle machine):
    python scripts/bench_filter.py --n 500000 --dim 512 --kinds flat ivf ivfpq hnsw --queries 200
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from indexer import IndexSpec
from reid_search.app.session import open_workspace_gallery
from reid_search.gallery import NewImage, SearchFilter
from reid_search.app.workspace import Workspace

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--cameras", type=int, default=100)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", nargs="+", default=["flat", "hnsw"])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cams = rng.integers(0, args.cameras, args.n)
    minutes = rng.integers(0, 30 * 24 * 60, args.n)
    q = x[rng.choice(args.n, args.queries, replace=False)] + 0.3 * rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    filters = {
        "none": None,
        "half the cameras": SearchFilter(cameras=frozenset(range(args.cameras // 2))),
        "10% of cameras": SearchFilter(cameras=frozenset(range(max(1, args.cameras // 10)))),
        "1 camera, 3 days": SearchFilter(cameras=frozenset({0}), since=T0, until=T0 + timedelta(days=3)),
    }
    print(f"{args.n} vectors, {args.dim}-d, {args.cameras} cameras, {args.queries} queries, k={args.k}")
    print(f"{'index':8} {'filter':18} {'passing':>9} {'ms/query':>9} {'recall@k':>9}")
    for kind in args.kinds:
        with tempfile.TemporaryDirectory() as tmp:
            g = open_workspace_gallery(Workspace(Path(tmp) / "ws"), spec=IndexSpec(kind), save_interval=1e9)
            t0 = time.perf_counter()
            for s in range(0, args.n, 20_000):
                e = min(args.n, s + 20_000)
                imgs = [NewImage(Path(tmp) / "g" / f"{i}.jpg", hashlib.sha256(b"%d" % i).hexdigest(), 1, camid=int(cams[i]),
                                 time=T0 + timedelta(minutes=int(minutes[i]))) for i in range(s, e)]
                g.add_images(imgs, x[s:e], "bench")
            print(f"{kind:8} built in {time.perf_counter() - t0:.1f}s ({g.describe()})")
            ids_all, feats = g.all_vectors()
            metas = {m.id: m for b in g.iter_metadata() for m in b}
            for name, f in filters.items():
                mask = np.array([f is None or f.allows(metas[i].camid, metas[i].time, metas[i].track) for i in ids_all])
                g.search(q[:2], args.k, f)  # warm-up
                t0 = time.perf_counter()
                _, got = g.search(q, args.k, f)
                ms = 1000 * (time.perf_counter() - t0) / len(q)
                sims = q @ feats[mask].T
                want = ids_all[mask][np.argsort(-sims, axis=1)[:, : args.k]]
                recall = np.mean([len(set(a[a >= 0]) & set(b)) / max(1, len(b)) for a, b in zip(got, want)])
                print(f"{kind:8} {name:18} {int(mask.sum()):>9} {ms:>9.2f} {recall:>9.3f}")
            g.close()


if __name__ == "__main__":
    main()
