"""Tracking within one camera: ByteTrack ids, readable track names, each track's best crops.

The tracker is ``trackers.ByteTrackTracker`` from roboflow's ``trackers``
(Apache-2.0). Of the two kept candidates it is the maintained ByteTrack:
supervision (MIT) moved its tracking out to that package and no longer ships
``ByteTrack`` (0.31 has none), so depending on supervision for it would pin an
abandoned copy. ``trackers`` is driven one frame at a time with numpy
``xyxy`` boxes and scores (wrapped in the ``supervision.Detections`` it takes),
accepts each frame's timestamp so lost-track budgets are seconds on
variable-rate footage, and brings only supervision, SciPy (the assignment) and
OpenCV (headless here) with it, not torch or a model zoo. BoxMOT, which has one
too, is AGPL-3.0 and is not used.

Memory stays bounded on a run of any length: a live track holds at most ``k``
crops, and a track that ByteTrack has given up is returned by
:meth:`CameraTracker.update` and forgotten.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from reid_search.footage.detect import Detections
from reid_search.footage.source import Frame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackerConfig:
    """Tracking and crop-quality settings for one camera.

    ByteTrack's thresholds are its own defaults except ``track_activation_threshold``
    (0.5 rather than 0.7: the small detectors' scores on real people sit at 0.5–0.9).
    ``lost_track_seconds`` is how long a track may go unseen before it ends.
    A crop is kept only if its box has at least ``min_box_area`` pixels, a
    height/width ratio within ``aspect_range``, a score of at least
    ``min_score``, stays ``edge_margin`` pixels clear of the frame edge, and
    its grey-level Laplacian variance (sharpness) reaches ``min_sharpness``;
    of those the ``k`` with the highest score × sqrt(area) are kept.
    ``first_number`` numbers this camera's first track (continue a camera's
    earlier runs by passing one past its last).
    """

    camid: int
    k: int = 5
    frame_rate: float = 10.0
    lost_track_seconds: float = 1.0
    track_activation_threshold: float = 0.5
    high_conf_det_threshold: float = 0.6
    minimum_iou_threshold: float = 0.1
    minimum_consecutive_frames: int = 2
    min_box_area: float = 32 * 64
    aspect_range: tuple[float, float] = (1.0, 5.0)
    min_score: float = 0.3
    edge_margin: int = 2
    min_sharpness: float = 20.0
    first_number: int = 1


@dataclass(frozen=True)
class Crop:
    """One kept view of a track: the RGB pixels, the frame box ``xyxy``, where and when, and its quality."""

    image: np.ndarray
    bbox: tuple[float, float, float, float]
    frame_index: int
    pts_seconds: float
    capture_time: datetime
    score: float
    quality: float


@dataclass
class Track:
    """A finished (or flushed) track: its name, lifespan, detection count and best crops, best first."""

    name: str
    camid: int
    first_frame: int
    last_frame: int
    first_time: datetime
    last_time: datetime
    detections: int = 0
    crops: list[Crop] = field(default_factory=list)


@dataclass(frozen=True)
class FrameTracks:
    """One frame's result: tracked boxes with their track names, and the tracks that ended."""

    xyxy: np.ndarray
    scores: np.ndarray
    names: list[str]
    ended: list[Track]


class _Open:
    """A live track: its summary and a min-heap of its best crops."""

    def __init__(self, name: str, camid: int, frame: Frame) -> None:
        self.track = Track(name, camid, frame.index, frame.index, frame.capture_time, frame.capture_time)
        self.heap: list[tuple[float, int, Crop]] = []

    def finish(self) -> Track:
        self.track.crops = [c for _, _, c in sorted(self.heap, key=lambda e: (-e[0], e[1]))]
        return self.track


