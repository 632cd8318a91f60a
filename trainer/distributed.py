"""Training under ``torchrun``: joining the job, wrapping the model, averaging what DDP does not.

A run without ``WORLD_SIZE`` (or with one process) is a job of one: every function here
is then a no-op, so the training loop has a single code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from reid_search.devices import ddp_backend
from reid_search.model import ReIDNet

__all__ = ["DistInfo", "average_gradients_", "init_distributed", "unwrap", "wrap_model"]


@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this call initialised the process group, so it tears it down

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and logs."""
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by ``torchrun`` (NCCL on GPU, gloo on CPU)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistInfo()
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(ddp_backend(device))
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owns)
    if torch.cuda.is_available() and device != "cpu":
        torch.cuda.set_device(info.local_rank)
    return info


def wrap_model(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """``model`` in DistributedDataParallel (SyncBatchNorm on GPUs) when the job has several ranks."""
    if info.world <= 1:
        return model
    wrapped = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else model
    return nn.parallel.DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)


def average_gradients_(params: Iterable[nn.Parameter], info: DistInfo) -> None:
    """Average the gradients of parameters that live outside DDP (the loss's centres) over the ranks."""
    if info.world <= 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(info.world)


def unwrap(model: nn.Module) -> ReIDNet:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)  # type: ignore[return-value]
