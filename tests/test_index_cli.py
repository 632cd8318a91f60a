"""`reid-search index / remove` end to end through CliRunner, and every kind of bad input."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from reid_search.app.cli._common import main
from reid_search.app.cli.index import db, index, remove
from reid_search.app.workspace import Workspace
from tests.helpers import faiss_index, open_ws, shared_path, write_crop
from tests.helpers import one_line_error as helpers_one_line_error

# The lead registers these in reid_search/app/cli/__init__.py; doing it here too is harmless.
for _cmd in (index, remove, db):
    main.add_command(_cmd)


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def index_cmd(ws: Path, folder: Path, ckpt: Path, *extra: str) -> Result:
    return run("-q", "-w", str(ws), "index", str(folder), "--model", str(ckpt), "--workers", "0", *extra)


def one_line_error(result: Result, *needles: str) -> None:
    """Exit 1 with the error on one line (after any per-file warnings logged during the run)."""
    helpers_one_line_error(result, *needles, after="skipped ")


def summary(result: Result) -> str:
    """The summary line (bad files are also logged as warnings while the run goes)."""
    lines = [ln for ln in result.output.splitlines() if ln.startswith(("indexed ", "dropped "))]
    assert len(lines) == 1, result.output
    return lines[0]


def gallery(ws: Path):
    return open_ws(Workspace(ws))


# ---- the happy path ---------------------------------------------------------


def test_index_market_folder_then_rerun_is_unchanged(tiny_ckpt: Path, market_dir: Path, tmp_path: Path) -> None:
    ws, folder = tmp_path / "ws", market_dir / "bounding_box_test"
    r = index_cmd(ws, folder, tiny_ckpt)
    assert r.exit_code == 0, r.output
    assert summary(r).startswith("indexed 8, replaced 0, unchanged 0, removed 0, skipped 0")
    assert "gallery: 8 images, flat index, dim 512" in r.output
    r = index_cmd(ws, folder, tiny_ckpt)
    assert summary(r).startswith("indexed 0, replaced 0, unchanged 8, removed 0, skipped 0"), r.output
    g = gallery(ws)
    assert g.ntotal == 8 and len(g.ids()) == 8
    ids, x = g.all_vectors()
    sims, got = g.search(x, 1)
    np.testing.assert_array_equal(got[:, 0], ids)  # every image finds itself first
    metas = g.metadata(ids)
    assert sorted({m.pid for m in metas}) == [-1, 0, 5, 6, 7]
    assert all(m.path.is_file() and m.root == folder.resolve() for m in metas)


def test_index_uses_the_workspace_model(tiny_ckpt: Path, market_dir: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    Workspace(ws).set_model(tiny_ckpt)
    r = run("-q", "-w", str(ws), "index", str(market_dir / "query"), "--workers", "0")
    assert r.exit_code == 0 and summary(r).startswith("indexed 3,"), r.output
    one_line_error(run("-w", str(tmp_path / "empty_ws"), "index", str(market_dir / "query")),
                   "no model in workspace", "--model")


def test_changed_file_is_replaced_and_prune_removes_deleted(tiny_ckpt: Path, market_dir: Path, tmp_path: Path) -> None:
    ws, folder = tmp_path / "ws", market_dir / "bounding_box_test"
    index_cmd(ws, folder, tiny_ckpt)
    changed = folder / "0005_c2s1_000001_00.jpg"
    old_id = next(m.id for batch in gallery(ws).iter_metadata() for m in batch if m.path.name == changed.name)
    write_crop(changed, seed=12345)  # new content, same name
    (folder / "0006_c2s1_000001_00.jpg").unlink()
    r = index_cmd(ws, folder, tiny_ckpt)
    assert summary(r).startswith("indexed 0, replaced 1, unchanged 6, removed 0"), r.output
    g = gallery(ws)
    assert g.ntotal == 8 and old_id not in g.ids()  # the deleted file is still there without --prune
    r = index_cmd(ws, folder, tiny_ckpt, "--prune")
    assert summary(r).startswith("indexed 0, replaced 0, unchanged 7, removed 1"), r.output
    g = gallery(ws)
    assert g.ntotal == 7 and faiss_index(g).ntotal == 7
    assert "0006_c2s1_000001_00.jpg" not in {m.path.name for b in g.iter_metadata() for m in b}


def test_new_files_are_added_incrementally(tiny_ckpt: Path, market_dir: Path, tmp_path: Path) -> None:
    ws, folder = tmp_path / "ws", market_dir / "bounding_box_test"
    index_cmd(ws, folder, tiny_ckpt)
    write_crop(folder / "sub" / "0009_c1s1_000001_00.jpg", seed=77)  # recursive
    r = index_cmd(ws, folder, tiny_ckpt)
    assert summary(r).startswith("indexed 1, replaced 0, unchanged 8"), r.output
    rel = {m.rel_path for b in gallery(ws).iter_metadata() for m in b}
    assert "sub/0009_c1s1_000001_00.jpg" in rel
    # a second root, then its parent: the roots merge and nothing is re-embedded
    r = index_cmd(ws, market_dir / "query", tiny_ckpt)
    assert summary(r).startswith("indexed 3,")
    r = index_cmd(ws, market_dir, tiny_ckpt)
    assert summary(r).startswith("indexed 16, replaced 0, unchanged 12"), r.output  # only the train split is new
    assert gallery(ws).roots() == [market_dir.resolve()]


def test_remove_command(tiny_ckpt: Path, market_dir: Path, tmp_path: Path) -> None:
    ws, folder = tmp_path / "ws", market_dir / "bounding_box_test"
    index_cmd(ws, folder, tiny_ckpt)
    r = run("-w", str(ws), "remove", str(folder / "0005_c2s1_000001_00.jpg"), str(folder / "nope.jpg"))
    assert r.exit_code == 0 and "removed 1 image(s)" in r.output and "not in the gallery" in r.output, r.output
    assert gallery(ws).ntotal == 7
    one_line_error(run("-w", str(ws), "remove", str(tmp_path / "other.jpg")), "nothing in the gallery matches")
    r = run("-w", str(ws), "remove", str(folder))
    assert "removed 7 image(s)" in r.output
    g = gallery(ws)
    assert g.ntotal == 0 and g.roots() == []


def test_other_model_is_refused_until_reindex(tiny_ckpt: Path, market_dir: Path, tmp_path: Path) -> None:
    import torch

    from reid_search.checkpoint import save_checkpoint
    from reid_search.model import build_model
    from tests.helpers import TINY_PRE

    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_checkpoint(other, build_model("resnet18"), TINY_PRE)
    ws, folder = tmp_path / "ws", market_dir / "bounding_box_test"
    index_cmd(ws, folder, tiny_ckpt)
    one_line_error(index_cmd(ws, folder, other), "was indexed with model", "--reindex", "--workspace")
    r = index_cmd(ws, folder, other, "--reindex")
    assert r.exit_code == 0 and summary(r).startswith("dropped 8 (re-index), indexed 8,"), r.output
    from reid_search.extractors import load_extractor

    assert gallery(ws).model_fingerprint == load_extractor(other, device="cpu").fingerprint


def test_index_type_option(tiny_ckpt: Path, market_dir: Path, tmp_path: Path) -> None:
    ws, folder = tmp_path / "ws", market_dir / "bounding_box_test"
    r = index_cmd(ws, folder, tiny_ckpt, "--index-type", "ivfpq", "--index-param", "nprobe=8")
    assert r.exit_code == 0 and "ivfpq (nprobe=8) index (exact until trained)" in r.output, r.output
    r = index_cmd(ws, folder, tiny_ckpt, "--index-type", "hnsw")
    assert "unchanged 8" in r.output and "hnsw index" in r.output
    assert gallery(ws).spec.kind == "hnsw"
    one_line_error(index_cmd(ws, folder, tiny_ckpt, "--index-param", "nlist=4"), "hnsw takes KEY=VALUE")
    r = index_cmd(ws, folder, tiny_ckpt, "--index-type", "ivfsq8")  # a Milvus-only type (on Milvus: test_milvus_store.py)
    msg = r.output.strip().splitlines()[-1]
    assert r.exit_code == 1 and msg.startswith("Error: --index-type ivfsq8 is a Milvus index; the FAISS store"), r.output
    assert gallery(ws).spec.kind == "hnsw"  # refused before anything changed


@pytest.mark.parametrize("cmd", [["index"], ["remove"], ["db"], ["db", "upgrade"]])
def test_help_has_example(cmd: list[str]) -> None:
    r = run(*cmd, "--help")
    assert r.exit_code == 0 and ("Example:" in r.output or "Examples:" in r.output)


# ---- odd files: one folder holding every kind, one run ----------------------------------------------
# (load_image itself is unit-tested per case in tests/test_extract.py)


def jpeg_bytes(seed: int = 3) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 255, (128, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


# name -> the reason it is skipped with
SKIPPED = {
    "0011_c1s1_000001_00.jpg": "corrupt",  # truncated
    "0012_c1s1_000001_00.jpg": "corrupt",  # zeros in the middle of the data
    "0013_c1s1_000001_00.jpg": "empty",  # zero bytes
    "0014_c1s1_000001_00.jpg": "not-an-image",  # text in a .jpg
    "0015_c1s1_000001_00.png": "too-large",  # the decompression-bomb guard
    "0016_c1s1_000001_00.jpg": "unreadable",  # no permission
    "0017_c1s1_000001_00.jpg": "missing",  # a broken symlink
}


def test_odd_files_are_skipped_with_their_reason_or_indexed(tiny_ckpt: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    gal = tmp_path / "gal"
    write_crop(gal / "0001_c1s1_000001_00.jpg", seed=1)  # a plain crop
    # indexed: other pixel formats, a symlink to a crop elsewhere, a name without labels
    write_crop(gal / "0002_c1s1_000001_00.png", seed=2, mode="RGBA")
    write_crop(gal / "0003_c1s1_000001_00.jpg", seed=3, mode="L")
    write_crop(gal / "0004_c1s1_000001_00.jpg", seed=4, mode="CMYK")
    assert Image.open(gal / "0003_c1s1_000001_00.jpg").mode == "L"
    assert Image.open(gal / "0004_c1s1_000001_00.jpg").mode == "CMYK"
    os.symlink(write_crop(tmp_path / "elsewhere" / "x.jpg", seed=5), gal / "0005_c1s1_000001_00.jpg")
    write_crop(gal / "snapshot from door camera.jpg", seed=6)
    # skipped
    data = jpeg_bytes()
    (gal / "0011_c1s1_000001_00.jpg").write_bytes(data[: len(data) // 2])
    (gal / "0012_c1s1_000001_00.jpg").write_bytes(data[:600] + bytes(500) + data[1100:])
    (gal / "0013_c1s1_000001_00.jpg").write_bytes(b"")
    (gal / "0014_c1s1_000001_00.jpg").write_text("<html>not a picture</html>")
    (gal / "notes.txt").write_text("not even looked at")  # not an image extension: not listed at all
    Image.new("1", (8000, 6000)).save(gal / "0015_c1s1_000001_00.png")  # 48 MP, a few KB on disk
    bad = gal / "0016_c1s1_000001_00.jpg"
    bad.write_bytes(jpeg_bytes())
    os.symlink(tmp_path / "gone.jpg", gal / "0017_c1s1_000001_00.jpg")
    if os.geteuid() == 0:  # root reads anything: make the read itself fail as it would for a user
        import indexer.pipeline as pipeline

        real = pipeline.sha256_file

        def deny(path, *a, **kw):  # type: ignore[no-untyped-def]
            if Path(path) == bad:
                raise PermissionError(13, "Permission denied")
            return real(path, *a, **kw)

        monkeypatch.setattr(pipeline, "sha256_file", deny)
    else:
        bad.chmod(0)
    try:
        r = index_cmd(tmp_path / "ws", gal, tiny_ckpt)
    finally:
        bad.chmod(0o644)
    assert r.exit_code == 0, r.output
    assert summary(r).startswith("indexed 6, replaced 0, unchanged 0, removed 0, skipped 7 (corrupt 2, empty 1, "
                                 "missing 1, not-an-image 1, too-large 1, unreadable 1)"), r.output
    for name, reason in SKIPPED.items():
        assert f"skipped {gal / name}: {reason}:" in r.output, (name, r.output)
    g = gallery(tmp_path / "ws")
    metas = {m.path.name: m for b in g.iter_metadata() for m in b}
    assert set(metas) == {"0001_c1s1_000001_00.jpg", "0002_c1s1_000001_00.png", "0003_c1s1_000001_00.jpg",
                          "0004_c1s1_000001_00.jpg", "0005_c1s1_000001_00.jpg", "snapshot from door camera.jpg"}
    assert g.ntotal == 6
    assert metas["0002_c1s1_000001_00.png"].pid == 2
    link = metas["0005_c1s1_000001_00.jpg"]  # under its own name, not its target's
    assert link.path == gal.resolve() / "0005_c1s1_000001_00.jpg" and link.pid == 5
    odd = metas["snapshot from door camera.jpg"]
    assert odd.pid is None and odd.camid is None and odd.frame is None
    assert sorted(g.labels()[1].tolist()) == [-2, 1, 2, 3, 4, 5]


def test_nothing_indexable_is_a_one_line_error(tiny_ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    (folder / "b.jpg").write_text("text")
    r = index_cmd(tmp_path / "ws", folder, tiny_ckpt)
    one_line_error(r, "nothing could be indexed", "skipped 2 (empty 1, not-an-image 1)", "a.jpg: zero-byte file")
    (folder / "a.jpg").unlink()
    (folder / "b.jpg").unlink()
    one_line_error(index_cmd(tmp_path / "ws", folder, tiny_ckpt), "no images in")
    one_line_error(index_cmd(tmp_path / "ws", tmp_path / "nope", tiny_ckpt), "no such folder")


@pytest.mark.slow
def test_cuhk03_gallery_gives_738_rows_and_vectors(tiny_ckpt: Path, tmp_path: Path) -> None:
    folder = shared_path("data", "cuhk03-labeled", "bounding_box_test")
    ws = tmp_path / "ws"
    r = run("-q", "-w", str(ws), "index", str(folder), "--model", str(tiny_ckpt))
    assert r.exit_code == 0 and summary(r).startswith("indexed 738, replaced 0, unchanged 0, removed 0, skipped 0"), r.output
    g = gallery(ws)
    assert g.ntotal == 738 and faiss_index(g).ntotal == 738 and len(g.ids()) == 738
    r = run("-q", "-w", str(ws), "index", str(folder), "--model", str(tiny_ckpt))
    assert summary(r).startswith("indexed 0, replaced 0, unchanged 738"), r.output
