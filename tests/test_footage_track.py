"""reid_search.footage.track: ByteTrack ids scored by TrackEval (IDF1, MOTA), track names, best-K crops, bounded memory."""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou
from trackeval.metrics import CLEAR, Identity

from reid_search.footage import CameraTracker, Detections, Frame, Track, TrackerConfig, open_source, read_mot_detections
from reid_search.footage.track import sharpness
from tests.footage_synth import Walker, ground_truth, render, write_video

SIZE = (160, 320)
START = datetime(2026, 5, 1, 8, 0, 0, tzinfo=timezone.utc)
FPS = 10
# Four people: two crossing (one above the other), one entering late, one leaving early.
WALKERS = [
    Walker(1, x0=10, y0=20, vx=3.0, vy=0.4),
    Walker(2, x0=280, y0=50, vx=-3.0, vy=0.0),
    Walker(3, x0=140, y0=95, vx=0.5, vy=-0.3, first=25),
    Walker(4, x0=60, y0=90, vx=-1.0, vy=0.2, last=40),
]
N_FRAMES = 80


def noisy_detections(gt: list, seed: int = 0, miss: float = 0.05) -> list[Detections]:
    """The ground truth as a detector would see it: 1 px jitter, 5 % missed, a low-score false positive now and then."""
    rng = np.random.default_rng(seed)
    out = []
    for rows in gt:
        boxes, scores = [], []
        for _, box in rows:
            if rng.random() < miss:
                continue
            boxes.append(box + rng.normal(0, 1.0, 4))
            scores.append(rng.uniform(0.8, 0.95))
        if rng.random() < 0.2:
            x, y = rng.uniform(0, SIZE[1] - 30), rng.uniform(0, SIZE[0] - 60)
            boxes.append([x, y, x + 20, y + 40])
            scores.append(0.2)
        out.append(Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32)))
    return out


def frames_of(gt: list, blurred: frozenset[int] = frozenset()) -> list[Frame]:
    return [
        Frame(i, i / FPS, START + timedelta(seconds=i / FPS), render(rows, SIZE, blurred))
        for i, rows in enumerate(gt)
    ]


def run(tracker: CameraTracker, frames: list[Frame], dets: list[Detections]) -> tuple[list, list[Track]]:
    steps, tracks = [], []
    for frame, d in zip(frames, dets):
        step = tracker.update(frame, d)
        steps.append(step)
        tracks += step.ended
    return steps, tracks + tracker.flush()


def score(gt: list, hyp: list[tuple[list, np.ndarray]]) -> dict[str, float]:
    """IDF1, MOTA and id switches of per-frame hypotheses ``(ids, xyxy)`` against the ground truth (TrackEval)."""
    gt_index: dict[int, int] = {}
    hyp_index: dict[object, int] = {}
    data: dict = {"gt_ids": [], "tracker_ids": [], "similarity_scores": []}
    for rows, (ids, boxes) in zip(gt, hyp):
        g = np.array([gt_index.setdefault(pid, len(gt_index)) for pid, _ in rows], int)
        h = np.array([hyp_index.setdefault(i, len(hyp_index)) for i in ids], int)
        gb = torch.tensor(np.array([b for _, b in rows]).reshape(-1, 4), dtype=torch.float64)
        hb = torch.tensor(np.asarray(boxes).reshape(-1, 4), dtype=torch.float64)
        data["gt_ids"].append(g)
        data["tracker_ids"].append(h)
        data["similarity_scores"].append(box_iou(gb, hb).numpy())
    data.update(
        num_timesteps=len(gt), num_gt_ids=len(gt_index), num_tracker_ids=len(hyp_index),
        num_gt_dets=sum(len(g) for g in data["gt_ids"]), num_tracker_dets=sum(len(h) for h in data["tracker_ids"]),
    )
    cfg = {"THRESHOLD": 0.5, "PRINT_CONFIG": False}
    clear, ident = CLEAR(cfg).eval_sequence(data), Identity(cfg).eval_sequence(data)
    return {"idf1": float(ident["IDF1"]), "mota": float(clear["MOTA"]), "num_switches": int(clear["IDSW"])}


def test_tracking_scores_on_exact_ground_truth() -> None:
    gt = ground_truth(WALKERS, N_FRAMES, SIZE)
    steps, tracks = run(CameraTracker(TrackerConfig(camid=3, frame_rate=FPS)), frames_of(gt), noisy_detections(gt))
    hyp = [(list(s.names), s.xyxy) for s in steps]
    good = score(gt, hyp)
    assert good["idf1"] > 0.9 and good["mota"] > 0.85 and good["num_switches"] <= 1, good
    assert len(tracks) == 4
    # The same boxes with ids shuffled in every frame: the scoring must see it.
    rng = np.random.default_rng(1)
    shuffled = [(list(rng.permutation(ids)) if ids else ids, boxes) for ids, boxes in hyp]
    relabelled = [([f"{n}-{i}" for n in ids], boxes) for i, (ids, boxes) in enumerate(hyp)]
    assert score(gt, shuffled)["idf1"] < 0.6
    assert score(gt, relabelled)["idf1"] < 0.2


