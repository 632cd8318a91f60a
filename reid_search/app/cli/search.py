"""``reid-search query`` and ``reid-search eval``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from reid_search.app.cli._common import App, pass_app, precision_option, progress_bar
from reid_search.data import QUERY_DIR, list_images, record_for
from reid_search.errors import DataError, GalleryError
from reid_search.multiquery import FUSE_MODES
from reid_search.sightings import GROUP_BY


def open_engine(app: App, model: Path | None, device: str, precision: str = "auto"):
    """The workspace's gallery with the given model, else the one that built the gallery."""
    from reid_search.app.session import open_workspace_gallery
    from reid_search.engine import SearchEngine
    from reid_search.extractors import load_extractor

    gallery = open_workspace_gallery(app.workspace)
    if gallery.ntotal == 0:
        raise GalleryError(f"the gallery of workspace {app.workspace.root} is empty: run `reid-search index FOLDER` first")
    extractor = load_extractor(app.workspace.model_path(model), device=device, precision=precision)
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
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", "-k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--rerank", is_flag=True, help="k-reciprocal re-ranking (online form, cached gallery structures).")
@click.option("--camid", type=int, default=None, help="The query's camera [default: from a Market name]; its gallery matches are dropped.")
@filter_options
@click.option("--fuse", type=click.Choice(FUSE_MODES), default="mean", show_default=True,
              help="Several IMAGES are one person: mean of their features, or each gallery item's best crop (max).")
@click.option("--threshold", type=float, default=None,
              help="Match when distance <= this [default: the workspace's, from `reid-search calibrate`, for this model].")
@click.option("--group-by", type=click.Choice(GROUP_BY), default=None,
              help="Sightings: the best hit per camera (or track), its hit and match counts, first/last time.")
@click.option("--json", "as_json", is_flag=True,
              help="Print {query, camid, rerank, filter, threshold, decision, hits: [{rank, id, path, pid, camid, "
                   "distance, time, track, match}]} (+ fuse, sightings).")
