"""``reid-search index``, ``remove`` and ``db upgrade``: build and maintain the gallery."""

from __future__ import annotations

from pathlib import Path
import click

from reid_search.app.cli._common import App, pass_app, precision_option, progress_bar
from reid_search.app.cli._model_options import model_input_options
from reid_search.app.cli._params import Label, TrackName
from reid_search.app.cli._report import MAX_SKIPPED_LINES, print_index_result
from reid_search.errors import DataError, GalleryError
from reid_search.limits import INDEX_KINDS, MIN_PID

# The command bodies import torch, faiss and SQLAlchemy themselves, so that
# `--help` and argument errors answer without loading them.


@click.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--model", "-m", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint (.pt) or ONNX file [default: the model that built the gallery, else the workspace's; "
                   "with --reindex the one `train` made last]. Recorded: query, eval, embed and serve then use it.")
@model_input_options
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
          reindex: bool, commit_every: int, precision: str = "auto", preprocess: dict | None = None) -> None:
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
    from reid_search.app.session import index_workspace

    def bar(total: int, what: str):
        return progress_bar(total, what, quiet=app.quiet)

    index_workspace(app.workspace, folder, model=model, manifest=manifest, index_type=index_type,
                    index_params=index_params, batch_size=batch_size, workers=workers, device=device, flip=flip,
                    precision=precision, prune=prune, reindex=reindex, commit_every=commit_every, progress=bar,
                    on_done=print_index_result, preprocess=preprocess)


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--pid", type=Label(low=MIN_PID), default=None, help="Crops of this person id.")
@click.option("--camid", type=Label(), default=None, help="Crops from this camera.")
@click.option("--before", metavar="TIME", default=None,
              help="Crops captured before TIME (ISO 8601, e.g. 2024-05-01T00:00:00Z; no zone = UTC). "
                   "Crops without a capture time never match.")
@click.option("--track", type=TrackName(), default=None, help="Crops of this track.")
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

    from reid_search.app.session import open_workspace_gallery, refresh_rerank

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
            files = app.workspace.remove_owned_files(m.path for m in metas)
            click.echo(f"removed {len(metas)} image(s) matching {what}"
                       + (f" ({files} stored file(s) deleted: uploads, footage crops)" if files else ""))
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
        refresh_rerank(app.workspace, store)
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