def test_names_are_readable_and_unique_per_camera() -> None:
    gt = ground_truth(WALKERS, N_FRAMES, SIZE)
    _, tracks = run(CameraTracker(TrackerConfig(camid=7, first_number=41)), frames_of(gt), noisy_detections(gt))
    names = [t.name for t in tracks]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"cam7-\d{6}", n) for n in names)
    assert sorted(names)[0] == "cam7-000041"
    late = min(tracks, key=lambda t: abs(t.first_frame - 26))
    assert late.first_time == START + timedelta(seconds=late.first_frame / FPS)


def test_best_k_crops_pass_the_quality_gates() -> None:
    gt = ground_truth(WALKERS, N_FRAMES, SIZE)
    frames = frames_of(gt, blurred=frozenset({2}))
    cfg = TrackerConfig(camid=1, k=3, min_box_area=20 * 40)
    steps, tracks = run(CameraTracker(cfg), frames, noisy_detections(gt))
    by_name = {t.name: t for t in tracks}
    # Brute force: every tracked box that passes the gates, best first per track.
    eligible: dict[str, list[float]] = {}
    for frame, step in zip(frames, steps):
        for name, box, s in zip(step.names, step.xyxy, step.scores):
            x1, y1, x2, y2 = (float(v) for v in box)
            w, h = x2 - x1, y2 - y1
            inside = x1 >= 2 and y1 >= 2 and x2 <= SIZE[1] - 2 and y2 <= SIZE[0] - 2
            if s < cfg.min_score or w * h < cfg.min_box_area or not 1.0 <= h / w <= 5.0 or not inside:
                continue
            pixels = frame.image[int(y1) : math.ceil(y2), int(x1) : math.ceil(x2)]
            if sharpness(pixels) < cfg.min_sharpness:
                continue
            eligible.setdefault(name, []).append(float(s) * math.sqrt(w * h))
    blurred_tracks = [t for t in tracks if t.crops == []]
    assert len(blurred_tracks) == 1 and blurred_tracks[0].detections > 30  # walker 2, out of focus
    for name, qualities in eligible.items():
        crops = by_name[name].crops
        assert [c.quality for c in crops] == pytest.approx(sorted(qualities, reverse=True)[:3])
        for c in crops:
            x1, y1, x2, y2 = c.bbox
            assert c.image.shape[2] == 3 and c.image.dtype == np.uint8
            assert 0 <= c.image.shape[0] - (y2 - y1) < 2 and 0 <= c.image.shape[1] - (x2 - x1) < 2
            assert c.capture_time == START + timedelta(seconds=c.frame_index / FPS)
            assert c.image.base is None  # a copy: the frame itself is not kept alive


def test_ended_tracks_are_emitted_and_dropped() -> None:
    # Three people in turn, never two at once: each track must end before the next begins.
    walkers = [Walker(p, x0=10, y0=40, vx=4.0, vy=0.0, first=40 * (p - 1), last=40 * (p - 1) + 25) for p in (1, 2, 3)]
    gt = ground_truth(walkers, 120, SIZE)
    tracker = CameraTracker(TrackerConfig(camid=2, lost_track_seconds=0.5))
    ended_at = []
    live = []
    for frame, d in zip(frames_of(gt), noisy_detections(gt, miss=0.0)):
        step = tracker.update(frame, d)
        ended_at += [(frame.index, t) for t in step.ended]
        live.append(tracker.live_tracks)
    assert max(live) == 1
    assert [t.name for _, t in ended_at] == ["cam2-000001", "cam2-000002", "cam2-000003"]
    for i, (when, t) in enumerate(ended_at):
        last = 40 * i + 25
        assert t.last_frame == last and last < when <= last + 8  # gone within the 0.5 s budget (+ slack)
    assert tracker.flush() == []


def test_video_and_det_txt_end_to_end(tmp_path: Path) -> None:
    gt = ground_truth(WALKERS[:2], 30, SIZE)
    images = [render(rows, SIZE) for rows in gt]
    video = write_video(tmp_path / "cam.mp4", images, [i / FPS for i in range(30)])
    lines = [
        f"{i + 1},-1,{b[0]:.1f},{b[1]:.1f},{b[2] - b[0]:.1f},{b[3] - b[1]:.1f},0.9,-1,-1,-1"
        for i, rows in enumerate(gt)
        for _, b in rows
    ]
    (tmp_path / "det.txt").write_text("\n".join(lines) + "\n")
    dets = read_mot_detections(tmp_path / "det.txt")
    tracker = CameraTracker(TrackerConfig(camid=5, k=2, min_box_area=20 * 40))
    tracks: list[Track] = []
    for frame in open_source(video, start=START):
        tracks += tracker.update(frame, dets.get(frame.index + 1, Detections.empty())).ended
    tracks += tracker.flush()
    assert sorted(t.name for t in tracks) == ["cam5-000001", "cam5-000002"]
    for t in tracks:
        assert len(t.crops) == 2
        for c in t.crops:
            assert abs((c.capture_time - START).total_seconds() - c.frame_index / FPS) < 1e-3
            x1, y1, x2, y2 = c.bbox
            truth = images[c.frame_index][int(y1) : math.ceil(y2), int(x1) : math.ceil(x2)].astype(float)
            assert c.image.shape == truth.shape
            assert np.abs(c.image.astype(float) - truth).mean() < 6  # the same pixels, through a lossy codec


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="k must be"):
        CameraTracker(TrackerConfig(camid=1, k=0))
