"""Writes that another process makes to the OLD gallery while a re-index builds the new one.

``replacing()`` builds the new version from the folder alone and switches to it;
the old version, with whatever was added to or removed from it meanwhile, is
dropped. These tests pin that behaviour (documented in README "--reindex") and
the remedy the README gives: re-add the service's uploads with ``reid-search
index WORKSPACE/uploads`` after the switch, before ``serve`` restarts.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from reid_search.gallery import NewImage
from reid_search.app.session import open_workspace_gallery
from reid_search.errors import GalleryError
from tests.helpers import feats, new_images, store_workspace, write_crop


def paths(g) -> set[Path]:
    """Every path the gallery's active version holds."""
    return {m.path for batch in g.iter_metadata() for m in batch}


def test_writes_to_the_old_gallery_during_a_reindex_are_not_carried_over(tmp_path: Path, store: str) -> None:
    from reid_search.app.service import upload_name

    ws = store_workspace(tmp_path / "ws", store)
    folder = tmp_path / "gal"
    crops = new_images(folder, 6, write=True)
    writer = open_workspace_gallery(ws)  # e.g. a running `serve` taking POST /gallery
    indexer = open_workspace_gallery(ws)  # `reid-search index FOLDER --reindex`
    try:
        writer.add_images(crops, feats(6, d=8, seed=1), "m1")
        up = ws.uploads_dir.resolve()
        earlier = NewImage(up / upload_name("a" * 64, ".jpg", 3, 1), "a" * 64, 1, pid=3, camid=1)
        writer.add_images([earlier], feats(1, d=8, seed=2), "m1")  # uploaded before the re-index started
        indexer.refresh()
        folder_paths = {c.path.resolve() for c in crops}
        with indexer.replacing() as new:
            new.add_images(crops[:3], feats(3, d=16, seed=3), "m2")
            during = NewImage(up / upload_name("b" * 64, ".jpg", 4, 2), "b" * 64, 1, pid=4, camid=2,
                              time=datetime(2024, 5, 1, 8, tzinfo=timezone.utc), track="t1")
            writer.add_images([during], feats(1, d=8, seed=4), "m1")  # a POST /gallery while the build runs
            erased, _ = writer.remove([crops[0].path])  # an erasure while the build runs
            assert erased == 1
            # The old version took both writes, and readers (the indexer's own handle too) still see it.
            want_old = (folder_paths - {crops[0].path.resolve()}) | {earlier.path, during.path}
            assert paths(writer) == want_old
            assert indexer.refresh() and paths(indexer) == want_old
            new.add_images(crops[3:], feats(3, d=16, seed=5), "m2")
        # The switch: exactly the folder. The upload made during the build is gone (so is the earlier one,
        # which was never in the folder), and the crop erased during the build is back.
        assert paths(indexer) == folder_paths and indexer.model_fingerprint == "m2" and indexer.ntotal == 6
        assert writer.refresh() and paths(writer) == folder_paths  # the writer follows the new version
        with pytest.raises(GalleryError, match="--reindex"):
            writer.add_images([during], feats(1, d=8, seed=4), "m1")  # the old model's writes are now refused
        writer.add_images([during], feats(1, d=16, seed=6), "m2")  # a write made after the switch stays
        assert indexer.refresh() and paths(indexer) == folder_paths | {during.path}
    finally:
        writer.close()
        indexer.close()


@pytest.mark.slow
def test_an_upload_from_another_process_during_a_reindex_is_lost_and_index_uploads_brings_it_back(
        tiny_ckpt: Path, market_dir: Path, tmp_path: Path) -> None:
    """Two processes: a `reid-search index` of the uploads folder runs while this one re-indexes."""
    from indexer.pipeline import index_folder
    from reid_search.app.cli import main
    from reid_search.extractors import load_extractor
    from reid_search.app.service import SearchCore, upload_name
    from reid_search.app.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    run = CliRunner()
    r = run.invoke(main, ["-q", "-w", str(ws.root), "index", str(market_dir / "bounding_box_test"),
                          "--model", str(tiny_ckpt), "--workers", "0"], catch_exceptions=False)
    assert r.exit_code == 0 and "indexed 8," in r.output, r.output
    tmp = write_crop(tmp_path / "upload.jpg", seed=4242)  # what `serve` stores for POST /gallery pid=42 camid=3
    upload = ws.uploads_dir / upload_name(hashlib.sha256(tmp.read_bytes()).hexdigest(), ".jpg", 42, 3)
    upload.parent.mkdir(parents=True)
    os.replace(tmp, upload)

    outputs: list[str] = []

    def write_from_another_process(n: int) -> None:
        if outputs:
            return
        out = subprocess.run([sys.executable, "-c", "from reid_search.app.cli import main; main()", "-q", "-w",
                              str(ws.root), "index", str(ws.uploads_dir), "--model", str(tiny_ckpt), "--workers", "0"],
                             capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
        outputs.append(out.stdout + out.stderr)
        assert out.returncode == 0, outputs[0]

    g = open_workspace_gallery(ws)
    try:
        report = index_folder(g, market_dir / "bounding_box_train", load_extractor(tiny_ckpt, device="cpu"),
                              num_workers=0, reindex=True, progress=write_from_another_process)
        assert "indexed 1," in outputs[0], outputs  # the other process did add it, to the old version
        assert report.indexed == 16
        assert report.dropped == 9 == g.replaced_count  # the 8 indexed first and the other process's upload
        assert paths(g) == {p.resolve() for p in (market_dir / "bounding_box_train").iterdir()}
    finally:
        g.close()
    assert upload.is_file()  # the rows are gone, the service's file is not (yet)

    r = run.invoke(main, ["-q", "-w", str(ws.root), "index", str(ws.uploads_dir), "--workers", "0"],
                   catch_exceptions=False)  # the remedy; the gallery's model is the default
    assert r.exit_code == 0 and "indexed 1," in r.output, r.output
    g = open_workspace_gallery(ws)
    try:
        got = [m for batch in g.iter_metadata() for m in batch if m.path == upload.resolve()]
        assert len(got) == 1 and (got[0].pid, got[0].camid) == (42, 3) and g.ntotal == 17
        old = time.time() - 3600
        os.utime(upload, (old, old))
        assert SearchCore.sweep_uploads(SimpleNamespace(uploads=ws.uploads_dir.resolve(), gallery=g)) == 0
        assert upload.is_file()  # a restarted `serve` keeps it now that a row names it
    finally:
        g.close()
