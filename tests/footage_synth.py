"""Small synthetic footage for the footage tests: textured boxes walking on a gradient, exact ground truth."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class Walker:
    """A person-like box: ``w``×``h`` pixels, top-left at ``(x0, y0)`` on ``first``, moving ``(vx, vy)`` px/frame."""

    pid: int
    x0: float
    y0: float
    vx: float
    vy: float
    w: int = 24
    h: int = 56
    first: int = 0
    last: int = 10**9


def ground_truth(walkers: Sequence[Walker], n_frames: int, size: tuple[int, int]) -> list[list[tuple[int, np.ndarray]]]:
    """Per frame, ``(pid, xyxy)`` of each walker fully inside the ``(height, width)`` frame."""
    h, w = size
    frames: list[list[tuple[int, np.ndarray]]] = []
    for f in range(n_frames):
        rows = []
        for p in walkers:
            if not p.first <= f <= p.last:
                continue
            x1 = p.x0 + p.vx * (f - p.first)
            y1 = p.y0 + p.vy * (f - p.first)
            box = np.array([x1, y1, x1 + p.w, y1 + p.h], np.float32)
            if box[0] >= 0 and box[1] >= 0 and box[2] <= w and box[3] <= h:
                rows.append((p.pid, box))
        frames.append(rows)
    return frames


def texture(pid: int, h: int, w: int) -> np.ndarray:
    """A fixed, sharp texture for one walker (a colour of its own plus seeded noise)."""
    rng = np.random.default_rng(1000 + pid)
    base = rng.integers(40, 215, 3)
    noise = rng.integers(-40, 40, (h, w, 1))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def render(rows: Iterable[tuple[int, np.ndarray]], size: tuple[int, int], blurred: frozenset[int] = frozenset()) -> np.ndarray:
    """One RGB frame with the given boxes drawn (later rows on top); walkers in ``blurred`` are out of focus."""
    import cv2

    h, w = size
    ramp = np.linspace(60, 120, w, dtype=np.float32)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = ramp[None, :, None].astype(np.uint8)
    rows = list(rows)
    for pid, box in rows:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        img[y1:y2, x1:x2] = texture(pid, y2 - y1, x2 - x1)
    for pid, box in rows:
        if pid in blurred:  # after drawing: whatever overlaps the walker is out of focus too
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            a, b, c, d = max(0, x1 - 8), max(0, y1 - 8), min(w, x2 + 8), min(h, y2 + 8)
            img[b:d, a:c] = cv2.GaussianBlur(img[b:d, a:c], (0, 0), 4)
    return img


def write_video(
    path: Path,
    images: Sequence[np.ndarray],
    pts_seconds: Sequence[float],
    *,
    codec: str = "libx264",
    rate: int = 10,
) -> Path:
    """Encode RGB frames with PyAV at the given presentation times (millisecond time base)."""
    import av

    h, w = images[0].shape[:2]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)  # else the encoder rounds pts to 1/rate
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "ultrafast", "bf": "0"}
        for img, t in zip(images, pts_seconds):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = int(round(t * 1000))
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
