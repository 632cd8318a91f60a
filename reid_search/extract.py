"""Streaming feature extraction shared by every command.

Images are decoded and transformed by DataLoader workers, run through the
model in batches under ``torch.inference_mode()``, and come out as
L2-normalised float32 rows. Nothing holds more than a few batches of images.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from reid_search.checkpoint import load_model
from reid_search.devices import device_from_name
from reid_search.errors import DataError, ModelError
from reid_search.model import ReIDNet, fuse_for_inference
from reid_search.precision import autocast_dtype, choose_precision, resolve_precision, validate_precision
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


class Extractor(Protocol):
    """Anything that turns a normalised image batch into L2-normalised features."""

    preprocess: Preprocess
    dim: int
    fingerprint: str
    description: str

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """``[B, 3, H, W]`` normalised images → ``[B, dim]`` float32, unit L2 norm."""
        ...


def resolve_device(name: str | None = "auto", detail: str = "") -> torch.device:
    """The extraction device for a ``--device`` value (see :func:`reid_search.devices.device_from_name`):
    ``auto`` picks CUDA when visible, else the CPU, saying so once in the log (with ``detail``).

    Raises:
        ModelError: an unknown device, or CUDA asked for where none is available.
    """
    return device_from_name(name, "feature extraction", detail)


# torch.compile costs seconds of compilation to win a few per cent per image once BatchNorm
# is folded and batches are chunked: on 2 idle cores, ResNet50 256x128 bf16 compiled in 15 s
# and then ran at 47.1 against 44.6 images/s (BENCHMARKS.md), so it pays for itself only
# after ~12,600 images.
COMPILE_MIN_IMAGES = 15000
COMPILE_CHOICES = ("auto", "on", "off")

# On a CPU the model is fastest when one call's activations stay in cache: on 2 cores,
# ResNet50 256x128 runs 44 images/s in chunks of 8 against 39 in batches of 32 (bf16;
# fp32 22.6 against 19.1), while ResNet18 128x64 is fastest on the whole batch.
# The largest activation of a torchvision ResNet is layer1's output, (H/4)(W/4) x
# feat_dim/8 values per image; one chunk holds about this many values.
CPU_CHUNK_VALUES = 4_500_000


def cpu_chunk(preprocess: Preprocess, feat_dim: int) -> int:
    """Images per model call on a CPU for a ResNet of ``feat_dim`` features at ``preprocess``'s size (≥ 1)."""
    per_image = max(1, preprocess.height * preprocess.width * feat_dim // 128)
    return max(1, CPU_CHUNK_VALUES // per_image)


class TorchExtractor:
    """Runs a :class:`ReIDNet` in eval mode: BatchNorm folded into the convolutions
    (:func:`~reid_search.model.fuse_for_inference`, on a copy: ``model`` is left
    as it was), channels_last, autocast at ``precision`` (see
    :mod:`reid_search.precision`), optional flip TTA, and ``torch.compile`` for
    long runs (``compile``: ``auto`` from :data:`COMPILE_MIN_IMAGES` images,
    ``on`` for any run of more than one batch, ``off``). On a CPU each batch goes
    through the model in chunks of ``chunk`` images (default :func:`cpu_chunk`);
    on a GPU whole.
    """

    def __init__(
        self,
        model: ReIDNet,
        preprocess: Preprocess,
        fingerprint: str,
        device: torch.device | str = "cpu",
        flip: bool = False,
        amp: bool | None = None,
        precision: str = "auto",
        compile: str = "auto",
        chunk: int | None = None,
    ) -> None:
        """``amp`` (older spelling) overrides ``precision``: True = the device's autocast, False = fp32.
        ``chunk``: images per model call (0: the whole batch; None: :func:`cpu_chunk` on a CPU, 0 on a GPU).

        Raises:
            ModelError: an unknown precision or compile choice.
        """
        self.device = torch.device(device)
        self.model = fuse_for_inference(model).to(self.device, memory_format=torch.channels_last)
        self.preprocess = preprocess
        self.dim = model.feat_dim
        self.flip = flip
        if amp is not None:
            precision = ("fp16" if self.device.type == "cuda" else "bf16") if amp else "fp32"
        self.precision = resolve_precision(precision, self.device)
        self._dtype = autocast_dtype(self.precision)
        self.amp = self._dtype is not None
        if compile not in COMPILE_CHOICES:
            raise ModelError(f"compile={compile!r}: use one of {', '.join(COMPILE_CHOICES)}")
        self.compile = compile
        self.compile_seconds: float | None = None  # set once a compiled graph is built
        if chunk is None:
            chunk = cpu_chunk(preprocess, model.feat_dim) if self.device.type == "cpu" else 0
        self.chunk = max(0, int(chunk))
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._compiled_batch = 0
        # Neither flip TTA's sum nor the precision enter the fingerprint the same way: flip
        # changes the embedding, precision only its rounding (cosine ≥ 0.9999 to fp32).
        self.fingerprint = fingerprint + ("+flip" if flip else "")
        self.description = f"{model.arch} ({'flip TTA, ' if flip else ''}{self.device}, {self.precision})"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self._dtype or torch.float32, enabled=self._dtype is not None):
            return self.model(x)

    def prepare(self, num_images: int, batch_size: int) -> None:
        """Get ready to embed ``num_images`` images in batches of ``batch_size``:
        compile the model when the run is long enough (see the class docstring).

        A failed compilation (no C++ compiler, unsupported platform) is logged
        and the model runs eagerly.
        """
        want = {"off": False, "on": num_images > batch_size, "auto": num_images >= COMPILE_MIN_IMAGES}[self.compile]
        batch_size = min(batch_size, self.chunk) if self.chunk else batch_size  # the model sees chunks
        if not want or (self._compiled is not None and self._compiled_batch == batch_size):
            return
        log.info("compiling %s for batches of %d (torch.compile, %d images to embed)", self.description, batch_size, num_images)
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(self._forward, dynamic=False, options={"freezing": self.device.type == "cpu"})
            x = torch.zeros(batch_size, 3, self.preprocess.height, self.preprocess.width, device=self.device)
            with torch.inference_mode():
                compiled(x.contiguous(memory_format=torch.channels_last))  # compilation happens on the first call
        except Exception as exc:  # the eager model still works: never fail a run over an optimisation
            log.warning("torch.compile failed (%s); running the model eagerly",
                        str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
            self.compile = "off"
            return
        self.compile_seconds = time.perf_counter() - t0
        self._compiled, self._compiled_batch = compiled, batch_size
        log.info("torch.compile took %.1f s", self.compile_seconds)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        step = self.chunk or x.shape[0]
        if x.shape[0] <= step:
            return self._run_chunk(x)
        return torch.cat([self._run_chunk(x[i:i + step]) for i in range(0, x.shape[0], step)])

    def _run_chunk(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self._compiled is None or n > self._compiled_batch:
            return self._forward(x)
        if n < self._compiled_batch:  # pad: a new shape would mean a new compilation
            pad = x.new_zeros((self._compiled_batch - n, *x.shape[1:])).contiguous(memory_format=torch.channels_last)
            return self._compiled(torch.cat([x, pad]).contiguous(memory_format=torch.channels_last))[:n]
        return self._compiled(x)

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """See :meth:`Extractor.embed`."""
        x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        f = self._run(x).float()
        if self.flip:
            f = f + self._run(torch.flip(x, dims=[3]).contiguous(memory_format=torch.channels_last)).float()
        return F.normalize(f, dim=1).cpu().numpy()


def load_extractor(
    model_path: str | os.PathLike[str],
    device: str | None = "auto",
    flip: bool = False,
    precision: str = "auto",
    compile: str = "auto",
) -> Extractor:
    """Open a checkpoint (``.pt``) or an ONNX file (``.onnx``) as an :class:`Extractor`.

    ``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``) applies to checkpoints;
    an ONNX graph's precision was fixed when it was exported, so it takes
    ``auto`` or ``fp32`` only. ``compile``: see :class:`TorchExtractor`.

    Raises:
        ModelError: the file is missing, unreadable or of an unknown kind, an
            unknown precision, or bf16/fp16 asked of an ONNX file.
    """
    precision = validate_precision(precision)
    path = Path(model_path)
    if path.suffix.lower() == ".onnx":
        if precision not in ("auto", "fp32"):
            raise ModelError(f"--precision {precision} does not apply to the ONNX model {path.name}: its precision was "
                             "fixed by `reid-search export` (--fp16, --int8); pass --precision auto")
        try:
            from reid_search.onnx_model import OnnxExtractor
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ModelError(f"cannot run ONNX models here ({exc}); install onnxruntime") from None
        return OnnxExtractor(path, device=device, flip=flip)
    # The CPU-fallback line names the precision the CPU will run (auto: bf16 on AVX512_BF16/AMX).
    dev = resolve_device(device, f"in {choose_precision(precision, 'cpu')}")
    model, meta, _ = load_model(path, dev)
    return TorchExtractor(model, meta.preprocess, meta.fingerprint, dev, flip=flip, precision=precision, compile=compile)


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


def default_num_workers(device: "str | torch.device" = "cuda") -> int:
    """Decoding processes for a model running on ``device`` (``cpu`` or a GPU), at most 4.

    For a GPU model, every core but one. For a CPU model, only the cores its
    threads leave idle: decoding and resizing a crop costs ~0.7 ms against
    ~22 ms for ResNet50 256x128 on 2 cores, so a decoder process that competes
    with the model's threads saves nothing (``index`` of 1,000 crops on 2 cores,
    median of 3: 42.0 images/s decoding in-process, 41.7 with one worker).
    """
    cores = os.cpu_count() or 1
    if str(device).split(":")[0] == "cpu":
        return max(0, min(4, cores - torch.get_num_threads()))
    return max(0, min(4, cores - 1))


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
        num_workers = default_num_workers(getattr(extractor, "device", "cpu")) if len(paths) > 2 * batch_size else 0
    prepare = getattr(extractor, "prepare", None)
    if prepare is not None:
        prepare(len(paths), batch_size)
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
