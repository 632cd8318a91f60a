"""Paths in the gallery store: removing by file and folder, pruning, roots that nest, names
that are not UTF-8, and which files a folder walk skips.

Tests taking ``store`` run on both stores (FAISS and Milvus Lite, see ``tests/conftest.py``)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from indexer.pipeline import index_folder
from reid_search.app.workspace import Workspace
from tests.helpers import PixelExtractor, feats, new_images, open_ws, store_workspace, write_crop, write_folder


@pytest.fixture()
def ws(tmp_path: Path, store: str) -> Workspace:
    """A workspace on each store in turn."""
    return store_workspace(tmp_path / "ws", store)


def test_remove_by_path_and_folder_and_prune(ws: Workspace, tmp_path: Path) -> None:
    g = open_ws(ws)
    root = tmp_path / "gal"
    a = new_images(root / "camA", 4, write=True)
    b = new_images(root / "camB", 4, start=4, write=True)
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
    g = open_ws(ws)
    inner = new_images(tmp_path / "data" / "cam1", 2)
    ids = g.add_images(inner, feats(2), "m")
    assert g.roots() == [(tmp_path / "data" / "cam1").resolve()]
    g.register_root(tmp_path / "data")
    assert g.roots() == [(tmp_path / "data").resolve()]
    assert [m.rel_path for m in g.metadata(ids)] == [f"cam1/{im.path.name}" for im in inner]
    assert set(g.existing(tmp_path / "data")) == {f"cam1/{im.path.name}" for im in inner}
    assert set(g.existing(tmp_path / "data" / "cam1")) == {im.path.name for im in inner}


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes in names")
def test_non_utf8_file_names_are_indexed_losslessly(ws: Workspace, tmp_path: Path) -> None:
    folder = tmp_path / "gal"
    write_folder(folder, 3, per_pid=1, cams=1)
    raw = os.fsencode(folder) + b"/caf\xe9_\xff.jpg"
    shutil.copy(folder / "0001_c1s1_000000_00.jpg", os.fsdecode(raw))
    (folder / "\ufffeodd.jpg").write_bytes((folder / "0002_c1s1_000001_00.jpg").read_bytes())  # the escape marker itself
    g = open_ws(ws)
    report = index_folder(g, folder, PixelExtractor(), num_workers=0)
    assert report.indexed == 5 and not report.skipped
    paths = {os.fsencode(m.path) for b in g.iter_metadata() for m in b}
    assert raw in paths and os.fsencode(folder / "\ufffeodd.jpg") in paths
    assert all(Path(os.fsdecode(p)).is_file() for p in paths)
    again = index_folder(g, folder, PixelExtractor(), num_workers=0)
    assert (again.indexed, again.unchanged) == (0, 5)
    assert g.remove([os.fsdecode(raw)]) == (1, [])


def test_gifs_are_counted_as_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "gal"
    write_crop(folder / "0001_c1s1_000000_00.jpg", seed=1, size=(32, 64))
    Image.new("RGB", (32, 64)).save(folder / "0002_c1s1_000001_00.gif")
    (folder / "notes.txt").write_text("not an image")
    report = index_folder(open_ws(Workspace(tmp_path / "ws")), folder, PixelExtractor(), num_workers=0)
    assert report.indexed == 1 and report.skipped_by_reason() == {"unsupported-format": 1}
    assert report.skipped[0][0].endswith(".gif") and ".gif" in report.skipped[0][2]
    assert report.seen == 2
