"""The plan of a dataset: every file's split, pid, camera and Market name, decided before drawing."""

from __future__ import annotations

from dataclasses import dataclass

from reid_search.data import GALLERY_DIR, QUERY_DIR, TRAIN_DIR
from reid_search.synthetic.look import K_EXTRA, K_TRACK, seeded

__all__ = ["MAX_EXTRA", "MAX_IMAGES_PER_ID", "Item", "plan"]

# Frames must fit Market's six digits: tracks start below 900,000 and step 25.
_MAX_FRAME_START = 900_000
_FRAME_STEP = 25
MAX_IMAGES_PER_ID = 1000
MAX_EXTRA = 39_000  # distractors or junk: frames 1 + 25 * i stay below 10**6


@dataclass(frozen=True)
class Item:
    """One file to write."""

    folder: str
    pid: int
    cam: int  # 1-based, as in the name
    seq: int
    frame: int
    bbox: int
    idx: int  # per-(pid) index, part of the image seed
    kind: str  # person | other_person | clutter | junk

    @property
    def name(self) -> str:
        """The Market file name."""
        pid = "-1" if self.pid == -1 else f"{self.pid:04d}"
        return f"{pid}_c{self.cam}s{self.seq}_{self.frame:06d}_{self.bbox:02d}.jpg"


def plan(
    *,
    ids: int,
    cameras: int,
    images_per_id: int,
    seed: int,
    n_train: int,
    distractors: int,
    junk: int,
) -> list[Item]:
    """Decide every file (split, pid, camera, name) without drawing anything."""
    items: list[Item] = []
    # At least two images per camera where possible, so a camera can give a query
    # and still keep a gallery image.
    k_max = min(cameras, max(2, images_per_id // 2))
    for pid in range(1, ids + 1):
        rng = seeded(seed, K_TRACK, pid)
        k = rng.randint(2, k_max)
        cams = sorted(c + 1 for c in rng.sample(range(cameras), k))
        base = 2 if images_per_id >= 2 * k else 1
        counts = [base] * k
        for _ in range(images_per_id - base * k):
            counts[rng.randrange(k)] += 1
        test = pid > n_train
        # Query: the first image of each camera that has a second one left for the
        # gallery; with one image per camera, only the first camera's.
        query_cams = {c for c, n in zip(cams, counts) if n >= 2} or {cams[0]}
        idx = 0
        for cam, n in zip(cams, counts):
            seq = rng.randrange(1, 7)
            start = rng.randrange(1, _MAX_FRAME_START)
            for j in range(n):
                frame = start + _FRAME_STEP * j + rng.randrange(0, _FRAME_STEP - 5)
                bbox = rng.choices(range(4), weights=(0.55, 0.25, 0.12, 0.08))[0]
                if not test:
                    folder = TRAIN_DIR
                elif j == 0 and cam in query_cams:
                    folder = QUERY_DIR
                else:
                    folder = GALLERY_DIR
                items.append(Item(folder, pid, cam, seq, frame, bbox, idx, "person"))
                idx += 1
    for pid, count in ((0, distractors), (-1, junk)):
        rng = seeded(seed, K_EXTRA, pid + 1)
        for i in range(count):
            cam = rng.randrange(1, cameras + 1)
            seq = rng.randrange(1, 7)
            # Spaced frames keep the names unique whatever the camera.
            frame = 1 + i * _FRAME_STEP + rng.randrange(0, _FRAME_STEP - 5)  # unique, < 10**6
            kind = "junk" if pid == -1 else ("other_person" if rng.random() < 0.5 else "clutter")
            items.append(Item(GALLERY_DIR, pid, cam, seq, frame, rng.randrange(0, 3), i, kind))
    return items
