"""``reid-search query`` and ``reid-search eval``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from reid_search.cli._common import App, pass_app, progress_bar
from reid_search.data import QUERY_DIR, list_images, record_for
from reid_search.errors import DataError, GalleryError


def open_engine(app: App, model: Path | None, device: str):
    """The workspace's gallery with the given model, else the one that built the gallery."""
    from indexer.store import open_gallery
    from reid_search.engine import SearchEngine
    from reid_search.extract import load_extractor

    gallery = open_gallery(app.workspace)
    if gallery.ntotal == 0:
        raise GalleryError(f"the gallery of workspace {app.workspace.root} is empty: run `reid-search index FOLDER` first")
    extractor = load_extractor(app.workspace.model_path(model), device=device)
    return SearchEngine(gallery, extractor, cache_dir=app.workspace.index_dir)


def filter_options(fn):
    """The filter options of `query` (the same fields as POST /query)."""
    opts = [
        click.option("--cameras", metavar="1,3", default=None, help="Only gallery crops from these cameras."),
        click.option("--exclude-cameras", metavar="4,5", default=None, help="No gallery crops from these cameras."),
        click.option("--since", metavar="TIME", default=None,
                     help="Only crops captured at or after TIME (ISO 8601, e.g. 2024-05-01T13:45:00Z; no zone = UTC)."),
        click.option("--until", metavar="TIME", default=None, help="Only crops captured at or before TIME."),
        click.option("--exclude-track", "exclude_tracks", metavar="T", multiple=True,
                     help="No crops of track T (repeatable), e.g. the query's own tracklet."),
        click.option("--keep-same-camera", is_flag=True,
                     help="Keep gallery crops from the query's own camera (dropped by default)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@click.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--top-k", "-k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--rerank", is_flag=True, help="k-reciprocal re-ranking (online form, cached gallery structures).")
@click.option("--camid", type=int, default=None, help="The query's camera [default: from a Market name]; its gallery matches are dropped.")
@filter_options
@click.option("--json", "as_json", is_flag=True,
              help="Print {query, camid, rerank, filter, hits: [{rank, id, path, pid, camid, distance, time, track}]}.")
@click.option("--show", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write a picture of the ranking (PNG).")
@click.option("--model", "-m", type=click.Path(dir_okay=False, path_type=Path), default=None, help="[default: the model that built the gallery]")
@click.option("--device", default="auto", show_default=True)
@pass_app
def query(app: App, image: Path, top_k: int, rerank: bool, camid: int | None, cameras: str | None,
          exclude_cameras: str | None, since: str | None, until: str | None, exclude_tracks: tuple[str, ...],
          keep_same_camera: bool, as_json: bool, show: Path | None, model: Path | None, device: str) -> None:
    """Find the person in IMAGE among the indexed gallery, other cameras first.

    Gallery crops from the query's own camera are dropped (camid from a
    Market name such as 0002_c1s1_000451_03.jpg, or --camid) unless
    --keep-same-camera. The filters (cameras, capture time, tracks) are
    ANDed and evaluated inside the gallery's search: --top-k hits come back
    whenever that many crops pass. A crop with no capture time never passes
    --since/--until.

    \b
    Examples:
      reid-search query query/0001_c1s1_001051_00.jpg --rerank
      reid-search query person.jpg --camid 3 --top-k 5 --json --show ranking.png
      reid-search query person.jpg --cameras 1,3 --since 2024-05-01T08:00:00Z --until 2024-05-01T18:00:00Z
      reid-search query crop.jpg --exclude-cameras 4,5 --exclude-track cam2-0042 --keep-same-camera
    """
    from reid_search.extract import load_image  # torch: only when it runs
    from reid_search.filters import check_label, describe_filter, filter_dict, make_search_filter

    # Arguments first: a bad filter fails before the model and the gallery load.
    where = make_search_filter(cameras, exclude_cameras, since, until, exclude_tracks)
    if camid is not None:
        check_label(camid, "--camid")
    if not image.is_file():
        raise DataError(f"no such image: {image}")
    img = load_image(image)
    rec = record_for(image)
    cam = camid if camid is not None else rec.camid
    engine = open_engine(app, model, device)
    feats = engine.embed_images([img])
    hits = engine.search(feats, top_k=top_k, camids=[cam], rerank=rerank, where=where,
                         keep_same_camera=keep_same_camera)[0]
    if show is not None:
        from reid_search.show import save_hits_picture

        save_hits_picture(show, image, hits, rec.pid)
    if as_json:
        click.echo(json.dumps({"query": str(image), "camid": cam, "rerank": rerank,
                               "filter": filter_dict(where, keep_same_camera), "hits": [h.to_dict() for h in hits]}))
    else:
        click.echo(f"query {image}  camid {cam if cam is not None else '-'}  {'re-ranked' if rerank else 'k-NN'}"
                   + ("" if where.is_empty else f"  filter {describe_filter(where)}"))
        click.echo(f"{'rank':>4}  {'distance':>8}  {'pid':>5}  {'cam':>3}  {'time':<20}  {'track':<8}  path")
        for h in hits:
            d = h.to_dict()
            click.echo(f"{h.rank:>4}  {h.distance:>8.4f}  {'-' if h.pid is None else h.pid:>5}  "
                       f"{'-' if h.camid is None else h.camid:>3}  {d['time'] or '-':<20}  {h.track or '-':<8}  {h.path}")
        if len(hits) < top_k:
            click.echo(f"({len(hits)} of {top_k}: no more gallery crops pass the filter)")
    if show is not None and not as_json:
        click.echo(f"picture: {show}")


@click.command("eval")
@click.option("--query", "query_dir", type=click.Path(path_type=Path), default=None,
              help="Query folder [default: query/ beside the indexed gallery folder].")
@click.option("--rerank", is_flag=True, help="Also re-rank (k-reciprocal).")
@click.option("--rerank-mode", type=click.Choice(["batch", "online"]), default="batch", show_default=True,
              help="batch: Zhong et al. over queries+gallery (the published protocol); online: one query at a time.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON (fractions in [0, 1]).")
@click.option("--model", "-m", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="[default: the model that built the gallery]")
@click.option("--device", default="auto", show_default=True)
@pass_app
def evaluate_cmd(app: App, query_dir: Path | None, rerank: bool, rerank_mode: str, as_json: bool,
                 model: Path | None, device: str):
    """CMC rank-1/5/10, mAP and mINP of a query folder against the indexed gallery.

    Market-1501 protocol: per query, gallery images of the same pid and camera
    and junk (pid -1) are ignored; distractors (pid 0) count as wrong.

    \b
    Examples:
      reid-search index Market-1501/bounding_box_test
      reid-search eval
      reid-search eval --rerank --json
    """
    from reid_search.evaluation import evaluate_queries

    engine = open_engine(app, model, device)
    if query_dir is None:
        roots = sorted({m.root for batch in engine.store.iter_metadata() for m in batch})
        candidates = [r.parent / QUERY_DIR for r in roots if (r.parent / QUERY_DIR).is_dir()]
        if not candidates:
            raise DataError("no query/ folder beside the indexed gallery; pass --query DIR")
        query_dir = candidates[0]
    queries = list_images(query_dir, recursive=False)
    with progress_bar(len(queries), "embed queries", quiet=app.quiet or as_json) as advance:
        res = evaluate_queries(engine, queries, rerank=rerank_mode if rerank else None, progress=advance)
    if as_json:
        click.echo(json.dumps(res.to_dict()))
        return res
    click.echo(f"query {query_dir}: {res.num_query} images ({res.num_valid_query} with a valid match); "
               f"gallery {res.num_gallery} images; re-ranking: {res.rerank or 'off'}")
    click.echo(f"mAP: {100 * res.mAP:.1f}%  mINP: {100 * res.mINP:.1f}%")
    for r, v in ((1, res.rank1), (5, res.rank5), (10, res.rank10)):
        click.echo(f"CMC curve, Rank-{r:<3}: {100 * v:.1f}%")
    return res  # for ctx.invoke callers (the demo)
