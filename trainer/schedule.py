"""Warmup + multi-step learning-rate schedule of the strong baseline, stepped per epoch."""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trainer.config import TrainConfig


def warmup_multistep_factor(
    epoch: int,
    milestones: Sequence[int] = (40, 70),
    gamma: float = 0.1,
    warmup_epochs: int = 10,
    warmup_factor: float = 0.01,
    warmup: bool = True,
) -> float:
    """Multiplier of the base lr in (0-based) ``epoch``.

    During warmup (``epoch < warmup_epochs``) the multiplier rises linearly
    from ``warmup_factor`` at epoch 0 towards 1 (``alpha = epoch/warmup_epochs``,
    ``warmup_factor*(1-alpha) + alpha``); it is then multiplied by ``gamma`` for
    every milestone ``<= epoch``. Defaults: 0.01 at 0, 0.505 at 5, 1 from 10,
    0.1 from 40, 0.01 from 70.

    Raises:
        ValueError: negative epoch.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, not {epoch}")
    factor = 1.0
    if warmup and epoch < warmup_epochs:
        alpha = epoch / warmup_epochs
        factor = warmup_factor * (1.0 - alpha) + alpha
    return factor * gamma ** bisect.bisect_right(sorted(milestones), epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: "TrainConfig") -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying :func:`warmup_multistep_factor` with ``cfg``'s schedule to every param group.

    Call ``scheduler.step()`` once at the end of each epoch; epoch e then runs
    at ``base_lr * warmup_multistep_factor(e)``. The factor is a
    ``functools.partial`` so ``state_dict()``/``load_state_dict()`` resume it.
    """
    fn = functools.partial(
        warmup_multistep_factor,
        milestones=tuple(cfg.milestones),
        gamma=cfg.gamma,
        warmup_epochs=cfg.warmup_epochs,
        warmup_factor=cfg.warmup_factor,
        warmup=cfg.warmup,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
