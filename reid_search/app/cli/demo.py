"""``reid-search demo``: the whole system end to end on an embedded default."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import click

from reid_search.app.cli._common import App, pass_app, run_training
from reid_search.data import GALLERY_DIR, QUERY_DIR

# A schedule that learns the synthetic identities on 2 idle CPU cores in about 2 minutes
# (BENCHMARKS.md, "The demo"): ResNet18 at 64x32 from scratch (no ImageNet weights offline),
# Adam at 3e-3 with a one-epoch half-lr warmup and decays at epochs 7 and 9 (0-based 6 and 8);
# the crop padding is the recipe's default, 10 px at 256x128 scaled to the input (2 px).
DEMO_TRAIN = ("arch=resnet18", "height=64", "width=32", "lr=3e-3", "num_identities=8", "num_instances=4",
              "warmup_epochs=2", "milestones=7,9", "eval_period=1000", "save_period=1000", "log_period=5")
DEMO_EPOCHS = 10
# Most identities train; the held-out rest (30 of the default 150) make the query and gallery.
DEMO_IDS = 150
DEMO_TRAIN_FRACTION = 0.8


@click.command()
@click.option("--data", "data_root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A Market-layout root to use instead of generating synthetic data.")
@click.option("--ids", default=DEMO_IDS, show_default=True, type=click.IntRange(4),
              help=f"Synthetic identities ({DEMO_TRAIN_FRACTION:.0%} train, the rest held out for query/gallery).")
@click.option("--epochs", default=DEMO_EPOCHS, show_default=True, type=click.IntRange(1))
@click.option("--max-steps", default=None, type=click.IntRange(1), help="Cap iterations per epoch (smaller runs).")
@click.option("-o", "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="More training overrides.")
@click.option("--fresh", is_flag=True, help="Delete the demo's previous output first.")
@pass_app
def demo(app: App, data_root: Path | None, ids: int, epochs: int, max_steps: int | None,
         overrides: tuple[str, ...], fresh: bool) -> None:
    """Generate data, train, index, evaluate (with and without re-ranking) and query.

    Everything goes into the workspace: demo-data/ (synthetic Market-layout
    crops), runs/demo/ (the model), the gallery index and DB, and
    demo-query.png (a ranked query).

    \b
    Examples:
      reid-search demo
      reid-search -w /tmp/cuhk demo --data ../shared/data/cuhk03-labeled --epochs 4 --max-steps 40
    """
    from reid_search.data import load_market
    from trainer.config import resolve_config

    t0 = time.perf_counter()
    # Bad overrides fail here, in one line, before anything is generated or deleted.
    sets = list(DEMO_TRAIN) + [f"epochs={epochs}"] + ([f"max_steps_per_epoch={max_steps}"] if max_steps else []) + list(overrides)
    cfg = resolve_config("softmax_triplet_with_center", sets)
    ws = app.workspace.ensure()
    run_dir = ws.runs_dir / "demo"
    if fresh:
        # The demo's own files only: the gallery is replaced through its store by step 4's
        # `index --reindex` (deleting the DB or index files here would leave the vectors of
        # a Milvus or plug-in store behind an empty DB).
        for p in (run_dir, ws.root / "demo-data"):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    data_root = _data(app, data_root, ids)
    untrained = _untrained(cfg, load_market(data_root))
    _train(app, cfg, data_root, run_dir, fresh)
    results, picture = _index_eval_query(app, data_root)
    _summary(untrained, results, data_root, ws, run_dir, picture, t0)


def _data(app: App, data_root: Path | None, ids: int) -> Path:
    """Step 1: the Market-layout root, generated into the workspace unless given (or already there)."""
    from reid_search.app.cli._common import progress_bar
    from reid_search.synthetic import generate

    if data_root is not None:
        click.secho(f"== 1. data: {data_root}", bold=True)
        return data_root
    data_root = app.workspace.root / "demo-data"
    if data_root.exists():
        click.secho(f"== 1. synthetic data: reusing {data_root}", bold=True)
        return data_root
    click.secho(f"== 1. synthetic data: {ids} identities, 4 cameras -> {data_root}", bold=True)
    with progress_bar(None, "generate", quiet=app.quiet) as advance:
        done = [0]

        def on_image(n: int, total: int) -> None:
            advance(n - done[0])
            done[0] = n

        s = generate(data_root, ids=ids, cameras=4, images_per_id=8, seed=0, train_fraction=DEMO_TRAIN_FRACTION,
                     progress=on_image)
    click.echo(f"{s.total_images} images: {s.num_train_ids} training identities ({s.train_images} crops), "
               f"{s.num_test_ids} held out (query {s.query_images}, gallery {s.gallery_images} incl. "
               f"{s.distractor_images} distractors and {s.junk_images} junk)")
    return data_root


def _untrained(cfg: Any, ds: Any) -> dict[str, float]:
    """Step 2: the metrics of the architecture before training (random init), for the summary."""
    import torch

    from reid_search.model import build_model
    from reid_search.torch_extractor import resolve_device
    from trainer.train import evaluate, preprocess_of

    click.secho("== 2. untrained model (same architecture, random init): query vs gallery", bold=True)
    torch.manual_seed(cfg.seed)
    untrained = evaluate(build_model(cfg.arch, 0, cfg.last_stride, cfg.neck).to(resolve_device("auto")),
                         ds.query, ds.gallery, preprocess_of(cfg), resolve_device("auto"))
    click.echo(f"untrained: R1 {100 * untrained['rank1']:.1f}%  mAP {100 * untrained['mAP']:.1f}%")
    return untrained


def _train(app: App, cfg: Any, data_root: Path, run_dir: Path, fresh: bool) -> None:
    """Step 3: train into ``run_dir`` (or reuse its model.pt) and make the model the workspace's."""
    from reid_search.transforms import AugmentConfig
    from trainer.schedule import describe_schedule
    from trainer.train import preprocess_of

    click.secho(f"== 3. train {cfg.recipe} ({cfg.arch} {cfg.height}x{cfg.width}, {cfg.epochs} epochs) on CPU/GPU", bold=True)
    pad_x, pad_y = AugmentConfig(pad=cfg.pad).padding(preprocess_of(cfg))
    click.echo(f"schedule: {cfg.optimizer}, P{cfg.num_identities}xK{cfg.num_instances}, {describe_schedule(cfg)}; "
               f"pad {pad_x}x{pad_y} px" + (" (10 px at 256x128, scaled)" if cfg.pad is None else "")
               + f", flip {cfg.flip_p}, random erasing {cfg.random_erasing_p}")
    if (run_dir / "model.pt").is_file() and not fresh:
        click.echo(f"reusing {run_dir / 'model.pt'} (pass --fresh to retrain)")
        app.workspace.set_model(run_dir / "model.pt")
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_training(app, cfg, data_root, run_dir)


