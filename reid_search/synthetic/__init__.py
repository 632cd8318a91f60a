"""Seeded synthetic person re-id dataset in the Market-1501 layout.

Each identity is a drawn pedestrian with fixed clothing colours and pattern,
lower-body garment, shoes, hair, body shape and carried bag. Everything a camera
does varies per camera and per image: background, colour cast, brightness and
gamma, resolution, blur, noise, crop scale/position, occlusion by poles and
boxes, bystanders at the crop edge, and pose (facing, arm swing, stride). So
identity lives only in the person, and raw-pixel nearest neighbour across
cameras is far from perfect while a learned model can do well.

Every image is drawn from its own random generator seeded by
``(seed, pid, camera, index)``, so files do not depend on generation order and
the same seed gives byte-identical output. An identity's look depends only on
``(seed, pid)``, so it is the same whatever ``ids``/``cameras`` are asked for.

Layout written under ``out``::

    bounding_box_train/  train identities (pids 1..n_train)
    bounding_box_test/   gallery of test identities, plus pid 0 distractors
                         and pid -1 junk boxes
    query/               about one image per (test identity, camera)

Names follow Market: ``0002_c1s1_000451_03.jpg`` (junk: ``-1_c3s2_000120_00.jpg``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from reid_search.data import GALLERY_DIR, QUERY_DIR, TRAIN_DIR
from reid_search.synthetic.camera import HEIGHT, WIDTH, make_camera
from reid_search.synthetic.draw import render
from reid_search.synthetic.look import K_EXTRA, Look, identity_look, make_look, seeded
from reid_search.synthetic.plan import MAX_EXTRA, MAX_IMAGES_PER_ID, Item
from reid_search.synthetic.plan import plan as _plan

log = logging.getLogger(__name__)

__all__ = ["SyntheticSummary", "generate", "WIDTH", "HEIGHT"]


@dataclass(frozen=True)
class SyntheticSummary:
    """What :func:`generate` wrote."""

    root: Path
    num_ids: int
    num_train_ids: int
    num_test_ids: int
    cameras: int
    train_images: int
    query_images: int
    gallery_images: int  # includes distractors and junk
    distractor_images: int
    junk_images: int
    seed: int

    @property
    def total_images(self) -> int:
        return self.train_images + self.query_images + self.gallery_images


def _check_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{out} exists and is not a folder: choose an empty or new folder for the dataset")
        if any(out.iterdir()):
            raise ValueError(
                f"{out} is not empty: choose an empty or new folder for the dataset (or delete its contents)"
            )


def generate(
    out: Path | str,
    *,
    ids: int = 60,
    cameras: int = 4,
    images_per_id: int = 8,
    seed: int = 0,
    train_fraction: float = 0.5,
    distractors: int | None = None,
    junk: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SyntheticSummary:
    """Write a seeded synthetic Market-1501-layout dataset to ``out``.

    Pids ``1..n_train`` (``n_train = round(ids * train_fraction)``, at least one
    each side) go to ``bounding_box_train``; the rest are test identities split
    into ``query`` (about one image per identity and camera) and
    ``bounding_box_test``, such that every query has a gallery image of its pid
    from another camera. Each identity appears in 2 or more cameras.
    ``distractors`` pid-0 and ``junk`` pid -1 images go to the gallery; ``None``
    picks about 5% and 3% of the test images (at least 2 each).

    The dataset is built in a temporary folder beside ``out`` and renamed into
    place, so a failure leaves no partial dataset. ``progress(done, total)`` is
    called after each image. The same arguments (and the same numpy/Pillow
    versions) give byte-identical files.

    Raises:
        ValueError: ``ids < 2``, ``ids > 9999``, ``cameras`` outside 2..9 (one
            digit in Market names), ``images_per_id`` outside 2..1000,
            ``train_fraction`` outside (0, 1), negative ``seed``, ``distractors``
            or ``junk`` outside 0..39000, or ``out`` existing and not an empty
            folder.
    """
    out = Path(out)
    _check_args(ids=ids, cameras=cameras, images_per_id=images_per_id, seed=seed,
                train_fraction=train_fraction, distractors=distractors, junk=junk)
    _check_out(out)

    n_train = min(ids - 1, max(1, round(ids * train_fraction)))
    n_test_images = (ids - n_train) * images_per_id
    if distractors is None:
        distractors = min(MAX_EXTRA, max(2, round(0.05 * n_test_images)))
    if junk is None:
        junk = min(MAX_EXTRA, max(2, round(0.03 * n_test_images)))
    items = _plan(
        ids=ids,
        cameras=cameras,
        images_per_id=images_per_id,
        seed=seed,
        n_train=n_train,
        distractors=distractors,
        junk=junk,
    )
    log.info("generating %d synthetic images (%d ids, %d cameras, seed %d) in %s", len(items), ids, cameras, seed, out)
    _write_in_place(out, lambda tmp: _write_items(tmp, items, seed, cameras, progress))

    counts = {sub: sum(1 for it in items if it.folder == sub) for sub in (TRAIN_DIR, GALLERY_DIR, QUERY_DIR)}
    summary = SyntheticSummary(
        root=out,
        num_ids=ids,
        num_train_ids=n_train,
        num_test_ids=ids - n_train,
        cameras=cameras,
        train_images=counts[TRAIN_DIR],
        query_images=counts[QUERY_DIR],
        gallery_images=counts[GALLERY_DIR],
        distractor_images=distractors,
        junk_images=junk,
        seed=seed,
    )
    log.info("wrote %d images to %s", summary.total_images, out)
    return summary


def _check_args(
    *,
    ids: int,
    cameras: int,
    images_per_id: int,
    seed: int,
    train_fraction: float,
    distractors: int | None,
    junk: int | None,
) -> None:
    """Raises ValueError for the arguments :func:`generate` refuses (see there)."""
    if ids < 2:
        raise ValueError(f"ids must be at least 2 (one train and one test identity), got {ids}")
    if ids > 9999:
        raise ValueError(f"ids must be at most 9999 (Market names have 4-digit pids), got {ids}")
    if not 2 <= cameras <= 9:
        raise ValueError(
            f"cameras must be between 2 and 9 (matching is across cameras; names have one-digit cameras), got {cameras}"
        )
    if not 2 <= images_per_id <= MAX_IMAGES_PER_ID:
        raise ValueError(
            f"images_per_id must be between 2 and {MAX_IMAGES_PER_ID} (an identity needs two cameras), "
            f"got {images_per_id}"
        )
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be strictly between 0 and 1, got {train_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    for label, v in (("distractors", distractors), ("junk", junk)):
        if v is not None and not 0 <= v <= MAX_EXTRA:
            raise ValueError(f"{label} must be between 0 and {MAX_EXTRA}, got {v}")


def _write_items(
    root: Path, items: list[Item], seed: int, cameras: int, progress: Callable[[int, int], None] | None
) -> None:
    """Draw and write every planned file under ``root``."""
    for sub in (TRAIN_DIR, GALLERY_DIR, QUERY_DIR):
        (root / sub).mkdir()
    cams = {c: make_camera(seed, c) for c in range(1, cameras + 1)}
    looks: dict[int, Look] = {}
    for n, item in enumerate(items, 1):
        look: Look | None
        if item.kind == "person":
            look = looks.get(item.pid)
            if look is None:
                look = looks[item.pid] = identity_look(seed, item.pid)
        elif item.kind == "clutter":
            look = None
        else:  # someone who is not one of the identities
            look = make_look(seeded(seed, K_EXTRA, 10 + item.pid, item.idx))
        (root / item.folder / item.name).write_bytes(render(item, seed, cams[item.cam], look))
        if progress is not None:
            progress(n, len(items))


def _write_in_place(out: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` on a temporary folder beside ``out``, then rename it to ``out``;
    on any failure the temporary folder is removed and ``out`` left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        _check_out(out)  # something may have appeared there meanwhile
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
