"""Upload staging: copy an upload to a temporary file with a byte cap, hash it, decode it.

Staged gallery uploads are later moved under ``WORKSPACE/uploads/`` with the
content-addressed names of :func:`upload_name`.
"""

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from reid_search.images import ImageLoadError, load_image
from reid_search.app.service.guard import ApiError

# Formats kept as uploaded (the extensions `reid-search index` picks up).
EXT_BY_FORMAT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}
# load_image's reasons → HTTP status.
_STATUS_BY_REASON = {"empty": 400, "corrupt": 400, "not-an-image": 415, "too-large": 413}


@dataclass
class StagedUpload:
    """An upload copied to a temporary file, hashed and decoded (resized to the model's input)."""

    filename: str
    tmp: Path
    sha256: str
    size: int
    ext: str
    image: Image.Image


def upload_name(sha256: str, ext: str, pid: int | None = None, camid: int | None = None) -> str:
    """Content-addressed file name of an uploaded gallery image.

    With labels it is a Market-style name (``0007_c3_u<sha>.jpg``) so the indexer
    parses pid and camid from it as it does for every gallery crop; the ``_u``
    keeps the hash from being read as a frame number (``_f123``).
    """
    if pid is None and camid is None:
        return f"{sha256}{ext}"
    if pid is None or camid is None:
        raise ValueError("pid and camid go together")
    p = f"{pid:04d}" if pid >= 0 else str(pid)
    return f"{p}_c{camid}_u{sha256}{ext}"


def copy_limited(src: BinaryIO, folder: Path | None, limit: int, filename: str, fsync: bool) -> tuple[Path, str, int]:
    """Copy ``src`` to a hidden temporary file in ``folder`` (None: the system's); 413 past ``limit`` bytes."""
    fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".tmp", dir=folder)
    h, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 16):
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "too-large", f"upload {filename!r} exceeds the {limit}-byte limit")
                h.update(chunk)
                out.write(chunk)
            if fsync:
                out.flush()
                os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(tmp), h.hexdigest(), size


def decode_upload(path: Path, filename: str, max_pixels: int) -> Image.Image:
    """The staged upload at ``path`` as RGB; an unusable one is an :class:`ApiError` naming the client's ``filename``."""
    try:
        return load_image(path, max_pixels=max_pixels)
    except ImageLoadError as exc:
        # exc's message names our temporary file; the client only knows its own name.
        status = _STATUS_BY_REASON.get(exc.reason, 500)
        raise ApiError(status, exc.reason, f"upload {filename!r}: {exc.detail}") from None


def image_format(path: Path) -> str | None:
    """Pillow's name for the file's format (``JPEG``, ``PNG``...), read from its header."""
    with Image.open(path) as im:
        return im.format