def _index_eval_query(app: App, data_root: Path) -> tuple[dict[str, Any], Path]:
    """Steps 4-6, as `index --reindex`, `eval` (with and without re-ranking) and `query --rerank --show`."""
    from reid_search.app.cli._common import progress_bar
    from reid_search.app.cli._report import print_answer, print_eval, print_index_result, save_answer_picture
    from reid_search.app.searching import evaluate_workspace, search_images
    from reid_search.app.session import index_workspace

    ws = app.workspace

    def bar(total: int, what: str):
        return progress_bar(total, what, quiet=app.quiet)

    click.secho(f"== 4. index {data_root / GALLERY_DIR}", bold=True)
    index_workspace(ws, data_root / GALLERY_DIR, reindex=True, progress=bar, on_done=print_index_result)
    results = {}
    for mode in (None, "batch"):
        click.secho(f"== 5. eval {'with k-reciprocal re-ranking' if mode else 'without re-ranking'}", bold=True)
        query_dir, results[mode or "off"] = evaluate_workspace(ws, data_root / QUERY_DIR, rerank=mode, progress=bar)
        print_eval(results[mode or "off"], query_dir)
    q = sorted((data_root / QUERY_DIR).iterdir())[0]
    picture = ws.root / "demo-query.png"
    click.secho(f"== 6. query {q.name} --rerank --show {picture}", bold=True)
    answer = search_images(ws, [q], top_k=8, rerank=True)
    save_answer_picture(picture, answer)
    print_answer(answer, picture=picture)
    return results, picture


def _summary(untrained: dict[str, float], results: dict[str, Any], data_root: Path, ws: Any, run_dir: Path,
             picture: Path, t0: float) -> None:
    """The table of the three runs, where everything is, and demo-summary.json."""
    plain, rr = results["off"], results["batch"]
    click.secho("== summary", bold=True)
    click.echo(f"{'':<26}{'R1':>8}{'R5':>8}{'mAP':>8}{'mINP':>8}")
    click.echo(f"{'untrained (random init)':<26}{100 * untrained['rank1']:>7.1f}%{100 * untrained['rank5']:>7.1f}%"
               f"{100 * untrained['mAP']:>7.1f}%{100 * untrained['mINP']:>7.1f}%")
    for name, r in (("trained", plain), ("trained + re-ranking", rr)):
        click.echo(f"{name:<26}{100 * r.rank1:>7.1f}%{100 * r.rank5:>7.1f}%{100 * r.mAP:>7.1f}%{100 * r.mINP:>7.1f}%")
    click.echo(f"data:    {data_root}\nmodel:   {ws.model_path()}\nlog:     {run_dir / 'train.log'}\n"
               f"gallery: {ws.index_dir} + {ws.db_url}\npicture: {picture}\n"
               f"time:    {time.perf_counter() - t0:.0f} s")
    summary = {"untrained": untrained, "trained": plain.to_dict(), "trained_rerank": rr.to_dict(),
               "seconds": time.perf_counter() - t0}
    (ws.root / "demo-summary.json").write_text(json.dumps(summary, indent=2))
