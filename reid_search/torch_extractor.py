"""The PyTorch extractor: a checkpoint's :class:`~reid_search.model.ReIDNet` run for retrieval.

BatchNorm folded into the convolutions, channels_last, autocast at the chosen
precision, optional flip TTA and ``torch.compile`` for long runs; CPU batches
run in cache-sized chunks.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from reid_search.devices import device_from_name
from reid_search.errors import ModelError, first_line
from reid_search.model import ReIDNet, fuse_for_inference
from reid_search.precision import autocast_dtype, resolve_precision
from reid_search.transforms import Preprocess

log = logging.getLogger(__name__)


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
        precision: str = "auto",
        compile: str = "auto",
        chunk: int | None = None,
    ) -> None:
        """``chunk``: images per model call (0: the whole batch; None: :func:`cpu_chunk` on a CPU, 0 on a GPU).

        Raises:
            ModelError: an unknown precision or compile choice.
        """
        self.device = torch.device(device)
        self.model = fuse_for_inference(model).to(self.device, memory_format=torch.channels_last)
        self.preprocess = preprocess
        self.dim = model.feat_dim
        self.flip = flip
        self.precision = resolve_precision(precision, self.device)
        self._dtype = autocast_dtype(self.precision)
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
                        first_line(exc, with_type=False)[:200])
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
