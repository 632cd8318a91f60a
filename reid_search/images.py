"""Opening crops as 8-bit RGB: one decoder for the whole system, with a guard against bombs.

Every path that reads an image (indexing, queries, the service's uploads,
calibration, export checks, ``show``) goes through :func:`load_image`, so a
crop that one command accepts every other command accepts too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from reid_search.errors import DataError

# Market crops are 64x128; even 4K frames are ~8.3 MP. Anything far larger is
# a mistake or a decompression bomb.
MAX_IMAGE_PIXELS = 40_000_000


class ImageLoadError(DataError):
    """An image that cannot be used; ``reason`` is a short machine-readable code."""

    def __init__(self, path: Path, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path, self.reason, self.detail = path, reason, detail


def load_image(path: str | os.PathLike[str], max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open any Pillow-readable crop as 8-bit RGB (alpha composited on grey, CMYK/L/P converted).

    16-bit and 32-bit integer images and float images keep their full range
    (see :func:`to_rgb`) instead of being clipped at 255.

    Raises:
        ImageLoadError: reason one of ``missing``, ``unreadable``, ``empty``,
            ``not-an-image``, ``too-large``, ``corrupt``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageLoadError(path, "missing", "file not found (broken link?)") from None
    except OSError as exc:
        raise ImageLoadError(path, "unreadable", f"cannot stat: {exc.strerror}") from None
    if size == 0:
        raise ImageLoadError(path, "empty", "zero-byte file")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageLoadError(path, "too-large", f"{w}x{h} pixels exceeds the {max_pixels} pixel limit")
            im.load()
            return to_rgb(im)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        if path.suffix.lower() in (".tif", ".tiff"):
            raise ImageLoadError(path, "not-an-image", "a TIFF Pillow cannot decode (multi-channel float?); "
                                 "save it as 8- or 16-bit RGB") from None
        raise ImageLoadError(path, "not-an-image", "not an image Pillow can read") from None
    except Image.DecompressionBombError:
        raise ImageLoadError(path, "too-large", "decompression bomb guard tripped") from None
    except PermissionError as exc:
        raise ImageLoadError(path, "unreadable", f"permission denied: {exc.strerror}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(path, "corrupt", f"corrupt or truncated image ({exc})") from None


# Pillow's modes for one-channel images wider than 8 bits. convert("RGB")
# clips them at 255 (a 16-bit crop turns almost white, a float one in [0, 1] black).
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as an 8-bit RGB image, mapping the full range of its pixel type onto 0..255.

    * 16-bit integer (``I;16*``): value / 65535 (so a 16-bit copy of an 8-bit
      crop, value × 257, comes back exactly);
    * 32-bit integer (``I``, how Pillow may open 16-bit PNGs): 0..255 as is when
      the image holds nothing above 255, else value / 65535 (clipped);
    * float (``F``): [0, 1] when the image holds nothing above 1 (the float
      convention), else [0, 255] when nothing exceeds 255, else [0, 65535];
      NaN becomes 0.
    """
    if im.mode == "RGB":
        return im.copy()
    if im.mode in _WIDE_MODES:
        return _wide_to_rgb(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (124, 116, 104, 255))  # ImageNet mean colour
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def _wide_to_rgb(im: Image.Image) -> Image.Image:
    a = np.asarray(im)
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(a.max(initial=0.0))
        scale = 255.0 if peak <= 1.0 else 1.0 if peak <= 255.0 else 255.0 / 65535.0
    elif im.mode == "I" and int(a.max(initial=0)) <= 255:
        scale = 1.0
    else:
        scale = 255.0 / 65535.0
    a8 = np.clip(np.rint(a.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(a8, "L").convert("RGB")
