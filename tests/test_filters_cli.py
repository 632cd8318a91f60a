"""The gallery as a store, through the CLI: manifest, filtered query, retention, safe re-index,
the recorded model and a bad re-ranking cache. Checked against brute force over the files."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from reid_search.gallery import SearchFilter
from reid_search.app.cli import main
from reid_search.errors import ModelError
from reid_search.extract import extract_features
from reid_search.extractors import load_extractor
from reid_search.app.workspace import Workspace
from tests.helpers import one_line_error, write_crop

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)
N = 24


def run(ws: Path, *args: str, catch: bool = False) -> Result:
    return CliRunner().invoke(main, ["-q", "-w", str(ws), *args], catch_exceptions=catch)


def fields(i: int) -> tuple[int, datetime | None, str | None]:
    """camid, time, track of crop i (some without time or track)."""
    return 1 + i % 4, None if i % 5 == 4 else T0 + timedelta(hours=i), None if i % 6 == 5 else f"trk{i % 3}"


@pytest.fixture()
def cams(tmp_path: Path, tiny_ckpt: Path):
    """N crops with plain names under two folders, a CSV manifest, indexed with --model (not set_model)."""
    folder = tmp_path / "cams"
    rows = ["path,camid,time,track"]
    for i in range(N):
        rel = f"cam{1 + i % 4}/crop_{i:03d}.jpg"
        write_crop(folder / rel, 4000 + i)
        cam, t, track = fields(i)
        rows.append(f"{rel},{cam},{'' if t is None else t.isoformat().replace('+00:00', 'Z')},{track or ''}")
    manifest = tmp_path / "crops.csv"
    manifest.write_text("\n".join(rows) + "\n")
    ws = tmp_path / "ws"
    r = run(ws, "index", str(folder), "--model", str(tiny_ckpt), "--manifest", str(manifest), "--workers", "0")
    assert r.exit_code == 0, r.output
    paths = [folder / f"cam{1 + i % 4}/crop_{i:03d}.jpg" for i in range(N)]
    feats = extract_features(paths, load_extractor(tiny_ckpt, "cpu"), num_workers=0)[0]
    return ws, folder, paths, feats


def brute(paths: list[Path], feats: np.ndarray, q: np.ndarray, flt: SearchFilter | None, k: int) -> list[str]:
    d = np.maximum(2 - 2 * feats.astype(np.float64) @ q.astype(np.float64), 0)
    ok = [i for i in range(len(paths)) if flt is None or flt.allows(*fields(i))]
    return [str(paths[i]) for i in sorted(ok, key=lambda i: (d[i], i))[:k]]


@pytest.mark.slow
def test_query_filters_equal_brute_force(cams) -> None:
    ws, folder, paths, feats = cams
    q = paths[7]
    cases = [
        ((), SearchFilter()),
        (("--cameras", "1,3"), SearchFilter(cameras={1, 3})),
        (("--exclude-cameras", "2,4"), SearchFilter(exclude_cameras={2, 4})),
        (("--since", "2024-05-01T12:00:00Z", "--until", "2024-05-01T20:00"),
         SearchFilter(since=T0 + timedelta(hours=4), until=T0 + timedelta(hours=12))),
        (("--exclude-track", "trk0", "--exclude-track", "trk2"), SearchFilter(exclude_tracks={"trk0", "trk2"})),
        (("--cameras", "4", "--since", "2024-05-01T00:00:00+02:00"), SearchFilter(cameras={4}, since=T0 - timedelta(hours=10))),
    ]
    for n, (args, flt) in enumerate(cases):
        for k in ((3, 50) if n == 1 else (50,)):
            r = run(ws, "query", str(q), "--json", "--top-k", str(k), *args)
            assert r.exit_code == 0, r.output
            out = json.loads(r.output)
            assert [h["path"] for h in out["hits"]] == brute(paths, feats, feats[7], flt, k), args
            for h in out["hits"]:
                i = paths.index(Path(h["path"]))
                cam, t, track = fields(i)
                assert h["camid"] == cam and h["track"] == track
                assert h["time"] == (None if t is None else t.isoformat().replace("+00:00", "Z"))
    # the query's own camera (--camid) is dropped unless --keep-same-camera
    r = run(ws, "query", str(q), "--json", "--top-k", "50", "--camid", "4")
    assert [h["path"] for h in json.loads(r.output)["hits"]] == brute(paths, feats, feats[7], SearchFilter(exclude_cameras={4}), 50)
    r = run(ws, "query", str(q), "--json", "--top-k", "50", "--camid", "4", "--keep-same-camera", "--cameras", "4")
    hits = json.loads(r.output)["hits"]
    assert hits[0]["path"] == str(q) and len(hits) == N // 4
    # a selective filter still fills top_k from the rest, and re-ranking filters too
    r = run(ws, "query", str(q), "--json", "--top-k", "2", "--cameras", "2", "--exclude-track", "trk1", "--rerank")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)["hits"]
    assert len(got) == 2 and all(h["camid"] == 2 and h["track"] != "trk1" for h in got)
    # human output says when fewer crops pass than asked
    r = run(ws, "query", str(q), "--top-k", "50", "--cameras", "2", "--since", "2024-05-01T20:00:00Z")
    assert r.exit_code == 0 and "no more gallery crops pass the filter" in r.output


@pytest.mark.parametrize("args, needle", [
    (("--since", "yesterday"), "--since"),
    (("--until", "2024-13-01"), "ISO 8601"),
    (("--cameras", "1,two"), "--cameras"),
    (("--exclude-cameras", "99999999999"), "out of range"),
    (("--since", "2024-05-02", "--until", "2024-05-01"), "after"),
    (("--camid", "-5"), "--camid"),
    (("--exclude-track", ""), "--exclude-track"),
])
def test_bad_filters_are_one_line_errors(tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    img = write_crop(tmp_path / "q.jpg", 1)
    one_line_error(run(tmp_path / "ws", "query", str(img), *args), needle)


def test_remove_by_filter_with_dry_run(cams) -> None:
    ws, folder, paths, feats = cams
    from reid_search.app.session import open_workspace_gallery

    def left() -> set[str]:
        with open_workspace_gallery(Workspace(ws)) as g:
            return {str(m.path) for b in g.iter_metadata() for m in b}

    before = T0 + timedelta(hours=10)
    match = {str(p) for i, p in enumerate(paths) if fields(i)[1] is not None and fields(i)[1] < before}
    r = run(ws, "remove", "--before", "2024-05-01T18:00:00Z", "--dry-run")
    assert r.exit_code == 0, r.output
    assert f"would remove {len(match)} image(s)" in r.output and left() == {str(p) for p in paths}
    r = run(ws, "remove", "--before", "2024-05-01T18:00:00Z")
    assert r.exit_code == 0 and f"removed {len(match)} image(s)" in r.output, r.output
    assert left() == {str(p) for p in paths} - match
    assert all(p.is_file() for p in paths)  # the user's own files are never deleted
    # ANDed fields
    gone = {str(p) for i, p in enumerate(paths) if fields(i)[0] == 2 and fields(i)[2] == "trk1"} - match
    r = run(ws, "remove", "--camid", "2", "--track", "trk1")
    assert r.exit_code == 0 and f"removed {len(gone)} image(s)" in r.output, r.output
    assert left() == {str(p) for p in paths} - match - gone
    # the re-ranking cache follows
    with np.load(ws / "index" / "rerank.npz") as z:
        assert len(z["ids"]) == N - len(match) - len(gone)
    r = run(ws, "query", str(paths[0]), "--json", "--top-k", "50", "--keep-same-camera", "--rerank")
    assert {h["path"] for h in json.loads(r.output)["hits"]} == left()
    one_line_error(run(ws, "remove"), "--pid")
    one_line_error(run(ws, "remove", str(paths[0]), "--pid", "3"), "not both")
    one_line_error(run(ws, "remove", str(paths[0]), "--dry-run"), "--dry-run")
    one_line_error(run(ws, "remove", "--before", "last week"), "--before", "ISO 8601")
    one_line_error(run(ws, "remove", "--pid", str(2**40)), "out of range")


def test_reindex_keeps_the_gallery_when_nothing_can_be_indexed(cams, tmp_path: Path, tiny_ckpt: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 1: --reindex of an empty folder, of unreadable files or with a failing model loses nothing."""
    ws, folder, paths, feats = cams
    from reid_search.app.session import open_workspace_gallery

    def state() -> tuple[int, list[str]]:
        with open_workspace_gallery(Workspace(ws)) as g:
            return g.ntotal, sorted(str(m.path) for b in g.iter_metadata() for m in b)

    full = state()
    assert full[0] == N
    r_before = run(ws, "query", str(paths[3]), "--json", "--top-k", "5").output
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run(ws, "index", str(empty), "--model", str(tiny_ckpt), "--reindex"), "no images")
    assert state() == full
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"{i}.jpg").write_bytes(b"not a jpeg")
    r = run(ws, "index", str(junk), "--model", str(tiny_ckpt), "--reindex", "--workers", "0")
    assert r.exit_code == 1 and "nothing could be indexed" in r.output.splitlines()[-1], r.output
    assert state() == full

    from reid_search.torch_extractor import TorchExtractor

    def broken(self, batch):
        raise ModelError("this model cannot run here: pass another --model")

    other = write_crop(tmp_path / "other" / "a.jpg", 5)
    monkeypatch.setattr(TorchExtractor, "embed", broken)
    one_line_error(run(ws, "index", str(other.parent), "--model", str(tiny_ckpt), "--reindex", "--workers", "0"),
                   "cannot run")
    assert state() == full

    def crash(self, batch):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(TorchExtractor, "embed", crash)
    r = run(ws, "index", str(other.parent), "--model", str(tiny_ckpt), "--reindex", "--workers", "0", catch=True)
    assert r.exit_code != 0 and state() == full
    monkeypatch.undo()
    assert run(ws, "query", str(paths[3]), "--json", "--top-k", "5").output == r_before
    # a re-index that works replaces the gallery
    r = run(ws, "index", str(other.parent), "--model", str(tiny_ckpt), "--reindex", "--workers", "0")
    assert r.exit_code == 0 and "dropped 24" in r.output, r.output
    assert state() == (1, [str(other)])


