"""Person detection: an ONNX YOLOX-family detector, or MOT Challenge ``det.txt`` rows.

The output contract a detector graph must meet (checked on load, refused with
one :class:`~reid_search.errors.ModelError` line otherwise):

* **One image input**, float32, 4-D: NCHW ``[1, 3, H, W]`` or NHWC ``[1, H, W, 3]``
  (the batch may be symbolic), with ``H`` and ``W`` fixed in the graph or given
  as ``input_size``, each a multiple of 32.
* **The first output** is ``[1, A, 5 + C]`` with ``C >= 1``: one row per anchor,
  ``(cx, cy, w, h, objectness, class_0 … class_{C-1})``, objectness and class
  scores already probabilities (the sigmoid inside the graph, as YOLOX exports).
* **Raw** (YOLOX exported with ``decode_in_inference=False``, as both shared
  models are): ``A = Σ (H/s)·(W/s)`` over strides ``s = 8, 16, 32``, stride 8
  first and each level row-major; ``cx, cy`` are offsets in grid cells and
  ``w, h`` logs of the size in strides, decoded here as
  ``(offset + cell) × s`` and ``exp(log) × s``.
  **Decoded** (the graph does that itself): ``cx, cy, w, h`` in input pixels.
  Which of the two is found on load from one run on a grey image (decoded
  centres spread over the input, raw offsets stay within a few cells) unless
  ``decoded`` is given.
* **The person class** is class 0 (COCO's order) or the only class of a
  one-class model; ``person_class`` picks another.
* **Pixels**: letterboxed (aspect kept, the rest padded with 114 grey, the pad
  split evenly), channels BGR, values 0–255, not normalised, as the original
  YOLOX trains. Measured on frames of the Intel sample clips: with BGR 0–255
  the mean of the three best person scores per frame is 0.693 (yolox_nano_416)
  and 0.671 (person_detector_192), with RGB 0–255 0.681 and 0.606, and with
  0–1 or ImageNet-normalised input no person scores above 0.07; ``channels``
  and ``scale`` change it for other graphs.

Boxes come back in the original frame's pixels, clipped to it, after NMS by
``torchvision.ops.nms``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from reid_search.errors import DataError, ModelError, first_line

log = logging.getLogger(__name__)

STRIDES = (8, 16, 32)
PAD_VALUE = 114


@dataclass(frozen=True)
class Detections:
    """People found in one frame: ``xyxy`` (N, 4) float32 frame pixels and ``scores`` (N,) float32."""

    xyxy: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        if self.xyxy.shape != (len(self.scores), 4):
            raise ValueError(f"xyxy has shape {self.xyxy.shape}, expected ({len(self.scores)}, 4)")

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def empty() -> "Detections":
        """No detection."""
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))


@dataclass(frozen=True)
class Letterbox:
    """How a frame was fitted into the model input: ``input = frame × scale + (pad_x, pad_y)``."""

    scale: float
    pad_x: float
    pad_y: float


def letterbox(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, Letterbox]:
    """``image`` (HxWx3) resized with its aspect kept and padded to ``height``×``width``, and the mapping."""
    import cv2

    h, w = image.shape[:2]
    scale = min(height / h, width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas = np.full((height, width, 3), PAD_VALUE, dtype=np.uint8)
    canvas[top : top + nh, left : left + nw] = resized
    return canvas, Letterbox(scale, float(left), float(top))


@functools.lru_cache(maxsize=8)
def grid_cells(height: int, width: int, strides: tuple[int, ...] = STRIDES) -> tuple[np.ndarray, np.ndarray]:
    """Each raw YOLOX anchor's cell ``(x, y)`` (A, 2) and stride (A, 1), stride 8 first, row-major (cached: read only)."""
    cells, steps = [], []
    for s in strides:
        ys, xs = np.meshgrid(np.arange(height // s), np.arange(width // s), indexing="ij")
        cells.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        steps.append(np.full((xs.size, 1), s))
    cells_a, steps_a = np.concatenate(cells).astype(np.float32), np.concatenate(steps).astype(np.float32)
    cells_a.flags.writeable = steps_a.flags.writeable = False
    return cells_a, steps_a


def decode_boxes(rows: np.ndarray, height: int, width: int, *, decoded: bool) -> np.ndarray:
    """Anchor rows ``(cx, cy, w, h, …)`` as (A, 4) ``xyxy`` in input pixels (raw rows go through grid and stride)."""
    xy, wh = rows[:, 0:2], rows[:, 2:4]
    if not decoded:
        cells, steps = grid_cells(height, width)
        xy = (xy + cells) * steps
        wh = np.exp(np.minimum(wh, 20.0)) * steps  # capped: a wild logit must not overflow
    return np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)


def person_boxes(
    out: np.ndarray,
    box: Letterbox,
    frame_hw: tuple[int, int],
    input_hw: tuple[int, int],
    *,
    decoded: bool,
    person_class: int = 0,
    score_threshold: float = 0.3,
    nms_iou: float = 0.45,
) -> Detections:
    """People from one image's detector output (A, 5 + C): score filter, back to frame pixels, clip, NMS."""
    import torch
    from torchvision.ops import nms

    scores = out[:, 4] * out[:, 5 + person_class]
    keep = scores >= score_threshold
    if not keep.any():
        return Detections.empty()
    rows, scores = out[keep], scores[keep]
    xyxy = decode_boxes(rows, *input_hw, decoded=decoded) if decoded else _decode_kept(out, keep, input_hw)
    xyxy[:, [0, 2]] = (xyxy[:, [0, 2]] - box.pad_x) / box.scale
    xyxy[:, [1, 3]] = (xyxy[:, [1, 3]] - box.pad_y) / box.scale
    h, w = frame_hw
    xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, w)
    xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, h)
    sized = ((xyxy[:, 2] - xyxy[:, 0]) >= 1) & ((xyxy[:, 3] - xyxy[:, 1]) >= 1)
    xyxy, scores = xyxy[sized], scores[sized]
    order = nms(torch.from_numpy(np.ascontiguousarray(xyxy, np.float32)), torch.from_numpy(scores.astype(np.float32)), nms_iou)
    idx = order.numpy()
    return Detections(xyxy[idx].astype(np.float32), scores[idx].astype(np.float32))


