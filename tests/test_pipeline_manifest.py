"""Manifests: CSV or JSON Lines labels for a folder; bad rows skipped one reason each."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reid_search.app.session import open_workspace_gallery
from indexer.pipeline import index_folder, parse_time, read_manifest
from reid_search.gallery import RemoveFilter, SearchFilter
from reid_search.errors import DataError
from reid_search.app.workspace import Workspace
from tests.helpers import write_crop
from tests.helpers import PixelExtractor


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "cams"
    for i in range(5):
        write_crop(root / ("a" if i < 3 else "b") / f"crop{i}.jpg", seed=i, size=(32, 64))
    write_crop(root / "0007_c4s1_000001_00.jpg", seed=9, size=(32, 64))
    return root


def test_parse_time() -> None:
    utc = datetime(2024, 5, 1, 13, 45, tzinfo=timezone.utc)
    assert parse_time("2024-05-01T13:45:00Z") == utc
    assert parse_time("2024-05-01 13:45") == utc  # naive means UTC
    assert parse_time("2024-05-01T15:45:00+02:00") == utc
    with pytest.raises(ValueError):
        parse_time("yesterday")


def test_csv_manifest_labels_and_bad_rows(folder: Path, tmp_path: Path) -> None:
    man = tmp_path / "m.csv"
    man.write_text(
        "path,camid,time,track,pid\n"
        "a/crop0.jpg,1,2024-05-01T10:00:00Z,t1,5\n"
        "a/crop1.jpg,1,2024-05-01T11:00:00,t1,\n"
        "a/crop2.jpg,2,,t2,\n"
        "b/crop3.jpg,x,,,\n"                       # bad camid
        "b/crop4.jpg,3,not-a-time,,\n"             # bad time
        "../escape.jpg,1,,,\n"                     # outside the folder
        "b/missing.jpg,1,,,\n"                     # no such file
        "a/crop0.jpg,9,,,\n"                       # listed twice
        "0007_c4s1_000001_00.jpg,,2024-05-02T00:00:00+02:00,,\n"  # labels from the name, time from the manifest
        ",1,,,\n"                                  # no path
        "b/crop4.jpg,99999999999,,,\n"             # camid out of range (now a first row for crop4? no: crop4 was bad)
    )
    g = open_workspace_gallery(Workspace(tmp_path / "ws"))
    report = index_folder(g, folder, PixelExtractor(), manifest=man, num_workers=0)
    assert report.indexed == 4, report.skipped
    reasons = {where.rsplit(":", 1)[-1] if where.startswith(str(man)) else Path(where).name: detail
               for where, _, detail in report.skipped}
    assert "camid 'x' is not an integer" in reasons["5"]
    assert "not ISO 8601" in reasons["6"]
    assert "stay inside" in reasons["7"]
    assert "file not found" in reasons["missing.jpg"]
    assert "listed twice" in reasons["9"]
    assert "no path" in reasons["11"]
    assert "out of range" in reasons["12"]
    assert report.skipped_by_reason() == {"bad-manifest-row": 6, "missing": 1}
    metas = {m.rel_path: m for b in g.iter_metadata() for m in b}
    m0 = metas["a/crop0.jpg"]
    assert (m0.camid, m0.pid, m0.track, m0.time) == (1, 5, "t1", datetime(2024, 5, 1, 10, tzinfo=timezone.utc))
    assert metas["a/crop1.jpg"].time == datetime(2024, 5, 1, 11, tzinfo=timezone.utc)
    assert metas["a/crop2.jpg"].time is None and metas["a/crop2.jpg"].pid is None
    named = metas["0007_c4s1_000001_00.jpg"]
    assert (named.pid, named.camid, named.time) == (7, 4, datetime(2024, 5, 1, 22, tzinfo=timezone.utc))
    assert g.count(SearchFilter(cameras=frozenset({1}))) == 2
    assert g.count(RemoveFilter(track="t1")) == 2
    # Changed labels for the same bytes are picked up on the next run; the rest is unchanged.
    man.write_text("path,camid,track,time\na/crop0.jpg,2,t9,\na/crop1.jpg,1,t1,2024-05-01T11:00:00\n")
    again = index_folder(g, folder, PixelExtractor(), manifest=man, num_workers=0)
    assert (again.replaced, again.unchanged) == (1, 1)
    m = g.metadata([max(g.ids())])[0]
    assert (m.rel_path, m.camid, m.track) == ("a/crop0.jpg", 2, "t9")


def test_jsonl_manifest(folder: Path, tmp_path: Path) -> None:
    man = tmp_path / "m.jsonl"
    lines = [{"path": "a/crop0.jpg", "camid": 3, "time": "2024-01-01T00:00:00Z", "track": "x"},
             {"path": "b/crop3.jpg", "pid": 2},
             "garbage",
             {"camid": 1}]
    man.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n\n")
    listed, skipped = read_manifest(man, folder)
    assert set(listed) == {"a/crop0.jpg", "b/crop3.jpg"} and listed["b/crop3.jpg"].pid == 2
    assert [(w.rsplit(":", 1)[1], r) for w, r, _ in skipped] == [("3", "bad-manifest-row"), ("4", "bad-manifest-row")]
    assert "not JSON" in skipped[0][2] and "no path" in skipped[1][2]


def test_manifest_errors_are_one_line(folder: Path, tmp_path: Path) -> None:
    g = open_workspace_gallery(Workspace(tmp_path / "ws"))
    with pytest.raises(DataError, match="no such manifest"):
        index_folder(g, folder, PixelExtractor(), manifest=tmp_path / "nope.csv")
    (tmp_path / "nopath.csv").write_text("file,camid\na.jpg,1\n")
    with pytest.raises(DataError, match="no path column"):
        index_folder(g, folder, PixelExtractor(), manifest=tmp_path / "nopath.csv")
    (tmp_path / "allbad.csv").write_text("path,camid\na/crop0.jpg,minus one\n")
    with pytest.raises(DataError, match="no usable rows.*not an integer") as err:
        index_folder(g, folder, PixelExtractor(), manifest=tmp_path / "allbad.csv")
    assert "\n" not in str(err.value) and g.ntotal == 0
