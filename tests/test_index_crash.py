"""SIGKILL an indexing run mid-way: nothing committed is lost, the re-run finishes without duplicates."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from reid_search.app.session import open_workspace_gallery
from reid_search.app.workspace import Workspace
from tests.conftest import write_crop
from tests.crash_harness import committed_rows, index_then_kill, kill, spawn

N_IMAGES = 200
COMMIT_EVERY = 8


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_completes(tiny_ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "gallery"
    for i in range(N_IMAGES):
        write_crop(folder / f"{i // 4 + 1:04d}_c{i % 2 + 1}s1_{i:06d}_00.jpg", seed=i, size=(32, 64))
    ws = tmp_path / "ws"
    args = ["-q", "-w", str(ws), "index", str(folder), "--model", str(tiny_ckpt), "--workers", "0",
            "--batch-size", "4", "--commit-every", str(COMMIT_EVERY)]
    db = ws / "reid.db"
    print(f"killed after {index_then_kill(args, db):.1f}s")
    seen = committed_rows(db)
    assert 0 < seen < N_IMAGES, "killed mid-run"
    g = open_workspace_gallery(Workspace(ws))  # repairs the index from the DB
    n = g.ntotal
    assert n >= seen and n < N_IMAGES and n % COMMIT_EVERY == 0  # whole chunks only
    np.testing.assert_array_equal(g.backend.index.ids(), g.ids())  # DB and index agree
    ids, x = g.all_vectors()
    assert len(ids) == n
    np.testing.assert_array_equal(g.search(x, 1)[1][:, 0], ids)
    g.close()

    from reid_search.app.cli._common import main
    from reid_search.app.cli.index import index

    main.add_command(index)
    t0 = time.monotonic()
    r = CliRunner().invoke(main, [*args[:-4], "--batch-size", "64"], catch_exceptions=False)
    print(f"re-run {time.monotonic() - t0:.1f}s")
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"indexed {N_IMAGES - n}, replaced 0, unchanged {n}, removed 0, skipped 0"), r.output
    g = open_workspace_gallery(Workspace(ws))
    assert g.ntotal == N_IMAGES and len(g.ids()) == N_IMAGES and g.backend.index.ntotal == N_IMAGES
    paths = [m.rel_path for b in g.iter_metadata() for m in b]
    assert len(set(paths)) == N_IMAGES == len(list(folder.iterdir()))
    np.testing.assert_array_equal(g.backend.index.ids(), g.ids())


# A stand-in model (a fixed projection of the pixels) slowed per batch, so the parent can
# kill the child in the middle of a re-index or right after a removal committed.
LIB_CHILD = """
import sys, time, numpy as np
from pathlib import Path
from reid_search.app.session import open_workspace_gallery
from indexer.pipeline import index_folder
from reid_search.gallery import RemoveFilter
from reid_search.app.workspace import Workspace
from tests.conftest import TINY_PRE

class Pix:
    preprocess, dim, description = TINY_PRE, 8, "pixels"
    def __init__(self, fp):
        self.fingerprint = fp
        self.w = np.random.default_rng(0).standard_normal((3 * 64 * 32, 8)).astype(np.float32)
    def embed(self, batch):
        time.sleep(0.05)
        x = batch.float().reshape(len(batch), -1).numpy() @ self.w
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

ws, what, arg = Workspace(Path(sys.argv[1])), sys.argv[2], sys.argv[3]
g = open_workspace_gallery(ws, save_interval=3600)
if what == "index":
    index_folder(g, arg, Pix(sys.argv[4]), batch_size=4, num_workers=0, commit_every=4, reindex=sys.argv[5] == "1")
else:
    gone = g.remove_where(RemoveFilter(camid=int(arg)))
    print("removed", " ".join(str(m.id) for m in gone), flush=True)
    time.sleep(600)
