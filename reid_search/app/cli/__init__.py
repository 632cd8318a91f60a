"""The ``reid-search`` command line: a click group of thin commands."""

from __future__ import annotations

from reid_search.app.cli._common import main
from reid_search.app.cli.calibrate import calibrate
from reid_search.app.cli.demo import demo
from reid_search.app.cli.embed import embed
from reid_search.app.cli.export import export
from reid_search.app.cli.index import db, index, remove
from reid_search.app.cli.search import evaluate_cmd, query
from reid_search.app.cli.serve import serve
from reid_search.app.cli.synthetic import make_synthetic
from reid_search.app.cli.train import train

main.add_command(demo)
main.add_command(embed)
main.add_command(export)
main.add_command(make_synthetic)
main.add_command(index)
main.add_command(remove)
main.add_command(db)
main.add_command(query)
main.add_command(evaluate_cmd)
main.add_command(calibrate)
main.add_command(train)
main.add_command(serve)

__all__ = ["main"]
