"""The synthetic Market-layout generator: layout, names, determinism, and that
identity is in the person (a simple colour feature finds it) while raw pixels
across cameras are far from a perfect match."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from reid_search import synthetic
from reid_search.synthetic import SyntheticSummary, generate

# The standard Market-1501 pattern (as the project's parser uses).
MARKET_RE = re.compile(r"([-\d]+)_c(\d)s(\d)_(\d+)_(\d+)")
FULL_NAME_RE = re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
FOLDERS = ("bounding_box_train", "bounding_box_test", "query")


def _parse(name: str) -> tuple[int, int]:
    m = MARKET_RE.search(name)
    assert m is not None, name
    return int(m.group(1)), int(m.group(2))


def _listing(root: Path) -> dict[str, list[Path]]:
    return {sub: sorted((root / sub).iterdir()) for sub in FOLDERS}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSummary, dict[str, list[Path]]]:
    root = tmp_path_factory.mktemp("small") / "market"
    summary = generate(root, ids=20, cameras=4, images_per_id=6, seed=3)
    return summary, _listing(root)


@pytest.fixture(scope="module")
def signal_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw-pixel and clothing-histogram features of every person image of 40 ids."""
    root = tmp_path_factory.mktemp("signal") / "market"
    generate(root, ids=40, cameras=4, images_per_id=6, seed=11)
    raws, hists, pids, cams = [], [], [], []
    for p in sorted(root.rglob("*.jpg")):
        pid, cam = _parse(p.name)
        if pid <= 0:
            continue
        im = Image.open(p).convert("RGB")
        raws.append(np.asarray(im.resize((16, 32), Image.BILINEAR), np.float32).ravel() / 255)
        # Colour histogram (8 bins per channel, Hellinger) of the central body
        # region, where the clothes are.
        a = np.asarray(im, np.uint8)[19:115, 16:48] // 32
        h = np.bincount((a[..., 0].astype(int) * 64 + a[..., 1] * 8 + a[..., 2]).ravel(), minlength=512)
        hists.append(np.sqrt(h / h.sum()))
        pids.append(pid)
        cams.append(cam)
    return np.stack(raws), np.stack(hists), np.array(pids), np.array(cams)


def _cross_camera(feats: np.ndarray, pids: np.ndarray, cams: np.ndarray) -> tuple[float, float, float]:
    """Rank-1 of nearest neighbour among other cameras' images, and the mean
    same-id and different-id distances across cameras."""
    sq = (feats**2).sum(1)
    d = sq[:, None] + sq[None, :] - 2 * feats @ feats.T
    other_cam = cams[:, None] != cams[None, :]
    same = pids[:, None] == pids[None, :]
    rank1 = float((pids[np.where(other_cam, d, np.inf).argmin(1)] == pids).mean())
    return rank1, float(d[other_cam & same].mean()), float(d[other_cam & ~same].mean())


# ---------------------------------------------------------------- layout


def test_layout_and_counts(small):
    summary, files = small
    assert summary.num_ids == 20 and summary.cameras == 4 and summary.seed == 3
    assert summary.num_train_ids == 10 and summary.num_test_ids == 10
    assert sorted(p.name for p in summary.root.iterdir()) == sorted(FOLDERS)
    assert len(files["bounding_box_train"]) == summary.train_images == 10 * 6
    assert len(files["query"]) == summary.query_images
    assert len(files["bounding_box_test"]) == summary.gallery_images
    assert summary.query_images + summary.gallery_images == 10 * 6 + summary.distractor_images + summary.junk_images
    assert summary.total_images == sum(len(v) for v in files.values())
    gallery_pids = [_parse(p.name)[0] for p in files["bounding_box_test"]]
    assert gallery_pids.count(0) == summary.distractor_images >= 2
    assert gallery_pids.count(-1) == summary.junk_images >= 2
    # Built beside `out` and renamed: nothing else left in the parent.
    assert [p.name for p in summary.root.parent.iterdir()] == [summary.root.name]


