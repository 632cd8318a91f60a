"""``reid-search export``: a checkpoint as an ONNX file, checked against PyTorch."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import click

from reid_search.cli._common import App, pass_app
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
@pass_app
def export(app: App, model: Path | None, fmt: str, out: Path, dynamic_batch: bool, fixed_batch: int | None,
           fp16: bool, opset: int, verify: bool, verify_dir: Path | None) -> None:
    """Export a checkpoint to ONNX with its preprocessing recorded as metadata.

    The ONNX file works wherever --model is accepted (index, query, eval,
    embed) and keeps the checkpoint's fingerprint, so galleries indexed with
    either file stay queryable with the other.

    \b
    Examples:
      reid-search export --out model.onnx --verify-dir data/market/query
      reid-search export --model runs/r50/model.pt --out r50-b1.onnx --fixed-batch 1
    """
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
