"""The gallery store's basic contract: add, search, metadata and vectors; replacing a path; the
model check; change listeners and the generation; opening (context manager, URLs, read-only, locks).

Tests taking ``store`` run on both stores (FAISS and Milvus Lite, see ``tests/conftest.py``);
those marked ``faiss_only`` need what only the FAISS store has (its index folder, a read-only
workspace)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from indexer import Gallery, open_gallery
from reid_search.app.workspace import Workspace
from reid_search.errors import GalleryError
from reid_search.gallery import ChangeEvent, NewImage
from tests.helpers import feats, new_images, open_ws, store_workspace


@pytest.fixture()
def ws(tmp_path: Path, store: str) -> Workspace:
    """A workspace on each store in turn."""
    return store_workspace(tmp_path / "ws", store)


def test_add_search_metadata_vectors(ws: Workspace, store: str, tmp_path: Path) -> None:
    g = open_ws(ws)
    assert (g.ntotal, g.dim, g.model_fingerprint, g.generation) == (0, None, None, 0)
    s, i = g.search(feats(2), 3)
    assert (i == -1).all()
    x = feats(30)
    imgs = new_images(tmp_path / "gal", 30)
    ids = g.add_images(imgs, x, "modelA")
    assert len(ids) == 30 and g.ntotal == 30 and g.dim == 16 and g.model_fingerprint == "modelA"
    assert g.generation == 1
    sims, got = g.search(x[:5], 4)
    np.testing.assert_array_equal(got[:, 0], ids[:5])
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    metas = g.metadata(got[:, 0])
    assert [m.path for m in metas] == [im.path.resolve() for im in imgs[:5]]
    m = metas[1]
    assert (m.pid, m.camid, m.seq, m.frame) == (2, 2, 1, 1) and m.rel_path == imgs[1].path.name
    assert m.root == (tmp_path / "gal").resolve() and m.model_fingerprint == "modelA" and m.sha256 == imgs[1].sha256
    np.testing.assert_array_equal(g.vectors(ids[[3, 1]]), x[[3, 1]])  # exact, in the order asked
    all_ids, all_x = g.all_vectors()
    np.testing.assert_array_equal(all_ids, ids)
    np.testing.assert_array_equal(all_x, x)
    batches = list(g.iter_vectors(batch_size=7))
    assert [len(b[0]) for b in batches] == [7, 7, 7, 7, 2]
    lids, pids, camids = g.labels()
    np.testing.assert_array_equal(lids, ids)
    assert pids[:3].tolist() == [1, 2, 3] and camids[:3].tolist() == [1, 2, 3]
    with pytest.raises(GalleryError, match="not in the gallery"):
        g.metadata([ids[0], -1])
    with pytest.raises(GalleryError, match="not in the gallery"):
        g.vectors([12345])
    assert g.backend.ntotal == g.ntotal
    g.close()
    g2 = open_ws(ws)  # persisted: the vectors and the DB agree
    assert g2.ntotal == 30 and g2.generation == 1
    np.testing.assert_array_equal(g2.search(x[:5], 4)[1], got)
    g2.close()
    con = sqlite3.connect(ws.root / "reid.db")
    try:
        assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 30
        # SQL keeps the vectors only where the backend does not (FAISS rebuilds from them; Milvus holds its own)
        assert con.execute("SELECT count(*) FROM embeddings").fetchone()[0] == (30 if store == "faiss" else 0)
    finally:
        con.close()
    if store != "faiss":  # the first open recorded where the gallery lives
        assert json.loads((ws.root / "store.json").read_text()) == {"store": store}


def test_names_without_market_labels_get_null_pid(ws: Workspace, tmp_path: Path) -> None:
    g = open_ws(ws)
    ids = g.add_images([NewImage(tmp_path / "g" / "holiday.jpg", "0" * 64, 1)], feats(1), "m")
    m = g.metadata(ids)[0]
    assert m.pid is None and m.camid is None and m.seq is None
    assert g.labels()[1].tolist() == [-2]


def test_same_path_replaces_and_ids_are_never_reused(ws: Workspace, tmp_path: Path) -> None:
    g = open_ws(ws)
    imgs = new_images(tmp_path / "gal", 3)
    first = g.add_images(imgs, feats(3), "m")
    g.remove_ids([first[2]])  # the highest id: SQLite would hand it out again without AUTOINCREMENT
    new = g.add_images([imgs[0]], feats(1, seed=9), "m")
    assert g.ntotal == 2 and new[0] > first[2]
    assert sorted(g.ids().tolist()) == sorted([first[1], new[0]])
    np.testing.assert_array_equal(g.backend.ids(), g.ids())


def test_model_mismatch_is_refused(ws: Workspace, tmp_path: Path) -> None:
    g = open_ws(ws)
    g.add_images(new_images(tmp_path / "g", 3), feats(3), "modelA")
    with pytest.raises(GalleryError, match=r"indexed with model modelA .* --reindex"):
        g.add_images(new_images(tmp_path / "g", 1, start=10), feats(1), "modelB")
    with pytest.raises(GalleryError, match="another --workspace"):
        g.check_model("modelA", 32)
    g.check_model("modelA", 16)
    assert g.clear() == 3
    assert g.ntotal == 0 and g.model_fingerprint is None and g.roots() == []
    g.add_images(new_images(tmp_path / "g", 2), feats(2, d=8), "modelB")
    assert g.dim == 8 and g.model_fingerprint == "modelB"


def test_change_listeners_and_generation(ws: Workspace, tmp_path: Path) -> None:
    g = open_ws(ws)
    events: list[ChangeEvent] = []
    g.on_change("cache", events.append)
    g.on_change("broken", lambda ev: 1 / 0)  # logged, does not break the gallery
    ids = g.add_images(new_images(tmp_path / "g", 5), feats(5), "m")
    g.remove_ids(ids[:2])
    g.remove_listener("broken")
    g.add_images(new_images(tmp_path / "g", 1), feats(1, seed=5), "m")  # path 0 again: it was removed, so a new row
    assert [ev.generation for ev in events] == [1, 2, 3]
    np.testing.assert_array_equal(events[0].added, ids)
    np.testing.assert_array_equal(events[1].removed, ids[:2])
    assert len(events[1].added) == 0
    other = open_ws(ws)  # another process's view
    assert other.generation == 3 and other.refresh() is False
    g.remove_ids(ids[2:3])
    assert other.db_generation() == 4 and other.refresh() is True
    assert other.ntotal == g.ntotal == 3


def test_gallery_is_a_context_manager(ws: Workspace, store: str, tmp_path: Path) -> None:
    with open_ws(ws, save_interval=3600) as g:
        assert isinstance(g, Gallery)
        ids = g.add_images(new_images(tmp_path / "g", 3), feats(3), "m")
    if store == "faiss":
        assert (ws.index_dir / "gallery.faiss").is_file()  # pending index changes are written on close
    with open_ws(ws) as g:
        np.testing.assert_array_equal(g.backend.ids(), ids)
        np.testing.assert_array_equal(g.search(feats(3), 1)[1][:, 0], ids)


def test_read_paths_take_no_lock(ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = open_ws(ws)
    g.add_images(new_images(tmp_path / "g", 4), feats(4), "m")
    g.close()
    from indexer import coordinator

    def no_lock(self, wait: bool = True) -> bool:  # type: ignore[no-untyped-def]
        if wait:
            raise AssertionError("a read waited for the writer lock")
        return False  # as in a read-only folder: the lock file cannot be made

    monkeypatch.setattr(coordinator.WriterLock, "_acquire", no_lock)
    r = open_ws(ws)
    assert r.ntotal == 4 and r.search(feats(1), 2)[1].shape == (1, 2) and r.count() == 4
    r.refresh()
    r.close()


@pytest.mark.faiss_only  # Milvus Lite writes into its folder when it opens (its lock), a server is writable
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_workspace_can_be_queried(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    g = open_ws(ws)
    ids = g.add_images(new_images(tmp_path / "g", 4), feats(4), "m")
    g.close()
    modes = {p: p.stat().st_mode for p in [ws.root, *ws.root.rglob("*")]}
    try:
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        g = open_ws(ws)
        np.testing.assert_array_equal(g.search(feats(4), 1)[1][:, 0], ids)
        with pytest.raises(GalleryError, match="writable|read-only|readonly"):
            g.add_images(new_images(tmp_path / "g", 1, start=9), feats(1), "m")
    finally:
        for p, m in modes.items():
            p.chmod(m)


@pytest.mark.faiss_only  # a DB URL plus the folder of the index file
def test_open_by_url_and_errors(tmp_path: Path) -> None:
    g = open_gallery(f"sqlite:///{tmp_path / 'x.db'}", tmp_path / "idx")
    g.add_images(new_images(tmp_path / "g", 2), feats(2), "m")
    g.close()
    assert (tmp_path / "idx" / "gallery.faiss").is_file()
    assert open_gallery(tmp_path / "x.db", tmp_path / "idx").ntotal == 2  # a plain path means SQLite
    with pytest.raises(GalleryError, match="needs index_dir"):
        open_gallery("sqlite:///y.db")
    with pytest.raises(GalleryError, match="not a SQLAlchemy URL"):
        open_gallery("a b://x", tmp_path / "i2")
    with pytest.raises(GalleryError, match="cannot use the DB URL"):
        open_gallery("nonsense://x", tmp_path / "i2")
    with pytest.raises(GalleryError, match="cannot open the metadata DB .*check --db") as err:
        open_gallery("postgresql+psycopg://nobody@127.0.0.1:1/none", tmp_path / "i3")
    assert "\n" not in str(err.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(GalleryError, match="cannot create the folder of the SQLite DB"):
        open_gallery(f"sqlite:///{tmp_path / 'file' / 'x.db'}", tmp_path / "i4")


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
