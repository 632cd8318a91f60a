"""``reid-search calibrate``: the distance threshold for a target false-positive rate."""

from __future__ import annotations

import json
from pathlib import Path

import click

from reid_search.app.cli._common import App, pass_app, precision_option, progress_bar
from reid_search.data import list_images
from reid_search.errors import DataError


@click.command()
@click.argument("query_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--fpr", "target_fpr", default=1e-3, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Target false-positive rate: the share of impostor pairs allowed to match.")
@click.option("--rerank", is_flag=True, help="Calibrate re-ranked distances (what `query --rerank` reports); their own threshold.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw the ROC and both distance histograms with the threshold (PNG).")
@click.option("--save/--no-save", default=True, show_default=True, help="Store the threshold in the workspace.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--model", "-m", type=click.Path(dir_okay=False, path_type=Path), default=None, help="[default: the workspace's model]")
@click.option("--device", default="auto", show_default=True)
@precision_option
@pass_app
def calibrate(app: App, query_dir: Path | None, target_fpr: float, rerank: bool, plot: Path | None, save: bool,
              as_json: bool, model: Path | None, device: str, precision: str = "auto") -> dict:
    """Find the distance below which a hit is a match, on a labelled query folder.

    Pairs as `eval` (same pid and camera, and junk, left out): genuine pairs share
    a pid, impostor pairs do not (distractors included). The threshold is the
    largest distance whose impostor rate is at most --fpr; it is saved in the
    workspace for this model (and distance kind), and `query` then marks matches.
    Also reports TPR at FPR 1e-4/1e-3/1e-2 and open-set identification: the share
    of queries whose top-1 is right and within the threshold, against the share
    with a top-1 within it once their identity is removed from the gallery.

    \b
    Examples:
      reid-search index Market-1501/bounding_box_test
      reid-search calibrate --fpr 1e-3 --plot roc.png
      reid-search calibrate Market-1501/query --rerank --json
      reid-search calibrate --precision fp32
    """
    from reid_search.calibration import (
        REPORTED_FPRS,
        collect_pairs,
        open_set_rates,
        roc_curve,
        threshold_at_fpr,
        tpr_at_fpr,
        tpr_at_threshold,
    )
    from reid_search.app.session import default_query_dir, open_engine
    from reid_search.evaluation import query_distances
    from reid_search.thresholds import Calibration, save_calibration

    engine = open_engine(app.workspace, model, device, precision)
    if query_dir is None:
        query_dir = default_query_dir(engine, "pass the query folder as an argument")
    if not query_dir.is_dir():
        raise DataError(f"no such query folder: {query_dir}")
    queries = list_images(query_dir, recursive=False)
    if not queries:
        raise DataError(f"no images in {query_dir}: pass a folder of labelled query crops")
    with progress_bar(len(queries), "embed queries", quiet=app.quiet or as_json) as advance:
        qd = query_distances(engine, queries, rerank="online" if rerank else None, progress=advance)
    try:
        stats = collect_pairs(qd.distmat, qd.q_pids, qd.g_pids, qd.q_camids, qd.g_camids,
                              fprs=(*REPORTED_FPRS, target_fpr))
    except ValueError as exc:
        raise DataError(f"{exc}; are the query folder and the indexed gallery from the same dataset?") from None
    threshold = threshold_at_fpr(stats, target_fpr)
    tpr = tpr_at_threshold(stats, threshold)
    open_set = open_set_rates(stats, threshold)
    out = {"threshold": threshold, "target_fpr": target_fpr, "tpr_at_fpr": tpr_at_fpr(stats, REPORTED_FPRS),
           "genuine_pairs": stats.num_genuine, "impostor_pairs": stats.num_impostor,
           "open_set": open_set.to_dict(), "rerank": rerank}
    if save:
        cal = Calibration(threshold, target_fpr, engine.extractor.fingerprint, rerank, tpr, stats.num_genuine,
                          stats.num_impostor, str(query_dir.resolve()), len(qd.g_pids))
        saved = save_calibration(app.workspace.root, cal)
    if plot is not None:
        from reid_search.show import render_calibration, save_png

        fpr_c, tpr_c, _ = roc_curve(stats)
        save_png(plot, render_calibration(fpr_c, tpr_c, stats.hist_edges, stats.genuine_hist,
                                          stats.impostor_hist, threshold, target_fpr))
    if as_json:
        click.echo(json.dumps(out))
        return out
    kind = "re-ranked" if rerank else "k-NN"
    click.echo(f"query {query_dir}: {stats.num_genuine} genuine and {stats.num_impostor} impostor pairs ({kind} distances)")
    click.echo(f"threshold {threshold:.6g} at FPR {target_fpr:g}: TPR {100 * tpr:.1f}%")
    for f, v in out["tpr_at_fpr"].items():
        click.echo(f"TPR at FPR {float(f):g}: {100 * v:.1f}%")
    click.echo(f"open set: {100 * open_set.detection_identification_rate:.1f}% of {open_set.num_known} known queries "
               f"found at top-1 within the threshold; false alarms {100 * open_set.false_alarm_rate:.1f}% "
               f"of {open_set.num_query} with their identity removed")
    if save:
        click.echo(f"saved for model {engine.extractor.fingerprint} in {saved}")
    if plot is not None:
        click.echo(f"plot: {plot}")
    return out
