"""Which number format the model runs in: ``auto``, ``fp32``, ``bf16`` or ``fp16``.

``auto`` picks bfloat16 autocast on CPUs that compute it natively (AVX512_BF16
or AMX, read from ``/proc/cpuinfo`` at run time), float16 autocast on CUDA
GPUs, and float32 everywhere else. Reduced precision only changes rounding
(cosine to the float32 feature ≥ 0.9999 on ResNet50), so it is **not** part of
the model's fingerprint: a gallery indexed in fp32 answers bf16 queries.

Nothing here imports torch at module level, so the CLI can name the choices
in ``--help`` without loading it.
"""

from __future__ import annotations

import functools
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reid_search.errors import ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPUINFO = Path("/proc/cpuinfo")
# CPU flags under which bfloat16 matrix products run natively (else oneDNN emulates them, slower than fp32).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16"})
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU computes natively, as far as extraction cares."""

    model: str
    flags: frozenset[str]

    @property
    def bf16(self) -> bool:
        """Native bfloat16 dot products (AVX512_BF16 or AMX)."""
        return bool(self.flags & BF16_FLAGS)

    @property
    def fp16(self) -> bool:
        """Native float16 arithmetic (AVX512_FP16 or AMX-FP16)."""
        return bool(self.flags & FP16_FLAGS)

    @property
    def int8(self) -> bool:
        """VNNI int8 dot products (what makes int8 ONNX graphs fast)."""
        return bool(self.flags & INT8_FLAGS)

    def summary(self) -> str:
        """One line: the model name and the flags that matter here."""
        wanted = sorted(self.flags & (BF16_FLAGS | FP16_FLAGS | INT8_FLAGS | {"avx2", "avx512f", "amx_tile"}))
        return f"{self.model or platform.machine()}: {' '.join(wanted) or 'no AVX2/AVX-512/AMX'}"


def parse_cpuinfo(text: str) -> CpuFeatures:
    """The first processor's model name and flags from ``/proc/cpuinfo`` text (x86 ``flags``, arm ``Features``)."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return CpuFeatures(model, flags)


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This machine's :class:`CpuFeatures` (cached). Without ``/proc/cpuinfo``, ask torch."""
    try:
        return parse_cpuinfo(CPUINFO.read_text(errors="replace"))
    except OSError:
        pass
    try:
        import torch

        cap = torch.backends.cpu.get_cpu_capability().lower()  # e.g. "avx512", "avx2", "default"
    except (ImportError, AttributeError):
        cap = "default"
    # torch's capability names the vector ISA only, never BF16: stay with fp32.
    return CpuFeatures(platform.processor(), frozenset({cap}))


def validate_precision(name: str) -> str:
    """``name`` lower-cased if it is one of :data:`PRECISIONS`.

    Raises:
        ModelError: an unknown precision.
    """
    key = (name or "").strip().lower()
    if key not in PRECISIONS:
        raise ModelError(f"--precision {name}: unknown; use one of {', '.join(PRECISIONS)}")
    return key


def choose_precision(requested: str, device: "torch.device | str", features: CpuFeatures | None = None) -> str:
    """The concrete precision (``fp32``, ``bf16`` or ``fp16``) ``requested`` means on ``device``, silently.

    ``auto``: fp16 autocast on CUDA, bf16 on a CPU with native bf16
    (``features``, default this CPU's), else fp32. An explicit choice is kept.

    Raises:
        ModelError: an unknown precision.
    """
    requested = validate_precision(requested)
    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    if requested != "auto":
        return requested
    if kind == "cuda":
        return "fp16"
    return "bf16" if (features if features is not None else cpu_features()).bf16 else "fp32"


def resolve_precision(requested: str, device: "torch.device | str", features: CpuFeatures | None = None) -> str:
    """:func:`choose_precision`, logging a warning when an explicit bf16/fp16 would only be emulated on this CPU.

    Raises:
        ModelError: an unknown precision.
    """
    chosen = choose_precision(requested, device, features)
    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    if kind == "cuda" or chosen == "fp32":
        return chosen
    feats = features if features is not None else cpu_features()
    if chosen == "bf16" and not feats.bf16:
        log.warning("--precision bf16 on a CPU without AVX512_BF16/AMX (%s): emulated, likely slower than fp32",
                    feats.summary())
    if chosen == "fp16" and not feats.fp16:
        log.warning("--precision fp16 on a CPU without AVX512_FP16/AMX-FP16 (%s): emulated, likely slower than fp32",
                    feats.summary())
    return chosen


def autocast_dtype(precision: str) -> "torch.dtype | None":
    """The autocast dtype of a resolved precision; ``None`` for fp32 (no autocast)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[validate_precision(precision)]
