"""SIGKILL an indexing run mid-way: nothing committed is lost, the re-run finishes without duplicates."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from indexer import open_gallery
from reid_search.workspace import Workspace
from tests.conftest import write_crop

N_IMAGES = 200
COMMIT_EVERY = 8

# Runs the real CLI in a child process, slowed down per batch so the parent
# can observe the first commit and kill the child while it is still working.
CHILD = """
import sys, time
from reid_search.cli._common import main
from reid_search.cli.index import index
from reid_search.extract import TorchExtractor

embed = TorchExtractor.embed
def slow_embed(self, batch):
    time.sleep(0.05)
    return embed(self, batch)
TorchExtractor.embed = slow_embed
main.add_command(index)
main(sys.argv[1:])
"""


def committed_rows(db: Path) -> int:
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


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_completes(tiny_ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "gallery"
    for i in range(N_IMAGES):
        write_crop(folder / f"{i // 4 + 1:04d}_c{i % 2 + 1}s1_{i:06d}_00.jpg", seed=i, size=(32, 64))
    ws = tmp_path / "ws"
    args = ["-q", "-w", str(ws), "index", str(folder), "--model", str(tiny_ckpt), "--workers", "0",
            "--batch-size", "4", "--commit-every", str(COMMIT_EVERY)]
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=repo, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    db = ws / "reid.db"
    deadline = time.monotonic() + 240
    try:
        while committed_rows(db) == 0:
            assert proc.poll() is None, f"the child ended before its first commit: {proc.stdout.read().decode()}"
            assert time.monotonic() < deadline, "no commit within 240 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    print(f"killed after {time.monotonic() - deadline + 240:.1f}s")
    seen = committed_rows(db)
    assert 0 < seen < N_IMAGES, "killed mid-run"
    g = open_gallery(Workspace(ws))  # repairs the index from the DB
    n = g.ntotal
    assert n >= seen and n < N_IMAGES and n % COMMIT_EVERY == 0  # whole chunks only
    np.testing.assert_array_equal(g.index.ids(), g.ids())  # DB and index agree
    ids, x = g.all_vectors()
    assert len(ids) == n
    np.testing.assert_array_equal(g.search(x, 1)[1][:, 0], ids)
    g.close()

    from reid_search.cli._common import main
    from reid_search.cli.index import index

    main.add_command(index)
    t0 = time.monotonic()
    r = CliRunner().invoke(main, [*args[:-4], "--batch-size", "64"], catch_exceptions=False)
    print(f"re-run {time.monotonic() - t0:.1f}s")
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"indexed {N_IMAGES - n}, replaced 0, unchanged {n}, removed 0, skipped 0"), r.output
    g = open_gallery(Workspace(ws))
    assert g.ntotal == N_IMAGES and len(g.ids()) == N_IMAGES and g.index.ntotal == N_IMAGES
    paths = [m.rel_path for b in g.iter_metadata() for m in b]
    assert len(set(paths)) == N_IMAGES == len(list(folder.iterdir()))
    np.testing.assert_array_equal(g.index.ids(), g.ids())
