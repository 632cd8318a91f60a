"""``reid-search demo``: the whole system end to end on an embedded default."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click

from reid_search.app.cli._common import App, pass_app
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
@click.pass_context
def demo(ctx: click.Context, app: App, data_root: Path | None, ids: int, epochs: int, max_steps: int | None,
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
    from reid_search.app.cli._common import progress_bar
    from reid_search.app.cli.index import index
    from reid_search.app.cli.search import evaluate_cmd, query
    from reid_search.app.cli.train import train
    from reid_search.data import load_market
    from reid_search.torch_extractor import resolve_device
    from reid_search.model import build_model
    from reid_search.synthetic import generate
    from reid_search.transforms import AugmentConfig
    from trainer.config import resolve_config
    from trainer.schedule import describe_schedule
    from trainer.train import evaluate, preprocess_of

    t0 = time.perf_counter()
    # Bad overrides fail here, in one line, before anything is generated or deleted.
    sets = list(DEMO_TRAIN) + [f"epochs={epochs}"] + ([f"max_steps_per_epoch={max_steps}"] if max_steps else []) + list(overrides)
    cfg = resolve_config("softmax_triplet_with_center", sets)
    ws = app.workspace.ensure()
    run_dir = ws.runs_dir / "demo"
    if fresh:
        for p in (run_dir, ws.root / "demo-data", ws.index_dir, ws.root / "reid.db"):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if data_root is None:
        data_root = ws.root / "demo-data"
        if not data_root.exists():
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
        else:
            click.secho(f"== 1. synthetic data: reusing {data_root}", bold=True)
    else:
        click.secho(f"== 1. data: {data_root}", bold=True)
    ds = load_market(data_root)

    click.secho("== 2. untrained model (same architecture, random init): query vs gallery", bold=True)
    import torch

    torch.manual_seed(cfg.seed)
    untrained = evaluate(build_model(cfg.arch, 0, cfg.last_stride, cfg.neck).to(resolve_device("auto")),
                         ds.query, ds.gallery, preprocess_of(cfg), resolve_device("auto"))
    click.echo(f"untrained: R1 {100 * untrained['rank1']:.1f}%  mAP {100 * untrained['mAP']:.1f}%")

    click.secho(f"== 3. train {cfg.recipe} ({cfg.arch} {cfg.height}x{cfg.width}, {cfg.epochs} epochs) on CPU/GPU", bold=True)
    pad_x, pad_y = AugmentConfig(pad=cfg.pad).padding(preprocess_of(cfg))
    click.echo(f"schedule: {cfg.optimizer}, P{cfg.num_identities}xK{cfg.num_instances}, {describe_schedule(cfg)}; "
               f"pad {pad_x}x{pad_y} px" + (" (10 px at 256x128, scaled)" if cfg.pad is None else "")
               + f", flip {cfg.flip_p}, random erasing {cfg.random_erasing_p}")
    if (run_dir / "model.pt").is_file() and not fresh:
        click.echo(f"reusing {run_dir / 'model.pt'} (pass --fresh to retrain)")
        ws.set_model(run_dir / "model.pt")
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        ctx.invoke(train, data_root=data_root, recipe="softmax_triplet_with_center", overrides=tuple(sets),
                   output=run_dir, resume=False, device="auto", print_config=False)

    click.secho(f"== 4. index {data_root / GALLERY_DIR}", bold=True)
    ctx.invoke(index, folder=data_root / GALLERY_DIR, model=None, index_type=None, index_params=(), batch_size=32,
               workers=None, device="auto", flip=False, prune=False, reindex=True, commit_every=1024)

    results = {}
    for mode in (None, "batch"):
        click.secho(f"== 5. eval {'with k-reciprocal re-ranking' if mode else 'without re-ranking'}", bold=True)
        results[mode or "off"] = ctx.invoke(evaluate_cmd, query_dir=data_root / QUERY_DIR, rerank=mode is not None,
                                            rerank_mode=mode or "batch", as_json=False, model=None, device="auto")

    q = sorted((data_root / QUERY_DIR).iterdir())[0]
    picture = ws.root / "demo-query.png"
    click.secho(f"== 6. query {q.name} --rerank --show {picture}", bold=True)
    ctx.invoke(query, images=(q,), top_k=8, rerank=True, camid=None, as_json=False, show=picture, model=None, device="auto")

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
