#!/usr/bin/env python3
"""Training throughput of the strong-baseline step (images/s), model side only.

Each row times ``trainer.train.train_step`` (forward, ID + triplet + center
losses, backward, Adam and centre SGD steps) on one fixed random P×K batch
(no image decoding) of the default recipe, with 751 classes like Market-1501.
It reports the median over ``--steps`` steps after ``--warmup`` untimed ones.

CPU rows: ResNet50 at 256×128 (the paper's setting) and ResNet18 at 128×64
(reference), fp32, channels_last on and off. With a GPU (``--device cuda``
or ``auto`` on a GPU machine) the same rows are timed in fp32, bf16 and fp16
(autocast; fp16 with a gradient scaler). Prints a Markdown table; --out
appends it to a file.

    uv run python scripts/bench_train.py --out BENCHMARKS.md
    uv run python scripts/bench_train.py --device cuda --steps 20 --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from trainer.config import resolve_config
from trainer.train import build_train_state, train_step

NUM_CLASSES = 751


@dataclass(frozen=True)
class Case:
    arch: str
    height: int
    width: int
    amp: str  # "off" | "bf16" | "fp16"
    channels_last: bool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(
    case: Case, device: torch.device, p: int, k: int, warmup: int, steps: int
) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each of ``steps`` timed steps."""
    cfg = resolve_config(overrides={
        "arch": case.arch, "height": case.height, "width": case.width, "amp": case.amp,
        "channels_last": case.channels_last, "num_identities": p, "num_instances": k,
    })
    torch.manual_seed(0)
    state = build_train_state(cfg, NUM_CLASSES, device)
    state.model.train()
    images = torch.randn(p * k, 3, case.height, case.width)
    labels = torch.arange(p).repeat_interleave(k)
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    wall, cpu = [], []
    for i in range(warmup + steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        parts = train_step(state, images, labels)
        float(parts["loss"])  # waits for the step, as the training loop's logging does
        _sync(device)
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return wall, cpu


def cases_for(device: torch.device, archs: list[str]) -> list[Case]:
    sizes = {"resnet50": (256, 128), "resnet18": (128, 64)}
    out = []
    for arch in archs:
        h, w = sizes.get(arch, (256, 128))
        if device.type == "cuda":
            amps = ["off", "bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["off", "fp16"]
            out += [Case(arch, h, w, amp, True) for amp in amps]
            out.append(Case(arch, h, w, "off", False))
        else:
            out += [Case(arch, h, w, "off", cl) for cl in (True, False)]
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--arch", action="append", help="resnet50 (256x128) and/or resnet18 (128x64); repeatable")
    ap.add_argument("--p", type=int, default=16, help="identities per batch")
    ap.add_argument("--k", type=int, default=4, help="images per identity")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=None, help="append the Markdown table to this file")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    archs = args.arch or ["resnet50", "resnet18"]
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{_cpu_name()}, {torch.get_num_threads()} threads"
    batch = args.p * args.k
    lines = [
        f"### Training throughput ({datetime.date.today()}, {device.type}: {where}, torch {torch.__version__})",
        "",
        f"`scripts/bench_train.py`: one `train_step` (default recipe, {NUM_CLASSES} classes) on a fixed "
        f"P{args.p}×K{args.k}={batch} batch, median of {args.steps} steps after {args.warmup} warm-up. "
        f"CPU s/step is the process's CPU time (all threads): it shows how much of the wall time was "
        f"computing when other processes share the cores.",
        "",
        "| model | input | precision | channels_last | step (ms) | images/s | CPU s/step |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for case in cases_for(device, archs):
        wall, cpu = time_case(case, device, args.p, args.k, args.warmup, args.steps)
        med = statistics.median(wall)
        prec = {"off": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + scaler"}[case.amp]
        row = (f"| {case.arch} | {case.height}×{case.width} | {prec} | {'on' if case.channels_last else 'off'} "
               f"| {1000 * med:.0f} | {batch / med:.1f} | {statistics.median(cpu):.2f} |")
        lines.append(row)
        print(row, flush=True)
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write("\n" + table)


if __name__ == "__main__":
    main()
