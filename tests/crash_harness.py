"""Run the real `reid-search index` in a child process and SIGKILL it once it has committed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The real CLI, slowed down per batch so the parent can observe a commit and kill
# the child while it is still working.
SLOW_INDEX_CHILD = """
import sys, time
from reid_search.app.cli._common import main
from reid_search.app.cli.index import index
from reid_search.torch_extractor import TorchExtractor

embed = TorchExtractor.embed
def slow_embed(self, batch):
    time.sleep(0.05)
    return embed(self, batch)
TorchExtractor.embed = slow_embed
main.add_command(index)
main(sys.argv[1:])
"""


def committed_rows(db: Path) -> int:
    """Rows in the images table of a SQLite DB, read without waiting (0 while it has none)."""
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT count(*) FROM images").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:  # schema not created yet, or a write in progress
        return 0


def spawn(code: str, *args: str) -> subprocess.Popen:
    """Run ``code`` with ``args`` in a child of its own session (so a kill reaches only what it started)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s session and check that the kill is what ended it."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def index_then_kill(args: list[str], db: Path, min_rows: int = 1, timeout_s: float = 240) -> float:
    """Start a slowed-down `reid-search ARGS` and SIGKILL it once ``db`` holds ``min_rows`` rows;
    returns the seconds it ran."""
    t0 = time.monotonic()
    proc = spawn(SLOW_INDEX_CHILD, *args)
    try:
        while committed_rows(db) < min_rows:
            assert proc.poll() is None, f"the child ended before committing {min_rows} rows: {proc.stdout.read().decode()}"
            assert time.monotonic() - t0 < timeout_s, f"no commit within {timeout_s:.0f} s"
            time.sleep(0.02)
    finally:
        kill(proc)
    return time.monotonic() - t0
