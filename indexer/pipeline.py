"""Indexing a folder: walk, hash, embed what is new or changed, commit in chunks.

The folder is walked recursively in sorted order and every file hashed
(sha256). Files whose path and hash are in the gallery already are
*unchanged*; new paths are *indexed*; known paths with another hash are
*replaced* (the old row and vector are deleted in the same transaction that
adds the new ones). Only new and changed files go through the model, streamed
by :func:`reid_search.extract.iter_features`.

Results are committed every ``commit_every`` images or ``commit_seconds``
seconds, whichever comes first; each commit is what the report counts, so
an interrupted run loses at most the uncommitted tail and a re-run skips
everything committed (as unchanged).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from indexer.store import Gallery, NewImage, sha256_file
from reid_search.data import IMAGE_EXTENSIONS, iter_image_paths
from reid_search.errors import DataError
from reid_search.extract import Extractor, iter_features

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    """What one :func:`index_folder` run did."""

    folder: Path
    indexed: int = 0
    replaced: int = 0
    unchanged: int = 0
    removed: int = 0
    dropped: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (path, reason, detail)
    seconds: float = 0.0

    @property
    def seen(self) -> int:
        """Image files found under the folder."""
        return self.indexed + self.replaced + self.unchanged + len(self.skipped)

    @property
    def usable(self) -> int:
        """Files that are in the gallery after the run."""
        return self.indexed + self.replaced + self.unchanged

    def skipped_by_reason(self) -> dict[str, int]:
        """Skipped files per reason code (``corrupt``, ``empty``, ``not-an-image`` ...)."""
        return dict(sorted(Counter(r for _, r, _ in self.skipped).items()))

    def summary(self) -> str:
        """One line, e.g. ``indexed 8, replaced 0, unchanged 0, removed 0, skipped 2 (corrupt 1, empty 1)``."""
        skipped = f"skipped {len(self.skipped)}"
        if self.skipped:
            skipped += " (" + ", ".join(f"{r} {n}" for r, n in self.skipped_by_reason().items()) + ")"
        dropped = f"dropped {self.dropped} (re-index), " if self.dropped else ""
        return (f"{dropped}indexed {self.indexed}, replaced {self.replaced}, unchanged {self.unchanged}, "
                f"removed {self.removed}, {skipped}")


@dataclass
class _Todo:
    path: Path
    sha256: str
    size: int
    old_id: int | None


def _hash(path: Path) -> tuple[str, int] | tuple[None, tuple[str, str]]:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        return None, ("missing", "file not found (broken link?)")
    except PermissionError as exc:
        return None, ("unreadable", f"permission denied: {exc.strerror}")
    except IsADirectoryError:
        return None, ("not-an-image", "a folder named like an image")
    except OSError as exc:
        return None, ("unreadable", f"cannot read: {exc.strerror}")


def index_folder(
    gallery: Gallery,
    folder: str | os.PathLike[str],
    extractor: Extractor,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    prune: bool = False,
    reindex: bool = False,
    commit_every: int = 1024,
    commit_seconds: float = 10.0,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> IndexReport:
    """Bring the gallery up to date with the images under ``folder``.

    Args:
        prune: also delete gallery images under ``folder`` whose files are gone.
        reindex: drop the whole gallery first (e.g. to switch models).
        commit_every / commit_seconds: commit after this many images or seconds.
        progress: called with the number of files handled, as they are.
        on_total: called once with the number of image files found.

    Raises:
        DataError: ``folder`` is missing, not a folder, or holds no image files.
        GalleryError: the gallery was indexed with another model (and not ``reindex``).
    """
    t0 = time.perf_counter()
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"no such folder: {folder}; pass the folder of gallery crops (e.g. bounding_box_test)")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder; pass the folder that holds the gallery crops")
    report = IndexReport(folder)
    if reindex:
        report.dropped = gallery.clear()
    gallery.check_model(extractor.fingerprint, extractor.dim)

    paths = list(iter_image_paths(folder, recursive=True))
    if on_total is not None:
        on_total(len(paths))
    if not paths:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no images in {folder} (or its subfolders); expected files ending in {exts}")

    root = gallery.register_root(folder)
    known = gallery.existing(folder)
    todo: list[_Todo] = []
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib releases the GIL
        hashes = (h for s in range(0, len(paths), 4096) for h in pool.map(_hash, paths[s : s + 4096]))
        for path, res in zip(paths, hashes):
            rel = path.relative_to(folder).as_posix()
            old = known.get(rel)
            if res[0] is None:
                reason, detail = res[1]  # type: ignore[misc]
                report.skipped.append((str(path), reason, detail))
                if progress is not None:
                    progress(1)
            elif old is not None and old[1] == res[0]:
                report.unchanged += 1
                if progress is not None:
                    progress(1)
            else:
                todo.append(_Todo(path, res[0], int(res[1]), old[0] if old else None))  # type: ignore[arg-type]
    log.info("%s: %d files, %d unchanged, %d to embed (root %s)", folder, len(paths), report.unchanged, len(todo), root)

    pending: list[tuple[_Todo, np.ndarray]] = []
    stale: list[int] = []  # old ids of changed files that no longer load
    last_commit = time.monotonic()

    def commit() -> None:
        nonlocal pending, stale, last_commit
        if not pending and not stale:
            return
        images = [NewImage(t.path, t.sha256, t.size) for t, _ in pending]
        feats = np.stack([f for _, f in pending]) if pending else np.zeros((0, extractor.dim), np.float32)
        replace = [t.old_id for t, _ in pending if t.old_id is not None] + stale
        gallery.add_images(images, feats, extractor.fingerprint, replace_ids=replace)
        # Counted only now that the rows are committed.
        report.replaced += sum(t.old_id is not None for t, _ in pending)
        report.indexed += sum(t.old_id is None for t, _ in pending)
        report.removed += len(stale)
        pending, stale = [], []
        last_commit = time.monotonic()
        gallery.maybe_save()

    try:
        for batch in iter_features([t.path for t in todo], extractor, batch_size=batch_size,
                                   num_workers=num_workers, progress=progress):
            for j, feat in zip(batch.indices, batch.features):
                pending.append((todo[j], feat))
            for j, reason, detail in batch.failures:
                report.skipped.append((str(todo[j].path), reason, detail))
                if todo[j].old_id is not None:
                    stale.append(todo[j].old_id)  # type: ignore[arg-type]
            if len(pending) >= commit_every or time.monotonic() - last_commit >= commit_seconds:
                commit()
        commit()
        if prune:
            present = {p.relative_to(folder).as_posix() for p in paths}
            gone = [i for rel, (i, _) in known.items() if rel not in present]
            report.removed += gallery.remove_ids(gone)
    finally:
        gallery.save()
    report.seconds = time.perf_counter() - t0
    log.info("%s: %s in %.1fs", folder, report.summary(), report.seconds)
    return report
