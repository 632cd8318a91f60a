"""Streaming feature extraction shared by every command.

Images are decoded and transformed by DataLoader workers, run through the
model in batches under ``torch.inference_mode()``, and come out as
L2-normalised float32 rows. Nothing holds more than a few batches of images.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from reid_search.checkpoint import load_model
from reid_search.devices import auto_device
from reid_search.errors import DataError, ModelError
from reid_search.model import ReIDNet
from reid_search.transforms import Preprocess, build_eval_transform

log = logging.getLogger(__name__)

# Market crops are 64x128; even 4K frames are ~8.3 MP. Anything far larger is
# a mistake or a decompression bomb.
MAX_IMAGE_PIXELS = 40_000_000


class ImageLoadError(DataError):
    """An image that cannot be used; ``reason`` is a short machine-readable code."""

    def __init__(self, path: Path, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path, self.reason, self.detail = path, reason, detail


def load_image(path: str | os.PathLike[str], max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open any Pillow-readable crop as RGB (alpha composited on grey, CMYK/L/P converted).

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
            return _to_rgb(im)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not-an-image", "not an image Pillow can read") from None
    except Image.DecompressionBombError:
        raise ImageLoadError(path, "too-large", "decompression bomb guard tripped") from None
    except PermissionError as exc:
        raise ImageLoadError(path, "unreadable", f"permission denied: {exc.strerror}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(path, "corrupt", f"corrupt or truncated image ({exc})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (124, 116, 104, 255))  # ImageNet mean colour
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


class Extractor(Protocol):
    """Anything that turns a normalised image batch into L2-normalised features."""

    preprocess: Preprocess
    dim: int
    fingerprint: str
    description: str

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """``[B, 3, H, W]`` normalised images → ``[B, dim]`` float32, unit L2 norm."""
        ...


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU (saying so once in the log).

    Raises:
        ModelError: a CUDA device was asked for and none is available.
    """
    if name in (None, "auto"):
        return torch.device(auto_device("feature extraction", detail="in fp32").type)
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {name}: no CUDA GPU is available here; use --device cpu or auto")
    return dev


class TorchExtractor:
    """Runs a :class:`ReIDNet` in eval mode (channels_last, autocast on GPU, optional flip TTA)."""

    def __init__(
        self,
        model: ReIDNet,
        preprocess: Preprocess,
        fingerprint: str,
        device: torch.device | str = "cpu",
        flip: bool = False,
        amp: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.preprocess = preprocess
        self.dim = model.feat_dim
        self.flip = flip
        self.amp = self.device.type == "cuda" if amp is None else amp
        # Flip TTA changes the embedding, so it is part of the fingerprint.
        self.fingerprint = fingerprint + ("+flip" if flip else "")
        self.description = f"{model.arch} ({'flip TTA, ' if flip else ''}{self.device})"

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """See :meth:`Extractor.embed`."""
        x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp):
            f = self.model(x)
            if self.flip:
                f = f + self.model(torch.flip(x, dims=[3]))
        return F.normalize(f.float(), dim=1).cpu().numpy()


def load_extractor(
    model_path: str | os.PathLike[str], device: str | None = "auto", flip: bool = False
) -> Extractor:
    """Open a checkpoint (``.pt``) or an ONNX file (``.onnx``) as an :class:`Extractor`.

    Raises:
        ModelError: the file is missing, unreadable or of an unknown kind.
    """
    path = Path(model_path)
    if path.suffix.lower() == ".onnx":
        try:
            from reid_search.onnx_model import OnnxExtractor
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ModelError(f"cannot run ONNX models here ({exc}); install onnxruntime") from None
        return OnnxExtractor(path, device=device, flip=flip)
    dev = resolve_device(device)
    model, meta, _ = load_model(path, dev)
    return TorchExtractor(model, meta.preprocess, meta.fingerprint, dev, flip=flip)


@dataclass
class FeatureBatch:
    """Features of the images at ``indices`` (positions in the input list) and the failures."""

    indices: list[int]
    features: np.ndarray
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (index, reason, detail)


class _CropDataset(Dataset):
    def __init__(self, paths: Sequence[Path], preprocess: Preprocess) -> None:
        self.paths = list(paths)
        self.transform = build_eval_transform(preprocess)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str, str]:
        try:
            return i, self.transform(load_image(self.paths[i])), "", ""
        except ImageLoadError as exc:
            return i, None, exc.reason, exc.detail


def _collate(items: list[tuple[int, torch.Tensor | None, str, str]]):
    ok = [(i, t) for i, t, _, _ in items if t is not None]
    failures = [(i, r, d) for i, t, r, d in items if t is None]
    tensors = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], tensors, failures


def default_num_workers() -> int:
    """Decoding workers: leave at least one core to the model."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def iter_features(
    paths: Sequence[str | os.PathLike[str]],
    extractor: Extractor,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[FeatureBatch]:
    """Stream features of ``paths`` batch by batch, in input order.

    Unreadable images are reported in ``FeatureBatch.failures`` and skipped;
    ``progress(n)`` is called with the number of images consumed by each batch.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return
    if num_workers is None:
        num_workers = default_num_workers() if len(paths) > 2 * batch_size else 0
    loader = DataLoader(
        _CropDataset(paths, extractor.preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=getattr(extractor, "device", torch.device("cpu")).type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    for indices, tensors, failures in loader:
        feats = extractor.embed(tensors) if tensors is not None else np.zeros((0, extractor.dim), np.float32)
        for i, reason, detail in failures:
            log.warning("skipped %s: %s", paths[i], detail)
        if progress is not None:
            progress(len(indices) + len(failures))
        yield FeatureBatch(indices, feats, failures)


def extract_features(
    paths: Sequence[str | os.PathLike[str]],
    extractor: Extractor,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[int], list[tuple[int, str, str]]]:
    """Collect :func:`iter_features` into one array (for query sets, not galleries).

    Returns ``(features [n_ok, dim], kept indices, failures)``.
    """
    feats: list[np.ndarray] = []
    kept: list[int] = []
    failures: list[tuple[int, str, str]] = []
    for b in iter_features(paths, extractor, batch_size, num_workers, progress):
        feats.append(b.features)
        kept.extend(b.indices)
        failures.extend(b.failures)
    out = np.concatenate(feats) if feats else np.zeros((0, extractor.dim), np.float32)
    return out, kept, failures
