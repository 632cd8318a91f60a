"""The ``--input-*`` options end to end: a declared preprocessing indexes, is recorded with the
gallery, and feeds later commands; contradictions, checkpoints and bad values are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from reid_search.app.cli import main
from reid_search.app.workspace import Workspace
from reid_search.metrics import evaluate
from reid_search.onnx_model import OnnxExtractor, file_fingerprint
from reid_search.preprocess import sidecar_path
from reid_search.transforms import Preprocess
from tests.helpers import one_line_error, shared_path
from tests.test_onnx_preprocess import RETAIL, pixel_graph

H, W = 4, 2
OPTIONS = ["--input-color", "BGR", "--input-scale", "1", "--input-mean", "10,20,30", "--input-std", "2,4,8"]
SIDECAR = {"color": "BGR", "input_scale": 1, "mean": [10, 20, 30], "std": [2, 4, 8]}
PRE = Preprocess(H, W, (10.0, 20.0, 30.0), (2.0, 4.0, 8.0), "NHWC", "BGR", 1.0)
RETAIL_OPTIONS = ["--input-layout", "NHWC", "--input-color", "BGR", "--input-scale", "1",
                  "--input-mean", "0,0,0", "--input-std", "1,1,1"]


def cli(ws: Path, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, ["-q", "-w", str(ws), *args])


def crops(root: Path) -> dict[Path, np.ndarray]:
    """Lossless H×W crops of 4 people: gallery in cameras 2 and 3, queries in camera 1; pixels by path."""
    rng = np.random.default_rng(7)
    out = {}
    for pid in range(1, 5):
        base = rng.integers(40, 216, (H, W, 3))
        for cam, folder in ((1, "query"), (2, "bounding_box_test"), (3, "bounding_box_test")):
            px = np.clip(base + rng.integers(-40, 41, (H, W, 3)), 0, 255).astype(np.uint8)
            path = root / folder / f"{pid:04d}_c{cam}s1_{pid * 10 + cam:06d}_00.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(px, "RGB").save(path)
            out[path] = px
    return out


def by_hand(px: np.ndarray) -> np.ndarray:
    """What the NHWC pixel graph returns under SIDECAR, L2-normalised: BGR, 0..255, (x - mean) / std."""
    v = ((px[..., ::-1].astype(np.float64) - SIDECAR["mean"]) / SIDECAR["std"]).ravel()
    return v / np.linalg.norm(v)


@pytest.fixture()
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    """(workspace, an NHWC pixel graph declaring nothing, the crops' pixels, the Market root)."""
    (tmp_path / "models").mkdir()
    model = pixel_graph(tmp_path / "models" / "pix.onnx", [1, H, W, 3])
    return tmp_path / "ws", model, crops(tmp_path / "data"), tmp_path / "data"


def test_index_with_options_then_query_eval_embed_without(setup) -> None:  # type: ignore[no-untyped-def]
    ws, model, pixels, data = setup
    r = cli(ws, "index", str(data / "bounding_box_test"), "--model", str(model), *OPTIONS)
    assert r.exit_code == 0, r.output
    record = json.loads((ws / "model.json").read_text())["gallery"]
    fp = OnnxExtractor(model, device="cpu", preprocess=SIDECAR).fingerprint
    assert fp.startswith(file_fingerprint(model) + "+pre-")
    assert record == {"path": str(model.resolve()), "fingerprint": fp, "preprocess": PRE.to_dict()}

    gallery = sorted(p for p in pixels if p.parent.name == "bounding_box_test")
    queries = sorted(p for p in pixels if p.parent.name == "query")
    g = np.stack([by_hand(pixels[p]) for p in gallery])
    q = np.stack([by_hand(pixels[p]) for p in queries])

    r = cli(ws, "embed", str(queries[0]), "--json")  # no options: the recorded preprocessing
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["model"] == fp
    np.testing.assert_allclose(out["feature"], q[0], atol=1e-5)

    r = cli(ws, "query", str(queries[0]), "--json", "--top-k", "8")
    assert r.exit_code == 0, r.output
    hits = json.loads(r.output)["hits"]
    d = ((g - q[0]) ** 2).sum(1)  # squared Euclidean on unit features; the query's camera (1) has no crops
    assert [Path(h["path"]).name for h in hits] == [gallery[i].name for i in np.argsort(d, kind="stable")]
    np.testing.assert_allclose([h["distance"] for h in hits], np.sort(d), atol=1e-5)

    r = cli(ws, "eval", "--query", str(data / "query"), "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    ids = [(int(p.name[:4]), int(p.name[6])) for p in (*queries, *gallery)]
    pid, cam = np.array([i[0] for i in ids]), np.array([i[1] for i in ids])
    want = evaluate(((q[:, None] - g[None]) ** 2).sum(-1), pid[:4], pid[4:], cam[:4], cam[4:])
    assert got["rank1"] == pytest.approx(want["cmc"][0]) and got["mAP"] == pytest.approx(want["mAP"])

    # Repeating the recorded values is fine; contradicting them is refused with the remedy.
    assert cli(ws, "query", str(queries[0]), "--input-color", "bgr", "--input-scale", "1/1").exit_code == 0
    msg = one_line_error(cli(ws, "eval", "--input-color", "RGB"), "color=RGB", "color=BGR", "--reindex")
    assert "model.json" in msg
    one_line_error(cli(ws, "index", str(data / "bounding_box_test"), "--input-mean", "0"), "mean=0,0,0", "--reindex")
    # --reindex embeds the gallery the new way, and records it.
    r = cli(ws, "index", str(data / "bounding_box_test"), "--reindex", "--model", str(model),
            *OPTIONS[:-2], "--input-std", "1")
    assert r.exit_code == 0, r.output
    assert Workspace(ws).gallery_preprocess(model)["std"] == [1.0, 1.0, 1.0]
    assert cli(ws, "eval", "--query", str(data / "query")).exit_code == 0
    # Re-indexed without options: as recorded.
    assert cli(ws, "index", str(data / "bounding_box_test"), "--reindex", "--model", str(model)).exit_code == 0
    assert Workspace(ws).gallery_preprocess(model)["std"] == [1.0, 1.0, 1.0]


def test_sidecar_beside_a_symlink_is_remembered(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ws, model, _, data = setup
    link = tmp_path / "elsewhere" / "reid.onnx"
    link.parent.mkdir()
    link.symlink_to(model)
    sidecar_path(link).write_text(json.dumps(SIDECAR))
    assert cli(ws, "index", str(data / "bounding_box_test"), "--model", str(link)).exit_code == 0
    # The workspace names the link's target, whose folder has no sidecar: the record supplies it.
    assert Workspace(ws).gallery_model()[0] == model.resolve()
    r = cli(ws, "eval", "--query", str(data / "query"), "--json")
    assert r.exit_code == 0, r.output
    assert Workspace(ws).gallery_preprocess(link) == PRE.to_dict()  # a symlink counts as its target

    # A sidecar that now says otherwise is refused in one line, with the remedy.
    sidecar_path(model).write_text(json.dumps({**SIDECAR, "color": "RGB"}))
    one_line_error(cli(ws, "eval", "--query", str(data / "query")), "color", "recorded in", "--reindex")
    # ... and a re-index follows it.
    assert cli(ws, "index", str(data / "bounding_box_test"), "--reindex").exit_code == 0
    assert Preprocess.from_dict(Workspace(ws).gallery_preprocess(model)).color == "RGB"
    assert cli(ws, "eval", "--query", str(data / "query")).exit_code == 0


def test_options_on_a_checkpoint_are_refused(tiny_ckpt: Path, market_dir: Path, tmp_path: Path) -> None:
    r = cli(tmp_path / "ws", "index", str(market_dir / "bounding_box_test"), "--model", str(tiny_ckpt),
            "--input-color", "BGR")
    one_line_error(r, "checkpoint", "apply to ONNX models only")
    assert not (tmp_path / "ws" / "model.json").exists()


def test_old_records_read_as_before(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    model = pixel_graph(tmp_path / "m.onnx", [1, 3, H, W])
    ws.ensure()
    ws.model_pointer.write_text(json.dumps({"gallery": {"path": str(model.resolve()), "fingerprint": "onnx:x"}}))
    assert ws.gallery_preprocess(model) is None and ws.gallery_model() == (model.resolve(), "onnx:x")
    ws.set_gallery_model(model, "onnx:x")  # nothing declared: the record stays in the old form
    assert json.loads(ws.model_pointer.read_text()) == {"gallery": {"path": str(model.resolve()), "fingerprint": "onnx:x"}}


@pytest.mark.parametrize("option, value, needle", [
    ("--input-layout", "HWC", "'HWC' is not NCHW or NHWC"),
    ("--input-color", "gray", "'gray' is not RGB or BGR"),
    ("--input-scale", "0", "'0' is not a positive number: 1/255 feeds pixels as 0..1, 1 as 0..255"),
    ("--input-scale", "1/0", "'1/0' is not a positive number"),
    ("--input-mean", "1,2", "'1,2' is not three numbers R,G,B"),
    ("--input-std", "1,0,1", "'1,0,1' has a value that is not positive"),
    ("--input-size", "256", "'256' is not HEIGHTxWIDTH"),
])
@pytest.mark.parametrize("command", ["index", "query", "eval", "calibrate", "embed", "serve"])
def test_bad_values_are_usage_errors(tmp_path: Path, command: str, option: str, value: str, needle: str) -> None:
    args = {"index": ["folder"], "query": ["a.jpg"], "embed": ["a.jpg"]}.get(command, [])
    r = cli(tmp_path / "ws", command, *args, option, value)
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: Invalid value for '{option}': "), r.output
    assert needle in errors[0] and "Traceback" not in r.output
    assert not (tmp_path / "ws").exists()  # refused before anything opened


@pytest.mark.slow
def test_retail_0288_on_cuhk03_labeled(tmp_path: Path) -> None:
    """OpenVINO's NHWC/BGR/0..255 model through the CLI: index with options, query and eval without."""
    model = shared_path(*RETAIL)
    root = shared_path("data", "cuhk03-labeled")
    assert not sidecar_path(model).exists()  # the options alone declare it
    ws = tmp_path / "ws"
    r = cli(ws, "index", str(root / "bounding_box_test"), "--model", str(model), *RETAIL_OPTIONS, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert Workspace(ws).gallery_preprocess(model) == Preprocess(256, 128, (0.0,) * 3, (1.0,) * 3, "NHWC", "BGR", 1.0).to_dict()
    r = cli(ws, "eval", "--query", str(root / "query"), "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert (res["num_gallery"], res["num_query"]) == (738, 200)
    # The library run directly gave R1 6.5 %, mAP 8.6 %.
    assert res["rank1"] == pytest.approx(0.065, abs=0.01) and res["mAP"] == pytest.approx(0.086, abs=0.01)
    one = sorted((root / "query").glob("*.jpg"))[0]
    r = cli(ws, "query", str(one), "--json", "--top-k", "5", "--device", "cpu")
    assert r.exit_code == 0, r.output
    hits = json.loads(r.output)["hits"]
    assert len(hits) == 5 and all(h["distance"] >= 0 for h in hits)


def test_service_uploads_record_the_declared_preprocessing(setup) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from reid_search.app.service import create_app

    ws_dir, model, pixels, _ = setup
    ws = Workspace(ws_dir)
    gallery = sorted(p for p in pixels if p.parent.name == "bounding_box_test")
    with TestClient(create_app(ws, model=model, device="cpu", preprocess=SIDECAR)) as client:
        for p in gallery:
            r = client.post("/gallery", files={"file": (p.name, p.read_bytes(), "image/png")},
                            data={"pid": p.name[:4], "camid": p.name[6]})
            assert r.status_code == 200, r.text
    assert ws.gallery_preprocess(model) == PRE.to_dict()
    # Served again without the declaration: the record supplies it.
    query = sorted(p for p in pixels if p.parent.name == "query")[0]
    with TestClient(create_app(ws, device="cpu")) as client:
        r = client.post("/query", files={"file": (query.name, query.read_bytes(), "image/png")}, data={"top_k": "3"})
        assert r.status_code == 200, r.text
    d = ((np.stack([by_hand(pixels[p]) for p in gallery]) - by_hand(pixels[query])) ** 2).sum(1)
    assert [h["distance"] for h in r.json()["hits"]] == pytest.approx(np.sort(d)[:3], abs=1e-5)
