"""Warmup + multi-step learning-rate schedule of the strong baseline, stepped per epoch.

reid-strong-baseline's ``WarmupMultiStepLR`` is a PyTorch scheduler, so it has
stepped once when it is built, and its trainer steps it again at the start of
every epoch: 0-based epoch ``e`` trains at the schedule's value for step
``e + 1``. :func:`warmup_multistep_factor` folds that shift in, so with the
paper's defaults the per-epoch lr is exactly the reference's: 3.815e-5 in
epoch 0, 3.5e-4 from epoch 9, 3.5e-5 from epoch 39, 3.5e-6 from epoch 69.
"""

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
    """Multiplier of the base lr that (0-based) ``epoch`` trains at, as in reid-strong-baseline.

    With ``t = epoch + 1`` (the reference scheduler's step count during that
    epoch): during warmup (``t < warmup_epochs``) the multiplier is
    ``warmup_factor*(1-alpha) + alpha`` with ``alpha = t/warmup_epochs``; it is
    then multiplied by ``gamma`` for every milestone ``<= t``. Defaults: 0.109
    at epoch 0, 0.604 at 5, 1 from 9, 0.1 from 39, 0.01 from 69.

    Raises:
        ValueError: negative epoch.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, not {epoch}")
    t = epoch + 1
    factor = 1.0
    if warmup and t < warmup_epochs:
        alpha = t / warmup_epochs
        factor = warmup_factor * (1.0 - alpha) + alpha
    return factor * gamma ** bisect.bisect_right(sorted(milestones), t)


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


def describe_schedule(cfg: "TrainConfig") -> str:
    """One line listing the lr of every epoch of ``cfg`` as runs of equal values (for logs and the demo)."""
    lrs = [cfg.lr * warmup_multistep_factor(e, cfg.milestones, cfg.gamma, cfg.warmup_epochs, cfg.warmup_factor,
                                            cfg.warmup) for e in range(cfg.epochs)]
    runs: list[str] = []
    start = 0
    for e in range(1, cfg.epochs + 1):
        if e == cfg.epochs or lrs[e] != lrs[start]:
            span = f"{start}" if e - 1 == start else f"{start}-{e - 1}"
            runs.append(f"{span}: {lrs[start]:.3g}")
            start = e
    return "lr by epoch " + ", ".join(runs)
