"""Regression tests of issue 11's store defects; each failed on the code before the store split.

Tests taking ``store`` run on both stores (FAISS and Milvus Lite, see ``tests/conftest.py``);
those marked ``faiss_only`` test the FAISS index file."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reid_search.gallery import NewImage
from indexer import open_gallery
from reid_search.app.session import open_workspace_gallery
from indexer.pipeline import index_folder
from reid_search.errors import DataError, GalleryError
from reid_search.app.workspace import Workspace
from tests.conftest import TINY_PRE, store_workspace, write_crop

REPO = Path(__file__).resolve().parents[1]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def imgs(folder: Path, n: int, start: int = 0) -> list[NewImage]:
    return [NewImage(folder / f"{i % 9 + 1:04d}_c{i % 3 + 1}s1_{i:06d}_00.jpg",
                     hashlib.sha256(b"%d" % i).hexdigest(), 1) for i in range(start, start + n)]


def feats(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


class PixelExtractor:
    """A deterministic stand-in model: a fixed projection of the pixels (fails on demand)."""

    preprocess = TINY_PRE
    dim = 8
    description = "pixels"

    def __init__(self, fingerprint: str = "pix", fail: bool = False) -> None:
        self.fingerprint, self.fail = fingerprint, fail
        self._w = np.random.default_rng(0).standard_normal((3 * 64 * 32, 8)).astype(np.float32)

    def embed(self, batch):  # type: ignore[no-untyped-def]
        if self.fail:
            raise RuntimeError("this model fails on every image")
        x = batch.float().reshape(len(batch), -1).numpy() @ self._w
        return unit(x)


def brute(g, x: np.ndarray, k: int) -> np.ndarray:
    ids, v = g.all_vectors()
    return ids[np.argsort(-(x @ v.T), axis=1, kind="stable")[:, :k]]


# ---- 1. re-index: beside the old gallery, switched atomically -------------------------------


def test_replacing_switches_atomically_and_a_failure_leaves_the_old_gallery(store: str, tmp_path: Path) -> None:
    ws = store_workspace(tmp_path / "ws", store)
    g = open_workspace_gallery(ws)
    old_ids = g.add_images(imgs(tmp_path / "old", 10), feats(10), "modelA")
    reader = open_workspace_gallery(ws)
    with pytest.raises(RuntimeError, match="boom"):
        with g.replacing() as new:
            new.add_images(imgs(tmp_path / "new", 4), feats(4, d=6, seed=1), "modelB")
            assert reader.refresh() is False and reader.ntotal == 10  # readers still see the old gallery
            raise RuntimeError("boom")
    assert g.ntotal == 10 and g.model_fingerprint == "modelA" and g.count() == 10
    np.testing.assert_array_equal(g.ids(), old_ids)
    with g.replacing() as new:
        new_ids = new.add_images(imgs(tmp_path / "new", 4), feats(4, d=6, seed=1), "modelB")
        assert reader.refresh() is False and reader.ntotal == 10 and reader.model_fingerprint == "modelA"
        np.testing.assert_array_equal(reader.search(feats(1), 1)[1][0], brute(reader, feats(1), 1)[0])
    assert g.ntotal == 4 and g.model_fingerprint == "modelB" and g.dim == 6
    np.testing.assert_array_equal(g.ids(), new_ids)
    assert reader.refresh() is True and reader.ntotal == 4 and reader.dim == 6
    np.testing.assert_array_equal(reader.search(feats(2, d=6, seed=1), 1)[1][:, 0], new_ids[:2])
    g.close()
    g2 = open_workspace_gallery(ws)
    assert g2.ntotal == 4 and g2.model_fingerprint == "modelB"
    if store == "faiss":
        assert sorted(p.name for p in ws.index_dir.glob("gallery*.faiss")) == [g2.backend.path.name]
    else:  # the old version's collection is dropped
        assert [c for c in g2.backend.client.list_collections() if c.startswith(f"reid_{g2.meta.state().store_id}_")] \
            == [g2.backend.collection]
    assert g2.roots() == [(tmp_path / "new").resolve()]


def test_reindex_validates_and_embeds_before_dropping_anything(store: str, tmp_path: Path) -> None:
    folder = tmp_path / "gal"
    for i in range(6):
        write_crop(folder / f"{i + 1:04d}_c1s1_{i:06d}_00.jpg", seed=i, size=(32, 64))
    g = open_workspace_gallery(store_workspace(tmp_path / "ws", store))
    index_folder(g, folder, PixelExtractor("m1"), num_workers=0)
    before = g.ids()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        index_folder(g, tmp_path / "empty", PixelExtractor("m2"), reindex=True, num_workers=0)
    with pytest.raises(RuntimeError, match="fails on every image"):
        index_folder(g, folder, PixelExtractor("m2", fail=True), reindex=True, num_workers=0)
    bad = tmp_path / "bad"
    for i in range(3):
        (bad / f"x{i}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (bad / f"x{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="no image could be embedded.*unchanged"):
        index_folder(g, bad, PixelExtractor("m2"), reindex=True, num_workers=0)
    np.testing.assert_array_equal(g.ids(), before)
    assert g.model_fingerprint == "m1" and g.ntotal == 6
    report = index_folder(g, folder, PixelExtractor("m2"), reindex=True, num_workers=0)
    assert (report.dropped, report.indexed) == (6, 6) and g.model_fingerprint == "m2"
    assert not np.isin(g.ids(), before).any()


def test_leftovers_of_an_aborted_build_are_cleaned_on_open(store: str, tmp_path: Path) -> None:
    ws = store_workspace(tmp_path / "ws", store)
    g = open_workspace_gallery(ws)
    g.add_images(imgs(tmp_path / "a", 5), feats(5), "m")
    # A build that died: version rows committed, its index saved, no switch.
    version = g.meta.begin_build()
    from indexer.coordinator import Gallery

    builder = Gallery(g.meta, ws.index_dir, building=version, backend_factory=g._factory)
    builder.add_images(imgs(tmp_path / "b", 3), feats(3, seed=2), "m")
    builder.backend.flush(0)
    assert g.meta.versions_present() == [0, version] and builder.backend.ntotal == 3
    if store == "faiss":
        assert builder.backend.path.is_file()
    g2 = open_workspace_gallery(ws)
    assert g2.meta.versions_present() == [0] and g2.meta.state().building is None
    assert g2.ntotal == 5
    if store == "faiss":
        assert not builder.backend.path.exists()
    else:
        assert not g2.backend.client.has_collection(builder.backend.collection)


def test_a_writer_whose_gallery_was_replaced_meanwhile_writes_into_the_new_one(store: str, tmp_path: Path) -> None:
    ws = store_workspace(tmp_path / "ws", store)
    serve, cli = open_workspace_gallery(ws), open_workspace_gallery(ws)
    serve.add_images(imgs(tmp_path / "up", 3), feats(3), "m")
    cli.refresh()
    with cli.replacing() as new:
        new.add_images(imgs(tmp_path / "re", 4), feats(4, seed=1), "m")
    added = serve.add_images(imgs(tmp_path / "up", 1, start=50), feats(1, seed=2), "m")  # serve never refreshed
    assert serve.version == cli.version and serve.ntotal == 5
    assert cli.refresh() and set(added.tolist()) <= set(cli.ids().tolist()) and cli.ntotal == 5
    with cli.replacing() as new:
        new.add_images(imgs(tmp_path / "re", 2), feats(2, d=6), "other-model")
    with pytest.raises(GalleryError, match="indexed with model other-model"):
        serve.add_images(imgs(tmp_path / "up", 1, start=60), feats(1, seed=3), "m")


# ---- 2. stale reads ------------------------------------------------------------------------------

WRITER = """
import sys, hashlib, numpy as np
from pathlib import Path
from reid_search.gallery import NewImage
from indexer import open_gallery
from reid_search.app.session import open_workspace_gallery
from reid_search.app.workspace import Workspace
ws, folder, start, n = Workspace(Path(sys.argv[1])), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
x = np.random.default_rng(start).standard_normal((n, 8)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
g = open_workspace_gallery(ws)
g.add_images([NewImage(folder / f"w{i}.jpg", hashlib.sha256(b"%d" % i).hexdigest(), 1) for i in range(start, start + n)], x, "m")
g.close()
"""


def run_writer(ws: Workspace, folder: Path, start: int, n: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", WRITER, str(ws.root), str(folder), str(start), str(n)],
                   check=True, cwd=REPO, env=env, timeout=120)


@pytest.mark.faiss_only  # writers in other processes: Milvus Lite serves one process (a Milvus server serves many)
def test_every_reader_sees_every_committed_row(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    serve = open_workspace_gallery(ws)  # a long-running process that also writes (POST /gallery)
    reader = open_workspace_gallery(ws)
    serve.add_images(imgs(tmp_path / "up", 5), feats(5), "m")
    run_writer(ws, tmp_path / "galE", 100, 7)  # `reid-search index galE` in another process
    serve.add_images(imgs(tmp_path / "up", 5, start=5), feats(5, seed=3), "m")  # commits after it
    run_writer(ws, tmp_path / "galF", 200, 4)
    serve.add_images(imgs(tmp_path / "up", 2, start=10), feats(2, seed=4), "m")  # the last commit is its own
    serve.refresh()
    reader.refresh()
    q = feats(6, seed=9)
    for g in (serve, reader):
        assert g.ntotal == len(g.ids()) == 23
        np.testing.assert_array_equal(g.backend.index.ids(), g.ids())
        np.testing.assert_array_equal(g.search(q, 23)[1], brute(g, q, 23))
        _, v = g.all_vectors()
        np.testing.assert_array_equal(g.search(v, 1)[1][:, 0], g.ids())  # every crop finds itself


# ---- 3. file names that are not UTF-8 --------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes in names")
def test_non_utf8_file_names_are_indexed_losslessly(store: str, tmp_path: Path) -> None:
    folder = tmp_path / "gal"
    for i in range(3):
        write_crop(folder / f"{i + 1:04d}_c1s1_{i:06d}_00.jpg", seed=i, size=(32, 64))
    raw = os.fsencode(folder) + b"/caf\xe9_\xff.jpg"
    shutil.copy(folder / "0001_c1s1_000000_00.jpg", os.fsdecode(raw))
    (folder / "\ufffeodd.jpg").write_bytes((folder / "0002_c1s1_000001_00.jpg").read_bytes())  # the escape marker itself
    g = open_workspace_gallery(store_workspace(tmp_path / "ws", store))
    report = index_folder(g, folder, PixelExtractor(), num_workers=0)
    assert report.indexed == 5 and not report.skipped
    paths = {os.fsencode(m.path) for b in g.iter_metadata() for m in b}
    assert raw in paths and os.fsencode(folder / "\ufffeodd.jpg") in paths
    assert all(Path(os.fsdecode(p)).is_file() for p in paths)
    again = index_folder(g, folder, PixelExtractor(), num_workers=0)
    assert (again.indexed, again.unchanged) == (0, 5)
    assert g.remove([os.fsdecode(raw)]) == (1, [])


# ---- 4. an index file made against another DB ---------------------------------------------------


@pytest.mark.faiss_only  # the index file
def test_index_file_of_another_db_is_detected_and_rebuilt(tmp_path: Path) -> None:
    a, b = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    ga, gb = open_workspace_gallery(a), open_workspace_gallery(b)
    ga.add_images(imgs(tmp_path / "ga", 20), feats(20, seed=1), "m")
    gb.add_images(imgs(tmp_path / "gb", 20), feats(20, seed=2), "m")  # same model, same ids
    ga.close()
    gb.close()
    np.testing.assert_array_equal(open_workspace_gallery(a).ids(), open_workspace_gallery(b).ids())
    shutil.copy(a.index_dir / "gallery.faiss", b.index_dir / "gallery.faiss")
    g = open_workspace_gallery(b)
    q = feats(5, seed=7)
    np.testing.assert_array_equal(g.search(q, 5)[1], brute(g, q, 5))
    _, v = g.all_vectors()
    np.testing.assert_array_equal(g.search(v, 1)[1][:, 0], g.ids())


# ---- 6. smaller ones ------------------------------------------------------------------------------------


@pytest.mark.faiss_only  # the index file's temporary
def test_crash_leftover_tmp_files_are_removed_on_open(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    g = open_workspace_gallery(ws)
    g.add_images(imgs(tmp_path / "g", 3), feats(3), "m")
    g.close()
    tmp = ws.index_dir / ".gallery.faiss.abc123.tmp"
    tmp.write_bytes(b"\0" * 4096)
    g = open_workspace_gallery(ws)
    assert not tmp.exists() and g.ntotal == 3


@pytest.mark.parametrize("store", ["faiss", "milvus:"])  # milvus: the workspace's own Lite file
def test_zero_byte_db_does_not_delete_the_index(store: str, tmp_path: Path) -> None:
    if store != "faiss":
        pytest.importorskip("milvus_lite", reason="milvus-lite cannot run here")
    ws = store_workspace(tmp_path / "ws", store)
    g = open_workspace_gallery(ws)
    g.add_images(imgs(tmp_path / "g", 3), feats(3), "m")
    collection = getattr(g.backend, "collection", None)
    g.close()
    index = ws.index_dir / "gallery.faiss" if store == "faiss" else ws.root / "milvus.db"
    size = index.stat().st_size
    db = Path(ws.db_url.removeprefix("sqlite:///"))
    db.write_bytes(b"")
    for p in db.parent.glob(db.name + "-*"):
        p.unlink()
    with pytest.raises(GalleryError, match=r"empty .*zero-byte.*restore the DB from a backup, or delete") as err:
        open_workspace_gallery(ws)
    assert "\n" not in str(err.value) and str(index) in str(err.value)
    assert index.stat().st_size == size
    if store != "faiss":
        from indexer.milvus.client import connect
        from indexer.location import parse_store

        assert connect(parse_store(store).resolved(ws.root)).has_collection(collection)  # the vectors are still there


@pytest.mark.faiss_only  # Milvus Lite writes into its folder when it opens (its lock), a server is writable
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_workspace_can_be_queried(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    g = open_workspace_gallery(ws)
    ids = g.add_images(imgs(tmp_path / "g", 4), feats(4), "m")
    g.close()
    modes = {p: p.stat().st_mode for p in [ws.root, *ws.root.rglob("*")]}
    try:
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        g = open_workspace_gallery(ws)
        np.testing.assert_array_equal(g.search(feats(4), 1)[1][:, 0], ids)
        with pytest.raises(GalleryError, match="writable|read-only|readonly"):
            g.add_images(imgs(tmp_path / "g", 1, start=9), feats(1), "m")
    finally:
        for p, m in modes.items():
            p.chmod(m)


def test_read_paths_take_no_lock(store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = store_workspace(tmp_path / "ws", store)
    g = open_workspace_gallery(ws)
    g.add_images(imgs(tmp_path / "g", 4), feats(4), "m")
    g.close()
    from indexer import coordinator

    def no_lock(self, wait: bool = True) -> bool:  # type: ignore[no-untyped-def]
        if wait:
            raise AssertionError("a read waited for the writer lock")
        return False  # as in a read-only folder: the lock file cannot be made

    monkeypatch.setattr(coordinator.WriterLock, "_acquire", no_lock)
    r = open_workspace_gallery(ws)
    assert r.ntotal == 4 and r.search(feats(1), 2)[1].shape == (1, 2) and r.count() == 4
    r.refresh()
    r.close()


def test_gifs_are_counted_as_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "gal"
    write_crop(folder / "0001_c1s1_000000_00.jpg", seed=1, size=(32, 64))
    from PIL import Image

    Image.new("RGB", (32, 64)).save(folder / "0002_c1s1_000001_00.gif")
    (folder / "notes.txt").write_text("not an image")
    report = index_folder(open_workspace_gallery(Workspace(tmp_path / "ws")), folder, PixelExtractor(), num_workers=0)
    assert report.indexed == 1 and report.skipped_by_reason() == {"unsupported-format": 1}
    assert report.skipped[0][0].endswith(".gif") and ".gif" in report.skipped[0][2]
    assert report.seen == 2


def test_missing_driver_names_the_dialects_driver(tmp_path: Path) -> None:
    pytest.importorskip("sqlalchemy")
    try:
        import MySQLdb  # noqa: F401

        pytest.skip("mysqlclient is installed")
    except ImportError:
        pass
    with pytest.raises(GalleryError, match="cannot use the DB URL") as err:
        open_gallery("mysql://u@127.0.0.1:1/db", tmp_path / "i")
    assert "pymysql" in str(err.value).lower() and "psycopg" not in str(err.value)
