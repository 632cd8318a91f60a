"""``reid-search calibrate``: the distance threshold for a target false-positive rate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from reid_search.app.cli._common import App, pass_app, precision_option, progress_bar
from reid_search.app.cli._model_options import model_input_options

if TYPE_CHECKING:
    from reid_search.app.searching import CalibrationRun


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
@model_input_options
@click.option("--device", default="auto", show_default=True)
@precision_option
@pass_app
def calibrate(app: App, query_dir: Path | None, target_fpr: float, rerank: bool, plot: Path | None, save: bool,
              as_json: bool, model: Path | None, device: str, precision: str = "auto",
              preprocess: dict | None = None) -> dict:
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
    from reid_search.app.searching import calibrate_workspace

    def bar(total: int, what: str):
        return progress_bar(total, what, quiet=app.quiet or as_json)

    run = calibrate_workspace(app.workspace, query_dir, target_fpr, rerank=rerank, save=save, model=model,
                              device=device, precision=precision, progress=bar, preprocess=preprocess)
    if plot is not None:
        from reid_search.calibration import roc_curve
        from reid_search.show import render_calibration, save_png

        st = run.stats
        fpr_c, tpr_c, _ = roc_curve(st)
        save_png(plot, render_calibration(fpr_c, tpr_c, st.hist_edges, st.genuine_hist, st.impostor_hist,
                                          run.threshold, target_fpr))
    out = run.to_json()
    if as_json:
        click.echo(json.dumps(out))
        return out
    _print_run(run)
    if plot is not None:
        click.echo(f"plot: {plot}")
    return out


def _print_run(run: CalibrationRun) -> None:
    st, open_set = run.stats, run.open_set
    kind = "re-ranked" if run.rerank else "k-NN"
    click.echo(f"query {run.query_dir}: {st.num_genuine} genuine and {st.num_impostor} impostor pairs ({kind} distances)")
    click.echo(f"threshold {run.threshold:.6g} at FPR {run.target_fpr:g}: TPR {100 * run.tpr:.1f}%")
    for f, v in run.tpr_at_fpr.items():
        click.echo(f"TPR at FPR {float(f):g}: {100 * v:.1f}%")
    click.echo(f"open set: {100 * open_set.detection_identification_rate:.1f}% of {open_set.num_known} known queries "
               f"found at top-1 within the threshold; false alarms {100 * open_set.false_alarm_rate:.1f}% "
               f"of {open_set.num_query} with their identity removed")
    if run.saved is not None:
        click.echo(f"saved for model {run.fingerprint} in {run.saved}")
