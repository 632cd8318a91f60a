"""Footage in: frames from videos and streams, person detection, per-camera tracking.

:mod:`.source` decodes (PyAV), :mod:`.detect` finds people (an ONNX YOLOX-family
detector, or MOT Challenge ``det.txt`` rows), :mod:`.track` links them into
tracks with ByteTrack and keeps each track's best crops. Core layer: it imports
only base modules of reid_search.
"""

from reid_search.footage.detect import Detections, YoloxDetector, read_mot_detections
from reid_search.footage.source import Frame, FrameSource, is_stream, open_source
from reid_search.footage.track import CameraTracker, Crop, FrameTracks, Track, TrackerConfig

__all__ = [
    "CameraTracker",
    "Crop",
    "Detections",
    "Frame",
    "FrameSource",
    "FrameTracks",
    "Track",
    "TrackerConfig",
    "YoloxDetector",
    "is_stream",
    "open_source",
    "read_mot_detections",
]
