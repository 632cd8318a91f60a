"""The gallery store: DB + index consistency, repair on open, roots, listeners (SQLite).

Tests taking ``store`` run on both stores (FAISS and Milvus Lite, see ``tests/conftest.py``);
those marked ``faiss_only`` test the FAISS index file or its training."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from reid_search.gallery import ChangeEvent, NewImage
from indexer import Gallery, IndexSpec, open_gallery
from reid_search.app.session import open_workspace_gallery
from reid_search.errors import GalleryError
from reid_search.app.workspace import Workspace
from tests.conftest import store_workspace


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def fake_images(folder: Path, n: int, start: int = 0, write: bool = False) -> list[NewImage]:
    out = []
    for i in range(start, start + n):
        p = folder / f"{i % 50 + 1:04d}_c{i % 3 + 1}s1_{i:06d}_00.jpg"
        if write:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x%d" % i)
        out.append(NewImage(p, hashlib.sha256(b"x%d" % i).hexdigest(), 2))
    return out


def feats(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


@pytest.fixture()
def ws(tmp_path: Path, store: str) -> Workspace:
    """A workspace on each store in turn."""
    return store_workspace(tmp_path / "ws", store)


@pytest.fixture()
def fws(tmp_path: Path) -> Workspace:
    """A FAISS workspace (for the ``faiss_only`` tests)."""
    return Workspace(tmp_path / "ws")


def test_add_search_metadata_vectors(ws: Workspace, tmp_path: Path) -> None:
    g = open_workspace_gallery(ws)
    assert (g.ntotal, g.dim, g.model_fingerprint, g.generation) == (0, None, None, 0)
    s, i = g.search(feats(2), 3)
    assert (i == -1).all()
    x = feats(30)
    imgs = fake_images(tmp_path / "gal", 30)
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
    g.close()
    g2 = open_workspace_gallery(ws)  # persisted: the file and the DB agree
    assert g2.ntotal == 30 and g2.generation == 1
    np.testing.assert_array_equal(g2.search(x[:5], 4)[1], got)


def test_names_without_market_labels_get_null_pid(ws: Workspace, tmp_path: Path) -> None:
    g = open_workspace_gallery(ws)
    ids = g.add_images([NewImage(tmp_path / "g" / "holiday.jpg", "0" * 64, 1)], feats(1), "m")
    m = g.metadata(ids)[0]
    assert m.pid is None and m.camid is None and m.seq is None
    assert g.labels()[1].tolist() == [-2]


def test_same_path_replaces_and_ids_are_never_reused(ws: Workspace, tmp_path: Path) -> None:
    g = open_workspace_gallery(ws)
    imgs = fake_images(tmp_path / "gal", 3)
    first = g.add_images(imgs, feats(3), "m")
    g.remove_ids([first[2]])  # the highest id: SQLite would hand it out again without AUTOINCREMENT
    new = g.add_images([imgs[0]], feats(1, seed=9), "m")
    assert g.ntotal == 2 and new[0] > first[2]
    assert sorted(g.ids().tolist()) == sorted([first[1], new[0]])
    np.testing.assert_array_equal(g.backend.ids(), g.ids())


def test_model_mismatch_is_refused(ws: Workspace, tmp_path: Path) -> None:
    g = open_workspace_gallery(ws)
    g.add_images(fake_images(tmp_path / "g", 3), feats(3), "modelA")
    with pytest.raises(GalleryError, match=r"indexed with model modelA .* --reindex"):
        g.add_images(fake_images(tmp_path / "g", 1, start=10), feats(1), "modelB")
    with pytest.raises(GalleryError, match="another --workspace"):
        g.check_model("modelA", 32)
    g.check_model("modelA", 16)
    assert g.clear() == 3
    assert g.ntotal == 0 and g.model_fingerprint is None and g.roots() == []
    g.add_images(fake_images(tmp_path / "g", 2), feats(2, d=8), "modelB")
    assert g.dim == 8 and g.model_fingerprint == "modelB"


def test_remove_by_path_and_folder_and_prune(ws: Workspace, tmp_path: Path) -> None:
    g = open_workspace_gallery(ws)
    root = tmp_path / "gal"
    a = fake_images(root / "camA", 4, write=True)
    b = fake_images(root / "camB", 4, start=4, write=True)
    g.register_root(root)
    g.add_images(a + b, feats(8), "m")
    assert g.roots() == [root.resolve()]
    removed, unmatched = g.remove([a[0].path, tmp_path / "elsewhere.jpg"])
    assert removed == 1 and unmatched == [str(tmp_path / "elsewhere.jpg")]
    removed, _ = g.remove([root / "camB"])
    assert removed == 4 and g.ntotal == 3
    a[1].path.unlink()
    assert g.prune(under=root / "camB") == 0
    assert g.prune() == 1 and g.ntotal == 2
    removed, _ = g.remove([root])
    assert removed == 2 and g.ntotal == 0 and g.roots() == []


def test_nested_roots_are_absorbed(ws: Workspace, tmp_path: Path) -> None:
    g = open_workspace_gallery(ws)
    inner = fake_images(tmp_path / "data" / "cam1", 2)
    ids = g.add_images(inner, feats(2), "m")
    assert g.roots() == [(tmp_path / "data" / "cam1").resolve()]
    g.register_root(tmp_path / "data")
    assert g.roots() == [(tmp_path / "data").resolve()]
    assert [m.rel_path for m in g.metadata(ids)] == [f"cam1/{im.path.name}" for im in inner]
    assert set(g.existing(tmp_path / "data")) == {f"cam1/{im.path.name}" for im in inner}
    assert set(g.existing(tmp_path / "data" / "cam1")) == {im.path.name for im in inner}


@pytest.mark.faiss_only  # the index file lagging the DB (Milvus: tests/test_milvus_store.py, repair)
def test_index_lagging_the_db_is_repaired_on_open(fws: Workspace, tmp_path: Path) -> None:
    """A crash after a DB commit but before the index file is written: re-add from the DB."""
    ws = fws
    g = open_workspace_gallery(ws, save_interval=3600)
    x = feats(40)
    g.add_images(fake_images(tmp_path / "g", 20), x[:20], "m")
    g.save()
    ids2 = g.add_images(fake_images(tmp_path / "g", 20, start=20), x[20:], "m")
    g.engine.dispose()  # "crash": the second commit never reached the index file
    g2 = open_workspace_gallery(ws)
    assert g2.ntotal == 40
    np.testing.assert_array_equal(g2.backend.index.ids(), g2.ids())
    np.testing.assert_array_equal(g2.search(x[20:25], 1)[1][:, 0], ids2[:5])


def test_stale_vectors_in_the_file_are_dropped_on_open(ws: Workspace, store: str, tmp_path: Path) -> None:
    """Ids in the vector backend that the DB no longer has (a removal that never reached it)."""
    g = open_workspace_gallery(ws)
    ids = g.add_images(fake_images(tmp_path / "g", 10), feats(10), "m")
    g.close()
    con = sqlite3.connect(ws.root / "reid.db")
    con.execute("DELETE FROM embeddings WHERE image_id IN (?, ?)", (int(ids[0]), int(ids[1])))
    con.execute("DELETE FROM images WHERE id IN (?, ?)", (int(ids[0]), int(ids[1])))
    con.commit()
    con.close()
    g2 = open_workspace_gallery(ws)
    assert g2.ntotal == 8 and not np.isin(g2.search(feats(10), 10)[1], ids[:2]).any()
    np.testing.assert_array_equal(g2.backend.ids(), ids[2:])
    g2.close()
    if store == "faiss":
        from indexer.faiss.index import VectorIndex

        on_disk, _ = VectorIndex.load(ws.index_dir / "gallery.faiss")
        np.testing.assert_array_equal(on_disk.ids(), ids[2:])  # the repair was written back
    else:
        np.testing.assert_array_equal(open_workspace_gallery(ws).backend.ids(), ids[2:])  # deleted from the collection


@pytest.mark.faiss_only  # the index file
def test_missing_or_corrupt_index_file_is_rebuilt(fws: Workspace, tmp_path: Path) -> None:
    ws = fws
    g = open_workspace_gallery(ws)
    x = feats(12)
    g.add_images(fake_images(tmp_path / "g", 12), x, "m")
    want = g.search(x, 3)[1]
    g.close()
    (ws.index_dir / "gallery.faiss").write_bytes(b"garbage")
    np.testing.assert_array_equal(open_workspace_gallery(ws).search(x, 3)[1], want)
    (ws.index_dir / "gallery.faiss").unlink()
    np.testing.assert_array_equal(open_workspace_gallery(ws).search(x, 3)[1], want)


@pytest.mark.faiss_only  # FAISS training
def test_flat_becomes_ivf_past_the_training_threshold(fws: Workspace, tmp_path: Path) -> None:
    ws = fws
    g = open_workspace_gallery(ws, spec=IndexSpec("ivf", min_train=700))
    x = feats(1000, d=8, seed=3)
    g.add_images(fake_images(tmp_path / "g", 600), x[:600], "m")
    assert not g.backend.index.trained and "exact until trained" in g.describe()
    g.add_images(fake_images(tmp_path / "g", 400, start=600), x[600:], "m")
    assert g.backend.index.trained and g.backend.index.nlist == 16 and g.ntotal == 1000
    g.close()
    g2 = open_workspace_gallery(ws)
    assert g2.backend.index.trained and g2.spec == IndexSpec("ivf", min_train=700)


@pytest.mark.faiss_only  # FAISS training and rebuilds (Milvus: tests/test_milvus_store.py)
@pytest.mark.parametrize("kind", ["hnsw", "ivfpq", "flat"])
def test_switching_index_type_rebuilds_from_stored_vectors(kind: str, fws: Workspace, tmp_path: Path) -> None:
    ws = fws
    g = open_workspace_gallery(ws)
    x = feats(800, d=16, seed=4)
    ids = g.add_images(fake_images(tmp_path / "g", 800), x, "m")
    assert g.set_spec(IndexSpec(kind, **({"min_train": 700} if kind == "ivfpq" else {}))) is (kind != "flat")
    assert g.spec.kind == kind and g.ntotal == 800 and g.backend.index.trained
    np.testing.assert_array_equal(g.search(x[:20], 1)[1][:, 0], ids[:20])
    g.remove_ids(ids[:5])  # hnsw cannot remove in place: rebuilt without them
    assert g.ntotal == 795 and not np.isin(g.search(x[:20], 5)[1], ids[:5]).any()
    g.close()
    assert open_workspace_gallery(ws).spec.kind == kind


@pytest.mark.faiss_only  # the FAISS index object
def test_search_parameter_change_needs_no_rebuild(fws: Workspace, tmp_path: Path) -> None:
    ws = fws
    g = open_workspace_gallery(ws, spec=IndexSpec("ivf", min_train=700))
    g.add_images(fake_images(tmp_path / "g", 800), feats(800, d=8), "m")
    before = g.backend.index
    assert g.set_spec(IndexSpec("ivf", min_train=700, nprobe=2)) is False
    assert g.backend.index is before and g.backend.index.spec.nprobe == 2


def test_change_listeners_and_generation(ws: Workspace, tmp_path: Path) -> None:
    g = open_workspace_gallery(ws)
    events: list[ChangeEvent] = []
    g.on_change("cache", events.append)
    g.on_change("broken", lambda ev: 1 / 0)  # logged, does not break the gallery
    ids = g.add_images(fake_images(tmp_path / "g", 5), feats(5), "m")
    g.remove_ids(ids[:2])
    g.remove_listener("broken")
    g.add_images(fake_images(tmp_path / "g", 1), feats(1, seed=5), "m")  # replaces path 0? no: path 0 was removed
    assert [ev.generation for ev in events] == [1, 2, 3]
    np.testing.assert_array_equal(events[0].added, ids)
    np.testing.assert_array_equal(events[1].removed, ids[:2])
    assert len(events[1].added) == 0
    other = open_workspace_gallery(ws)  # another process's view
    assert other.generation == 3 and other.refresh() is False
    g.remove_ids(ids[2:3])
    assert other.db_generation() == 4 and other.refresh() is True
    assert other.ntotal == g.ntotal == 3


@pytest.mark.faiss_only  # a DB URL plus the folder of the index file
def test_open_by_url_and_errors(tmp_path: Path) -> None:
    g = open_gallery(f"sqlite:///{tmp_path / 'x.db'}", tmp_path / "idx")
    g.add_images(fake_images(tmp_path / "g", 2), feats(2), "m")
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


def test_gallery_is_a_context_manager(ws: Workspace, store: str, tmp_path: Path) -> None:
    with open_workspace_gallery(ws, save_interval=3600) as g:
        assert isinstance(g, Gallery)
        ids = g.add_images(fake_images(tmp_path / "g", 3), feats(3), "m")
    if store == "faiss":
        assert (ws.index_dir / "gallery.faiss").is_file()  # pending index changes are written on close
    with open_workspace_gallery(ws) as g:
        np.testing.assert_array_equal(g.backend.ids(), ids)
        np.testing.assert_array_equal(g.search(feats(3), 1)[1][:, 0], ids)