def test_names_follow_market(small):
    summary, files = small
    names = [p.name for sub in FOLDERS for p in files[sub]]
    assert len(set(names)) == len(names)
    for name in names:
        m = FULL_NAME_RE.match(name)
        assert m is not None, name
        assert MARKET_RE.search(name).groups() == m.groups()  # type: ignore[union-attr]
        assert 1 <= int(m.group(2)) <= summary.cameras
        assert 1 <= int(m.group(3)) <= 6
    assert any(n.startswith("-1_c") for n in names) and any(n.startswith("0000_c") for n in names)


def test_images_are_64x128_rgb_jpeg(small):
    _, files = small
    for sub in FOLDERS:
        for p in files[sub]:
            with Image.open(p) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 128)), p.name
                assert np.asarray(im).std() > 5  # not blank


def test_train_and_test_ids_are_disjoint(small):
    summary, files = small
    train = {_parse(p.name)[0] for p in files["bounding_box_train"]}
    query = {_parse(p.name)[0] for p in files["query"]}
    gallery = {_parse(p.name)[0] for p in files["bounding_box_test"]}
    assert train == set(range(1, 11))
    assert query == set(range(11, 21))
    assert gallery - {0, -1} == query
    assert not train & (query | gallery)


def test_each_identity_in_at_least_two_cameras(small):
    _, files = small
    cams = defaultdict(set)
    for sub in FOLDERS:
        for p in files[sub]:
            pid, cam = _parse(p.name)
            cams[pid].add(cam)
    assert all(len(cams[pid]) >= 2 for pid in range(1, 21))


def test_every_query_has_a_cross_camera_gallery_match(small):
    _, files = small
    gallery = {_parse(p.name) for p in files["bounding_box_test"]}
    per_id_cam = defaultdict(int)
    for p in files["query"]:
        pid, cam = _parse(p.name)
        per_id_cam[pid, cam] += 1
        assert any(gp == pid and gc != cam for gp, gc in gallery), p.name
    assert max(per_id_cam.values()) == 1  # at most one query per (id, camera)


# ---------------------------------------------------------------- determinism


