"""Frames from a video file, a folder of numbered frames, a live stream or a device.

Decoding goes through PyAV, the FFmpeg binding, rather than OpenCV's ``VideoCapture``:
PyAV hands over each frame's exact presentation timestamp (``pts × time_base``),
so capture times stay right on variable-frame-rate files, GIFs (whose frames have
their own delays) and streams, where a frame index × nominal fps drifts; and one
API covers mp4/mkv/avi/mov/GIF files, ``rtsp://``/``http(s)://`` streams and
capture devices, with open/read timeouts that a never-answering stream needs.

A source is a one-pass iterator of :class:`Frame` objects; one decoded frame is
held at a time, so memory does not grow with the length of the video or the
stream.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from reid_search.errors import DataError, first_line
from reid_search.timeutil import as_utc

log = logging.getLogger(__name__)

STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_NUMBER = re.compile(r"(\d+)(?!.*\d)")
# A file that ends this much (seconds) before its container's stated duration stopped early.
_END_SLACK_S = 0.5


@dataclass(frozen=True)
class Frame:
    """One decoded frame.

    ``index`` counts decoded frames from 0 (frames skipped by ``fps`` sampling
    still count, so it names the frame in the source); ``pts_seconds`` is its
    presentation time from the start of the source; ``capture_time`` is the
    aware UTC time it was taken (start + pts for files, the wall clock for live
    sources); ``image`` is HxWx3 uint8 RGB.
    """

    index: int
    pts_seconds: float
    capture_time: datetime
    image: np.ndarray


def is_stream(source: str | Path) -> bool:
    """Whether ``source`` names a live stream (a URL) or a capture device (``/dev/video*``)."""
    text = str(source)
    return text.lower().startswith(STREAM_SCHEMES) or text.startswith("/dev/video")


class FrameSource:
    """Frames of one source, read once, in presentation order.

    Use :func:`open_source` to make one. After iteration, ``stopped_early`` is
    ``None`` when the whole source decoded, or a one-line reason (a corrupt or
    truncated file: where it stopped); ``frames_decoded`` counts decoded frames
    and ``last_pts`` the last presentation time seen.
    """

    def __init__(
        self,
        source: str | Path,
        *,
        fps: float | None,
        start: datetime | None,
        timeout_s: float,
        frames_fps: float,
    ) -> None:
        if fps is not None and not (fps > 0 and math.isfinite(fps)):
            raise DataError(f"fps must be a positive number, not {fps}")
        if not frames_fps > 0:
            raise DataError(f"frames_fps must be positive, not {frames_fps}")
        self.name = str(source)
        self.fps = fps
        self.live = is_stream(source)
        self.stopped_early: str | None = None
        self.frames_decoded = 0
        self.last_pts: float | None = None
        self.duration_s: float | None = None
        self._container = None
        self._stream = None
        self._read = False
        self._frame_files: list[Path] | None = None
        self._frames_fps = frames_fps
        path = Path(source)
        if self.live:
            self.kind = "stream"
            self._open_av(timeout_s)
        elif path.is_dir():
            self.kind = "frames"
            self._frame_files = numbered_frames(path)
            self.duration_s = len(self._frame_files) / frames_fps
        elif path.is_file():
            if path.stat().st_size == 0:
                raise DataError(f"{path} is empty (0 bytes): not a video")
            self.kind = "file"
            self._open_av(timeout_s)
        else:
            raise DataError(f"{source} does not exist (expected a video file, a folder of frames or a stream URL)")
        self.start_time, self.start_from = self._start(start, path)

    # -- opening ----------------------------------------------------------
    def _open_av(self, timeout_s: float) -> None:
        import av

        options: dict[str, str] = {}
        fmt = None
        if self.name.lower().startswith(("rtsp://", "rtsps://")):
            options["rtsp_transport"] = "tcp"
        if self.name.startswith("/dev/video"):
            fmt = "v4l2"
        began = time.monotonic()
        try:
            self._container = av.open(self.name, format=fmt, options=options, timeout=(timeout_s, timeout_s))
        except (av.error.FFmpegError, OSError) as exc:
            # The interrupt callback ends a silent stream as ExitError, or as the protocol's own
            # error (RTSP says "invalid data"): the clock tells a timeout apart.
            if isinstance(exc, av.error.ExitError) or (self.live and time.monotonic() - began >= 0.9 * timeout_s):
                raise DataError(f"{self.name} did not answer within {timeout_s:g} s") from exc
            if self.live:
                raise DataError(f"cannot open stream {self.name}: {_ffmpeg_reason(exc)}") from exc
            raise DataError(
                f"{self.name} cannot be read as video ({_ffmpeg_reason(exc)}): not a video, "
                "or an mp4/mov cut off before its index"
            ) from exc
        if not self._container.streams.video:
            self._container.close()
            raise DataError(f"{self.name} has no video stream")
        stream = self._container.streams.video[0]
        # FFmpeg's default (slice) threading: frame threading buys nothing at these sizes
        # (425 vs 353 frames/s on the 768x432 clip) and loses its in-flight frames on a damaged packet.
        self._stream = stream
        if stream.duration is not None and stream.time_base is not None:
            self.duration_s = float(stream.duration * stream.time_base)
        elif self._container.duration is not None and not self.live:
            self.duration_s = self._container.duration / 1_000_000

    def _start(self, start: datetime | None, path: Path) -> tuple[datetime, str]:
        if self.live:
            if start is not None:
                log.info("%s: a live source is timed by the wall clock; the start time is not used", self.name)
            return datetime.now(timezone.utc), "wall clock"
        if start is not None:
            return as_utc(start), "given"
        tag = (self._container.metadata.get("creation_time") if self._container is not None else None) or None
        if tag:
            try:
                return as_utc(datetime.fromisoformat(tag.replace("Z", "+00:00"))), "creation_time tag"
            except ValueError:
                log.info("%s: unreadable creation_time tag %r", self.name, tag)
        mtime = path.stat().st_mtime if self.kind == "file" else max(p.stat().st_mtime for p in self._frame_files or [path])
        # A camera closes the file when it stops recording: the start is mtime minus the duration.
        t = datetime.fromtimestamp(mtime, timezone.utc) - timedelta(seconds=self.duration_s or 0.0)
        log.info("%s: no start time given or stored; taking the file time (%s)", self.name, t.isoformat())
        return t, "file time"

    @property
    def expected_frames(self) -> int | None:
        """About how many frames iteration will yield (for a progress bar); None for a live source."""
        if self.live or self.duration_s is None:
            return None
        if self._frame_files is not None:
            rate = self._frames_fps
        else:
            rate = float(self._stream.average_rate) if self._stream is not None and self._stream.average_rate else 25.0
        if self.fps is not None:
            rate = min(rate, self.fps)
        return max(1, round(self.duration_s * rate))

    # -- reading ----------------------------------------------------------
    def __iter__(self) -> Iterator[Frame]:
        """Decoded frames, sampled to ``fps`` by timestamp when it is set.

        Raises:
            DataError: the source was read (or closed) already: open it again.
        """
        if self._read:
            raise DataError(f"{self.name} was read already: open it again to read it again")
        self._read = True
        raw = self._iter_frames() if self._frame_files is not None else self._iter_av()
        if self.fps is None:
            yield from raw
            return
        step = 1.0 / self.fps
        due: float | None = None
        for frame in raw:
            # Sampling on the timestamp grid keeps the rate right where frame intervals vary.
            if due is None or frame.pts_seconds + 1e-6 >= due:
                yield frame
                base = frame.pts_seconds if due is None else due
                due = base + step * (math.floor((frame.pts_seconds + 1e-6 - base) / step) + 1)

    def _iter_av(self) -> Iterator[Frame]:
        import av

        stream = self._stream
        rate = float(stream.average_rate) if stream.average_rate else 25.0
        # Times count from the stream's start (AVI and some mp4 edit lists start past 0).
        origin: float | None = float(stream.start_time * stream.time_base) if stream.start_time is not None and not self.live else None
        prev: float | None = None
        try:
            for packet in self._container.demux(stream):
                try:
                    decoded = packet.decode()
                except av.error.InvalidDataError as exc:
                    # One damaged packet: FFmpeg's own decoders conceal and go on, so do we.
                    log.warning("%s: skipped a damaged packet after frame %d: %s", self.name, self.frames_decoded, _ffmpeg_reason(exc))
                    continue
                for vf in decoded:
                    t = vf.time if vf.time is not None else (prev + 1.0 / rate if prev is not None else 0.0)
                    if origin is None:
                        origin = t
                    pts = max(0.0, t - origin)
                    if prev is not None and pts < prev:
                        pts = prev  # a non-monotonic stamp must not send time backwards
                    prev = pts
                    capture = datetime.now(timezone.utc) if self.live else self.start_time + timedelta(seconds=pts)
                    frame = Frame(self.frames_decoded, pts, capture, vf.to_ndarray(format="rgb24"))
                    self.frames_decoded += 1
                    self.last_pts = pts
                    yield frame
        except av.error.ExitError:
            self._stop(f"stream stopped answering after frame {self.frames_decoded}")
        except (av.error.FFmpegError, OSError) as exc:
            self._stop(f"decoding failed after frame {self.frames_decoded} (t={self.last_pts or 0:.3f} s): {_ffmpeg_reason(exc)}")
        else:
            self._check_complete()
        finally:
            self.close()

    def _iter_frames(self) -> Iterator[Frame]:
        from PIL import Image, UnidentifiedImageError

        for i, path in enumerate(self._frame_files or []):
            try:
                with Image.open(path) as img:
                    image = np.asarray(img.convert("RGB"))
            except (OSError, UnidentifiedImageError) as exc:
                self._stop(f"unreadable frame {path.name} (frame {i}): {_first(exc)}")
                return
            pts = i / self._frames_fps
            self.frames_decoded += 1
            self.last_pts = pts
            yield Frame(i, pts, self.start_time + timedelta(seconds=pts), image)

    def _check_complete(self) -> None:
        if self.live or self.duration_s is None:
            return
        if self.frames_decoded == 0:
            self._stop("no frame decoded")
            return
        interval = 1.0 / float(self._stream.average_rate) if self._stream.average_rate else 0.0
        end = (self.last_pts or 0.0) + interval
        if end + _END_SLACK_S < self.duration_s:
            self._stop(f"ended at {end:.3f} s of {self.duration_s:.3f} s (truncated?) after frame {self.frames_decoded - 1}")

    def _stop(self, reason: str) -> None:
        self.stopped_early = reason
        log.warning("%s: %s; kept the %d frames before it", self.name, reason, self.frames_decoded)

    def close(self) -> None:
        """Release the decoder (iteration does it at the end)."""
        self._read = True
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(
    source: str | Path,
    *,
    fps: float | None = None,
    start: datetime | None = None,
    timeout_s: float = 10.0,
    frames_fps: float = 25.0,
) -> FrameSource:
    """Open a video file (any FFmpeg-readable type, GIF included), a frame folder, a stream URL or a device.

    ``fps`` samples at most that many frames per second of presentation time.
    ``start`` (a naive time is UTC) anchors capture times of files and frame
    folders; without it a file's ``creation_time`` tag is used, else its
    modification time minus its duration. Live sources always use the wall
    clock. A folder's frames are ordered by the last number in their names and
    spaced ``frames_fps`` apart. ``timeout_s`` bounds opening and each read of
    a stream.

    Raises:
        DataError: a missing or zero-length file, a file that is not a video,
            an empty frame folder, or a stream that did not answer in time.
    """
    return FrameSource(source, fps=fps, start=start, timeout_s=timeout_s, frames_fps=frames_fps)


def numbered_frames(folder: Path) -> list[Path]:
    """The frame images of ``folder`` in the order of the last number in their names.

    Raises:
        DataError: no frames, or a frame without a number in its name.
    """
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
    if not files:
        raise DataError(f"{folder} holds no frames ({', '.join(FRAME_SUFFIXES)})")
    unnumbered = [p.name for p in files if not _NUMBER.search(p.stem)]
    if unnumbered:
        raise DataError(f"{folder}: frame {unnumbered[0]} has no number in its name (expected e.g. 000001.jpg)")
    return sorted(files, key=lambda p: (int(_NUMBER.search(p.stem).group(1)), p.name))


def _first(exc: BaseException) -> str:
    return first_line(exc, with_type=False)


def _ffmpeg_reason(exc: BaseException) -> str:
    """FFmpeg's own words without the errno and the repeated file name."""
    return getattr(exc, "strerror", None) or _first(exc)
