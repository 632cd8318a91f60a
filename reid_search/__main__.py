"""``python -m reid_search`` (used by ``torchrun -m reid_search train ...``)."""

from reid_search.app.cli import main

main(prog_name="reid-search")
