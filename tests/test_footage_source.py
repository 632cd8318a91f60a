"""reid_search.footage.source: PyAV decoding, pts-based times, fps sampling, bad files and silent streams."""

from __future__ import annotations

import logging
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from reid_search.errors import DataError
from reid_search.footage import open_source
from tests.helpers import shared_path
from tests.footage_synth import Walker, ground_truth, render, write_video

SIZE = (96, 128)
START = datetime(2026, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
# Variable frame rate: gaps of 50 ms to 650 ms.
VFR_PTS = [0.0, 0.1, 0.15, 0.5, 0.55, 1.2] + [round(1.2 + 0.05 * i, 3) for i in range(1, 25)]


def walker_frames(n: int) -> tuple[list[np.ndarray], list]:
    gt = ground_truth([Walker(1, x0=4, y0=20, vx=3, vy=0.5)], n, SIZE)
    return [render(rows, SIZE) for rows in gt], gt


@pytest.mark.parametrize("ext, codec", [("mp4", "libx264"), ("mkv", "libx264"), ("avi", "mpeg4"), ("mov", "mpeg4")])
def test_constant_rate_file_times_and_pixels(tmp_path: Path, ext: str, codec: str) -> None:
    images, gt = walker_frames(20)
    path = write_video(tmp_path / f"cam.{ext}", images, [i / 10 for i in range(20)], codec=codec)
    with open_source(path, start=START) as src:
        frames = list(src)
    assert [f.index for f in frames] == list(range(20))
    assert [f.pts_seconds for f in frames] == pytest.approx([i / 10 for i in range(20)], abs=1e-6)
    assert frames[7].capture_time == START + timedelta(seconds=0.7)
    assert src.stopped_early is None and src.start_from == "given"
    f = frames[10]
    assert f.image.shape == (*SIZE, 3) and f.image.dtype == np.uint8
    # The walker's box is where the ground truth says (lossy codec: compare mean colour).
    x1, y1, x2, y2 = (int(round(v)) for v in gt[10][0][1])
    inside = f.image[y1 + 4 : y2 - 4, x1 + 4 : x2 - 4].reshape(-1, 3).mean(0)
    assert np.abs(inside - images[10][y1 + 4 : y2 - 4, x1 + 4 : x2 - 4].reshape(-1, 3).mean(0)).max() < 12


@pytest.mark.parametrize("ext", ["mp4", "mkv", "mov"])
def test_variable_frame_rate_uses_presentation_times(tmp_path: Path, ext: str) -> None:
    images, _ = walker_frames(len(VFR_PTS))
    path = write_video(tmp_path / f"vfr.{ext}", images, VFR_PTS)
    frames = list(open_source(path, start=START))
    assert [f.pts_seconds for f in frames] == pytest.approx(VFR_PTS, abs=1e-6)
    # Index × nominal rate would put frame 5 at 0.5 s; it was shown at 1.2 s.
    assert frames[5].capture_time == START + timedelta(seconds=1.2)


def test_fps_sampling_follows_timestamps(tmp_path: Path) -> None:
    images, _ = walker_frames(len(VFR_PTS))
    path = write_video(tmp_path / "vfr.mkv", images, VFR_PTS)
    got = [f.pts_seconds for f in open_source(path, fps=4)]
    # One frame per 0.25 s slot of presentation time, the first in it: slots without a frame stay empty.
    assert got == pytest.approx([0.0, 0.5, 1.2, 1.25, 1.5, 1.75, 2.0, 2.25], abs=1e-6)
    steady_images, _ = walker_frames(30)
    steady = write_video(tmp_path / "cfr.mkv", steady_images, [i / 30 for i in range(30)], rate=30)
    picked = [f.index for f in open_source(steady, fps=10)]
    assert picked == list(range(0, 30, 3))


def test_gif_frame_delays(tmp_path: Path) -> None:
    images, _ = walker_frames(4)
    path = tmp_path / "walk.gif"
    frames = [Image.fromarray(im) for im in images]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[100, 300, 50, 100], loop=0)
    got = list(open_source(path, start=START))
    assert [f.pts_seconds for f in got] == pytest.approx([0.0, 0.1, 0.4, 0.45], abs=1e-6)
    assert got[0].image.shape == (*SIZE, 3)


