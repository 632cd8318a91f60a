"""One writing process per gallery: an exclusive advisory lock on a file (``flock``).

Readers never take it; writers hold it for each change, and a re-index also
holds a second one for its whole build (see :mod:`indexer.coordinator`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

from reid_search.errors import GalleryError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"  # under the index folder: held for every write
BUILD_LOCK_FILE = ".build.lock"  # held for the whole of a re-index


class WriterLock:
    """Exclusive advisory lock on a file: one writing process per gallery."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._depth = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock for the block, waiting for another holder."""
        if self._depth == 0:
            self._acquire()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._release()

    @contextlib.contextmanager
    def try_hold(self) -> Iterator[bool]:
        """Like :meth:`hold` without waiting; yields whether the lock is held (False where it cannot be made)."""
        if self._depth == 0 and not self._acquire(wait=False):
            yield False
            return
        self._depth += 1
        try:
            yield True
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._release()

    def _acquire(self, wait: bool = True) -> bool:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no cross-process lock
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if not wait:
                return False  # a read-only workspace: readers go on without writing anything
            raise GalleryError(f"cannot lock the gallery for writing ({self.path}: {exc.strerror}); "
                               "the workspace must be writable to change the gallery") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                return False
            log.warning("another reid-search process is changing this gallery; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        return True

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