@click.option("--show", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write a picture of the ranking (PNG).")
@click.option("--model", "-m", type=click.Path(dir_okay=False, path_type=Path), default=None, help="[default: the model that built the gallery]")
@click.option("--device", default="auto", show_default=True)
@precision_option
@pass_app
def query(app: App, images: tuple[Path, ...], top_k: int, rerank: bool, camid: int | None, cameras: str | None,
          exclude_cameras: str | None, since: str | None, until: str | None, exclude_tracks: tuple[str, ...],
          keep_same_camera: bool, fuse: str, threshold: float | None, group_by: str | None, as_json: bool,
          show: Path | None, model: Path | None, device: str, precision: str = "auto") -> None:
    """Find the person in IMAGES among the indexed gallery, other cameras first.

    Gallery crops from the query's own camera are dropped (camid from a
    Market name such as 0002_c1s1_000451_03.jpg, or --camid) unless
    --keep-same-camera. The filters (cameras, capture time, tracks) are
    ANDed and evaluated inside the gallery's search: --top-k hits come back
    whenever that many crops pass. A crop with no capture time never passes
    --since/--until.

    Several IMAGES are crops of one person (a track): they are fused (--fuse)
    and the cameras of all of them are dropped. Each hit gets `match`
    (distance <= the threshold) and the answer a decision: match, no-match,
    or uncalibrated when this model (and distance kind) has no threshold.
    With --group-by, --top-k counts sightings, taken from the best
    max(20 x top-k, 200) hits.

    \b
    Examples:
      reid-search query query/0001_c1s1_001051_00.jpg --rerank
      reid-search query person.jpg --camid 3 --top-k 5 --json --show ranking.png
      reid-search query track/*.jpg --fuse max --group-by camera --json
      reid-search query person.jpg --cameras 1,3 --since 2024-05-01T08:00:00Z --until 2024-05-01T18:00:00Z
      reid-search query crop.jpg --exclude-cameras 4,5 --exclude-track cam2-0042 --keep-same-camera
    """
    from reid_search.images import load_image  # torch: only when it runs
    from reid_search.filters import check_label, describe_filter, filter_dict, make_search_filter
    from reid_search.multiquery import search_crops
    from reid_search.thresholds import decide, load_calibration

    # Arguments first: a bad filter fails before the model and the gallery load.
    where = make_search_filter(cameras, exclude_cameras, since, until, exclude_tracks)
    if camid is not None:
        check_label(camid, "--camid")
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise DataError(f"no such image: {missing[0]}")
    imgs = [load_image(p) for p in images]
    recs = [record_for(p) for p in images]
    cams = [camid if camid is not None else r.camid for r in recs]
    engine = open_engine(app, model, device, precision)
    if threshold is None:
        cal = load_calibration(app.workspace, engine.extractor.fingerprint, rerank)
        threshold = cal.threshold if cal is not None else None
    want = top_k if group_by is None else min(1000, max(20 * top_k, 200))
    hits = search_crops(engine, engine.embed_images(imgs), cams, fuse, top_k=want, rerank=rerank, where=where,
                        keep_same_camera=keep_same_camera)
    flags, decision = decide([h.distance for h in hits], threshold)
    sightings = None
    if group_by is not None:
        from reid_search.sightings import group_hits

        sightings = group_hits(hits, group_by, threshold)[:top_k]
    query_pid = recs[0].pid if len({r.pid for r in recs}) == 1 else None
    if show is not None:
        from reid_search.show import save_hits_picture

        if sightings is None:
            save_hits_picture(show, images[0], hits, query_pid, matches=flags)
        else:
            labels = [f"{group_by[0]}{s.key if s.key is not None else '-'} {s.matches if s.matches is not None else '?'}"
                      f"/{s.hits}" for s in sightings]
            save_hits_picture(show, images[0], [s.best for s in sightings], query_pid,
                              matches=[None if threshold is None else s.best.distance <= threshold for s in sightings],
                              labels=labels)
    cam = cams[0] if len(images) == 1 else sorted({c for c in cams if c is not None})
    if as_json:
        out = {"query": str(images[0]) if len(images) == 1 else [str(p) for p in images], "camid": cam,
               "rerank": rerank, "filter": filter_dict(where, keep_same_camera), "threshold": threshold,
               "decision": decision, "hits": [{**h.to_dict(), "match": m} for h, m in zip(hits, flags)]}
        if len(images) > 1:
            out["fuse"] = fuse
        if sightings is not None:
            out["group_by"] = group_by
            out["sightings"] = [s.to_dict() for s in sightings]
        click.echo(json.dumps(out))
    else:
        names = str(images[0]) if len(images) == 1 else f"{len(images)} crops ({fuse})"
        click.echo(f"query {names}  camid {cam if cam not in (None, []) else '-'}  {'re-ranked' if rerank else 'k-NN'}"
                   + ("" if where.is_empty else f"  filter {describe_filter(where)}"))
        th = "none (run `reid-search calibrate`)" if threshold is None else f"{threshold:.4f}"
        click.echo(f"decision: {decision}  threshold {th}")
        if sightings is not None:
            click.echo(f"{group_by:>7}  {'hits':>4}  {'match':>5}  {'best':>8}  {'first time':<20}  {'last time':<20}  path")
            for s in sightings:
                d = s.to_dict()
                click.echo(f"{'-' if s.key is None else s.key!s:>7}  {s.hits:>4}  "
                           f"{'-' if s.matches is None else s.matches:>5}  {s.best.distance:>8.4f}  "
                           f"{d['first_time'] or '-':<20}  {d['last_time'] or '-':<20}  {s.best.path}")
        else:
            click.echo(f"{'rank':>4}  {'distance':>8}  {'match':>5}  {'pid':>5}  {'cam':>3}  {'time':<20}  {'track':<8}  path")
            for h, m in zip(hits, flags):
                d = h.to_dict()
                click.echo(f"{h.rank:>4}  {h.distance:>8.4f}  {'-' if m is None else ('*' if m else ''):>5}  "
                           f"{'-' if h.pid is None else h.pid:>5}  {'-' if h.camid is None else h.camid:>3}  "
                           f"{d['time'] or '-':<20}  {h.track or '-':<8}  {h.path}")
            if len(hits) < top_k:
                click.echo(f"({len(hits)} of {top_k}: no more gallery crops pass the filter)")
    if show is not None and not as_json:
        click.echo(f"picture: {show}")


def default_query_dir(engine, remedy: str) -> Path:
    """``query/`` beside the indexed gallery folder.

    Raises:
        DataError: there is none (the message ends with ``remedy``).
    """
    roots = sorted({m.root for batch in engine.store.iter_metadata() for m in batch})
    candidates = [r.parent / QUERY_DIR for r in roots if (r.parent / QUERY_DIR).is_dir()]
    if not candidates:
        raise DataError(f"no query/ folder beside the indexed gallery; {remedy}")
    return candidates[0]


@click.command("eval")
@click.option("--query", "query_dir", type=click.Path(path_type=Path), default=None,
              help="Query folder [default: query/ beside the indexed gallery folder].")
@click.option("--rerank", is_flag=True, help="Also re-rank (k-reciprocal).")
@click.option("--rerank-mode", type=click.Choice(["batch", "online"]), default="batch", show_default=True,
              help="batch: Zhong et al. over queries+gallery (the published protocol); online: one query at a time.")
@click.option("--multi-query", type=click.Choice(FUSE_MODES), default=None,
              help="Score each (pid, camera) group of query images as one query, fusing its crops (Market's multiple query).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the metrics as JSON (fractions in [0, 1]), with tpr_at_fpr {\"0.0001\", \"0.001\", \"0.01\"}.")
@click.option("--model", "-m", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="[default: the model that built the gallery]")
@click.option("--device", default="auto", show_default=True)
@precision_option
@pass_app
def evaluate_cmd(app: App, query_dir: Path | None, rerank: bool, rerank_mode: str, multi_query: str | None,
                 as_json: bool, model: Path | None, device: str, precision: str = "auto"):
    """CMC rank-1/5/10, mAP and mINP of a query folder against the indexed gallery.

    Market-1501 protocol: per query, gallery images of the same pid and camera
    and junk (pid -1) are ignored; distractors (pid 0) count as wrong.

    \b
    Examples:
      reid-search index Market-1501/bounding_box_test
      reid-search eval
      reid-search eval --rerank --json
      reid-search eval --precision fp32
      reid-search eval --multi-query mean
    """
    from reid_search.evaluation import evaluate_queries

    engine = open_engine(app, model, device, precision)
    if query_dir is None:
        query_dir = default_query_dir(engine, "pass --query DIR")
    queries = list_images(query_dir, recursive=False)
    with progress_bar(len(queries), "embed queries", quiet=app.quiet or as_json) as advance:
        res = evaluate_queries(engine, queries, rerank=rerank_mode if rerank else None, multi_query=multi_query,
                               progress=advance)
    if as_json:
        click.echo(json.dumps(res.to_dict()))
        return res
    unit = "images" if multi_query is None else f"(pid, camera) groups fused by {multi_query}"
    click.echo(f"query {query_dir}: {res.num_query} {unit} ({res.num_valid_query} with a valid match); "
               f"gallery {res.num_gallery} images; re-ranking: {res.rerank or 'off'}")
    click.echo(f"mAP: {100 * res.mAP:.1f}%  mINP: {100 * res.mINP:.1f}%")
    for r, v in ((1, res.rank1), (5, res.rank5), (10, res.rank10)):
        click.echo(f"CMC curve, Rank-{r:<3}: {100 * v:.1f}%")
    if res.tpr_at_fpr:
        click.echo("TPR at FPR " + ", ".join(f"{float(f):g}: {100 * v:.1f}%" for f, v in res.tpr_at_fpr.items()))
    return res  # for ctx.invoke callers (the demo)