def test_frame_folder_in_number_order(tmp_path: Path) -> None:
    images, _ = walker_frames(3)
    for n, im in zip((1, 2, 10), images):
        Image.fromarray(im).save(tmp_path / f"{n:d}.png")
    frames = list(open_source(tmp_path, start=START, frames_fps=5))
    assert [f.pts_seconds for f in frames] == pytest.approx([0.0, 0.2, 0.4])
    assert np.array_equal(frames[2].image, images[2])  # 10.png after 2.png
    (tmp_path / "cover.png").write_bytes((tmp_path / "1.png").read_bytes())
    with pytest.raises(DataError, match="cover.png has no number"):
        open_source(tmp_path)


def test_file_time_when_no_start(tmp_path: Path) -> None:
    images, _ = walker_frames(10)
    path = write_video(tmp_path / "cam.mkv", images, [i / 10 for i in range(10)])
    src = open_source(path)
    assert src.start_from in ("file time", "creation_time tag")
    first = next(iter(src))
    assert first.capture_time.tzinfo is not None


def test_zero_length_file(tmp_path: Path) -> None:
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty \(0 bytes\)") as e:
        open_source(tmp_path / "empty.mp4")
    assert "\n" not in str(e.value)


def test_not_a_video(tmp_path: Path) -> None:
    (tmp_path / "notes.mp4").write_text("these are not frames\n" * 50)
    with pytest.raises(DataError, match="cannot be read as video") as e:
        open_source(tmp_path / "notes.mp4")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "missing.mp4")


def _faststart_mp4(path: Path, images: list[np.ndarray]) -> Path:
    # The index first, as cameras and web uploads write it: a cut-off file still opens.
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = SIZE[1], SIZE[0], "yuv420p"
        for im in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(im, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.mark.parametrize("kind", ["mkv", "faststart-mp4"])
def test_truncated_file_yields_what_decodes(tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    images, _ = walker_frames(40)
    if kind == "mkv":
        full = write_video(tmp_path / "full.mkv", images, [i / 10 for i in range(40)])
    else:
        full = _faststart_mp4(tmp_path / "full.mp4", images)
    data = full.read_bytes()
    cut = tmp_path / f"cut{full.suffix}"
    cut.write_bytes(data[: int(len(data) * 0.85)])
    with caplog.at_level(logging.WARNING, logger="reid_search.footage.source"):
        src = open_source(cut, start=START)
        frames = list(src)
    assert 5 < len(frames) < 40
    assert [f.index for f in frames] == list(range(len(frames)))
    assert src.stopped_early is not None and "of 4.000 s" in src.stopped_early
    assert any("kept the" in r.getMessage() for r in caplog.records)
    whole = open_source(full)
    assert len(list(whole)) == 40 and whole.stopped_early is None
    with pytest.raises(DataError, match="read already"):
        list(whole)


def test_mp4_cut_before_its_index(tmp_path: Path) -> None:
    images, _ = walker_frames(20)
    full = write_video(tmp_path / "full.mp4", images, [i / 10 for i in range(20)])
    data = full.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # moov is at the end: gone
    with pytest.raises(DataError, match="cut off before its index"):
        open_source(tmp_path / "cut.mp4")


@pytest.mark.parametrize("scheme", ["http", "rtsp"])
def test_silent_stream_times_out(scheme: str) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    held: list[socket.socket] = []

    def accept() -> None:
        try:
            held.append(server.accept()[0])  # accept, then say nothing
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"{scheme}://127.0.0.1:{server.getsockname()[1]}/cam"
    began = time.monotonic()
    try:
        with pytest.raises(DataError, match="did not answer within 1 s") as e:
            open_source(url, timeout_s=1.0)
    finally:
        server.close()
        for conn in held:
            conn.close()
        thread.join(5)
    assert time.monotonic() - began < 8
    assert "\n" not in str(e.value)


def test_real_clip_decodes() -> None:
    clip = shared_path("data", "footage", "one-by-one-person-detection.mp4")
    src = open_source(clip, fps=2)
    frames = []
    for f in src:
        frames.append(f)
        if len(frames) == 6:
            break
    assert [round(f.pts_seconds, 3) for f in frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert frames[0].image.shape == (432, 768, 3)
