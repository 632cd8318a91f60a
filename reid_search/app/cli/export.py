"""``reid-search export``: a checkpoint as an ONNX file, checked against PyTorch."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import click

from reid_search.app.cli._common import App, pass_app, progress_bar
from reid_search.data import iter_image_paths
from reid_search.errors import DataError, ModelError
from reid_search.limits import DEFAULT_OPSET, MIN_OPSET, VERIFY_MAX_IMAGES


@click.command()
@click.option("--model", "-m", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint (.pt) to export [default: the workspace's model].")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True, help="Export format.")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="File to write (.onnx); replaced only if the export passes verification.")
@click.option("--dynamic-batch", is_flag=True, help="Symbolic batch dimension (the default).")
@click.option("--fixed-batch", type=click.IntRange(1), default=None, metavar="N",
              help="Fix the batch dimension to N, for runtimes that need static shapes.")
@click.option("--fp16", is_flag=True, help="float16 weights and compute (half the size); input/output stay float32.")
@click.option("--opset", type=click.IntRange(MIN_OPSET), default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare ONNX Runtime's features with PyTorch's (cosine ≥ 0.9999, fp16 ≥ 0.999).")
@click.option("--verify-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Verify on the first {VERIFY_MAX_IMAGES} crops of this folder [default: generated images].")
@click.option("--int8", is_flag=True,
              help="Statically quantised graph (int8 per-channel weights, uint8 activations; VNNI CPUs); needs --calibrate. "
                   "--model may also be an fp32 .onnx file.")
@click.option("--calibrate", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="FOLDER",
              help="int8: crops to calibrate on (a Market root: bounding_box_train/, checked on query/ vs bounding_box_test/).")
@click.option("--check", "check_dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="FOLDER",
              help="int8: labelled crops to check on [default: the Market root's query/ and bounding_box_test/, "
                   "else the calibration folder's images not used to calibrate].")
@click.option("--calibration-images", type=click.IntRange(1), default=256, show_default=True, help="int8: crops used to calibrate.")
@click.option("--check-images", type=click.IntRange(2), default=1000, show_default=True, help="int8: most crops to check on.")
@click.option("--calibration-method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax",
              show_default=True, help="int8: how activation ranges are set.")
@click.option("--min-cosine", type=click.FloatRange(0, 1), default=0.98, show_default=True,
              help="int8: refuse when any check image's int8 feature has a lower cosine to its fp32 feature.")
@click.option("--max-metric-drop", type=click.FloatRange(0), default=0.5, show_default=True,
              help="int8: refuse when rank-1 or mAP of the check images fall more points below fp32's.")
@pass_app
def export(app: App, model: Path | None, fmt: str, out: Path, dynamic_batch: bool, fixed_batch: int | None,
           fp16: bool, opset: int, verify: bool, verify_dir: Path | None, int8: bool = False,
           calibrate: Path | None = None, check_dir: Path | None = None, calibration_images: int = 256,
           check_images: int = 1000, calibration_method: str = "minmax", min_cosine: float = 0.98,
           max_metric_drop: float = 0.5) -> None:
    """Export a checkpoint to ONNX with its preprocessing recorded as metadata.

    The ONNX file works wherever --model is accepted (index, query, eval,
    embed) and keeps the checkpoint's fingerprint, so galleries indexed with
    either file stay queryable with the other.

    \b
    Examples:
      reid-search export --out model.onnx --verify-dir data/market/query
      reid-search export --model runs/r50/model.pt --out r50-b1.onnx --fixed-batch 1
      reid-search export --int8 --calibrate data/cuhk03-labeled --out r50-int8.onnx
    """
    if int8 or calibrate is not None:
        _export_int8(app, model, out, int8, calibrate, check_dir, calibration_images, check_images,
                     calibration_method, min_cosine, max_metric_drop, opset, fp16, fixed_batch, verify_dir)
        return
    if check_dir is not None:
        raise click.UsageError("--check goes with --int8; drop it")
    if dynamic_batch and fixed_batch is not None:
        raise click.UsageError("--dynamic-batch and --fixed-batch exclude each other; pass one")
    if out.suffix.lower() != ".onnx":
        raise click.BadParameter(f"{out}: name the file *.onnx so the other commands recognise it", param_hint="--out")
    if verify_dir is not None and not verify:
        raise click.UsageError("--verify-dir has no effect with --no-verify; drop one")
    checkpoint = app.workspace.model_path(model)
    if checkpoint.suffix.lower() == ".onnx":
        raise ModelError(f"{checkpoint} is already an ONNX file; pass the checkpoint (.pt) it came from with --model")
    images = None
    if verify_dir is not None:
        if not verify_dir.is_dir():
            raise DataError(f"--verify-dir {verify_dir}: no such folder; pass a folder of person crops")
        images = list(islice(iter_image_paths(verify_dir), VERIFY_MAX_IMAGES))
        if not images:
            raise DataError(f"--verify-dir {verify_dir} holds no images; pass a folder of person crops")
    from reid_search.onnx_model import export_onnx  # torch: loaded only when exporting

    report = export_onnx(checkpoint, out, fixed_batch=fixed_batch, fp16=fp16, opset=opset,
                         verify=verify, verify_images=images)
    batch = "dynamic" if report.batch is None else f"fixed at {report.batch}"
    click.echo(f"wrote {report.path} ({report.size_bytes / 1e6:.1f} MB, {fmt} opset {report.opset}, "
               f"batch {batch}, {'fp16' if report.fp16 else 'fp32'}) from {checkpoint}")
    click.echo("metadata:")
    for key, value in report.metadata.items():
        click.echo(f"  {key}: {value}")
    if report.min_cosine is None:
        click.echo("not verified (--no-verify)")
    else:
        source = str(verify_dir) if verify_dir is not None else "generated"
        click.echo(f"verified: ONNX Runtime vs PyTorch on {report.verified_images} {source} images, "
                   f"min cosine {report.min_cosine:.7f} (≥ {report.threshold} required)")


def _export_int8(app: App, model: Path | None, out: Path, int8: bool, calibrate: Path | None, check_dir: Path | None,
                 calibration_images: int, check_images: int, method: str, min_cosine: float, max_metric_drop: float,
                 opset: int, fp16: bool, fixed_batch: int | None, verify_dir: Path | None) -> None:
    if not int8:
        raise click.UsageError("--calibrate goes with --int8; add --int8 or drop --calibrate")
    if calibrate is None:
        raise click.UsageError("--int8 needs --calibrate FOLDER: a few hundred crops like the ones you will index")
    if fp16 or fixed_batch is not None or verify_dir is not None:
        raise click.UsageError("--int8 excludes --fp16, --fixed-batch and --verify-dir (it checks on --check)")
    if out.suffix.lower() != ".onnx":
        raise click.BadParameter(f"{out}: name the file *.onnx so the other commands recognise it", param_hint="--out")
    source = app.workspace.model_path(model)
    from reid_search.quantize import export_int8  # torch, onnxruntime: loaded only when exporting

    with progress_bar(None, "calibrate + check", quiet=app.quiet) as advance:
        r = export_int8(source, out, calibrate, check=check_dir, calibration_images=calibration_images,
                        check_images=check_images, method=method, min_cosine=min_cosine,
                        max_metric_drop=max_metric_drop, opset=opset, progress=advance)
    click.echo(f"wrote {r.path} ({r.size_bytes / 1e6:.1f} MB int8, fp32 {r.fp32_size_bytes / 1e6:.1f} MB) from {source}")
    click.echo(f"calibration: {r.calibration_images} images, {r.method}, {r.calibration_seconds:.1f} s")
    click.echo(f"check: int8 vs fp32 on {r.check_images} images, min cosine {r.min_cosine:.5f} "
               f"(mean {r.mean_cosine:.5f}; ≥ {r.min_cosine_required} required)")
    m = r.metrics
    if m is None:
        click.echo("metric check: skipped (the check images carry no Market names; pass --check a labelled folder)")
    else:
        click.echo(f"metric check ({m.protocol}, {m.num_query} queries): rank-1 {m.rank1_fp32:.2f} → {m.rank1_int8:.2f}, "
                   f"mAP {m.map_fp32:.2f} → {m.map_int8:.2f} (drop ≤ {r.max_metric_drop} points required)")
