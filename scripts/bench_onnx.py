#!/usr/bin/env python3
"""CPU extractor throughput: PyTorch vs ONNX Runtime for the same ResNet50, plus a third-party OSNet.

One freshly initialised ResNet50 BNNeck (256×128) is saved as a checkpoint and
exported with ``export_onnx`` (verified against PyTorch); both extractors
(TorchExtractor and OnnxExtractor, CPU, fp32) then embed the same ready-made
batches, interleaved so machine drift hits both alike. Reported: images/s,
median of --repeats runs, and the ratio. With --osnet, the third-party OSNet
x0.25 file (fixed batch 1, so each batch is split into single images) is timed
the same way. Prints a Markdown table; --out appends it.

    uv run python scripts/bench_onnx.py --images 128 --repeats 3 --osnet ../shared/models/osnet_x0_25_market1501.onnx
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from reid_search.checkpoint import save_checkpoint
from reid_search.extract import load_extractor
from reid_search.model import build_model
from reid_search.onnx_model import OnnxExtractor, export_onnx
from reid_search.transforms import Preprocess


def images_per_s(embed, x: torch.Tensor, n: int) -> float:
    batch = x.shape[0]
    t0 = time.perf_counter()
    done = 0
    while done < n:
        embed(x[: min(batch, n - done)])
        done += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128, help="images per timed run")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fp16", action="store_true", help="also time an fp16 export on ONNX Runtime CPU")
    ap.add_argument("--osnet", type=Path, default=None, help="a third-party ReID .onnx file to time as well")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    pre = Preprocess(256, 128)
    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "r50.pt"
        save_checkpoint(ckpt, build_model("resnet50"), pre)
        t0 = time.perf_counter()
        report = export_onnx(ckpt, Path(tmp) / "r50.onnx")
        export_s = time.perf_counter() - t0
        sides: list[tuple[str, object]] = [
            ("PyTorch (TorchExtractor, fp32)", load_extractor(ckpt, device="cpu")),
            ("ONNX Runtime (OnnxExtractor, fp32)", OnnxExtractor(report.path, device="cpu")),
        ]
        if args.fp16:
            half = export_onnx(ckpt, Path(tmp) / "r50-fp16.onnx", fp16=True)
            sides.append(("ONNX Runtime (OnnxExtractor, fp16 export)", OnnxExtractor(half.path, device="cpu")))
        x = torch.randn(args.batch, 3, pre.height, pre.width)
        for _, ex in sides:
            ex.embed(x)  # warm-up: oneDNN / ORT kernel selection
        times: list[list[float]] = [[] for _ in sides]
        for _ in range(args.repeats):
            for i, (_, ex) in enumerate(sides):
                times[i].append(images_per_s(ex.embed, x, args.images))
        rows += [(name, t) for (name, _), t in zip(sides, times)]

    torch_med = statistics.median(rows[0][1])
    lines = [
        f"| ResNet50 BNNeck 256×128, batch {args.batch}, CPU ({torch.get_num_threads()} torch threads, "
        f"onnxruntime {ort.__version__} default threads) | images/s (median of {args.repeats}) | runs | × PyTorch |",
        "|---|---|---|---|",
    ]
    for name, t in rows:
        med = statistics.median(t)
        lines.append(f"| {name} | {med:.1f} | {', '.join(f'{v:.1f}' for v in t)} | {med / torch_med:.2f} |")

    if args.osnet is not None:
        ex = OnnxExtractor(args.osnet, device="cpu")
        x = torch.randn(args.batch, 3, ex.preprocess.height, ex.preprocess.width)
        ex.embed(x)
        t = [images_per_s(ex.embed, x, args.images) for _ in range(args.repeats)]
        med = statistics.median(t)
        lines.append(f"| {args.osnet.name} (third-party, fixed batch {ex.batch}, "
                     f"{ex.preprocess.height}×{ex.preprocess.width}) | {med:.1f} | {', '.join(f'{v:.1f}' for v in t)} | {med / torch_med:.2f} |")
    table = "\n".join(lines) + f"\n\nResNet50 export + verification took {export_s:.0f} s; min cosine ONNX Runtime vs PyTorch {report.min_cosine:.7f}.\n"
    print(table)
    if args.out:
        with args.out.open("a") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
