"""Shared CLI plumbing: the group, the workspace option, errors, progress bars."""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import click
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from reid_search import __version__
from reid_search.errors import ReidSearchError
from reid_search.precision import PRECISIONS
from reid_search.app.workspace import DB_ENV, DEFAULT_WORKSPACE, STORE_ENV, WORKSPACE_ENV, Workspace

if TYPE_CHECKING:
    from trainer.config import TrainConfig


class _Group(click.Group):
    """Turns the errors a user can fix into one-line messages with exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ReidSearchError as exc:
            raise click.ClickException(str(exc)) from None


@dataclass
class App:
    """What every command gets through ``@pass_app``."""

    workspace: Workspace
    quiet: bool = False


pass_app = click.make_pass_decorator(App)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="reid-search")
@click.option(
    "--workspace", "-w", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_WORKSPACE,
    envvar=WORKSPACE_ENV, show_default=True, show_envvar=True,
    help="Folder holding the model pointer, the gallery index and the metadata DB.",
)
@click.option("--db", "db_url", envvar=DB_ENV, show_envvar=True, default=None,
              help="SQLAlchemy URL of the metadata DB [default: SQLite inside the workspace].")
@click.option("--store", "store", envvar=STORE_ENV, show_envvar=True, default=None, metavar="STORE",
              help="Where the gallery's vectors live: faiss (default), milvus: (Milvus Lite in the workspace), "
                   "milvus:PATH.db, http://HOST:19530 (a Milvus server; token from $REID_SEARCH_MILVUS_TOKEN), "
                   "or NAME:URI for an installed plug-in store (entry point group reid_search.backends). "
                   "The workspace remembers it.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def main(ctx: click.Context, workspace: Path, db_url: str | None, store: str | None, verbose: int, quiet: bool) -> None:
    """Person re-identification search: train, index a gallery, query, evaluate.

    \b
    Example (end to end on synthetic data):
      reid-search make-synthetic data/synth --ids 40
      reid-search train --data data/synth -o epochs=2
      reid-search index data/synth/bounding_box_test
      reid-search eval --rerank
      reid-search --store milvus: index data/synth/bounding_box_test   # vectors in Milvus Lite
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    ctx.obj = App(Workspace(workspace, db_url, store), quiet)


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, unit: str = "img", quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A tqdm bar exposed as an ``advance(n)`` callback; log lines print above it.

    Only records that already go to the console are redirected: tqdm's redirect would
    otherwise add a console handler where logging has none (a host that configured its
    own), and the same record would print or not depending on whether a bar was open.
    """
    console = any(_is_console(h) for h in logging.getLogger().handlers)
    redirect = logging_redirect_tqdm() if console else contextlib.nullcontext()
    with redirect, tqdm(total=total, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True, leave=True) as bar:
        yield bar.update


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


precision_option = click.option(
    "--precision", type=click.Choice(PRECISIONS, case_sensitive=False), default="auto", show_default=True,
    help="Model number format: auto = bf16 on CPUs with AVX512_BF16/AMX, fp16 autocast on GPUs, else fp32. "
         "Does not change the model's fingerprint (an fp32 gallery answers bf16 queries). "
         "ONNX files keep the precision they were exported with.",
)
"""``--precision`` of every command that embeds images; pass the value to ``load_extractor(precision=...)``."""


def run_training(app: App, cfg: TrainConfig, data_root: Path, out: Path, *, resume: bool = False,
                 device: str = "auto") -> None:
    """Train ``cfg`` on ``data_root`` into ``out`` with progress bars and per-epoch metrics, then make
    the model the workspace's (``train`` and the demo).

    Raises:
        click.ClickException: the loss went non-finite.
        ReidSearchError: bad data, a bad config.
    """
    from trainer.train import main as train_main

    bar: list[tqdm] = []

    def progress(epoch: int, steps: int):
        b = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it", disable=app.quiet, dynamic_ncols=True)
        bar[:] = [b]

        def step(vals: dict[str, float]) -> None:
            post = {k: f"{vals[k]:.3g}" for k in ("loss", "id", "triplet", "center", "acc") if k in vals}
            post["lr"] = f"{vals['lr']:.2e}"
            post["img/s"] = f"{vals['img_s']:.1f}"
            b.set_postfix(post, refresh=False)
            b.update(1)

        return step, b.close

    def on_epoch(done: int, stats: dict[str, float]) -> None:
        if "mAP" in stats:
            click.echo(f"epoch {done}: R1 {100 * stats['rank1']:.2f}%  R5 {100 * stats['rank5']:.2f}%  "
                       f"R10 {100 * stats['rank10']:.2f}%  mAP {100 * stats['mAP']:.2f}%  mINP {100 * stats['mINP']:.2f}%")

    try:
        with _console_log(app.quiet):
            result = train_main(cfg, data_root, out, resume=resume, device=device, progress=progress, on_epoch=on_epoch)
    except FloatingPointError as exc:
        raise click.ClickException(str(exc)) from None
    if not result.is_main:  # other torchrun ranks: rank 0 reports
        return
    app.workspace.set_model(result.model_path)
    click.echo(f"model: {result.model_path} (workspace {app.workspace.root} now uses it)")
    click.echo(f"log:   {result.out_dir / 'train.log'}")


class _TqdmHandler(logging.Handler):
    """Prints log records above the progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must not raise
            self.handleError(record)


@contextlib.contextmanager
def _console_log(quiet: bool) -> Iterator[None]:
    """While training, the trainer's records go to train.log (at INFO) and to the console at the
    verbosity of -v (warnings by default), printed above the bars."""
    tlog = logging.getLogger("trainer")
    level = logging.getLogger().getEffectiveLevel()
    handler = _TqdmHandler(level=max(level, logging.WARNING) if quiet else level)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    propagate = tlog.propagate
    tlog.addHandler(handler)
    tlog.propagate = False
    try:
        yield
    finally:
        tlog.removeHandler(handler)
        tlog.propagate = propagate
