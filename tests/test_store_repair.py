"""Opening a gallery repairs what a crash or a restore left: vectors the DB lacks, rows the vectors
lack, an index file that lags, is corrupt or belongs to another DB, leftovers of an aborted
re-index and of saves; a zero-byte DB is refused without touching the vectors.

Tests taking ``store`` run on both stores (FAISS and Milvus Lite, see ``tests/conftest.py``);
those marked ``faiss_only`` test the FAISS index file."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.protocol import RowFields
from reid_search.app.workspace import Workspace
from reid_search.errors import GalleryError
from tests.helpers import brute_force, faiss_index, feats, new_images, open_ws, store_workspace

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def ws(tmp_path: Path, store: str) -> Workspace:
    """A workspace on each store in turn."""
    return store_workspace(tmp_path / "ws", store)


@pytest.fixture()
def fws(tmp_path: Path) -> Workspace:
    """A FAISS workspace (for the ``faiss_only`` tests)."""
    return Workspace(tmp_path / "ws")


def test_stale_vectors_in_the_backend_are_dropped_on_open(ws: Workspace, store: str, tmp_path: Path) -> None:
    """Ids in the vector backend that the DB no longer has (a removal that never reached it)."""
    g = open_ws(ws)
    ids = g.add_images(new_images(tmp_path / "g", 10), feats(10), "m")
    g.close()
    con = sqlite3.connect(ws.root / "reid.db")
    con.execute("DELETE FROM embeddings WHERE image_id IN (?, ?)", (int(ids[0]), int(ids[1])))
    con.execute("DELETE FROM images WHERE id IN (?, ?)", (int(ids[0]), int(ids[1])))
    con.commit()
    con.close()
    g2 = open_ws(ws)
    assert g2.ntotal == 8 and not np.isin(g2.search(feats(10), 10)[1], ids[:2]).any()
    np.testing.assert_array_equal(g2.backend.ids(), ids[2:])
    g2.close()
    if store == "faiss":
        from indexer.faiss.index import VectorIndex

        on_disk, _ = VectorIndex.load(ws.index_dir / "gallery.faiss")
        np.testing.assert_array_equal(on_disk.ids(), ids[2:])  # the repair was written back
    else:
        np.testing.assert_array_equal(open_ws(ws).backend.ids(), ids[2:])  # deleted from the collection


def test_open_repairs_rows_without_vectors_and_vectors_without_rows(ws: Workspace, store: str, tmp_path: Path) -> None:
    """A vector lost from the backend (a crash between the SQL commit and the insert) and an orphan vector:
    the orphan is dropped; the lost vector is re-added from SQL where SQL keeps the vectors (FAISS),
    else its row is deleted (Milvus holds the only copy)."""
    g = open_ws(ws)
    x = feats(30)
    ids = g.add_images(new_images(tmp_path / "g", 30), x, "m")
    b = g.backend
    b.remove(ids[:2])
    b.add(RowFields(np.array([10_000]), np.array([1]), np.array([1]), np.array([np.nan]), [None]), x[:1])
    g.close()
    g = open_ws(Workspace(ws.root))
    kept = ids if store == "faiss" else ids[2:]
    assert g.ntotal == g.backend.ntotal == len(kept)
    np.testing.assert_array_equal(g.ids(), kept)
    np.testing.assert_array_equal(g.backend.ids(), kept)
    np.testing.assert_array_equal(g.search(x[2:5], 1)[1][:, 0], ids[2:5])
    g.close()


def test_leftovers_of_an_aborted_build_are_cleaned_on_open(ws: Workspace, store: str, tmp_path: Path) -> None:
    g = open_ws(ws)
    g.add_images(new_images(tmp_path / "a", 5), feats(5), "m")
    # A build that died: version rows committed, its index saved, no switch.
    version = g.meta.begin_build()
    from indexer.coordinator import Gallery

    builder = Gallery(g.meta, ws.index_dir, building=version, backend_factory=g._factory)
    builder.add_images(new_images(tmp_path / "b", 3), feats(3, seed=2), "m")
    builder.backend.flush(0)
    assert g.meta.versions_present() == [0, version] and builder.backend.ntotal == 3
    if store == "faiss":
        assert builder.backend.path.is_file()
    g2 = open_ws(ws)
    assert g2.meta.versions_present() == [0] and g2.meta.state().building is None
    assert g2.ntotal == 5
    if store == "faiss":
        assert not builder.backend.path.exists()
    else:
        assert not g2.backend.client.has_collection(builder.backend.collection)


@pytest.mark.parametrize("store", ["faiss", "milvus:"])  # milvus: the workspace's own Lite file
def test_zero_byte_db_does_not_delete_the_index(store: str, tmp_path: Path) -> None:
    if store != "faiss":
        pytest.importorskip("milvus_lite", reason="milvus-lite cannot run here")
    ws = store_workspace(tmp_path / "ws", store)
    g = open_ws(ws)
    g.add_images(new_images(tmp_path / "g", 3), feats(3), "m")
    collection = None if store == "faiss" else g.backend.collection
    g.close()
    if store != "faiss":  # recorded as given: relative to the workspace, so it survives a move
        assert json.loads((ws.root / "store.json").read_text()) == {"store": "milvus:"}
    index = ws.index_dir / "gallery.faiss" if store == "faiss" else ws.root / "milvus.db"
    size = index.stat().st_size
    db = Path(ws.db_url.removeprefix("sqlite:///"))
    db.write_bytes(b"")
    for p in db.parent.glob(db.name + "-*"):
        p.unlink()
    with pytest.raises(GalleryError, match=r"empty .*zero-byte.*restore the DB from a backup, or delete") as err:
        open_ws(ws)
    assert "\n" not in str(err.value) and str(index) in str(err.value)
    assert index.stat().st_size == size
    if store != "faiss":
        from indexer.location import parse_store
        from indexer.milvus.client import connect

        assert connect(parse_store(store).resolved(ws.root)).has_collection(collection)  # the vectors are still there


# ---- the FAISS index file ------------------------------------------------------------------------


@pytest.mark.faiss_only  # the index file lagging the DB (rows without vectors on Milvus: above)
def test_index_lagging_the_db_is_repaired_on_open(fws: Workspace, tmp_path: Path) -> None:
    """A crash after a DB commit but before the index file is written: re-add from the DB."""
    ws = fws
    g = open_ws(ws, save_interval=3600)
    x = feats(40)
    g.add_images(new_images(tmp_path / "g", 20), x[:20], "m")
    g.save()
    ids2 = g.add_images(new_images(tmp_path / "g", 20, start=20), x[20:], "m")
    g.engine.dispose()  # "crash": the second commit never reached the index file
    g2 = open_ws(ws)
    assert g2.ntotal == 40
    np.testing.assert_array_equal(faiss_index(g2).ids(), g2.ids())
    np.testing.assert_array_equal(g2.search(x[20:25], 1)[1][:, 0], ids2[:5])


@pytest.mark.faiss_only  # the index file
def test_missing_or_corrupt_index_file_is_rebuilt(fws: Workspace, tmp_path: Path) -> None:
    ws = fws
    g = open_ws(ws)
    x = feats(12)
    g.add_images(new_images(tmp_path / "g", 12), x, "m")
    want = g.search(x, 3)[1]
    g.close()
    (ws.index_dir / "gallery.faiss").write_bytes(b"garbage")
    np.testing.assert_array_equal(open_ws(ws).search(x, 3)[1], want)
    (ws.index_dir / "gallery.faiss").unlink()
    np.testing.assert_array_equal(open_ws(ws).search(x, 3)[1], want)


@pytest.mark.faiss_only  # the index file
def test_index_file_of_another_db_is_detected_and_rebuilt(tmp_path: Path) -> None:
    a, b = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    ga, gb = open_ws(a), open_ws(b)
    ga.add_images(new_images(tmp_path / "ga", 20), feats(20, seed=1), "m")
    gb.add_images(new_images(tmp_path / "gb", 20), feats(20, seed=2), "m")  # same model, same ids
    ga.close()
    gb.close()
    np.testing.assert_array_equal(open_ws(a).ids(), open_ws(b).ids())
    shutil.copy(a.index_dir / "gallery.faiss", b.index_dir / "gallery.faiss")
    g = open_ws(b)
    q = feats(5, seed=7)
    np.testing.assert_array_equal(g.search(q, 5)[1], brute_force(g, q, 5)[1])
    _, v = g.all_vectors()
    np.testing.assert_array_equal(g.search(v, 1)[1][:, 0], g.ids())


@pytest.mark.faiss_only  # the index file's temporary
def test_crash_leftover_tmp_files_are_removed_on_open(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    g = open_ws(ws)
    g.add_images(new_images(tmp_path / "g", 3), feats(3), "m")
    g.close()
    tmp = ws.index_dir / ".gallery.faiss.abc123.tmp"
    tmp.write_bytes(b"\0" * 4096)
    g = open_ws(ws)
    assert not tmp.exists() and g.ntotal == 3


# ---- stale reads -----------------------------------------------------------------------------------

WRITER = """
import sys, numpy as np
from pathlib import Path
from reid_search.app.workspace import Workspace
from tests.helpers import feats, new_images, open_ws
ws, folder, start, n = Workspace(Path(sys.argv[1])), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = open_ws(ws)
g.add_images(new_images(folder, n, start=start), feats(n, d=8, seed=start), "m")
g.close()
"""


def run_writer(ws: Workspace, folder: Path, start: int, n: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", WRITER, str(ws.root), str(folder), str(start), str(n)],
                   check=True, cwd=REPO, env=env, timeout=120)


@pytest.mark.slow  # two writer subprocesses
@pytest.mark.faiss_only  # writers in other processes: Milvus Lite serves one process (a Milvus server serves many)
def test_every_reader_sees_every_committed_row(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    serve = open_ws(ws)  # a long-running process that also writes (POST /gallery)
    reader = open_ws(ws)
    serve.add_images(new_images(tmp_path / "up", 5), feats(5, d=8), "m")
    run_writer(ws, tmp_path / "galE", 100, 7)  # `reid-search index galE` in another process
    serve.add_images(new_images(tmp_path / "up", 5, start=5), feats(5, d=8, seed=3), "m")  # commits after it
    run_writer(ws, tmp_path / "galF", 200, 4)
    serve.add_images(new_images(tmp_path / "up", 2, start=10), feats(2, d=8, seed=4), "m")  # the last commit is its own
    serve.refresh()
    reader.refresh()
    q = feats(6, d=8, seed=9)
    for g in (serve, reader):
        assert g.ntotal == len(g.ids()) == 23
        np.testing.assert_array_equal(faiss_index(g).ids(), g.ids())
        np.testing.assert_array_equal(g.search(q, 23)[1], brute_force(g, q, 23)[1])
        _, v = g.all_vectors()
        np.testing.assert_array_equal(g.search(v, 1)[1][:, 0], g.ids())  # every crop finds itself
