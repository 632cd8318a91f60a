from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from reid_search.data import (
    ImageRecord, list_images, load_market, parse_name, record_for, training_labels, has_identity_labels,
)
from reid_search.errors import DataError
from tests.helpers import shared_path, write_crop


@pytest.mark.parametrize(
    "name, expected",
    [
        ("0002_c1s1_000451_03.jpg", (2, 1, 1, 451)),
        ("1501_c6s4_001902_01.jpg", (1501, 6, 4, 1902)),
        ("-1_c3s2_011653_00.jpg", (-1, 3, 2, 11653)),
        ("0000_c5s1_000123_04.jpg", (0, 5, 1, 123)),
        ("0001_c2_f0046182.jpg", (1, 2, None, 46182)),  # DukeMTMC
    ],
)
def test_parse_market_names(name: str, expected: tuple) -> None:
    info = parse_name(name)
    assert info is not None
    assert (info.pid, info.camid, info.seq, info.frame) == expected


@pytest.mark.parametrize("name", ["frame_0001.jpg", "person.png", "c1s1_000451.jpg", "-2_c1s1_000001_00.jpg", "abc_c1s1_0_0.jpg"])
def test_unlabelled_names_are_none(name: str) -> None:
    assert parse_name(name) is None
    r = record_for(Path(name))
    assert (r.pid, r.camid) == (None, None)


def test_real_market_samples() -> None:
    folder = shared_path("data", "market1501-samples")
    records = list_images(folder)
    assert len(records) == 51
    assert has_identity_labels(records)
    assert {r.camid for r in records} <= set(range(1, 7))
    assert len({r.camid for r in records}) == 6
    assert len({r.pid for r in records}) == 49
    assert any(r.pid == 0 for r in records), "the samples include a 0000 distractor"
    assert not any(r.is_junk for r in records)
    for r in records:  # the name's fields, re-assembled, give the name back
        assert r.path.name.startswith(f"{r.pid:04d}_c{r.camid}s{r.seq}_{r.frame:06d}_")


def test_real_cuhk03_layout() -> None:
    ds = load_market(shared_path("data", "cuhk03-labeled"))
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (7239, 200, 738)
    assert ds.num_train_pids == 743
    assert len({r.pid for r in ds.query}) == 100
    assert {r.pid for r in ds.query} == {r.pid for r in ds.gallery}
    assert not ({r.pid for r in ds.train} & {r.pid for r in ds.query})
    assert {r.camid for r in ds.gallery} == {1, 2}


def test_list_images_sorted_recursive_and_unlabelled(tmp_path: Path) -> None:
    write_crop(tmp_path / "b" / "frame_2.jpg", 1)
    write_crop(tmp_path / "a.png", 2)
    write_crop(tmp_path / "b" / "0003_c2s1_000001_00.jpg", 3)
    (tmp_path / "notes.txt").write_text("not an image")
    recs = list_images(tmp_path)
    assert [r.path.relative_to(tmp_path).as_posix() for r in recs] == ["a.png", "b/0003_c2s1_000001_00.jpg", "b/frame_2.jpg"]
    assert [r.pid for r in recs] == [None, 3, None]
    assert not has_identity_labels(recs)


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        list_images(tmp_path / "missing")
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path)
    f = write_crop(tmp_path / "x.jpg", 0)
    with pytest.raises(DataError, match="is a file"):
        list_images(f)


def test_load_market_errors(tmp_path: Path, market_dir: Path) -> None:
    with pytest.raises(DataError, match="no bounding_box_train/"):
        load_market(market_dir / "query")
    write_crop(market_dir / "query" / "holiday.jpg", 5)
    with pytest.raises(DataError, match="lack Market names"):
        load_market(market_dir)
    import shutil

    shutil.rmtree(market_dir / "query")
    ds = load_market(market_dir, need_eval=False)
    assert (len(ds.train), len(ds.query)) == (16, 0)


def test_training_labels_drop_junk_and_relabel() -> None:
    recs = [ImageRecord(Path(f"{p}.jpg"), p, 1) for p in (7, -1, 3, 7, 12)]
    kept, labels, pid2label = training_labels(recs)
    assert [r.pid for r in kept] == [7, 3, 7, 12]
    assert labels == [1, 0, 1, 2]
    assert pid2label == {3: 0, 7: 1, 12: 2}
    assert Counter(labels)[1] == 2