def test_the_model_that_built_the_gallery_is_used(tmp_path: Path, tiny_ckpt: Path, market_dir: Path) -> None:
    """After `index --model X`, query, eval, embed (and serve) without --model use X."""
    ws = tmp_path / "ws"
    r = run(ws, "index", str(market_dir / "bounding_box_test"), "--model", str(tiny_ckpt), "--workers", "0")
    assert r.exit_code == 0, r.output
    assert Workspace(ws).gallery_model()[0] == tiny_ckpt.resolve()
    q = market_dir / "query" / "0005_c1s1_000000_00.jpg"
    r = run(ws, "query", str(q), "--json")
    assert r.exit_code == 0 and json.loads(r.output)["hits"], r.output
    r = run(ws, "eval", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["num_query"] == 3, r.output
    r = run(ws, "embed", str(q), "--json")
    assert r.exit_code == 0, r.output
    from reid_search.app.service import SearchCore

    core = SearchCore(Workspace(ws), device="cpu")
    try:
        assert core.model_file == tiny_ckpt.resolve()
    finally:
        core.close()
    # a model trained afterwards does not displace it for queries, only for --reindex
    Workspace(ws).set_model(tmp_path / "elsewhere.pt")
    assert Workspace(ws).model_path() == tiny_ckpt.resolve()
    assert Workspace(ws).gallery_model()[0] == tiny_ckpt.resolve()


@pytest.mark.parametrize("damage", ["truncate", "npy"])
def test_unreadable_rerank_cache_never_fails_a_command(tmp_path: Path, tiny_ckpt: Path, market_dir: Path,
                                                       damage: str) -> None:
    """Defect 5 through the CLI: query --rerank answers, index/remove exit 0 after committing."""
    ws = tmp_path / "ws"
    folder = market_dir / "bounding_box_test"
    assert run(ws, "index", str(folder), "--model", str(tiny_ckpt), "--workers", "0").exit_code == 0
    cache = ws / "index" / "rerank.npz"

    def spoil() -> None:
        if damage == "truncate":
            cache.write_bytes(cache.read_bytes()[:200])
        elif damage == "garbage":
            cache.write_bytes(b"PK\x03\x04" + b"\x00" * 50)
        else:
            np.save(cache.with_suffix(".tmp.npy"), np.arange(4))
            cache.with_suffix(".tmp.npy").replace(cache)

    q = market_dir / "query" / "0006_c1s1_000000_00.jpg"
    spoil()
    r = run(ws, "query", str(q), "--rerank", "--json", "--top-k", "3")
    assert r.exit_code == 0 and len(json.loads(r.output)["hits"]) == 3, r.output
    spoil()
    write_crop(folder / "0009_c3s1_000001_00.jpg", 77)
    r = run(ws, "index", str(folder), "--model", str(tiny_ckpt), "--workers", "0")
    assert r.exit_code == 0 and "indexed 1," in r.output, r.output
    spoil()
    r = run(ws, "remove", str(folder / "0009_c3s1_000001_00.jpg"))
    assert r.exit_code == 0 and "removed 1" in r.output, r.output
    with np.load(cache) as z:
        assert len(z["ids"]) == 8


@pytest.mark.slow
def test_query_on_a_read_only_workspace(tmp_path: Path, tiny_ckpt: Path, market_dir: Path) -> None:
    """Defect 6: reads need no lock; a read-only workspace answers `query` (and `query --rerank`
    with a spoilt cache it cannot rewrite). Needs a private read-only mount (root + unshare), else skips."""
    import shutil
    import subprocess
    import sys

    ws = tmp_path / "ws"
    assert run(ws, "index", str(market_dir / "bounding_box_test"), "--model", str(tiny_ckpt), "--workers", "0").exit_code == 0
    (ws / "index" / "rerank.npz").write_bytes(b"PK\x03\x04 spoilt")
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("no unshare/mount here")
    q = market_dir / "query" / "0005_c1s1_000000_00.jpg"
    cli = f"{sys.executable} -m reid_search -q -w {ws} query {q} --json --rerank"
    script = f"mount --bind {ws} {ws} && mount -o remount,ro,bind {ws} || exit 99; touch {ws}/probe 2>/dev/null && exit 98; {cli}"
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if r.returncode in (98, 99) or "unshare:" in r.stderr:
        pytest.skip(f"cannot make a read-only mount here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stdout + r.stderr
    hits = json.loads(r.stdout)["hits"]
    assert hits and all(h["camid"] != 1 for h in hits)
    assert "Traceback" not in r.stderr
