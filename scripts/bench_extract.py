#!/usr/bin/env python3
"""CPU feature-extraction throughput: model-only forward vs the streaming pipeline.

Both sides use the same TorchExtractor (ResNet50 BNNeck, 256×128, batch 32):
"forward" feeds ready-made tensors; "pipeline" reads 64×128 JPEG crops from
disk through iter_features (DataLoader decode workers + batching). The
target is pipeline ≥ 0.9 × forward. Prints a Markdown table; --out appends it.

    uv run python scripts/bench_extract.py --images 256 --repeats 3 --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reid_search.extract import TorchExtractor, default_num_workers, iter_features
from reid_search.model import build_model
from reid_search.transforms import Preprocess


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (128, 64, 3), dtype=np.uint8)
        p = folder / f"{i % 500 + 1:04d}_c{i % 6 + 1}s1_{i:06d}_00.jpg"
        Image.fromarray(arr).save(p, quality=95)
        paths.append(p)
    return paths


def time_forward(ex: TorchExtractor, n: int, batch: int) -> float:
    x = torch.randn(batch, 3, 256, 128)
    t0 = time.perf_counter()
    done = 0
    while done < n:
        ex.embed(x[: min(batch, n - done)])
        done += batch
    return n / (time.perf_counter() - t0)


def time_pipeline(ex: TorchExtractor, paths: list[Path], batch: int, workers: int) -> float:
    t0 = time.perf_counter()
    count = sum(len(b.indices) for b in iter_features(paths, ex, batch_size=batch, num_workers=workers))
    assert count == len(paths)
    return count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="decode workers [default: the extractor's default]")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    workers = default_num_workers() if args.workers is None else args.workers
    torch.manual_seed(0)
    ex = TorchExtractor(build_model("resnet50"), Preprocess(), "bench", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images)
        time_forward(ex, args.batch, args.batch)  # warm-up (oneDNN kernel selection)
        fwd, pipe = [], []
        for _ in range(args.repeats):  # interleaved so drift hits both sides alike
            fwd.append(time_forward(ex, args.images, args.batch))
            pipe.append(time_pipeline(ex, paths, args.batch, workers))
    f, p = statistics.median(fwd), statistics.median(pipe)
    table = (
        f"| ResNet50 256×128, batch {args.batch}, {torch.get_num_threads()} threads, {workers} decode workers | images/s (median of {args.repeats}) |\n"
        f"|---|---|\n"
        f"| model-only forward (tensors in memory) | {f:.1f} |\n"
        f"| streaming pipeline from {args.images} JPEG files | {p:.1f} |\n"
        f"| ratio pipeline / forward | **{p / f:.2f}** |\n"
    )
    print(table)
    if args.out:
        with args.out.open("a") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
