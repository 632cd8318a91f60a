"""``reid-search query`` and ``reid-search eval``."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from reid_search.app.cli._common import App, pass_app, precision_option, progress_bar
from reid_search.app.cli._model_options import model_input_options
from reid_search.app.cli._params import Label, filter_options
from reid_search.app.cli._report import print_answer, print_eval, save_answer_picture
from reid_search.multiquery import FUSE_MODES
from reid_search.sightings import GROUP_BY


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", "-k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--rerank", is_flag=True, help="k-reciprocal re-ranking (online form, cached gallery structures).")
@click.option("--camid", type=Label(), default=None, help="The query's camera [default: from a Market name]; its gallery matches are dropped.")
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
@model_input_options
@click.option("--device", default="auto", show_default=True)
@precision_option
@pass_app
def query(app: App, images: tuple[Path, ...], top_k: int, rerank: bool, camid: int | None,
          cameras: frozenset[int] | None, exclude_cameras: frozenset[int] | None, since: datetime | None,
          until: datetime | None, exclude_tracks: tuple[str, ...],
          keep_same_camera: bool, fuse: str, threshold: float | None, group_by: str | None, as_json: bool,
          show: Path | None, model: Path | None, device: str, precision: str = "auto",
          preprocess: dict | None = None) -> None:
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
    from reid_search.app.searching import search_images
    from reid_search.filters import make_search_filter

    # The options are checked as they are parsed (reid_search.app.cli._params); this checks
    # them together (since <= until) before the model and the gallery load.
    where = make_search_filter(cameras, exclude_cameras, since, until, exclude_tracks)
    ans = search_images(app.workspace, images, top_k=top_k, rerank=rerank, camid=camid, where=where,
                        keep_same_camera=keep_same_camera, fuse=fuse, threshold=threshold, group_by=group_by,
                        model=model, device=device, precision=precision, preprocess=preprocess)
    if show is not None:
        save_answer_picture(show, ans)
    print_answer(ans, as_json, picture=show)


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
@model_input_options
@click.option("--device", default="auto", show_default=True)
@precision_option
@pass_app
def evaluate_cmd(app: App, query_dir: Path | None, rerank: bool, rerank_mode: str, multi_query: str | None,
                 as_json: bool, model: Path | None, device: str, precision: str = "auto",
                 preprocess: dict | None = None):
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
    from reid_search.app.searching import evaluate_workspace

    def bar(total: int, what: str):
        return progress_bar(total, what, quiet=app.quiet or as_json)

    query_dir, res = evaluate_workspace(app.workspace, query_dir, rerank=rerank_mode if rerank else None,
                                        multi_query=multi_query, model=model, device=device, precision=precision,
                                        progress=bar, preprocess=preprocess)
    print_eval(res, query_dir, multi_query, as_json)
