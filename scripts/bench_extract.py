#!/usr/bin/env python3
"""Extraction speed and accuracy, every path side by side in one run.

Rows (same ResNet50 BNNeck checkpoint, same batches, interleaved repeats so
machine drift hits all alike; images/s is the median of --repeats):

* eager fp32 NCHW: the model called as torchreid's FeatureExtractor does (the anchor);
* ours at each --precisions (TorchExtractor: channels_last + autocast);
* ours bf16 + torch.compile (with its compile time), unless --no-compile;
* ONNX Runtime fp32 and int8 (``export --int8``, calibrated on --data's train
  split or on the generated crops);
* OpenVINO (CPU plugin), when the ``bench`` dependency group is installed: the
  same fp32 ONNX graph at f32 and at its default bf16 inference precision, the
  ONNX Runtime int8 QDQ graph (OpenVINO runs QDQ with its own int8 kernels),
  and NNCF post-training int8 quantisation of the fp32 graph calibrated on the
  same crops as ``export --int8``; --no-openvino skips them;
* with --fp16-onnx, an fp16 export on ONNX Runtime; with --onnx FILE, another
  (e.g. third-party) ONNX model, timed and scored the same way (no cosine: a different model);
* ``reid-search index`` end to end on JPEG crops (a fresh workspace, a subprocess,
  --precision auto): the images/s it reports and its wall time;
* on a CUDA machine, also fp32/bf16/fp16 on the GPU and ONNX Runtime's CUDA and
  TensorRT providers where installed.

Accuracy columns: min cosine of each path's features to the eager fp32 ones on
the timed batch; with --data (a Market root) and --accuracy, rank-1 and mAP of
query/ against bounding_box_test/ for each path.

    uv run python scripts/bench_extract.py --images 256 --repeats 3 \\
        --checkpoint runs/cuhk03/model.pt --data ../shared/data/cuhk03-labeled --accuracy --out /tmp/extract.md
    uv run python scripts/bench_extract.py --images 64 --repeats 1 --no-compile   # a quick check
    uv run python scripts/bench_extract.py --images 128 --precisions fp32 --no-compile --no-index --no-openvino \
        --fp16-onnx --onnx ../shared/models/osnet_x0_25_market1501.onnx   # PyTorch vs ONNX Runtime (was bench_onnx.py)

The OpenVINO/NNCF rows need the ``bench`` group (not installed by scripts/dev.py):
``UV_PROJECT_ENVIRONMENT=.venv uv run --frozen --extra cpu --group bench python scripts/bench_extract.py ...``.
Without it the script says so in its notes and runs the other rows.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image

from reid_search.checkpoint import load_model, save_checkpoint
from reid_search.torch_extractor import TorchExtractor
from reid_search.extract import extract_features
from reid_search.extractors import load_extractor
from reid_search.model import build_model
from reid_search.precision import cpu_features
from reid_search.transforms import Preprocess, build_eval_transform


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` 64×128 Market-named JPEG crops (smooth colour fields + noise)."""
    from reid_search.onnx_model import synthetic_crops

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(synthetic_crops(n, seed=seed)):
        p = folder / f"{i % 500 + 1:04d}_c{i % 6 + 1}s1_{i:06d}_00.jpg"
        im.save(p, quality=95)
        paths.append(p)
    return paths


class Side(NamedTuple):
    """One row: its name, its embed function, a note, the extractor for the accuracy
    columns (None: not measured), and its own input batch (None: the shared one,
    whose eager fp32 features the min-cosine column compares with)."""

    name: str
    embed: Callable[[torch.Tensor], object]
    note: str = ""
    extractor: object = None
    x: torch.Tensor | None = None


def images_per_s(fn: Callable[[torch.Tensor], object], x: torch.Tensor, n: int) -> float:
    t0 = time.perf_counter()
    done = 0
    while done < n:
        fn(x)
        done += x.shape[0]
    return done / (time.perf_counter() - t0)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def rank1_map(extractor, data: Path) -> tuple[float, float]:
    from reid_search.data import load_market
    from reid_search.metrics import evaluate

    ds = load_market(data, need_train=False)
    q = extract_features([r.path for r in ds.query], extractor, num_workers=0)[0]
    g = extract_features([r.path for r in ds.gallery], extractor, num_workers=0)[0]
    res = evaluate(1 - q @ g.T, np.array([r.pid for r in ds.query]), np.array([r.pid for r in ds.gallery]),
                   np.array([r.camid for r in ds.query]), np.array([r.camid for r in ds.gallery]))
    return 100 * float(res["cmc"][0]), 100 * float(res["mAP"])


