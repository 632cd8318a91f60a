"""Shared CLI plumbing: the group, the workspace option, errors, progress bars."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import click
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from reid_search import __version__
from reid_search.errors import ReidSearchError
from reid_search.precision import PRECISIONS
from reid_search.app.workspace import DB_ENV, DEFAULT_WORKSPACE, STORE_ENV, WORKSPACE_ENV, Workspace


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
                   "milvus:PATH.db, or http://HOST:19530 (a Milvus server; token from $REID_SEARCH_MILVUS_TOKEN). "
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
    """A tqdm bar exposed as an ``advance(n)`` callback; log lines print above it."""
    with logging_redirect_tqdm(), tqdm(total=total, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True, leave=True) as bar:
        yield bar.update


precision_option = click.option(
    "--precision", type=click.Choice(PRECISIONS, case_sensitive=False), default="auto", show_default=True,
    help="Model number format: auto = bf16 on CPUs with AVX512_BF16/AMX, fp16 autocast on GPUs, else fp32. "
         "Does not change the model's fingerprint (an fp32 gallery answers bf16 queries). "
         "ONNX files keep the precision they were exported with.",
)
"""``--precision`` of every command that embeds images; pass the value to ``load_extractor(precision=...)``."""
