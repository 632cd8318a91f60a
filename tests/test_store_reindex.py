"""Re-indexing: the new gallery is built beside the old one and switched to atomically; a failed or
empty re-index leaves the old gallery; writers and readers of the old gallery follow the switch.

Every test runs on both stores (FAISS and Milvus Lite, see ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.pipeline import index_folder
from reid_search.errors import DataError, GalleryError
from tests.helpers import PixelExtractor, brute_force, feats, new_images, open_ws, store_workspace, write_folder


def test_replacing_switches_atomically_and_a_failure_leaves_the_old_gallery(store: str, tmp_path: Path) -> None:
    ws = store_workspace(tmp_path / "ws", store)
    g = open_ws(ws)
    old_ids = g.add_images(new_images(tmp_path / "old", 10), feats(10), "modelA")
    reader = open_ws(ws)
    with pytest.raises(RuntimeError, match="boom"):
        with g.replacing() as new:
            new.add_images(new_images(tmp_path / "new", 4), feats(4, d=6, seed=1), "modelB")
            assert reader.refresh() is False and reader.ntotal == 10  # readers still see the old gallery
            raise RuntimeError("boom")
    assert g.ntotal == 10 and g.model_fingerprint == "modelA" and g.count() == 10
    np.testing.assert_array_equal(g.ids(), old_ids)
    with g.replacing() as new:
        new_ids = new.add_images(new_images(tmp_path / "new", 4), feats(4, d=6, seed=1), "modelB")
        assert reader.refresh() is False and reader.ntotal == 10 and reader.model_fingerprint == "modelA"
        np.testing.assert_array_equal(reader.search(feats(1), 1)[1][0], brute_force(reader, feats(1), 1)[1][0])
    assert g.ntotal == 4 and g.model_fingerprint == "modelB" and g.dim == 6
    np.testing.assert_array_equal(g.ids(), new_ids)
    assert reader.refresh() is True and reader.ntotal == 4 and reader.dim == 6
    np.testing.assert_array_equal(reader.search(feats(2, d=6, seed=1), 1)[1][:, 0], new_ids[:2])
    g.close()
    g2 = open_ws(ws)
    assert g2.ntotal == 4 and g2.model_fingerprint == "modelB"
    if store == "faiss":
        assert sorted(p.name for p in ws.index_dir.glob("gallery*.faiss")) == [g2.backend.path.name]
    else:  # the old version's collection is dropped
        assert [c for c in g2.backend.client.list_collections() if c.startswith(f"reid_{g2.meta.state().store_id}_")] \
            == [g2.backend.collection]
    assert g2.roots() == [(tmp_path / "new").resolve()]


def test_reindex_validates_and_embeds_before_dropping_anything(store: str, tmp_path: Path) -> None:
    folder = tmp_path / "gal"
    write_folder(folder, 6, per_pid=1, cams=1)
    g = open_ws(store_workspace(tmp_path / "ws", store))
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


def test_a_writer_whose_gallery_was_replaced_meanwhile_writes_into_the_new_one(store: str, tmp_path: Path) -> None:
    ws = store_workspace(tmp_path / "ws", store)
    serve, cli = open_ws(ws), open_ws(ws)
    serve.add_images(new_images(tmp_path / "up", 3), feats(3), "m")
    cli.refresh()
    with cli.replacing() as new:
        new.add_images(new_images(tmp_path / "re", 4), feats(4, seed=1), "m")
    added = serve.add_images(new_images(tmp_path / "up", 1, start=50), feats(1, seed=2), "m")  # serve never refreshed
    assert serve.version == cli.version and serve.ntotal == 5
    assert cli.refresh() and set(added.tolist()) <= set(cli.ids().tolist()) and cli.ntotal == 5
    with cli.replacing() as new:
        new.add_images(new_images(tmp_path / "re", 2), feats(2, d=6), "other-model")
    with pytest.raises(GalleryError, match="indexed with model other-model"):
        serve.add_images(new_images(tmp_path / "up", 1, start=60), feats(1, seed=3), "m")
