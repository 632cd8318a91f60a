"""Market-1501 layout: name parsing, folder listing and the dataset splits.

Names look like ``0002_c1s1_000451_03.jpg``: pid 2, camera 1, sequence 1,
frame 451, box 3. pid -1 is junk (never trained on, never counted in
evaluation) and pid 0 a distractor (kept in galleries). DukeMTMC-style names
(``0001_c2_f0046182.jpg``) parse too, without a sequence. Files whose names
carry no pid/camid are accepted with ``pid = camid = None``.

Camera ids are kept as written in the name (1-based): ``--camid 1`` means ``c1``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from reid_search.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

_MARKET = re.compile(r"^(-?\d+)_c(\d+)(?:s(\d+)_(\d+)|_f(\d+))?")

TRAIN_DIR = "bounding_box_train"
GALLERY_DIR = "bounding_box_test"
QUERY_DIR = "query"


@dataclass(frozen=True)
class NameInfo:
    """What a Market/Duke-style file name says about the crop."""

    pid: int
    camid: int
    seq: int | None = None
    frame: int | None = None


@dataclass(frozen=True)
class ImageRecord:
    """One crop on disk with whatever its name tells (``None`` when unknown)."""

    path: Path
    pid: int | None = None
    camid: int | None = None
    seq: int | None = None
    frame: int | None = None

    @property
    def is_junk(self) -> bool:
        """True for Market's junk boxes (pid -1)."""
        return self.pid == -1


def parse_name(name: str) -> NameInfo | None:
    """Parse a Market-1501 (or DukeMTMC) crop name; ``None`` when it is not one."""
    m = _MARKET.match(os.path.basename(name))
    if m is None:
        return None
    pid, camid = int(m.group(1)), int(m.group(2))
    if pid < -1:
        return None
    if m.group(3) is not None:
        return NameInfo(pid, camid, int(m.group(3)), int(m.group(4)))
    if m.group(5) is not None:
        return NameInfo(pid, camid, None, int(m.group(5)))
    return NameInfo(pid, camid)


def labels_from_name(name: str | os.PathLike[str]) -> tuple[int | None, int | None, int | None, int | None]:
    """``(pid, camid, seq, frame)`` a Market/Duke-style file name gives (its last part
    counts); all four ``None`` for any other name."""
    info = parse_name(os.fspath(name))
    return (info.pid, info.camid, info.seq, info.frame) if info else (None, None, None, None)


def record_for(path: Path) -> ImageRecord:
    """Build the record of one image path, parsing its name when it can."""
    return ImageRecord(path, *labels_from_name(path.name))


def is_image_name(name: str) -> bool:
    """True when ``name`` ends in one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def walk_files(folder: Path, recursive: bool = True) -> Iterator[Path]:
    """Yield the entries under ``folder`` whose names do not start with ``.``, in the one
    order every listing uses: each folder's files by name, then its subfolders by name.

    Recursive: files only, symbolic links to folders not followed. Otherwise the
    folder's own entries, whatever their kind. Nothing is opened or read.
    """
    if recursive:
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            dirnames.sort()
            for fn in sorted(filenames):
                if not fn.startswith("."):
                    yield Path(dirpath) / fn
    else:
        for p in sorted(folder.iterdir()):
            if not p.name.startswith("."):
                yield p


def iter_image_paths(folder: Path, recursive: bool = True) -> Iterator[Path]:
    """Yield image files under ``folder`` in sorted order, without reading them."""
    return (p for p in walk_files(folder, recursive) if is_image_name(p.name))


def list_images(folder: str | os.PathLike[str], recursive: bool = True) -> list[ImageRecord]:
    """List the crops under ``folder`` (sorted), parsing pid/camid from names.

    Raises:
        DataError: the folder does not exist, is not a folder, or holds no images.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"no such folder: {folder}; pass a folder of person crops (e.g. bounding_box_test)")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder; pass the folder that holds the crops")
    records = [record_for(p) for p in iter_image_paths(folder, recursive)]
    if not records:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no images in {folder}; expected files ending in {exts}")
    return records


def has_identity_labels(records: Sequence[ImageRecord]) -> bool:
    """True when every record carries a pid and camid from its name."""
    return all(r.pid is not None and r.camid is not None for r in records)


@dataclass(frozen=True)
class MarketDataset:
    """The three splits of a Market-1501-layout root."""

    root: Path
    train: tuple[ImageRecord, ...]
    query: tuple[ImageRecord, ...]
    gallery: tuple[ImageRecord, ...]

    @property
    def num_train_pids(self) -> int:
        """Number of distinct trainable identities (junk excluded)."""
        return len({r.pid for r in self.train if r.pid is not None and r.pid >= 0})


def _split(root: Path, name: str, required: bool) -> tuple[ImageRecord, ...]:
    folder = root / name
    if not folder.is_dir():
        if required:
            raise DataError(
                f"{root} has no {name}/ folder; a Market-1501 root holds "
                f"{TRAIN_DIR}/, {QUERY_DIR}/ and {GALLERY_DIR}/"
            )
        return ()
    records = list_images(folder, recursive=False)
    unnamed = [r.path.name for r in records if r.pid is None]
    if unnamed:
        raise DataError(
            f"{len(unnamed)} file(s) in {folder} lack Market names like 0002_c1s1_000451_03.jpg "
            f"(first: {unnamed[0]}); rename them or move them out"
        )
    return tuple(records)


def load_market(root: str | os.PathLike[str], *, need_train: bool = True, need_eval: bool = True) -> MarketDataset:
    """Read a Market-1501-layout root.

    Raises:
        DataError: the root or a needed split is missing, empty, or badly named.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no such dataset folder: {root}; pass a Market-1501-layout root")
    ds = MarketDataset(
        root=root,
        train=_split(root, TRAIN_DIR, need_train),
        query=_split(root, QUERY_DIR, need_eval),
        gallery=_split(root, GALLERY_DIR, need_eval),
    )
    log.info(
        "dataset %s: train %d images / %d ids, query %d, gallery %d",
        root, len(ds.train), ds.num_train_pids, len(ds.query), len(ds.gallery),
    )
    return ds


def training_labels(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[int], dict[int, int]]:
    """Drop junk and map pids to contiguous class labels 0..C-1 (sorted by pid).

    Returns the kept records, their labels, and the pid→label map.
    """
    kept = [r for r in records if r.pid is not None and r.pid >= 0]
    pid2label = {pid: i for i, pid in enumerate(sorted({r.pid for r in kept}))}  # type: ignore[misc]
    return kept, [pid2label[r.pid] for r in kept], pid2label  # type: ignore[index]
