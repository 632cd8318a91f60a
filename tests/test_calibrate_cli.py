"""`reid-search calibrate` end to end, and the workspace's per-model thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reid_search.calibration import collect_pairs, threshold_at_fpr
from reid_search.data import list_images
from reid_search.errors import ModelError
from reid_search.thresholds import Calibration, decide, load_calibration, save_calibration, thresholds_path
from reid_search.app.workspace import Workspace
from tests.helpers import one_line_error
from tests.test_calibration import _slow
from tests.test_search import brute, indexed, run  # noqa: F401  (indexed is a fixture)


def test_calibrate_matches_brute_force_and_saves(indexed, tiny_ckpt: Path, tmp_path: Path) -> None:  # noqa: F811
    ws, root = indexed
    plot = tmp_path / "roc.png"
    r = run(ws, "calibrate", "--fpr", "0.1", "--json", "--plot", str(plot))
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert set(out) == {"threshold", "target_fpr", "tpr_at_fpr", "genuine_pairs", "impostor_pairs", "open_set", "rerank"}
    assert set(out["tpr_at_fpr"]) == {"0.0001", "0.001", "0.01"}
    assert out["rerank"] is False and out["target_fpr"] == 0.1
    g, gf = brute(tiny_ckpt, root / "bounding_box_test")
    q, qf = brute(tiny_ckpt, root / "query")
    qp, gp = np.array([x.pid for x in q]), np.array([x.pid for x in g])
    qc, gc = np.array([x.camid for x in q]), np.array([x.camid for x in g])
    d = np.maximum(2 - 2 * qf @ gf.T, 0).astype(np.float64)
    t, tpr, dir_, far = _slow(d, qp, gp, qc, gc, 0.1)
    assert out["threshold"] == pytest.approx(t, abs=1e-5)
    assert out["open_set"]["detection_identification_rate"] == pytest.approx(dir_)
    assert out["open_set"]["false_alarm_rate"] == pytest.approx(far)
    s = collect_pairs(d, qp, gp, qc, gc)
    assert (out["genuine_pairs"], out["impostor_pairs"]) == (s.num_genuine, s.num_impostor)
    assert Image.open(plot).size[0] > 400

    from reid_search.extractors import load_extractor

    fp = load_extractor(tiny_ckpt, "cpu").fingerprint
    cal = load_calibration(ws, fp, rerank=False)
    assert cal is not None and cal.threshold == out["threshold"] and cal.target_fpr == 0.1
    assert load_calibration(ws, fp, rerank=True) is None  # re-ranked distances need their own

    r = run(ws, "calibrate", "--rerank")
    assert r.exit_code == 0 and "threshold" in r.output and "saved" in r.output, r.output
    rr = load_calibration(ws, fp, rerank=True)
    assert rr is not None and load_calibration(ws, fp, rerank=False) == cal  # both kept


def test_calibrate_embeds_queries_at_the_precision_asked(indexed, tiny_ckpt: Path) -> None:  # noqa: F811
    from reid_search.extract import extract_features
    from reid_search.extractors import load_extractor
    from reid_search.precision import cpu_features

    ws, root = indexed
    g, gf = brute(tiny_ckpt, root / "bounding_box_test")  # the gallery as indexed (--precision auto)
    q = list_images(root / "query")
    qf = extract_features([x.path for x in q], load_extractor(tiny_ckpt, "cpu", precision="fp32"))[0]
    d = np.maximum(2 - 2 * qf @ gf.T, 0).astype(np.float64)
    t32 = _slow(d, np.array([x.pid for x in q]), np.array([x.pid for x in g]),
                np.array([x.camid for x in q]), np.array([x.camid for x in g]), 0.1)[0]
    r = run(ws, "calibrate", "--fpr", "0.1", "--json", "--no-save", "--precision", "fp32")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["threshold"] == pytest.approx(t32, abs=1e-6)
    if cpu_features().bf16:  # auto is bf16 here: a different rounding, a different threshold
        auto = json.loads(run(ws, "calibrate", "--fpr", "0.1", "--json", "--no-save").output)["threshold"]
        assert abs(auto - t32) > 1e-6
    bad = run(ws, "calibrate", "--precision", "int4")
    assert bad.exit_code == 2 and "'int4' is not one of 'auto', 'fp32', 'bf16', 'fp16'" in bad.output


def test_threshold_of_one_model_is_refused_for_another(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    cal = Calibration(0.8, 1e-3, "model-a", False, 0.9, 10, 1000, "q", 100)
    save_calibration(ws.root, cal)
    assert load_calibration(ws.root, "model-a", False) == cal
    assert load_calibration(ws.root, "model-b", False) is None
    with pytest.raises(ModelError, match="calibrated with model model-a"):
        cal.check("model-b", False)
    with pytest.raises(ModelError, match="k-NN"):
        cal.check("model-a", True)
    # An entry filed under another model's key is refused, not applied.
    data = json.loads(thresholds_path(ws.root).read_text())
    data["entries"]["model-b|knn"] = data["entries"]["model-a|knn"]
    thresholds_path(ws.root).write_text(json.dumps(data))
    with pytest.raises(ModelError):
        load_calibration(ws.root, "model-b", False)


def test_unreadable_thresholds_file_is_kept(tmp_path: Path) -> None:
    from reid_search.errors import GalleryError

    ws = Workspace(tmp_path / "ws").ensure()
    thresholds_path(ws.root).write_text("{not json")
    with pytest.raises(GalleryError, match="move it away"):
        save_calibration(ws.root, Calibration(0.8, 1e-3, "m", False, 0.9, 1, 1, "q", 1))
    assert thresholds_path(ws.root).read_text() == "{not json"


def test_decide() -> None:
    assert decide([0.1, 0.5], None) == ([None, None], "uncalibrated")
    assert decide([0.1, 0.5], 0.3) == ([True, False], "match")
    assert decide([0.4, 0.5], 0.3) == ([False, False], "no-match")
    assert decide([0.3], 0.3) == ([True], "match")


def test_calibrate_errors_are_one_line(indexed, tmp_path: Path) -> None:  # noqa: F811
    ws, root = indexed
    one_line_error(run(ws, "calibrate", str(tmp_path / "nope")), "no such query folder")
    (tmp_path / "empty").mkdir()
    one_line_error(run(ws, "calibrate", str(tmp_path / "empty")), "no images")
    r = run(ws, "calibrate", "--fpr", "1")
    assert r.exit_code == 2 and "--fpr" in r.output


def test_threshold_helper_matches_cli_float_kind() -> None:
    # float32 distances (what eval computes) give the same threshold once widened.
    d = np.array([[0.25, 0.5, 0.75]], np.float32)
    s = collect_pairs(d, np.array([1]), np.array([1, 2, 3]), np.array([0]), np.array([1, 1, 1]), fprs=(0.6,))
    assert threshold_at_fpr(s, 0.6) == 0.5


def test_query_marks_matches_fuses_crops_and_groups_sightings(indexed, tiny_ckpt: Path) -> None:  # noqa: F811
    ws, root = indexed
    q1, q2 = root / "query" / "0005_c1s1_000000_00.jpg", root / "query" / "0006_c1s1_000000_00.jpg"
    out = json.loads(run(ws, "query", str(q1), "--json").output)
    assert out["decision"] == "uncalibrated" and out["threshold"] is None
    assert all(h["match"] is None for h in out["hits"])
    from reid_search.extractors import load_extractor

    assert run(ws, "calibrate", "--fpr", "0.1").exit_code == 0
    cal = load_calibration(ws, load_extractor(tiny_ckpt, "cpu").fingerprint, False)
    out = json.loads(run(ws, "query", str(q1), "--json").output)
    assert out["threshold"] == cal.threshold
    assert [h["match"] for h in out["hits"]] == [h["distance"] <= cal.threshold for h in out["hits"]]
    assert out["decision"] == ("match" if any(h["match"] for h in out["hits"]) else "no-match")
    # --threshold overrides; the table marks matches.
    out = json.loads(run(ws, "query", str(q1), "--json", "--threshold", "1e9").output)
    assert out["decision"] == "match" and all(h["match"] for h in out["hits"])
    assert "decision: no-match" in run(ws, "query", str(q1), "--threshold", "-1").output
    # Two crops: the mean of their features, both cameras dropped.
    g, gf = brute(tiny_ckpt, root / "bounding_box_test")
    q, qf = brute(tiny_ckpt, root / "query")
    rows = [[x.path for x in q].index(p) for p in (q1, q2)]
    f = qf[rows].mean(0)
    f /= np.linalg.norm(f)
    d = np.maximum(2 - 2 * gf @ f, 0)
    out = json.loads(run(ws, "query", str(q1), str(q2), "--json", "--top-k", "50").output)
    keep = [i for i, rec in enumerate(g) if rec.camid != 1]
    assert [h["path"] for h in out["hits"]] == [str(g[i].path) for i in sorted(keep, key=lambda i: (d[i], str(g[i].path)))]
    assert out["fuse"] == "mean" and out["camid"] == [1]
    # Sightings per camera: one per camera left, best hit first.
    out = json.loads(run(ws, "query", str(q1), "--json", "--group-by", "camera").output)
    keys = [s["key"] for s in out["sightings"]]
    assert sorted(keys) == sorted({h.camid for h in g} - {1})
    assert out["sightings"][0]["best"]["id"] == out["hits"][0]["id"]
