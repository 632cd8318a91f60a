"""SIGKILL an indexing run, a re-index or a removal mid-way: nothing committed is lost, the old gallery
stays whole, the re-run finishes without duplicates. Each test runs on both stores (FAISS, Milvus Lite)."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from reid_search.app.workspace import Workspace
from tests.helpers import PixelExtractor, open_ws, store_workspace, write_folder
from tests.crash_harness import committed_rows, index_then_kill, kill, spawn

COMMIT_EVERY = 8
# Fewer images into Milvus Lite: its inserts are slower, the run must still be killed mid-way.
N_IMAGES = {"faiss": 200, "milvus:": 120}
MIN_ROWS = {"faiss": 1, "milvus:": 16}  # rows committed before the kill
STORES = ["faiss", "milvus:"]  # milvus: the workspace's own Lite file (a child process cannot share the session's)


def needs(store: str) -> None:
    if store != "faiss":
        pytest.importorskip("milvus_lite", reason="milvus-lite cannot run here")


@pytest.mark.slow
@pytest.mark.parametrize("store", STORES)
def test_sigkill_mid_run_then_rerun_completes(store: str, tiny_ckpt: Path, tmp_path: Path) -> None:
    needs(store)
    n_images = N_IMAGES[store]
    folder = tmp_path / "gallery"
    write_folder(folder, n_images, per_pid=4, cams=2)
    ws = tmp_path / "ws"
    args = ["-q", "-w", str(ws), "--store", store, "index", str(folder), "--model", str(tiny_ckpt), "--workers", "0",
            "--batch-size", "4", "--commit-every", str(COMMIT_EVERY)]
    db = ws / "reid.db"
    print(f"killed after {index_then_kill(args, db, min_rows=MIN_ROWS[store]):.1f}s")
    seen = committed_rows(db)
    assert 0 < seen < n_images, "killed mid-run"
    g = open_ws(Workspace(ws))  # repairs: the FAISS index from the DB; SQL rows without a Milvus vector are dropped
    n = g.ntotal
    assert n < n_images and n % COMMIT_EVERY == 0  # whole chunks only
    if store == "faiss":
        assert n >= seen  # the DB keeps the vectors: nothing committed is lost
    np.testing.assert_array_equal(g.backend.ids(), g.ids())  # DB and vectors agree
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
    assert r.output.startswith(f"indexed {n_images - n}, replaced 0, unchanged {n}, removed 0, skipped 0"), r.output
    g = open_ws(Workspace(ws))
    assert g.ntotal == n_images and len(g.ids()) == n_images and g.backend.ntotal == n_images
    np.testing.assert_array_equal(g.backend.ids(), g.ids())
    paths = [m.rel_path for b in g.iter_metadata() for m in b]
    assert len(set(paths)) == n_images == len(list(folder.iterdir()))
    assert set(paths) == {p.name for p in folder.iterdir()}  # SQL rows == vectors == files
    g.close()


# The stand-in model slowed per batch, so the parent can kill the child in the middle of a
# re-index or right after a removal committed. ARGS: workspace, store, then steps run in turn:
# ``index=FOLDER=FINGERPRINT=REINDEX`` (prints the ids when done) or ``remove=CAMID`` (prints the
# removed ids, then waits to be killed).
LIB_CHILD = """
import sys, time
from pathlib import Path
from indexer.pipeline import index_folder
from reid_search.gallery import RemoveFilter
from reid_search.app.workspace import Workspace
from tests.helpers import PixelExtractor, open_ws

class Pix(PixelExtractor):
    def embed(self, batch):
        time.sleep(0.05)
        return super().embed(batch)

ws = Workspace(Path(sys.argv[1]), store_override=sys.argv[2])
g = open_ws(ws, save_interval=3600)
for step in sys.argv[3:]:
    what, *arg = step.split("=")
    if what == "index":
        index_folder(g, arg[0], Pix(arg[1]), batch_size=4, num_workers=0, commit_every=4, reindex=arg[2] == "1")
        print("ids", " ".join(str(i) for i in g.ids()), flush=True)
    else:
        gone = g.remove_where(RemoveFilter(camid=int(arg[0])))
        print("removed", " ".join(str(m.id) for m in gone), flush=True)
        time.sleep(600)
"""


def _lib_child(ws: Path, store: str, *steps: str) -> subprocess.Popen:
    return spawn(LIB_CHILD, str(ws), store, *steps)


def _index_step(folder: Path, fp: str, reindex: bool = False) -> str:
    return f"index={folder}={fp}={int(reindex)}"


def _read_ids(proc: subprocess.Popen, word: str) -> list[int]:
    """The ids of the child's next output line, which must start with ``word``."""
    line = proc.stdout.readline().decode()
    assert line.startswith(word + " "), line + proc.stdout.read().decode()
    return [int(i) for i in line.split()[1:]]


