"""Where GPU work runs, and the one log line said when it falls back to the CPU.

FAISS search, training (AMP, DDP), extraction and ONNX Runtime each ask here
whether a CUDA GPU is visible; extraction and ONNX Runtime turn a ``--device``
value into a device through :func:`device_from_name`. Where none is, the work runs on the CPU and
:func:`cpu_fallback` logs one line per component and process saying so and why
(``CUDA_VISIBLE_DEVICES`` hiding every GPU, no GPU, or a CPU-only build).
Nothing here imports torch or faiss at import time.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from reid_search.errors import ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_said: set[str] = set()
_lock = threading.Lock()


def hidden_by_env() -> bool:
    """``CUDA_VISIBLE_DEVICES`` is set to nothing (or -1): every GPU is hidden from this process."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1")


def why_no_gpu() -> str:
    """A few words on why no GPU is visible, for the fallback line."""
    return "CUDA_VISIBLE_DEVICES hides every GPU" if hidden_by_env() else "no CUDA GPU visible"


def cuda_visible() -> bool:
    """Whether torch sees a CUDA GPU (never raises; imports torch)."""
    import torch

    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver means no GPU, not a crash
        return False


def cpu_fallback(component: str, detail: str = "", reason: str | None = None, level: int = logging.INFO) -> None:
    """Log once per process that ``component`` runs on the CPU, with ``reason`` (default :func:`why_no_gpu`).

    ``level`` is INFO where no GPU is visible (normal on a CPU machine) and
    WARNING where one is but the installed build cannot use it.
    """
    with _lock:
        if component in _said:
            return
        _said.add(component)
    log.log(level, "%s: %s runs on the CPU%s", reason or why_no_gpu(), component, f" {detail}" if detail else "")


def auto_device(component: str, index: int = 0, detail: str = "") -> "torch.device":
    """CUDA device ``index`` when a GPU is visible, else the CPU (and one :func:`cpu_fallback` line)."""
    import torch

    if cuda_visible():
        return torch.device("cuda", index)
    cpu_fallback(component, detail)
    return torch.device("cpu")


def device_from_name(name: "str | torch.device | None", component: str, detail: str = "") -> "torch.device":
    """The device a ``--device`` value names: ``auto``/``None`` is :func:`auto_device`
    (CUDA when visible, else the CPU and one :func:`cpu_fallback` line with ``detail``);
    ``cpu``, ``cuda`` and ``cuda:N`` are taken as they are.

    Raises:
        ModelError: an unknown device name, or CUDA asked for where no GPU is visible.
    """
    import torch

    if name is None or name == "auto":
        return auto_device(component, 0, detail)
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ModelError(f"--device {name}: unknown device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(f"--device {name}: {component} runs on cpu or cuda only; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not cuda_visible():
        raise ModelError(f"--device {name}: {why_no_gpu()} here; use --device cpu or auto")
    return dev


def ddp_backend(device: str = "auto") -> str:
    """The torch.distributed backend: NCCL when ranks train on GPUs, else gloo (logged once)."""
    import torch.distributed as dist

    if device == "cpu":
        return "gloo"
    if not cuda_visible():
        cpu_fallback("DDP", "with the gloo backend instead of NCCL")
        return "gloo"
    if not dist.is_nccl_available():
        log.warning("this torch build has no NCCL: DDP uses gloo on the GPUs (slower all-reduce)")
        return "gloo"
    return "nccl"


__all__ = ["auto_device", "cpu_fallback", "cuda_visible", "ddp_backend", "device_from_name", "hidden_by_env",
           "why_no_gpu"]