def _bytes(root: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = _bytes(generate(tmp_path / "a", ids=6, cameras=3, images_per_id=4, seed=5).root)
    b = _bytes(generate(tmp_path / "b", ids=6, cameras=3, images_per_id=4, seed=5).root)
    c = _bytes(generate(tmp_path / "c", ids=6, cameras=3, images_per_id=4, seed=6).root)
    assert a == b
    assert len(a) == len(c)
    assert set(a.values()).isdisjoint(c.values())


def test_an_identity_does_not_depend_on_the_other_identities(tmp_path):
    # Per-image seeds: pid 1's files are the same whether 4 or 10 ids are made.
    few = _bytes(generate(tmp_path / "few", ids=4, cameras=3, images_per_id=4, seed=2).root)
    many = _bytes(generate(tmp_path / "many", ids=10, cameras=3, images_per_id=4, seed=2).root)
    pid1 = {k: v for k, v in few.items() if k.startswith("bounding_box_train/0001_")}
    assert len(pid1) == 4
    assert all(many[k] == v for k, v in pid1.items())


# ---------------------------------------------------------------- signal


def test_identity_is_in_the_clothing_colours(signal_set):
    _, hists, pids, cams = signal_set
    rank1, same, different = _cross_camera(hists, pids, cams)
    # Measured over seeds 0-11 (40 ids, 4 cameras, 6 images): rank-1 0.26-0.51,
    # same/different distance ratio 0.72-0.84. Chance rank-1 is 1/40.
    assert same < 0.92 * different
    assert rank1 > 0.15
    # Control: with the identities shuffled the same feature finds nothing.
    shuffled = np.random.default_rng(0).permutation(pids)
    rank1_shuffled, same_s, different_s = _cross_camera(hists, shuffled, cams)
    assert rank1_shuffled < 0.1 and same_s > 0.95 * different_s


def test_raw_pixels_are_far_from_perfect_across_cameras(signal_set):
    raws, _, pids, cams = signal_set
    rank1, _, _ = _cross_camera(raws, pids, cams)
    # Measured over seeds 0-11 (40 ids, 4 cameras, 6 images): 0.18-0.38.
    assert rank1 < 0.6


# ---------------------------------------------------------------- plan (pure)


@settings(max_examples=60, deadline=None)
@given(
    ids=st.integers(2, 12),
    cameras=st.integers(2, 9),
    images_per_id=st.integers(2, 12),
    train_fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**32),
)
def test_plan_invariants(ids, cameras, images_per_id, train_fraction, seed):
    n_train = min(ids - 1, max(1, round(ids * train_fraction)))
    items = synthetic._plan(
        ids=ids, cameras=cameras, images_per_id=images_per_id, seed=seed, n_train=n_train, distractors=3, junk=2
    )
    names = [it.name for it in items]
    assert len(set(names)) == len(names)
    assert all(MARKET_RE.fullmatch(n[:-4]) for n in names)
    by_pid = defaultdict(list)
    for it in items:
        by_pid[it.pid].append(it)
    assert sorted(by_pid) == [-1, 0, *range(1, ids + 1)]
    assert len(by_pid[0]) == 3 and len(by_pid[-1]) == 2
    for pid in range(1, ids + 1):
        mine = by_pid[pid]
        assert len(mine) == images_per_id
        assert len({it.cam for it in mine}) >= 2
        assert all(1 <= it.cam <= cameras for it in mine)
        folders = {it.folder for it in mine}
        if pid <= n_train:
            assert folders == {"bounding_box_train"}
            continue
        queries = [it for it in mine if it.folder == "query"]
        gallery = [it for it in mine if it.folder == "bounding_box_test"]
        assert queries and gallery
        assert len({it.cam for it in queries}) == len(queries)
        for q in queries:
            assert any(g.cam != q.cam for g in gallery)


# ---------------------------------------------------------------- API


def test_smallest_dataset_is_valid(tmp_path):
    summary = generate(tmp_path / "tiny", ids=2, cameras=2, images_per_id=2, seed=0)
    files = _listing(summary.root)
    assert summary.num_train_ids == summary.num_test_ids == 1
    (query,) = files["query"]
    pid, cam = _parse(query.name)
    assert any(_parse(p.name) == (pid, 3 - cam) for p in files["bounding_box_test"])


def test_empty_existing_folder_is_accepted_and_progress_reported(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    calls: list[tuple[int, int]] = []
    summary = generate(
        out, ids=3, cameras=2, images_per_id=3, distractors=1, junk=0, progress=lambda d, t: calls.append((d, t))
    )
    total = summary.total_images
    assert calls == [(i, total) for i in range(1, total + 1)]
    assert summary.distractor_images == 1 and summary.junk_images == 0
    assert sum(len(v) for v in _listing(out).values()) == total


def test_summary_is_frozen(small):
    summary, _ = small
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.num_ids = 3  # type: ignore[misc]


def test_failure_leaves_nothing_behind(tmp_path):
    def boom(done: int, total: int) -> None:
        if done == 5:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        generate(tmp_path / "out", ids=4, cameras=2, images_per_id=3, progress=boom)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ids": 1}, "ids must be at least 2"),
        ({"ids": 10_000}, "ids must be at most 9999"),
        ({"cameras": 1}, "cameras must be between 2 and 9"),
        ({"cameras": 10}, "cameras must be between 2 and 9"),
        ({"images_per_id": 1}, "images_per_id must be between 2"),
        ({"train_fraction": 1.0}, "train_fraction"),
        ({"seed": -1}, "seed must be non-negative"),
        ({"distractors": -1}, "distractors must be between 0 and"),
        ({"junk": 40_000}, "junk must be between 0 and"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_non_empty_or_file_out_is_refused(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty: choose an empty or new folder"):
        generate(full, ids=2)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "file.jpg"
    a_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a folder"):
        generate(a_file, ids=2)