def sharpness(image: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image: low for blurred or flat crops."""
    import cv2

    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


class CameraTracker:
    """ByteTrack over one camera's frames, fed one frame of detections at a time.

    Names are ``cam{camid}-{number:06d}``, numbered in the order tracks are
    confirmed, so they are unique within the camera (see
    ``TrackerConfig.first_number`` across runs).
    """

    def __init__(self, config: TrackerConfig) -> None:
        """Raises: ValueError: ``k`` below 1 or a non-positive frame rate."""
        from trackers import ByteTrackTracker

        if config.k < 1 or not config.frame_rate > 0:
            raise ValueError(f"k must be >= 1 and frame_rate > 0, got {config.k} and {config.frame_rate}")
        self.config = config
        # The library counts its lost buffer in 30 fps frames and turns it into seconds itself.
        self._bt = ByteTrackTracker(
            lost_track_buffer=max(0, round(config.lost_track_seconds * 30)),
            frame_rate=config.frame_rate,
            track_activation_threshold=config.track_activation_threshold,
            minimum_consecutive_frames=config.minimum_consecutive_frames,
            minimum_iou_threshold=config.minimum_iou_threshold,
            high_conf_det_threshold=config.high_conf_det_threshold,
        )
        self._open: dict[int, _Open] = {}
        self._numbers = itertools.count(config.first_number)
        self._seq = itertools.count()
        self._last_pts: float | None = None

    def update(self, frame: Frame, detections: Detections) -> FrameTracks:
        """Track one frame's detections; return the tracked boxes and the tracks that ended."""
        import supervision as sv

        pts = frame.pts_seconds
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1e-6  # the library skips a frame whose time does not advance
        self._last_pts = pts
        n = len(detections)
        if n:
            det = sv.Detections(
                xyxy=detections.xyxy.astype(np.float32),
                confidence=detections.scores.astype(np.float32),
                data={"row": np.arange(n)},
            )
        else:
            det = sv.Detections.empty()
        result = self._bt.update(det, timestamp=pts)
        xyxy, scores, names = [], [], []
        for i, tid in enumerate(result.tracker_id):
            if tid < 0:
                continue
            tid = int(tid)
            row = int(result.data["row"][i])
            box, score = detections.xyxy[row], float(detections.scores[row])
            live = self._open.get(tid)
            if live is None:
                live = self._open[tid] = _Open(f"cam{self.config.camid}-{next(self._numbers):06d}", self.config.camid, frame)
            live.track.last_frame, live.track.last_time = frame.index, frame.capture_time
            live.track.detections += 1
            self._offer(live, frame, box, score)
            xyxy.append(box)
            scores.append(score)
            names.append(live.track.name)
        alive = {int(t) for t in self._bt.tracked_objects.tracker_id} if self._open else set()
        ended = [self._open.pop(tid).finish() for tid in [t for t in self._open if t not in alive]]
        for t in ended:
            log.debug("track %s ended: frames %d-%d, %d crops", t.name, t.first_frame, t.last_frame, len(t.crops))
        return FrameTracks(
            np.array(xyxy, np.float32).reshape(-1, 4), np.array(scores, np.float32), names, ended
        )

    def flush(self) -> list[Track]:
        """End every live track (the source is over) and return them; the tracker starts afresh."""
        ended = [live.finish() for live in self._open.values()]
        self._open.clear()
        self._bt.reset()
        self._last_pts = None
        return ended

    @property
    def live_tracks(self) -> int:
        """How many tracks are still open."""
        return len(self._open)

    def _offer(self, live: _Open, frame: Frame, box: np.ndarray, score: float) -> None:
        cfg = self.config
        h, w = frame.image.shape[:2]
        x1, y1, x2, y2 = (float(v) for v in box)
        bw, bh = x2 - x1, y2 - y1
        area = bw * bh
        if score < cfg.min_score or area < cfg.min_box_area or bw <= 0:
            return
        if not cfg.aspect_range[0] <= bh / bw <= cfg.aspect_range[1]:
            return
        m = cfg.edge_margin
        if x1 < m or y1 < m or x2 > w - m or y2 > h - m:
            return  # cut by the frame edge: part of the person is missing
        quality = score * math.sqrt(area)
        if len(live.heap) >= cfg.k and quality <= live.heap[0][0]:
            return  # not better than the worst kept: skip the copy and the blur test
        pixels = frame.image[int(y1) : int(math.ceil(y2)), int(x1) : int(math.ceil(x2))]
        if pixels.size == 0 or sharpness(pixels) < cfg.min_sharpness:
            return
        crop = Crop(pixels.copy(), (x1, y1, x2, y2), frame.index, frame.pts_seconds, frame.capture_time, score, quality)
        entry = (quality, next(self._seq), crop)
        if len(live.heap) < cfg.k:
            heapq.heappush(live.heap, entry)
        else:
            heapq.heapreplace(live.heap, entry)
