"""``reid-search make-synthetic``: a seeded Market-layout dataset of drawn pedestrians."""

from __future__ import annotations

from pathlib import Path

import click

from tqdm import tqdm

from reid_search.app.cli._common import App, pass_app
from reid_search.synthetic import generate


@click.command("make-synthetic")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--ids", default=60, show_default=True, type=click.IntRange(2), help="Identities (half train, half test).")
@click.option("--cameras", default=4, show_default=True, type=click.IntRange(2), help="Cameras.")
@click.option("--images-per-id", default=8, show_default=True, type=click.IntRange(2), help="Crops per identity.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same bytes.")
@pass_app
def make_synthetic(app: App, out: Path, ids: int, cameras: int, images_per_id: int, seed: int) -> None:
    """Write a synthetic Market-1501-layout dataset (64×128 JPEGs) into OUT.

    Identities differ only as people do (clothes, build, bags, hair) and each
    camera has its own background, light, scale, blur and occlusions.

    \b
    Example:
      reid-search make-synthetic data/synth --ids 100 --cameras 4 --images-per-id 8 --seed 0
    """
    with tqdm(desc="generate", unit="img", disable=app.quiet, dynamic_ncols=True) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            s = generate(out, ids=ids, cameras=cameras, images_per_id=images_per_id, seed=seed, progress=progress)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(
        f"wrote {s.total_images} images of {s.num_ids} identities ({s.num_train_ids} train, {s.num_test_ids} test) "
        f"from {s.cameras} cameras to {s.root}: bounding_box_train {s.train_images}, query {s.query_images}, "
        f"bounding_box_test {s.gallery_images} (incl. {s.distractor_images} distractors, {s.junk_images} junk)"
    )
