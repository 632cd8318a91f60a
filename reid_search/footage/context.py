"""Frame context for answers: the frames of a source that hits came from, read back for a picture.

A hit on footage names its source, its frame number and its box. When the
source is still there, the frame is decoded again and the box drawn on it; when
it is gone (a live stream, a deleted file), callers fall back to the stored
crop. Frames are found by decoding forward through the source once, in order
(frame numbers count decoded frames, which seeking by timestamp cannot
recover exactly on variable-rate files); reading stops at the last frame asked
for.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import numpy as np

from reid_search.errors import DataError
from reid_search.footage.source import is_stream, open_source

log = logging.getLogger(__name__)

MAX_FRAMES_SCANNED = 200_000


def read_frames(source: str | Path, indices: Iterable[int], *, frames_fps: float = 25.0) -> dict[int, np.ndarray]:
    """The RGB frames ``indices`` of a video file or frame folder (those it has); empty for a stream or a
    missing source (the caller then shows the stored crop)."""
    wanted = sorted({int(i) for i in indices if i is not None and int(i) >= 0})
    if not wanted or is_stream(source) or not Path(source).exists():
        return {}
    if Path(source).is_dir():
        return _folder_frames(Path(source), wanted)
    last = wanted[-1]
    if last > MAX_FRAMES_SCANNED:
        log.info("%s: frame %d is too far in to decode for a picture; showing stored crops", source, last)
        wanted = [i for i in wanted if i <= MAX_FRAMES_SCANNED]
        last = wanted[-1] if wanted else -1
    out: dict[int, np.ndarray] = {}
    want = set(wanted)
    try:
        with open_source(source, start=None, frames_fps=frames_fps) as frames:
            for frame in frames:
                if frame.index in want:
                    out[frame.index] = frame.image
                if frame.index >= last:
                    break
    except DataError as exc:
        log.info("%s: no frame context (%s)", source, exc)
    return out


def _folder_frames(folder: Path, wanted: list[int]) -> dict[int, np.ndarray]:
    from PIL import Image

    from reid_search.footage.source import numbered_frames

    try:
        files = numbered_frames(folder)
    except DataError as exc:
        log.info("%s: no frame context (%s)", folder, exc)
        return {}
    out: dict[int, np.ndarray] = {}
    for i in wanted:
        if i < len(files):
            try:
                with Image.open(files[i]) as img:
                    out[i] = np.asarray(img.convert("RGB"))
            except OSError:
                continue
    return out


__all__ = ["read_frames"]
