"""Calibrated match thresholds kept in the workspace, one per (model fingerprint, re-ranking).

``WORKSPACE/thresholds.json`` (the functions here take the workspace folder) maps ``"<fingerprint>|knn"`` or ``"<fingerprint>|rerank"``
to what ``reid-search calibrate`` measured. A lookup needs the exact fingerprint of the
model that answers the query and the same distance kind, so one model's threshold is
never applied to another model's distances (nor a k-NN threshold to re-ranked ones).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from reid_search.atomic import atomic_write_json
from reid_search.errors import GalleryError, ModelError

log = logging.getLogger(__name__)

THRESHOLDS_FILE = "thresholds.json"
FORMAT_VERSION = 1
DECISIONS = ("match", "no-match", "uncalibrated")


@dataclass(frozen=True)
class Calibration:
    """One calibrated threshold and what it was measured on."""

    threshold: float
    target_fpr: float
    model_fingerprint: str
    rerank: bool
    tpr: float
    genuine_pairs: int
    impostor_pairs: int
    query_dir: str
    gallery_items: int

    @property
    def key(self) -> str:
        """Its key in the thresholds file."""
        return threshold_key(self.model_fingerprint, self.rerank)

    def check(self, fingerprint: str, rerank: bool) -> None:
        """Refuse to apply this threshold to another model's (or the other distance kind's) distances.

        Raises:
            ModelError: the model or the re-ranking flag differs.
        """
        if fingerprint != self.model_fingerprint:
            raise ModelError(f"the threshold was calibrated with model {self.model_fingerprint}, not {fingerprint}: "
                             "run `reid-search calibrate` with this model or pass --threshold")
        if rerank != self.rerank:
            kind = "re-ranked" if self.rerank else "k-NN"
            raise ModelError(f"the threshold is for {kind} distances: run `reid-search calibrate"
                             f"{'' if rerank is False else ' --rerank'}` or pass --threshold")


def threshold_key(fingerprint: str, rerank: bool) -> str:
    """``"<fingerprint>|rerank"`` or ``"<fingerprint>|knn"``."""
    return f"{fingerprint}|{'rerank' if rerank else 'knn'}"


def thresholds_path(folder: str | os.PathLike[str]) -> Path:
    """Where the workspace folder ``folder`` keeps its thresholds."""
    return Path(folder) / THRESHOLDS_FILE


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise TypeError("entries is not an object")
        return entries
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GalleryError(f"the thresholds file {path} is unreadable ({exc}): move it away and run "
                           "`reid-search calibrate` again") from None


def save_calibration(folder: str | os.PathLike[str], cal: Calibration) -> Path:
    """Store ``cal`` in the workspace folder ``folder`` (created if needed; the file atomically),
    replacing only the entry of its model and distance kind.

    Raises:
        GalleryError: the existing file is unreadable (it is left as it is).
        OSError: the folder or the file cannot be written.
    """
    path = thresholds_path(folder)
    entries = _read(path)
    entries[cal.key] = asdict(cal)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"version": FORMAT_VERSION, "entries": entries})
    log.info("threshold %.6g for %s saved in %s", cal.threshold, cal.key, path)
    return path


def load_calibration(folder: str | os.PathLike[str], fingerprint: str, rerank: bool) -> Calibration | None:
    """The threshold calibrated in the workspace folder ``folder`` for exactly this model and
    distance kind, or None.

    Raises:
        GalleryError: the thresholds file is unreadable.
        ModelError: the entry filed under this key is another model's.
    """
    path = thresholds_path(folder)
    raw = _read(path).get(threshold_key(fingerprint, rerank))
    if raw is None:
        return None
    try:
        cal = Calibration(**raw)
    except TypeError as exc:
        raise GalleryError(f"the thresholds file {path} has a malformed entry ({exc}): run "
                           "`reid-search calibrate` again") from None
    cal.check(fingerprint, rerank)  # the key and the entry must agree
    return cal


def decide(distances: Sequence[float], threshold: float | None) -> tuple[list[bool | None], str]:
    """Per-hit ``match`` flags (distance <= threshold) and the answer's decision.

    ``decision`` is ``"match"`` when any hit matches, ``"no-match"`` when none does,
    ``"uncalibrated"`` (and every flag None) without a threshold.
    """
    if threshold is None:
        return [None] * len(distances), "uncalibrated"
    flags = [float(d) <= threshold for d in distances]
    return flags, "match" if any(flags) else "no-match"