def _assert_consistent(ws: Path, store: str) -> "object":
    """Rows == stored vectors == the backend's (FAISS: in memory and in the file); returns the open gallery."""
    g = open_ws(Workspace(ws))
    con = sqlite3.connect(ws / "reid.db")
    try:
        rows = con.execute("SELECT count(*) FROM images").fetchone()[0]
        vecs = con.execute("SELECT count(*) FROM embeddings").fetchone()[0]
    finally:
        con.close()
    assert rows == g.ntotal == len(g.ids()) == g.backend.ntotal
    np.testing.assert_array_equal(g.backend.ids(), g.ids())
    if store == "faiss":
        from indexer.faiss.index import VectorIndex

        assert vecs == rows
        on_disk, _ = VectorIndex.load(g.backend.path)
        np.testing.assert_array_equal(on_disk.ids(), g.ids())
        assert sorted(p.name for p in ws.joinpath("index").glob("*gallery*")) == [g.backend.path.name]
    else:  # Milvus holds the only copy of the vectors, in the active version's collection alone
        assert vecs == 0
        mine = f"reid_{g.meta.state().store_id}_"
        assert [c for c in g.backend.client.list_collections() if c.startswith(mine)] == [g.backend.collection]
    return g


def _indexed(ws: Path, store: str, folder: Path, fp: str, reindex: bool = False) -> np.ndarray:
    """Index ``folder`` into ``ws`` in this process with the stand-in model; returns the gallery's ids."""
    from indexer.pipeline import index_folder

    with open_ws(store_workspace(ws, store)) as g:
        index_folder(g, folder, PixelExtractor(fp), num_workers=0, reindex=reindex)
        return g.ids()


def _first_then(ws: Path, store: str, folder: Path, fp: str, step: str) -> tuple[np.ndarray, subprocess.Popen]:
    """Index ``folder``, then start a child that runs ``step``; returns the first ids and the child.

    Milvus Lite serves a file to the first process that opens it, until that process exits: so
    on Milvus the child indexes first too (this process opens the gallery only after the kill)."""
    if store == "faiss":
        return _indexed(ws, store, folder, fp), _lib_child(ws, store, step)
    proc = _lib_child(ws, store, _index_step(folder, fp), step)
    try:
        return np.array(_read_ids(proc, "ids"), np.int64), proc
    except BaseException:
        kill(proc)
        raise


@pytest.mark.slow
@pytest.mark.parametrize("store", STORES)
def test_sigkill_during_reindex_leaves_the_old_gallery_whole(store: str, tmp_path: Path) -> None:
    needs(store)
    old_folder, new_folder, ws = tmp_path / "old", tmp_path / "new", tmp_path / "ws"
    write_folder(old_folder, 12)
    write_folder(new_folder, 60, seed=100)
    before, proc = _first_then(ws, store, old_folder, "modelA", _index_step(new_folder, "modelB", reindex=True))
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
    g = _assert_consistent(ws, store)
    np.testing.assert_array_equal(g.ids(), before)  # the old gallery, whole
    assert g.model_fingerprint == "modelA" and g.meta.versions_present() == [0]
    _, x = g.all_vectors()
    np.testing.assert_array_equal(g.search(x, 1)[1][:, 0], before)
    g.close()
    # The re-index, run again to the end, replaces it.
    _indexed(ws, store, new_folder, "modelB", reindex=True)
    g = _assert_consistent(ws, store)
    assert g.ntotal == 60 and g.model_fingerprint == "modelB" and not np.isin(g.ids(), before).any()
    g.close()


@pytest.mark.slow
@pytest.mark.parametrize("store", STORES)
def test_sigkill_after_remove_committed_keeps_the_rows_gone(store: str, tmp_path: Path) -> None:
    needs(store)
    folder, ws = tmp_path / "gal", tmp_path / "ws"
    write_folder(folder, 12)
    before, proc = _first_then(ws, store, folder, "modelA", "remove=1")
    try:
        gone = _read_ids(proc, "removed")
    finally:
        kill(proc)  # after the commit, before the vectors were written (FAISS: the index file)
    assert len(gone) == 4
    g = _assert_consistent(ws, store)
    assert g.ntotal == 8 and not np.isin(g.ids(), gone).any()
    assert set(g.ids().tolist()) == set(before.tolist()) - set(gone)
    assert not np.isin(g.search(g.all_vectors()[1], 12)[1], gone).any()
    assert all(m.camid != 1 for b in g.iter_metadata() for m in b)
    g.close()