"""


def _lib_child(ws: Path, *args: str) -> subprocess.Popen:
    return spawn(LIB_CHILD, str(ws), *args)


def _assert_consistent(ws: Path) -> "object":
    """Rows == stored vectors == index (in memory and in the file); returns the open gallery."""
    from indexer.faiss.index import VectorIndex

    g = open_workspace_gallery(Workspace(ws))
    con = sqlite3.connect(ws / "reid.db")
    try:
        rows = con.execute("SELECT count(*) FROM images").fetchone()[0]
        vecs = con.execute("SELECT count(*) FROM embeddings").fetchone()[0]
    finally:
        con.close()
    assert rows == vecs == g.ntotal == len(g.ids())
    np.testing.assert_array_equal(g.backend.index.ids(), g.ids())
    on_disk, _ = VectorIndex.load(g.backend.path)
    np.testing.assert_array_equal(on_disk.ids(), g.ids())
    assert sorted(p.name for p in ws.joinpath("index").glob("*gallery*")) == [g.backend.path.name]
    return g


def _gallery_folder(folder: Path, n: int, seed: int = 0) -> None:
    for i in range(n):
        write_crop(folder / f"{i // 2 + 1:04d}_c{i % 3 + 1}s1_{i:06d}_00.jpg", seed=seed + i, size=(32, 64))


def _indexed(ws: Path, folder: Path, fp: str, reindex: bool = False) -> np.ndarray:
    from indexer.pipeline import index_folder
    from tests.test_store_defects import PixelExtractor

    with open_workspace_gallery(Workspace(ws)) as g:
        index_folder(g, folder, PixelExtractor(fp), num_workers=0, reindex=reindex)
        return g.ids()


@pytest.mark.slow
def test_sigkill_during_reindex_leaves_the_old_gallery_whole(tmp_path: Path) -> None:
    old_folder, new_folder, ws = tmp_path / "old", tmp_path / "new", tmp_path / "ws"
    _gallery_folder(old_folder, 12)
    _gallery_folder(new_folder, 60, seed=100)
    before = _indexed(ws, old_folder, "modelA")
    proc = _lib_child(ws, "index", str(new_folder), "modelB", "1")
    deadline = time.monotonic() + 240
    try:
        while True:
            con = sqlite3.connect(f"file:{ws / 'reid.db'}?mode=ro", uri=True, timeout=5)
            try:
                building = con.execute("SELECT count(*) FROM images WHERE gallery <> 0").fetchone()[0]
            finally:
                con.close()
            if building >= 8:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no commit of the new gallery within 240 s"
            time.sleep(0.02)
    finally:
        kill(proc)
    g = _assert_consistent(ws)
    np.testing.assert_array_equal(g.ids(), before)  # the old gallery, whole
    assert g.model_fingerprint == "modelA" and g.meta.versions_present() == [0]
    _, x = g.all_vectors()
    np.testing.assert_array_equal(g.search(x, 1)[1][:, 0], before)
    # The re-index, run again to the end, replaces it.
    _indexed(ws, new_folder, "modelB", reindex=True)
    g = _assert_consistent(ws)
    assert g.ntotal == 60 and g.model_fingerprint == "modelB" and not np.isin(g.ids(), before).any()


@pytest.mark.slow
def test_sigkill_after_remove_committed_keeps_the_rows_gone(tmp_path: Path) -> None:
    folder, ws = tmp_path / "gal", tmp_path / "ws"
    _gallery_folder(folder, 12)
    before = _indexed(ws, folder, "modelA")
    proc = _lib_child(ws, "remove", "1")
    try:
        line = proc.stdout.readline().decode()
        assert line.startswith("removed "), line + proc.stdout.read().decode()
    finally:
        kill(proc)  # after the commit, before the index file was written
    gone = [int(i) for i in line.split()[1:]]
    assert len(gone) == 4
    g = _assert_consistent(ws)
    assert g.ntotal == 8 and not np.isin(g.ids(), gone).any()
    assert set(g.ids().tolist()) == set(before.tolist()) - set(gone)
    assert not np.isin(g.search(g.all_vectors()[1], 12)[1], gone).any()
    assert all(m.camid != 1 for b in g.iter_metadata() for m in b)