def index_end_to_end(ckpt: Path, folder: Path, ws: Path, precision: str) -> tuple[float, float]:
    """(images/s reported by `reid-search index`, wall seconds of the command)."""
    cmd = [sys.executable, "-m", "reid_search", "-q", "-w", str(ws), "index", str(folder), "--model", str(ckpt),
           "--reindex", "--precision", precision]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"index failed: {out.stderr.strip() or out.stdout.strip()}")
    m = re.search(r"\(([0-9.]+) images/s embedded\)", out.stdout)
    return (float(m.group(1)) if m else float("nan")), wall


def have_openvino() -> str | None:
    """``None`` when openvino (and nncf) import, else why not, for the notes."""
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"OpenVINO rows skipped: {exc} (install the bench group: uv sync --extra cpu --group bench)"
    return None


class OpenVinoExtractor:
    """An extractor (``preprocess``, ``dim``, ``embed``) over an OpenVINO CPU compiled model.

    The model is reshaped to a static batch of ``batch`` (static shapes let the
    CPU plugin pick its fastest kernels); shorter batches are padded, longer
    ones split. ``precision``: OpenVINO's inference precision hint (``f32``,
    ``bf16``) or ``None`` for the plugin's default (bf16 on AVX512_BF16/AMX CPUs).
    """

    def __init__(self, model, pre: Preprocess, batch: int, precision: str | None) -> None:
        import openvino as ov

        core = ov.Core()
        if isinstance(model, (str, Path)):
            model = core.read_model(str(model))
        model.reshape({model.input(0): [batch, 3, pre.height, pre.width]})
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.preprocess, self.batch = pre, batch
        self.dim = int(self.compiled.output(0).get_partial_shape()[1].get_length())

    def _run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.request.infer({0: x})[self.compiled.output(0)], dtype=np.float32)

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        x = batch.numpy().astype(np.float32, copy=False)
        parts = []
        for start in range(0, x.shape[0], self.batch):
            chunk = x[start : start + self.batch]
            k = chunk.shape[0]
            if k < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - k, *chunk.shape[1:]), np.float32)])
            parts.append(self._run(np.ascontiguousarray(chunk))[:k])
        f = np.concatenate(parts)
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def nncf_int8(fp32_onnx: Path, calibration: list[Path], pre: Preprocess):
    """NNCF post-training int8 quantisation of the fp32 graph (as an OpenVINO model) on ``calibration``.

    Returns ``(quantised ov.Model, seconds)``; NNCF's defaults for CPU: per-channel
    symmetric int8 weights, per-tensor activations, fast bias correction.
    """
    import nncf
    import openvino as ov

    from reid_search.images import load_image

    tf = build_eval_transform(pre)
    items = [tf(load_image(p)).unsqueeze(0).numpy() for p in calibration]
    t0 = time.perf_counter()
    model = ov.Core().read_model(str(fp32_onnx))
    q = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))
    return q, time.perf_counter() - t0


