"""``reid-search index``, ``remove`` and ``db upgrade``: build and maintain the gallery."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click

from reid_search.app.cli._common import App, pass_app, precision_option, progress_bar
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
              help="Checkpoint (.pt) or ONNX file [default: the model that built the gallery, else the workspace's; "
                   "with --reindex the one `train` made last]. Recorded: query, eval, embed and serve then use it.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV or JSON Lines file with a `path` column (relative to FOLDER) and any of camid, time "
                   "(ISO 8601, UTC when no zone), track, pid. Bad rows are reported and skipped.")
@click.option("--index-type", type=click.Choice(INDEX_KINDS), default=None,
              help="Index: flat (exact), ivf, ivfpq (compact: ~0.6 GB per million 2048-d images) or hnsw; the Milvus "
                   "store also ivfsq8 and diskann (a Milvus server only) [default: the gallery's, flat when new]. "
                   "Changing it rebuilds the index from the stored vectors.")
@click.option("--index-param", "index_params", multiple=True, metavar="KEY=VALUE",
              help="Index parameter, repeatable: nlist, nprobe, min_train (ivf, ivfpq); pq_m, k_factor, refine_bits "
                   "(ivfpq; 2-3 = RaBitQ, 4/6/8 = scalar quantizer); hnsw_m, ef_construction, ef_search (hnsw); "
                   "nlist, nprobe (ivfsq8); search_list (diskann). 0 = automatic.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--workers", type=click.IntRange(0), default=None, help="Image decoding processes [default: automatic].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--flip/--no-flip", default=False, show_default=True,
              help="Average with the horizontally flipped image (queries must use the same).")
@precision_option
@click.option("--prune", is_flag=True, help="Also remove gallery images under FOLDER whose files are gone.")
@click.option("--reindex", is_flag=True,
              help="Build a new gallery of FOLDER beside the current one and switch to it when complete (needed to "
                   "switch models). Until then queries see the old gallery; a failure or a kill keeps it whole.")
@click.option("--commit-every", default=1024, show_default=True, type=click.IntRange(1),
              help="Commit (and so never lose) progress every N images (and at least every 10 s).")
@pass_app
def index(app: App, folder: Path, model: Path | None, manifest: Path | None, index_type: str | None,
          index_params: tuple[str, ...], batch_size: int, workers: int | None, device: str, flip: bool, prune: bool,
          reindex: bool, commit_every: int, precision: str = "auto") -> None:
    """Add the images under FOLDER (recursively) to the workspace's gallery.

    Incremental: unchanged files are skipped, changed files (by content hash)
    replaced; re-running after an interruption finishes the job. Unreadable
    images are skipped with their reason; the exit code is 1 only when nothing
    could be indexed. Labels come from the manifest, else from Market-style
    names (0002_c1s1_000451_03.jpg: pid 2, camera 1; no capture time).

    \b
    Examples:
      reid-search index data/market/bounding_box_test
      reid-search index /data/cams --manifest /data/cams/crops.csv
      reid-search index /data/cams --index-type ivfpq --index-param nprobe=64 --prune
      reid-search --store http://milvus:19530 index /data/cams --index-type diskann
      reid-search index data/market/bounding_box_test --model runs/new/model.pt --reindex
      reid-search index data/market/bounding_box_test --precision fp32

    \b
    A manifest (CSV; JSON Lines takes the same fields):
      path,camid,time,track
      cam1/000001.jpg,1,2024-05-01T08:00:03Z,cam1-0007
    """
    from reid_search.app.session import open_workspace_gallery
    from reid_search.extractors import load_extractor

    if not folder.exists():
        raise DataError(f"no such folder: {folder}; pass the folder of gallery crops (e.g. bounding_box_test)")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder; pass the folder that holds the gallery crops")
    if manifest is not None and not manifest.is_file():
        raise DataError(f"no manifest at {manifest}: pass a CSV or JSON Lines file with a `path` column")
    model_file = app.workspace.model_path(model, gallery=not reindex)
    extractor = load_extractor(model_file, device=device, flip=flip, precision=precision)
    app.workspace.ensure()
    store = open_workspace_gallery(app.workspace)
    try:
        run = dict(folder=folder, extractor=extractor, manifest=manifest, index_type=index_type,
                   index_params=index_params, batch_size=batch_size, workers=workers, prune=prune,
                   commit_every=commit_every, quiet=app.quiet)
        if reindex:
            # The new gallery is built beside the old one; leaving this block by an
            # exception (nothing indexable, a bad model, Ctrl-C) keeps the old one whole.
            with store.replacing() as new:
                report = _index_into(new, **run)
            report.dropped = store.replaced_count
        else:
            store.check_model(extractor.fingerprint, extractor.dim)
            report = _index_into(store, **run)
        app.workspace.set_gallery_model(model_file, extractor.fingerprint)
        _print_report(report, store.describe(), getattr(extractor, "compile_seconds", None))
        _refresh_rerank(app, store)
    finally:
        store.close()


def _index_into(store, *, folder: Path, extractor, manifest: Path | None, index_type: str | None,
                index_params: tuple[str, ...], batch_size: int, workers: int | None, prune: bool,
                commit_every: int, quiet: bool) -> IndexReport:
    """Index FOLDER into ``store``; GalleryError when nothing could be indexed."""
    from indexer.pipeline import index_folder
    from indexer.spec import parse_index_spec

    if index_type is not None or index_params:
        store.set_spec(parse_index_spec(index_type or store.spec.kind, index_params, base=store.spec))
    total = sum(1 for _ in iter_image_paths(folder))
    extra = {"manifest": manifest} if manifest is not None else {}
    with progress_bar(total, "index", quiet=quiet) as advance:
        report = index_folder(store, folder, extractor, batch_size=batch_size, num_workers=workers, prune=prune,
                              commit_every=commit_every, progress=advance, **extra)
    if report.usable == 0:
        raise GalleryError(_nothing_indexed(report))
    return report


# Above this size the cached re-ranking structures are built on the first
# `query --rerank` instead of at the end of every index run.
RERANK_PRECOMPUTE_LIMIT = 200_000


def _refresh_rerank(app: App, store) -> None:
    """Keep the gallery's k-reciprocal structures (used by `query --rerank`) in step with the gallery.

    Runs after the change is committed, so it never fails the command: a cache
    that cannot be rebuilt now is rebuilt by the next `query --rerank`.
    """
    from reid_search.engine import RERANK_CACHE, refresh_rerank_cache

    cache = app.workspace.index_dir / RERANK_CACHE
    try:
        if store.ntotal > RERANK_PRECOMPUTE_LIMIT:
            cache.unlink(missing_ok=True)
            return
        refresh_rerank_cache(store, app.workspace.index_dir)
    except Exception as exc:  # noqa: BLE001 - the gallery change is committed; the cache is optional
        logging.getLogger(__name__).warning("could not rebuild the re-ranking cache %s (%s: %s); "
                                            "`query --rerank` will rebuild it", cache, type(exc).__name__, exc)
        with contextlib.suppress(OSError):
            cache.unlink(missing_ok=True)


def _nothing_indexed(report: IndexReport) -> str:
    first = report.skipped[0] if report.skipped else None
    detail = f"; first: {Path(first[0]).name}: {first[2]}" if first else ""
    return f"nothing could be indexed in {report.folder}: {report.summary()}{detail}"


def _print_report(report: IndexReport, gallery: str, compile_seconds: float | None = None) -> None:
    rate = (report.indexed + report.replaced) / report.seconds if report.seconds > 0 else 0.0
    click.echo(f"{report.summary()} in {report.seconds:.1f}s ({rate:.1f} images/s embedded)")
    if compile_seconds is not None:
        click.echo(f"  torch.compile took {compile_seconds:.1f}s of that (a run this long pays it back)")
    for path, reason, detail in report.skipped[:MAX_SKIPPED_LINES]:
        click.echo(f"  skipped {path}: {reason}: {detail}")
    if len(report.skipped) > MAX_SKIPPED_LINES:
        click.echo(f"  ... and {len(report.skipped) - MAX_SKIPPED_LINES} more skipped (run with -v to log them all)")
    click.echo(f"gallery: {gallery}")


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--pid", type=int, default=None, help="Crops of this person id.")
@click.option("--camid", type=int, default=None, help="Crops from this camera.")
@click.option("--before", metavar="TIME", default=None,
              help="Crops captured before TIME (ISO 8601, e.g. 2024-05-01T00:00:00Z; no zone = UTC). "
                   "Crops without a capture time never match.")
@click.option("--track", default=None, help="Crops of this track.")
@click.option("--dry-run", is_flag=True, help="Count (and list) what the filter matches; remove nothing.")
@pass_app
def remove(app: App, paths: tuple[Path, ...], pid: int | None, camid: int | None, before: str | None,
           track: str | None, dry_run: bool) -> None:
    """Remove images from the gallery: by path (files or whole folders), or by filter.

    By path, files need not exist any more; to drop every file gone from
    disk under a folder, use `reid-search index FOLDER --prune`. By filter
    (retention, erasure), --pid, --camid, --before and --track are ANDed.
    Rows, vectors and re-ranking structures go; so do the files that the HTTP
    service stored for them under WORKSPACE/uploads (your own image folders
    are never touched).

    \b
    Examples:
      reid-search remove data/market/bounding_box_test/0001_c1s1_001051_00.jpg
      reid-search remove data/old_camera/
      reid-search remove --before 2024-04-01T00:00:00Z --dry-run
      reid-search remove --pid 17
      reid-search remove --camid 4 --before 2024-04-01 --track cam4-0031
    """
    from reid_search.filters import make_remove_filter

    by_filter = any(v is not None for v in (pid, camid, before, track))
    if paths and by_filter:
        raise DataError("give PATHs or --pid/--camid/--before/--track, not both (run remove twice)")
    if not paths and not by_filter:
        raise DataError("say what to remove: PATHs (files or folders) or --pid/--camid/--before/--track")
    if dry_run and not by_filter:
        raise DataError("--dry-run counts what --pid/--camid/--before/--track match; it does not take PATHs")
    where = make_remove_filter(pid, camid, before, track) if by_filter else None

    from reid_search.app.session import open_workspace_gallery

    store = open_workspace_gallery(app.workspace)
    try:
        if where is not None:
            metas = store.remove_where(where, dry_run=dry_run)
            what = _describe_remove(pid, camid, before, track)
            if dry_run:
                click.echo(f"would remove {len(metas)} image(s) matching {what} (dry run: nothing removed)")
                for m in metas[:MAX_SKIPPED_LINES]:
                    click.echo(f"  {m.path}")
                if len(metas) > MAX_SKIPPED_LINES:
                    click.echo(f"  ... and {len(metas) - MAX_SKIPPED_LINES} more")
                return
            files = app.workspace.remove_uploads(m.path for m in metas)
            click.echo(f"removed {len(metas)} image(s) matching {what}"
                       + (f" ({files} uploaded file(s) deleted)" if files else ""))
        else:
            removed, unmatched = store.remove([str(p) for p in paths])
            if removed == 0 and unmatched:
                roots = sorted({str(m.root) for batch in store.iter_metadata() for m in batch})
                raise GalleryError(f"nothing in the gallery matches {', '.join(unmatched)}; gallery roots: "
                                   + (", ".join(roots) or "none"))
            click.echo(f"removed {removed} image(s)")
            for p in unmatched:
                click.echo(f"  not in the gallery: {p}")
        click.echo(f"gallery: {store.describe()}")
        _refresh_rerank(app, store)
    finally:
        store.close()


def _describe_remove(pid: int | None, camid: int | None, before: str | None, track: str | None) -> str:
    parts = [f"{k} {v}" for k, v in (("pid", pid), ("camid", camid), ("before", before), ("track", track))
             if v is not None]
    return ", ".join(parts)


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
    from indexer.db import make_engine

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
