"""The ``reid-search`` command line: a click group of thin commands."""

from __future__ import annotations

from reid_search.cli._common import main
from reid_search.cli.embed import embed
from reid_search.cli.export import export
from reid_search.cli.synthetic import make_synthetic
from reid_search.cli.train import train

main.add_command(embed)
main.add_command(export)
main.add_command(make_synthetic)
main.add_command(train)

__all__ = ["main"]
