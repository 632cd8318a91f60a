"""Query and eval end to end through the CLI, checked against brute force."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from reid_search.app.cli import main
from reid_search.data import list_images
from reid_search.extract import extract_features
from reid_search.extractors import load_extractor
from reid_search.metrics import evaluate
from reid_search.online_rerank import GalleryRerank
from reid_search.rerank import k_reciprocal
from tests.helpers import write_crop


def run(ws: Path, *args: str):
    return CliRunner().invoke(main, ["-q", "-w", str(ws), *args], catch_exceptions=False)


@pytest.fixture()
def indexed(tmp_path: Path, tiny_ckpt: Path, market_dir: Path):
    ws = tmp_path / "ws"
    # 2 more cameras so the camera filter has something to drop
    for k, cam in enumerate((1, 1, 3)):
        write_crop(market_dir / "bounding_box_test" / f"0005_c{cam}s1_{100 + k:06d}_00.jpg", 500 + k)
    r = run(ws, "index", str(market_dir / "bounding_box_test"), "--model", str(tiny_ckpt))
    assert r.exit_code == 0, r.output
    from reid_search.app.workspace import Workspace

    Workspace(ws).set_model(tiny_ckpt)
    return ws, market_dir


def brute(tiny_ckpt: Path, folder: Path):
    recs = list_images(folder)
    feats, kept, _ = extract_features([r.path for r in recs], load_extractor(tiny_ckpt, "cpu"))
    return [recs[i] for i in kept], feats


def test_query_drops_own_camera_and_matches_brute_force(indexed, tiny_ckpt: Path) -> None:
    ws, root = indexed
    q = root / "query" / "0005_c1s1_000000_00.jpg"
    r = run(ws, "query", str(q), "--top-k", "20", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["camid"] == 1 and out["query"] == str(q)
    hits = out["hits"]
    assert hits and all(h["camid"] != 1 for h in hits)
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    g, gf = brute(tiny_ckpt, root / "bounding_box_test")
    qf = brute(tiny_ckpt, root / "query")[1][[i for i, x in enumerate(list_images(root / "query")) if x.path == q][0]]
    d = np.maximum(2 - 2 * gf @ qf, 0)
    keep = [i for i, rec in enumerate(g) if rec.camid != 1]
    order = sorted(keep, key=lambda i: (d[i], str(g[i].path)))
    assert [h["path"] for h in hits] == [str(g[i].path) for i in order]
    np.testing.assert_allclose([h["distance"] for h in hits], d[order], atol=1e-4)
    # --camid overrides the name; no camid → no filter
    r = run(ws, "query", str(q), "--camid", "2", "--json", "--top-k", "20")
    assert all(h["camid"] != 2 for h in json.loads(r.output)["hits"])
    plain = write_crop(root.parent / "frame.jpg", 5)
    r = run(ws, "query", str(plain), "--json", "--top-k", "20")
    assert len(json.loads(r.output)["hits"]) == len(g)


def test_query_rerank_uses_cached_gallery_structures(indexed, tiny_ckpt: Path) -> None:
    ws, root = indexed
    q = root / "query" / "0006_c1s1_000000_00.jpg"
    r = run(ws, "query", str(q), "--rerank", "--json", "--top-k", "5")
    assert r.exit_code == 0, r.output
    hits = json.loads(r.output)["hits"]
    assert (ws / "index" / "rerank.npz").is_file()
    g, gf = brute(tiny_ckpt, root / "bounding_box_test")
    qf = extract_features([q], load_extractor(tiny_ckpt, "cpu"))[0][0]
    d = GalleryRerank.build(gf).distances(qf)
    keep = [i for i, rec in enumerate(g) if rec.camid != 1]
    order = sorted(keep, key=lambda i: d[i])[:5]
    assert [h["path"] for h in hits] == [str(g[i].path) for i in order]
    np.testing.assert_allclose([h["distance"] for h in hits], d[order], atol=1e-4)


def test_eval_matches_metrics_on_brute_force_features(indexed, tiny_ckpt: Path) -> None:
    ws, root = indexed
    g, gf = brute(tiny_ckpt, root / "bounding_box_test")
    q, qf = brute(tiny_ckpt, root / "query")
    args = (np.array([x.pid for x in q]), np.array([x.pid for x in g]),
            np.array([x.camid for x in q]), np.array([x.camid for x in g]))
    for extra, distmat in (((), np.maximum(2 - 2 * qf @ gf.T, 0)), (("--rerank",), k_reciprocal(qf, gf))):
        r = run(ws, "eval", "--json", *extra)
        assert r.exit_code == 0, r.output
        got = json.loads(r.output)
        ref = evaluate(distmat, *args)
        assert got["num_query"] == 3 and got["num_gallery"] == len(g) and got["rerank"] == bool(extra)
        assert got["rank1"] == pytest.approx(ref["cmc"][0], abs=1e-6)
        assert got["mAP"] == pytest.approx(ref["mAP"], abs=1e-5)
        assert got["mINP"] == pytest.approx(ref["mINP"], abs=1e-5)
    r = run(ws, "eval")
    assert "mAP" in r.output and "Rank-1" in r.output


def test_show_writes_a_picture(indexed, tmp_path: Path) -> None:
    ws, root = indexed
    out = tmp_path / "rank.png"
    r = run(ws, "query", str(root / "query" / "0007_c1s1_000000_00.jpg"), "--top-k", "3", "--show", str(out))
    assert r.exit_code == 0, r.output
    img = Image.open(out)
    assert img.width > 4 * 64 and img.height >= 128
    # the query's own frame is dark, the hits' frames green (same pid) or red (other)
    colours = {img.getpixel((x, 7)) for x in range(img.width)}
    assert (30, 170, 60) in colours or (210, 40, 40) in colours


def test_search_errors_are_one_line(tmp_path: Path, tiny_ckpt: Path, market_dir: Path) -> None:
    ws = tmp_path / "empty-ws"
    q = market_dir / "query" / "0005_c1s1_000000_00.jpg"
    r = run(ws, "query", str(q), "--model", str(tiny_ckpt))
    assert r.exit_code == 1 and "reid-search index" in r.output and "Traceback" not in r.output
    r = run(ws, "query", str(tmp_path / "nope.jpg"))
    assert r.exit_code == 1 and "no such image" in r.output
    # a gallery of unlabelled crops can be queried but not evaluated
    cams = tmp_path / "cams"
    for i in range(4):
        write_crop(cams / f"frame_{i}.jpg", i)
    assert run(ws, "index", str(cams), "--model", str(tiny_ckpt)).exit_code == 0
    r = run(ws, "eval", "--query", str(market_dir / "query"), "--model", str(tiny_ckpt))
    assert r.exit_code == 1 and "labelled gallery" in r.output


def test_query_with_another_model_is_refused(indexed, tmp_path: Path) -> None:
    import torch

    from reid_search.checkpoint import save_checkpoint
    from reid_search.model import build_model
    from tests.helpers import TINY_PRE

    torch.manual_seed(7)
    other = tmp_path / "other.pt"
    save_checkpoint(other, build_model("resnet18"), TINY_PRE)
    ws, root = indexed
    r = run(ws, "query", str(root / "query" / "0005_c1s1_000000_00.jpg"), "--model", str(other))
    assert r.exit_code == 1 and "--reindex" in r.output


def test_index_and_remove_keep_the_rerank_cache_current(indexed) -> None:
    import numpy as np

    ws, root = indexed
    cache = ws / "index" / "rerank.npz"
    assert cache.is_file(), "index builds the re-ranking structures"
    before = np.load(cache)["ids"].copy()
    victim = sorted((root / "bounding_box_test").iterdir())[0]
    assert run(ws, "remove", str(victim)).exit_code == 0
    after = np.load(cache)["ids"]
    assert len(after) == len(before) - 1


def test_a_gallery_indexed_with_flip_is_queried_with_flip(tmp_path: Path, tiny_ckpt: Path, market_dir: Path) -> None:
    """Flip TTA enters the fingerprint, so `query` and `eval` use it when the gallery was indexed with it."""
    ws = tmp_path / "ws"
    r = run(ws, "index", str(market_dir / "bounding_box_test"), "--model", str(tiny_ckpt), "--flip")
    assert r.exit_code == 0, r.output
    q = sorted((market_dir / "query").iterdir())[0]
    r = run(ws, "query", str(q), "--top-k", "5", "--json")
    assert r.exit_code == 0, r.output
    hits = json.loads(r.output)["hits"]
    flipped = load_extractor(tiny_ckpt, "cpu", flip=True)
    recs = list_images(market_dir / "bounding_box_test")
    gf = extract_features([x.path for x in recs], flipped)[0]
    qf = extract_features([q], flipped)[0][0]
    qcam = next(x.camid for x in list_images(market_dir / "query") if x.path == q)
    d = np.maximum(2 - 2 * gf @ qf, 0)
    keep = [i for i, x in enumerate(recs) if x.camid != qcam]
    want = [keep[i] for i in np.argsort(d[keep], kind="stable")[:5]]
    assert [Path(h["path"]).name for h in hits] == [recs[i].path.name for i in want]
    np.testing.assert_allclose([h["distance"] for h in hits], d[want], atol=1e-4)
    r = run(ws, "eval", "--query", str(market_dir / "query"), "--json")
    assert r.exit_code == 0, r.output
