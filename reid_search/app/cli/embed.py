"""``reid-search embed``: features of one image or a folder."""

from __future__ import annotations

import io
import json
from pathlib import Path

import click
import numpy as np

from reid_search.atomic import atomic_write, atomic_write_bytes
from reid_search.app.cli._common import App, pass_app, precision_option, progress_bar
from reid_search.app.cli._model_options import model_input_options
from reid_search.data import list_images, record_for
from reid_search.errors import DataError


@click.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--model", "-m", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint (.pt) or ONNX file [default: the workspace's model].")
@model_input_options
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="For a folder: write features to .npy (names to NAME.paths.txt) or .npz (features, paths, pids, camids).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per image).")
@click.option("--flip/--no-flip", default=False, show_default=True, help="Average with the horizontally flipped image.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@precision_option
@pass_app
def embed(app: App, target: Path, model: Path | None, out: Path | None, as_json: bool,
          flip: bool, batch_size: int, device: str, precision: str, preprocess: dict | None = None) -> None:
    """Print the L2-normalised feature of one image, or save a folder's features.

    \b
    Examples:
      reid-search embed query/0001_c1s1_001051_00.jpg --json
      reid-search embed bounding_box_test --out gallery.npy
      reid-search embed bounding_box_test --out gallery.npz --precision fp32
    """
    from reid_search.app.session import open_extractor
    from reid_search.extract import extract_features  # torch: only when it runs
    from reid_search.images import load_image

    if not target.exists():
        raise DataError(f"no such image or folder: {target}")
    if not target.is_dir():
        load_image(target)  # a single unusable image is an error, not a skip
    _, extractor = open_extractor(app.workspace, model, device=device, flip=flip, precision=precision,
                                  preprocess=preprocess)
    records = list_images(target) if target.is_dir() else [record_for(target)]
    if target.is_dir() and out is None and not as_json:
        raise DataError(f"{target} is a folder: pass --out FEATS.npy (or .npz) to save its features, or --json to print them")
    paths = [r.path for r in records]
    with progress_bar(len(paths), "embed", quiet=app.quiet or len(paths) == 1) as advance:
        feats, kept, failures = extract_features(paths, extractor, batch_size=batch_size, progress=advance)
    kept_records = [records[i] for i in kept]
    if out is not None:
        _save(out, feats, kept_records)
        click.echo(f"wrote {len(kept)} × {feats.shape[1]} features to {out}" + (f" ({len(failures)} skipped)" if failures else ""), err=as_json)
    if as_json:
        for r, f in zip(kept_records, feats):
            click.echo(json.dumps({"path": str(r.path), "pid": r.pid, "camid": r.camid, "dim": int(f.shape[0]),
                                   "model": extractor.fingerprint, "feature": [round(float(v), 7) for v in f]}))
    elif out is None:
        r, f = kept_records[0], feats[0]
        click.echo(f"{r.path.name}\t" + " ".join(f"{v:.6f}" for v in f))


def _save(out: Path, feats: np.ndarray, records: list) -> None:
    names = [str(r.path) for r in records]
    if out.suffix == ".npz":
        buf = io.BytesIO()
        np.savez(buf, features=feats, paths=np.array(names),
                 pids=np.array([-2 if r.pid is None else r.pid for r in records]),
                 camids=np.array([-2 if r.camid is None else r.camid for r in records]))
        atomic_write_bytes(out, buf.getvalue())
        return
    if out.suffix != ".npy":
        raise DataError(f"--out {out}: use a .npy or .npz file name")
    with atomic_write(out) as fh:
        np.save(fh, feats)
    with atomic_write(out.with_suffix(".paths.txt"), "w") as fh:
        fh.write("\n".join(names) + "\n")