def openvino_sides(onnx_paths: dict[str, Path], calibration: list[Path], pre: Preprocess, batch: int,
                   notes: list[str]) -> list[Side]:
    """The OpenVINO rows."""
    import openvino as ov

    sides = []
    for name, hint in (("fp32 graph, f32", "f32"), ("fp32 graph, default precision", None)):
        ex = OpenVinoExtractor(onnx_paths["fp32"], pre, batch, hint)
        sides.append(Side(f"OpenVINO {name} (runs {ex.precision})", ex.embed, "", ex))
    if "int8" in onnx_paths:
        ex = OpenVinoExtractor(onnx_paths["int8"], pre, batch, None)
        sides.append(Side("OpenVINO on the ONNX Runtime int8 QDQ graph", ex.embed, "", ex))
    try:
        q, seconds = nncf_int8(onnx_paths["fp32"], calibration, pre)
    except ImportError as exc:
        notes.append(f"NNCF row skipped: {exc}")
    else:
        ex = OpenVinoExtractor(q, pre, batch, None)
        sides.append(Side("OpenVINO, NNCF int8 (PTQ)", ex.embed, f"quantised in {seconds:.0f} s", ex))
    notes.append(f"OpenVINO {ov.__version__}, CPU plugin, LATENCY hint, static batch {batch}; "
                 f"NNCF calibrated on the {len(calibration)} crops `export --int8` used")
    return sides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="images per timed run (model-only rows)")
    ap.add_argument("--index-images", type=int, default=None, help="JPEG crops for the index row [default: --images]")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,bf16", help="ours: comma-separated fp32,bf16,fp16")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a ResNet50 checkpoint [default: random init]")
    ap.add_argument("--data", type=Path, default=None, help="a Market root: int8 calibration (train) and --accuracy")
    ap.add_argument("--accuracy", action="store_true", help="rank-1/mAP of each path on --data (slow)")
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime and OpenVINO rows")
    ap.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO/NNCF rows")
    ap.add_argument("--fp16-onnx", action="store_true", help="also an fp16 export on ONNX Runtime (CPU)")
    ap.add_argument("--onnx", type=Path, action="append", default=[], metavar="FILE",
                    help="another ReID .onnx file to time (and score with --accuracy), e.g. the shared OSNet; repeatable")
    ap.add_argument("--no-index", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="append the Markdown table to this file")
    args = ap.parse_args()
    if args.accuracy and args.data is None:
        ap.error("--accuracy needs --data (a Market root)")

    feats = cpu_features()
    rows: list[dict] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if args.checkpoint is None:
            torch.manual_seed(0)
            ckpt = tmp / "r50.pt"
            save_checkpoint(ckpt, build_model("resnet50", num_classes=0), Preprocess(256, 128))
            notes.append("checkpoint: freshly initialised ResNet50 (speed only; accuracy columns mean nothing)")
        else:
            ckpt = args.checkpoint
            notes.append(f"checkpoint: {ckpt}")
        model, meta, _ = load_model(ckpt, "cpu")
        pre = meta.preprocess
        crops = write_jpegs(tmp / "crops" / "bounding_box_test", args.index_images or args.images)
        tf = build_eval_transform(pre)
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p in crops[: args.batch]])

        eager = copy.deepcopy(model).eval()

        @torch.inference_mode()
        def eager_fn(b: torch.Tensor) -> np.ndarray:
            return eager(b).numpy()

        # (name, embed, note, extractor for the accuracy columns or None)
        sides: list[Side] = [
            Side("eager fp32 NCHW (torchreid FeatureExtractor style)", eager_fn, "",
                 load_extractor(ckpt, "cpu", precision="fp32", compile="off") if args.accuracy else None)]
        ref = eager_fn(x)
        for p in [s.strip() for s in args.precisions.split(",") if s.strip()]:
            ex = TorchExtractor(copy.deepcopy(model), pre, meta.fingerprint, "cpu", precision=p, compile="off")
            sides.append(Side(f"ours {p}, channels_last", ex.embed, "", ex))
        if not args.no_compile:
            ex = TorchExtractor(copy.deepcopy(model), pre, meta.fingerprint, "cpu", precision="auto", compile="on")
            ex.prepare(10**6, args.batch)
            extra = f"compile {ex.compile_seconds:.0f} s" if ex.compile_seconds is not None else "compile failed: eager"
            sides.append(Side(f"ours {ex.precision} + torch.compile", ex.embed, extra, None))
        onnx_paths: dict[str, Path] = {}
        if not args.no_onnx:
            from reid_search.onnx_model import OnnxExtractor, export_onnx
            from reid_search.quantize import export_int8, split_images

            onnx_paths["fp32"] = export_onnx(ckpt, tmp / "fp32.onnx").path
            calib = args.data if args.data is not None else tmp / "crops" / "bounding_box_test"
            t0 = time.perf_counter()
            rep = export_int8(ckpt, tmp / "int8.onnx", calib, calibration_images=args.calibration_images,
                              check_images=200, min_cosine=0.0, max_metric_drop=100.0)
            onnx_paths["int8"] = rep.path
            m = rep.metrics
            notes.append(f"int8 export: {time.perf_counter() - t0:.0f} s, calibration {rep.calibration_images} images "
                         f"({rep.calibration_seconds:.0f} s), check min cosine {rep.min_cosine:.5f} on {rep.check_images}"
                         + (f", R1 {m.rank1_fp32:.1f}→{m.rank1_int8:.1f}, mAP {m.map_fp32:.1f}→{m.map_int8:.1f}" if m else ""))
            if args.fp16_onnx:
                onnx_paths["fp16"] = export_onnx(ckpt, tmp / "fp16.onnx", fp16=True).path
            for name, path in onnx_paths.items():
                ex = OnnxExtractor(path, device="cpu")
                sides.append(Side(f"ONNX Runtime {name} (CPU)", ex.embed, "", ex))
            why_not = "OpenVINO rows skipped (--no-openvino)" if args.no_openvino else have_openvino()
            if why_not is None:
                # The same crops export_int8 calibrated on (split_images is deterministic).
                calibration = [r.path for r in split_images(calib, None, args.calibration_images, 200)[0]]
                sides += openvino_sides({k: v for k, v in onnx_paths.items() if k != "fp16"}, calibration, pre,
                                        args.batch, notes)
            else:
                notes.append(why_not)
        for path in args.onnx:
            # Another model (e.g. a third-party ReID graph): speed and accuracy, no cosine to ours.
            from reid_search.onnx_model import OnnxExtractor

            ex = OnnxExtractor(path, device="cpu")
            tf_own = build_eval_transform(ex.preprocess)
            x_own = torch.stack([tf_own(Image.open(p).convert("RGB")) for p in crops[: args.batch]])
            sides.append(Side(f"{path.name} (ONNX Runtime, {ex.preprocess.height}×{ex.preprocess.width}, "
                              f"{'fixed batch ' + str(ex.batch) if ex.batch else 'dynamic batch'})", ex.embed,
                              "another model", ex, x_own))
        if torch.cuda.is_available():
            for p in ("fp32", "bf16", "fp16"):
                ex = TorchExtractor(copy.deepcopy(model), pre, meta.fingerprint, "cuda", precision=p, compile="off")
                sides.append(Side(f"ours {p} on {torch.cuda.get_device_name()}", ex.embed, "", None))
            if onnx_paths:
                import onnxruntime as ort

                from reid_search.onnx_model import OnnxExtractor

                avail = ort.get_available_providers()
                if "CUDAExecutionProvider" in avail:
                    for name, path in onnx_paths.items():
                        sides.append(Side(f"ONNX Runtime {name} (CUDA EP)", OnnxExtractor(path, device="cuda").embed, "", None))
                if "TensorrtExecutionProvider" not in avail:
                    notes.append("ONNX Runtime TensorRT provider: not installed in this environment")

        for side in sides:
            side.embed(x if side.x is None else side.x)  # warm-up: kernel selection
        times: list[list[float]] = [[] for _ in sides]
        for _ in range(args.repeats):
            for i, side in enumerate(sides):
                times[i].append(images_per_s(side.embed, x if side.x is None else side.x, args.images))
        for side, t in zip(sides, times):
            cos = min_cosine(ref, np.asarray(side.embed(x))) if side.x is None else float("nan")
            row = {"name": side.name, "ips": statistics.median(t), "runs": t, "cos": cos, "extra": side.note}
            if args.accuracy and side.extractor is not None:
                row["r1"], row["map"] = rank1_map(side.extractor, args.data)
            rows.append(row)
        if not args.no_index:
            folder = crops[0].parent
            ips, wall = index_end_to_end(ckpt, folder, tmp / "ws", "auto")
            rows.append({"name": f"`reid-search index` end to end, {len(crops)} JPEG crops, --precision auto",
                         "ips": ips, "runs": [ips], "cos": float("nan"), "extra": f"wall {wall:.1f} s incl. start-up"})

    anchor = rows[0]["ips"]
    lines = [
        f"CPU: {feats.summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{meta.arch} BNNeck {pre.height}×{pre.width}, batch {args.batch}, {args.images} images per run",
        "",
        f"| path | images/s (median of {args.repeats}) | runs | × eager fp32 | min cosine to fp32 | R1 | mAP | note |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        acc = (f"{r['r1']:.1f} | {r['map']:.1f}" if "r1" in r else " | ")
        cos = "" if np.isnan(r["cos"]) else f"{r['cos']:.5f}"
        lines.append(f"| {r['name']} | {r['ips']:.1f} | {', '.join(f'{v:.1f}' for v in r['runs'])} | "
                     f"{r['ips'] / anchor:.2f} | {cos} | {acc} | {r['extra']} |")
    lines += [""] + [f"- {n}" for n in notes]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with args.out.open("a") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
