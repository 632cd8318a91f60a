"""``reid-search index``, ``remove`` and ``db upgrade``: build and maintain the gallery."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from reid_search.cli._common import App, pass_app, precision_option, progress_bar
from reid_search.data import iter_image_paths
from reid_search.errors import DataError, GalleryError
from reid_search.limits import INDEX_KINDS

if TYPE_CHECKING:
    from indexer.pipeline import IndexReport

# The command bodies import torch, faiss and SQLAlchemy themselves, so that
# `--help` and argument errors answer without loading them.

MAX_SKIPPED_LINES = 20


@click.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--model", "-m", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint (.pt) or ONNX file [default: the workspace's model].")
@click.option("--index-type", type=click.Choice(INDEX_KINDS), default=None,
              help="FAISS index: flat (exact), ivf, ivfpq (compact: ~0.6 GB per million 2048-d images) or hnsw "
                   "[default: the gallery's, flat when new]. "
                   "Changing it rebuilds the index from the stored vectors.")
@click.option("--index-param", "index_params", multiple=True, metavar="KEY=VALUE",
              help="Index parameter, repeatable: nlist, nprobe, min_train (ivf, ivfpq); pq_m, k_factor, refine_bits "
                   "(ivfpq; 2-3 = RaBitQ, 4/6/8 = scalar quantizer); hnsw_m, ef_construction, ef_search (hnsw). "
                   "0 = automatic.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--workers", type=click.IntRange(0), default=None, help="Image decoding processes [default: automatic].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--flip/--no-flip", default=False, show_default=True,
              help="Average with the horizontally flipped image (queries must use the same).")
@precision_option
@click.option("--prune", is_flag=True, help="Also remove gallery images under FOLDER whose files are gone.")
@click.option("--reindex", is_flag=True, help="Drop the whole gallery first (needed to switch models).")
@click.option("--commit-every", default=1024, show_default=True, type=click.IntRange(1),
              help="Commit (and so never lose) progress every N images (and at least every 10 s).")
@pass_app
def index(app: App, folder: Path, model: Path | None, index_type: str | None, index_params: tuple[str, ...],
          batch_size: int, workers: int | None, device: str, flip: bool, prune: bool, reindex: bool,
          commit_every: int, precision: str = "auto") -> None:
    """Add the images under FOLDER (recursively) to the workspace's gallery.

    Incremental: unchanged files are skipped, changed files (by content hash)
    replaced; re-running after an interruption finishes the job. Unreadable
    images are skipped with their reason; the exit code is 1 only when nothing
    could be indexed.

    \b
    Examples:
      reid-search index data/market/bounding_box_test
      reid-search index /data/cams --index-type ivfpq --index-param nprobe=64 --prune
      reid-search index data/market/bounding_box_test --model runs/new/model.pt --reindex
      reid-search index data/market/bounding_box_test --precision fp32
    """
    from indexer.store import open_gallery
    from indexer.vectors import parse_index_spec
    from reid_search.extract import load_extractor

    if not folder.exists():
        raise DataError(f"no such folder: {folder}; pass the folder of gallery crops (e.g. bounding_box_test)")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder; pass the folder that holds the gallery crops")
    extractor = load_extractor(app.workspace.model_path(model), device=device, flip=flip, precision=precision)
    app.workspace.ensure()
    gallery = open_gallery(app.workspace)
    try:
        dropped = 0
        if reindex:
            dropped = gallery.clear()
        else:
            gallery.check_model(extractor.fingerprint, extractor.dim)
        if index_type is not None or index_params:
            gallery.set_spec(parse_index_spec(index_type or gallery.spec.kind, index_params, base=gallery.spec))
        total = sum(1 for _ in iter_image_paths(folder))
        with progress_bar(total, "index", quiet=app.quiet) as advance:
            report = gallery.add_folder(folder, extractor, batch_size=batch_size, num_workers=workers,
                                        prune=prune, commit_every=commit_every, progress=advance)
        report.dropped = dropped
        if report.usable == 0:
            raise GalleryError(_nothing_indexed(report))
        _print_report(report, gallery.describe())
        _refresh_rerank(app, gallery)
    finally:
        gallery.close()


# Above this size the cached re-ranking structures are built on the first
# `query --rerank` instead of at the end of every index run.
RERANK_PRECOMPUTE_LIMIT = 200_000


def _refresh_rerank(app: App, gallery) -> None:
    """Keep the gallery's k-reciprocal structures (used by `query --rerank`) in step with the gallery."""
    from reid_search.engine import refresh_rerank_cache

    gallery.save()  # the cache is keyed by the committed generation
    if gallery.ntotal > RERANK_PRECOMPUTE_LIMIT:
        (app.workspace.index_dir / "rerank.npz").unlink(missing_ok=True)
        return
    refresh_rerank_cache(gallery, app.workspace.index_dir)


def _nothing_indexed(report: IndexReport) -> str:
    first = report.skipped[0] if report.skipped else None
    detail = f"; first: {Path(first[0]).name}: {first[2]}" if first else ""
    return f"nothing could be indexed in {report.folder}: {report.summary()}{detail}"


def _print_report(report: IndexReport, gallery: str) -> None:
    rate = (report.indexed + report.replaced) / report.seconds if report.seconds > 0 else 0.0
    click.echo(f"{report.summary()} in {report.seconds:.1f}s ({rate:.1f} images/s embedded)")
    for path, reason, detail in report.skipped[:MAX_SKIPPED_LINES]:
        click.echo(f"  skipped {path}: {reason}: {detail}")
    if len(report.skipped) > MAX_SKIPPED_LINES:
        click.echo(f"  ... and {len(report.skipped) - MAX_SKIPPED_LINES} more skipped (run with -v to log them all)")
    click.echo(f"gallery: {gallery}")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@pass_app
def remove(app: App, paths: tuple[Path, ...]) -> None:
    """Remove images (files, or whole folders) from the gallery's DB and index.

    Files need not exist any more; to drop every file gone from disk under a
    folder, use `reid-search index FOLDER --prune`.

    \b
    Examples:
      reid-search remove data/market/bounding_box_test/0001_c1s1_001051_00.jpg
      reid-search remove data/old_camera/
    """
    from indexer.store import open_gallery

    gallery = open_gallery(app.workspace)
    try:
        removed, unmatched = gallery.remove(paths)
        if removed == 0 and unmatched:
            raise GalleryError(
                f"nothing in the gallery matches {', '.join(unmatched)}; gallery roots: "
                + (", ".join(map(str, gallery.roots())) or "none")
            )
        click.echo(f"removed {removed} image(s)")
        for p in unmatched:
            click.echo(f"  not in the gallery: {p}")
        click.echo(f"gallery: {gallery.describe()}")
        _refresh_rerank(app, gallery)
    finally:
        gallery.close()


@click.group()
def db() -> None:
    """Maintain the metadata DB.

    \b
    Example:
      reid-search --db postgresql+psycopg://reid@dbhost/reid db upgrade
    """


@db.command()
@pass_app
def upgrade(app: App) -> None:
    """Migrate the metadata DB to the current schema (also done whenever a gallery is opened).

    \b
    Example:
      reid-search db upgrade
    """
    from indexer.migrations import upgrade_db
    from indexer.store import make_engine

    app.workspace.ensure()
    engine = make_engine(app.workspace.db_url)
    try:
        before, after = upgrade_db(engine)
    finally:
        engine.dispose()
    if before == after:
        click.echo(f"the DB is up to date (revision {after})")
    else:
        click.echo(f"migrated the DB from {before or 'empty'} to revision {after}")


__all__ = ["db", "index", "remove"]
