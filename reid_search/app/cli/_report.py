"""What the commands print: index reports, query answers, metrics (the demo prints them too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from reid_search.app.session import IndexResult
    from reid_search.app.searching import SearchAnswer
    from reid_search.evaluation import EvalResult

MAX_SKIPPED_LINES = 20


def print_index_result(result: IndexResult) -> None:
    """The summary of an index run: counts, speed, the first skipped files, the gallery."""
    report = result.report
    rate = (report.indexed + report.replaced) / report.seconds if report.seconds > 0 else 0.0
    click.echo(f"{report.summary()} in {report.seconds:.1f}s ({rate:.1f} images/s embedded)")
    if result.compile_seconds is not None:
        click.echo(f"  torch.compile took {result.compile_seconds:.1f}s of that (a run this long pays it back)")
    for path, reason, detail in report.skipped[:MAX_SKIPPED_LINES]:
        click.echo(f"  skipped {path}: {reason}: {detail}")
    if len(report.skipped) > MAX_SKIPPED_LINES:
        click.echo(f"  ... and {len(report.skipped) - MAX_SKIPPED_LINES} more skipped (run with -v to log them all)")
    click.echo(f"gallery: {result.gallery}")


def save_answer_picture(show: Path, ans: SearchAnswer) -> None:
    """A PNG of the ranking (or of the sightings' best hits) of ``ans``."""
    from reid_search.show import save_hits_picture

    if ans.sightings is None:
        save_hits_picture(show, ans.images[0], ans.hits, ans.query_pid, matches=ans.flags)
        return
    g = ans.group_by or "?"
    labels = [f"{g[0]}{s.key if s.key is not None else '-'} {s.matches if s.matches is not None else '?'}"
              f"/{s.hits}" for s in ans.sightings]
    save_hits_picture(show, ans.images[0], [s.best for s in ans.sightings], ans.query_pid,
                      matches=[None if ans.threshold is None else s.best.distance <= ans.threshold
                               for s in ans.sightings],
                      labels=labels)


def print_answer(ans: SearchAnswer, as_json: bool = False, picture: Path | None = None) -> None:
    """``query``'s output: one JSON object, or the header, the decision and the hits (or sightings) table."""
    if as_json:
        click.echo(json.dumps(ans.to_json()))
        return
    from reid_search.filters import describe_filter

    images, cam, where = ans.images, ans.camid, ans.where
    names = str(images[0]) if len(images) == 1 else f"{len(images)} crops ({ans.fuse})"
    click.echo(f"query {names}  camid {cam if cam not in (None, []) else '-'}  {'re-ranked' if ans.rerank else 'k-NN'}"
               + ("" if where.is_empty else f"  filter {describe_filter(where)}"))
    th = "none (run `reid-search calibrate`)" if ans.threshold is None else f"{ans.threshold:.4f}"
    click.echo(f"decision: {ans.decision}  threshold {th}")
    if ans.sightings is not None:
        click.echo(f"{ans.group_by:>7}  {'hits':>4}  {'match':>5}  {'best':>8}  {'first time':<20}  "
                   f"{'last time':<20}  path")
        for s in ans.sightings:
            d = s.to_dict()
            click.echo(f"{'-' if s.key is None else s.key!s:>7}  {s.hits:>4}  "
                       f"{'-' if s.matches is None else s.matches:>5}  {s.best.distance:>8.4f}  "
                       f"{d['first_time'] or '-':<20}  {d['last_time'] or '-':<20}  {s.best.path}")
    else:
        click.echo(f"{'rank':>4}  {'distance':>8}  {'match':>5}  {'pid':>5}  {'cam':>3}  {'time':<20}  {'track':<8}  path")
        for h, m in zip(ans.hits, ans.flags):
            d = h.to_dict()
            click.echo(f"{h.rank:>4}  {h.distance:>8.4f}  {'-' if m is None else ('*' if m else ''):>5}  "
                       f"{'-' if h.pid is None else h.pid:>5}  {'-' if h.camid is None else h.camid:>3}  "
                       f"{d['time'] or '-':<20}  {h.track or '-':<8}  {h.path}")
        if len(ans.hits) < ans.top_k:
            click.echo(f"({len(ans.hits)} of {ans.top_k}: no more gallery crops pass the filter)")
    if picture is not None:
        click.echo(f"picture: {picture}")


def print_eval(res: EvalResult, query_dir: Path, multi_query: str | None = None, as_json: bool = False) -> None:
    """``eval``'s output: the metrics as JSON, or CMC, mAP, mINP (and TPR at FPR) lines."""
    if as_json:
        click.echo(json.dumps(res.to_dict()))
        return
    unit = "images" if multi_query is None else f"(pid, camera) groups fused by {multi_query}"
    click.echo(f"query {query_dir}: {res.num_query} {unit} ({res.num_valid_query} with a valid match); "
               f"gallery {res.num_gallery} images; re-ranking: {res.rerank or 'off'}")
    click.echo(f"mAP: {100 * res.mAP:.1f}%  mINP: {100 * res.mINP:.1f}%")
    for r, v in ((1, res.rank1), (5, res.rank5), (10, res.rank10)):
        click.echo(f"CMC curve, Rank-{r:<3}: {100 * v:.1f}%")
    if res.tpr_at_fpr:
        click.echo("TPR at FPR " + ", ".join(f"{float(f):g}: {100 * v:.1f}%" for f, v in res.tpr_at_fpr.items()))