def _decode_kept(out: np.ndarray, keep: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    # Decoding only the anchors that passed the score filter: most of A never does.
    cells, steps = grid_cells(*input_hw)
    rows = out[keep]
    xy = (rows[:, 0:2] + cells[keep]) * steps[keep]
    wh = np.exp(np.minimum(rows[:, 2:4], 20.0)) * steps[keep]
    return np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)


class YoloxDetector:
    """A YOLOX-family ONNX person detector run by ONNX Runtime (the contract: this module's docstring).

    ``num_threads`` sets ONNX Runtime's intra-op threads (``None``: its default,
    one per core). ``decoded=None`` finds out whether the graph decodes boxes
    itself.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        score_threshold: float = 0.3,
        nms_iou: float = 0.45,
        person_class: int | None = None,
        channels: Literal["BGR", "RGB"] = "BGR",
        scale: float = 1.0,
        decoded: bool | None = None,
        input_size: tuple[int, int] | None = None,
        num_threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        """Load and check the graph.

        Raises:
            ModelError: the file is missing or not an ONNX graph, or the graph
                does not meet the output contract.
        """
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"no detector at {self.path}")
        if channels not in ("BGR", "RGB"):
            raise ModelError(f"channels must be BGR or RGB, not {channels!r}")
        opts = ort.SessionOptions()
        if num_threads is not None:
            opts.intra_op_num_threads = num_threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(self.path), opts, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own untyped errors for a file that is not a graph
            raise ModelError(f"{self.path} is not an ONNX graph ONNX Runtime can load: {first_line(exc, with_type=False)}") from exc
        self.num_threads = num_threads
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.channels = channels
        self.scale = scale
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise self._refuse(f"has {len(inputs)} inputs, expected one image")
        inp = inputs[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if inp.type != "tensor(float)" or len(shape) != 4:
            raise self._refuse(f"input {inp.name} is {inp.type} {shape}, expected float32 [1, 3, H, W] or [1, H, W, 3]")
        if shape[1] == 3:
            self.layout, hw = "NCHW", shape[2:4]
        elif shape[3] == 3:
            self.layout, hw = "NHWC", shape[1:3]
        else:
            raise self._refuse(f"input {inp.name} {shape} has no axis of 3 channels at 1 or 3")
        if input_size is not None:
            hw = list(input_size)
        if not all(isinstance(d, int) and d > 0 for d in hw):
            raise self._refuse(f"input {inp.name} {shape} has no fixed size: pass input_size=(H, W)")
        self.input_hw = (int(hw[0]), int(hw[1]))
        if any(d % 32 for d in self.input_hw):
            raise self._refuse(f"input size {self.input_hw} is not a multiple of 32")
        self.output_name = self.session.get_outputs()[0].name
        out = self._run(np.full((*self.input_hw, 3), PAD_VALUE, np.uint8))
        if out.ndim != 3 or out.shape[0] != 1 or out.shape[2] < 6:
            raise self._refuse(f"output {self.output_name} is {list(out.shape)}, expected [1, anchors, 5 + classes]")
        out = out[0]
        self.num_classes = out.shape[1] - 5
        if person_class is None:
            person_class = 0
        if not 0 <= person_class < self.num_classes:
            raise self._refuse(f"has {self.num_classes} classes, no person class {person_class}")
        self.person_class = person_class
        scores = out[:, 4:]
        if not np.isfinite(out).all() or scores.min() < -1e-4 or scores.max() > 1 + 1e-4:
            raise self._refuse("scores are not probabilities in [0, 1] (no sigmoid in the graph?)")
        anchors = sum((self.input_hw[0] // s) * (self.input_hw[1] // s) for s in STRIDES)
        if decoded is None:
            # Raw offsets stay within a few grid cells; decoded centres spread over the input.
            decoded = float(np.median(np.abs(out[:, 0:2]))) > 4.0
        if not decoded and out.shape[0] != anchors:
            raise self._refuse(
                f"output {self.output_name} has {out.shape[0]} raw anchors, expected {anchors} "
                f"(strides {STRIDES} on {self.input_hw[0]}x{self.input_hw[1]})"
            )
        self.decoded = bool(decoded)
        log.info(
            "detector %s: %s %dx%d, %d classes (person %d), %s output, %s threads",
            self.path.name, self.layout, *self.input_hw, self.num_classes, self.person_class,
            "decoded" if self.decoded else "raw", num_threads or "default",
        )

    def _refuse(self, why: str) -> ModelError:
        return ModelError(f"{self.path} is not a YOLOX-style detector: {why}")

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """One RGB uint8 frame as the model's input tensor (batch of one), and its letterbox."""
        canvas, box = letterbox(image, *self.input_hw)
        return self._tensor(canvas), box

    def _tensor(self, canvas: np.ndarray) -> np.ndarray:
        x = canvas[..., ::-1] if self.channels == "BGR" else canvas
        x = x.astype(np.float32)
        if self.scale != 1.0:
            x *= self.scale
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x[None])

    def _run(self, canvas: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: self._tensor(canvas)})[0]

    def detect(self, image: np.ndarray) -> Detections:
        """People in one HxWx3 uint8 RGB frame, boxes in its pixels.

        Raises:
            DataError: ``image`` is not HxWx3 uint8.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(f"expected an HxWx3 uint8 RGB frame, got {image.dtype} {image.shape}")
        tensor, box = self.preprocess(image)
        out = self.session.run([self.output_name], {self.input_name: tensor})[0][0]
        return person_boxes(
            out, box, image.shape[:2], self.input_hw, decoded=self.decoded, person_class=self.person_class,
            score_threshold=self.score_threshold, nms_iou=self.nms_iou,
        )


def read_mot_detections(path: str | Path, *, min_score: float | None = None) -> dict[int, Detections]:
    """MOT Challenge ``det.txt`` rows ``frame, id, x, y, w, h, conf, …`` as detections per frame number.

    Frame numbers are as written (MOT counts from 1). Boxes become ``xyxy``;
    rows scoring below ``min_score`` are dropped; blank lines are skipped.

    Raises:
        DataError: the file is missing, or a row is malformed (the message
            names the file, the line and the row).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no detections file at {p}")
    boxes: dict[int, list[tuple[float, float, float, float, float]]] = {}
    with p.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.strip()
            if not text:
                continue
            fields = [f.strip() for f in text.split(",")] if "," in text else text.split()
            where = f"{p}:{lineno}"
            if len(fields) < 7:
                raise DataError(f"{where}: {len(fields)} fields, expected frame,id,x,y,w,h,conf,…: {text[:80]!r}")
            try:
                frame_f = float(fields[0])
                x, y, w, h, conf = (float(v) for v in fields[2:7])
            except ValueError:
                raise DataError(f"{where}: not a number in {text[:80]!r}") from None
            if not all(math.isfinite(v) for v in (frame_f, x, y, w, h, conf)):
                raise DataError(f"{where}: not a finite number in {text[:80]!r}")
            if frame_f != int(frame_f) or frame_f < 0:
                raise DataError(f"{where}: frame {fields[0]!r} is not a frame number: {text[:80]!r}")
            if w <= 0 or h <= 0:
                raise DataError(f"{where}: box width and height must be positive: {text[:80]!r}")
            if min_score is not None and conf < min_score:
                continue
            boxes.setdefault(int(frame_f), []).append((x, y, x + w, y + h, conf))
    return {
        f: Detections(np.array([r[:4] for r in rows], np.float32), np.array([r[4] for r in rows], np.float32))
        for f, rows in sorted(boxes.items())
    }
