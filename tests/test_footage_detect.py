"""reid_search.footage.detect: YOLOX decoding against a hand-computed graph, the shared detectors, det.txt."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from reid_search.errors import DataError, ModelError
from reid_search.footage import Detections, YoloxDetector, open_source, read_mot_detections
from reid_search.footage.detect import grid_cells, letterbox
from tests.helpers import shared_path

LN2 = math.log(2.0)


def constant_detector(path: Path, rows: np.ndarray, input_shape: list = [1, 3, 64, 64]) -> Path:
    """An ONNX graph whose output is ``rows`` (with a batch axis) whatever the image."""
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, input_shape)
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, *rows.shape])
    inits = [
        numpy_helper.from_array(rows[None].astype(np.float32), "rows"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["rows", "nothing"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "constant_detector", [images], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, path)
    return path


def raw_rows(classes: int) -> np.ndarray:
    """Raw YOLOX rows for a 64x64 input (84 anchors: 8x8 at stride 8, 4x4 at 16, 2x2 at 32).

    Hand-computed, for a 128x64 (WxH) frame letterboxed with scale 0.5 and 16 px of pad on top:
      E anchor 24 (stride 8, cell 0,3): centre (0, 28), 16x16 -> input (-8, 20, 8, 36)
        -> frame (-16, 8, 16, 40), clipped to (0, 8, 16, 40); score 0.9 x 0.9 = 0.81
      A anchor 35 (stride 8, cell 3,4): centre (28, 36), 16x16 -> frame (40, 24, 72, 56); 0.72
      B anchor 36: A's centre, 17.6 px, 0.64 -> IoU 0.83 with A: suppressed
      C anchor 74 (stride 16, cell 2,2): centre (36, 36), 24x24 -> frame (48, 16, 96, 64); 0.63
      D anchor 83 (stride 32): another class (person 0.05): dropped
    """
    rows = np.zeros((84, 5 + classes), np.float32)
    rows[24, :6] = [0.0, 0.5, LN2, LN2, 0.9, 0.9]
    rows[35, :6] = [0.5, 0.5, LN2, LN2, 0.9, 0.8]
    rows[36, :6] = [-0.5, 0.5, math.log(2.2), math.log(2.2), 0.8, 0.8]
    rows[74, :6] = [0.25, 0.25, math.log(1.5), math.log(1.5), 0.7, 0.9]
    rows[83, :6] = [0.5, 0.5, 0.0, 0.0, 0.95, 0.05]
    if classes > 1:
        rows[83, 6] = 0.99
    return rows


EXPECTED_XYXY = np.array([[0, 8, 16, 40], [40, 24, 72, 56], [48, 16, 96, 64]], np.float32)
EXPECTED_SCORES = np.array([0.81, 0.72, 0.63], np.float32)
FRAME = np.zeros((64, 128, 3), np.uint8)


@pytest.mark.parametrize("classes", [80, 1])
def test_raw_outputs_decode_to_the_hand_computed_boxes(tmp_path: Path, classes: int) -> None:
    det = YoloxDetector(constant_detector(tmp_path / "raw.onnx", raw_rows(classes)), score_threshold=0.3)
    assert not det.decoded and det.num_classes == classes and det.layout == "NCHW"
    found = det.detect(FRAME)
    np.testing.assert_allclose(found.xyxy, EXPECTED_XYXY, atol=1e-4)
    np.testing.assert_allclose(found.scores, EXPECTED_SCORES, atol=1e-6)


def test_graph_that_decodes_itself(tmp_path: Path) -> None:
    cells, steps = grid_cells(64, 64)
    rows = np.zeros((84, 6), np.float32)
    rows[:, 0:2] = (cells + 0.5) * steps  # decoded centres, all over the input
    rows[:, 2:4] = 10.0
    rows[35] = [28, 36, 16, 16, 0.9, 0.8]
    det = YoloxDetector(constant_detector(tmp_path / "decoded.onnx", rows))
    assert det.decoded
    found = det.detect(FRAME)
    np.testing.assert_allclose(found.xyxy, EXPECTED_XYXY[1:2], atol=1e-4)
    # Told otherwise, the same rows are taken as raw and come out elsewhere.
    assert not np.allclose(YoloxDetector(tmp_path / "decoded.onnx", decoded=False).detect(FRAME).xyxy[:1], EXPECTED_XYXY[1:2])


def test_nhwc_input(tmp_path: Path) -> None:
    det = YoloxDetector(constant_detector(tmp_path / "nhwc.onnx", raw_rows(1), input_shape=[1, 64, 64, 3]))
    assert det.layout == "NHWC"
    np.testing.assert_allclose(det.detect(FRAME).xyxy, EXPECTED_XYXY, atol=1e-4)


def test_letterbox_records_scale_and_pad() -> None:
    img = np.full((50, 100, 3), 7, np.uint8)
    canvas, box = letterbox(img, 64, 64)
    assert canvas.shape == (64, 64, 3)
    assert (box.scale, box.pad_x, box.pad_y) == (0.64, 0.0, 16.0)
    assert (canvas[16:48] == 7).all() and (canvas[:16] == 114).all() and (canvas[48:] == 114).all()


@pytest.mark.parametrize(
    "rows, shape, needle",
    [
        (np.zeros((84, 4), np.float32), [1, 3, 64, 64], r"expected \[1, anchors, 5 \+ classes\]"),
        (np.zeros((80, 6), np.float32), [1, 3, 64, 64], "has 80 raw anchors, expected 84"),
        (np.full((84, 6), 3.0, np.float32), [1, 3, 64, 64], "not probabilities"),
        (np.zeros((84, 6), np.float32), [1, 4, 64, 64], "no axis of 3 channels"),
        (np.zeros((84, 6), np.float32), [1, 3, 60, 60], "not a multiple of 32"),
    ],
)
def test_graph_breaking_the_contract_is_refused(tmp_path: Path, rows: np.ndarray, shape: list, needle: str) -> None:
    path = constant_detector(tmp_path / "bad.onnx", rows, input_shape=shape)
    with pytest.raises(ModelError, match=needle) as e:
        YoloxDetector(path)
    assert "\n" not in str(e.value) and "not a YOLOX-style detector" in str(e.value)


def test_not_a_graph(tmp_path: Path) -> None:
    (tmp_path / "det.onnx").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match="not an ONNX graph") as e:
        YoloxDetector(tmp_path / "det.onnx")
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="no detector at"):
        YoloxDetector(tmp_path / "missing.onnx")


def test_frame_must_be_rgb_uint8(tmp_path: Path) -> None:
    det = YoloxDetector(constant_detector(tmp_path / "raw.onnx", raw_rows(1)))
    with pytest.raises(DataError, match="HxWx3 uint8"):
        det.detect(np.zeros((64, 64), np.uint8))


def _frame(clip: str, index: int) -> np.ndarray:
    for f in open_source(shared_path("data", "footage", clip)):
        if f.index == index:
            return f.image
    raise AssertionError(f"{clip} has no frame {index}")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_shared_detectors_find_the_person_on_a_real_frame() -> None:
    frame = _frame("one-by-one-person-detection.mp4", 100)  # one person, standing
    tops = []
    for name in ("yolox_nano_416x416.onnx", "person_detector_192x192.onnx"):
        det = YoloxDetector(shared_path("models", name), num_threads=1)
        assert not det.decoded and det.num_classes == (80 if "nano" in name else 1)
        found = det.detect(frame)
        assert len(found) == 1, (name, found)
        x1, y1, x2, y2 = found.xyxy[0]
        assert found.scores[0] > 0.6
        assert 0 <= x1 < x2 <= 768 and 0 <= y1 < y2 <= 432
        assert (y2 - y1) / (x2 - x1) > 1.8  # a standing person, not a grid cell
        tops.append(found.xyxy[0])
    assert _iou(*tops) > 0.8  # two detectors, one person


def test_shared_detectors_find_the_shoppers() -> None:
    frame = _frame("store-aisle-detection.gif", 30)
    for name in ("yolox_nano_416x416.onnx", "person_detector_192x192.onnx"):
        found = YoloxDetector(shared_path("models", name), num_threads=1).detect(frame)
        assert len(found) >= 2 and (found.scores > 0.5).sum() >= 2


def test_read_mot_detections(tmp_path: Path) -> None:
    path = tmp_path / "det.txt"
    path.write_text("1,-1,10,20,30,60,0.9,-1,-1,-1\n1,-1,100,20,30,60,0.2,-1,-1,-1\n\n3,-1,12.5,21,30,60,0.8\n")
    dets = read_mot_detections(path)
    assert sorted(dets) == [1, 3]
    np.testing.assert_allclose(dets[1].xyxy, [[10, 20, 40, 80], [100, 20, 130, 80]])
    np.testing.assert_allclose(dets[3].scores, [0.8])
    assert len(read_mot_detections(path, min_score=0.5)[1]) == 1
    assert isinstance(dets[3], Detections)


@pytest.mark.parametrize(
    "row, needle",
    [
        ("1,-1,10,20,30,60", "6 fields"),
        ("1,-1,ten,20,30,60,0.9", "not a number"),
        ("1,-1,10,20,0,60,0.9", "must be positive"),
        ("1.5,-1,10,20,30,60,0.9", "not a frame number"),
        ("1,-1,10,20,30,nan,0.9", "not a finite number"),
    ],
)
def test_bad_det_rows_name_the_line(tmp_path: Path, row: str, needle: str) -> None:
    path = tmp_path / "det.txt"
    path.write_text("1,-1,10,20,30,60,0.9,-1,-1,-1\n" + row + "\n")
    with pytest.raises(DataError, match=needle) as e:
        read_mot_detections(path)
    assert f"{path}:2:" in str(e.value) and "\n" not in str(e.value)
