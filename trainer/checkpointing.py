"""Reproducible runs: seeding, the random state, and the training checkpoint (save, check, resume).

A resumed run must continue exactly as an uninterrupted one, so a training
checkpoint holds, besides the weights, both optimisers, the schedule, the
gradient scaler, the sampler's position and every random generator's state.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from reid_search.checkpoint import read_checkpoint, save_checkpoint
from reid_search.errors import ModelError, first_line
from reid_search.transforms import Preprocess
from trainer.config import ConfigError, TrainConfig, compatibility_problems, config_from_dict, config_to_dict
from trainer.distributed import unwrap
from trainer.losses import ReIDLoss
from trainer.sampler import RandomIdentitySampler

__all__ = [
    "Resumable",
    "load_training",
    "preprocess_of",
    "rank_seed",
    "read_resumable",
    "rng_state",
    "save_model",
    "save_training",
    "seed_everything",
    "set_rng_state",
]


class Resumable(Protocol):
    """What a training checkpoint saves and restores (``trainer.train.TrainState`` is one)."""

    model: nn.Module
    criterion: ReIDLoss
    optimizer: torch.optim.Optimizer
    center_optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    cfg: TrainConfig


def preprocess_of(cfg: TrainConfig) -> Preprocess:
    """The input contract the trained model will carry."""
    return Preprocess(cfg.height, cfg.width, tuple(cfg.mean), tuple(cfg.std))  # type: ignore[arg-type]


def seed_everything(seed: int) -> None:
    """Seed torch, numpy's global generator and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """A seed of its own for each (run seed, rank, epoch)."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, np.uint64)[0] >> 1)


def rng_state() -> dict[str, Any]:
    """Every global generator's state, as tensors and plain values a ``weights_only`` load accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model(path: Path, model: nn.Module, cfg: TrainConfig) -> None:
    """The final model: weights, input contract and config, no training state."""
    save_checkpoint(path, unwrap(model), preprocess_of(cfg), config=config_to_dict(cfg))


def save_training(path: Path, state: Resumable, epoch: int, sampler: RandomIdentitySampler, metrics: dict | None = None) -> None:
    """Checkpoint after ``epoch`` epochs: model, both optimizers, scheduler, scaler, sampler, RNG."""
    train_state = {
        "epoch": epoch,
        "optimizer": state.optimizer.state_dict(),
        "center_optimizer": state.center_optimizer.state_dict() if state.center_optimizer else None,
        "center": state.criterion.center.state_dict() if state.criterion.center is not None else None,
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "sampler": sampler.state_dict(),
        "rng": rng_state(),
        "metrics": metrics or {},
    }
    save_checkpoint(path, unwrap(state.model), preprocess_of(state.cfg), config=config_to_dict(state.cfg), train_state=train_state)


def read_resumable(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Read a :func:`save_training` checkpoint and check that ``cfg`` may continue it.

    Another recipe, architecture, input size, normalisation or optimiser is
    refused; a longer schedule (``epochs``), other periods or workers are not.

    Raises:
        ModelError: unreadable, no training state, or an incompatible config.
    """
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt.get("train_state"), dict):
        raise ModelError(f"{path} holds no training state (a final model?); resume from latest.pt")
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        raise ModelError(f"cannot resume {path}: it holds no saved config; start a new run with --output DIR")
    try:
        old = config_from_dict(saved)
    except ConfigError as exc:
        raise ModelError(f"cannot resume {path}: its saved config is damaged ({exc}); start a new run with --output DIR") from None
    problems = compatibility_problems(old, cfg)
    if old.recipe != cfg.recipe:
        problems.insert(0, f"recipe: checkpoint has {old.recipe!r}, requested {cfg.recipe!r}")
    if problems:
        raise ModelError(
            f"cannot resume {path}: " + "; ".join(problems)
            + f"; resume with the run's settings ({path.parent / 'config.json'}) or start a new run with --output DIR"
        )
    return ckpt


def load_training(
    path: Path, state: Resumable, sampler: RandomIdentitySampler, ckpt: dict[str, Any] | None = None
) -> int:
    """Restore the :func:`save_training` checkpoint at ``path`` into ``state``; returns the epochs already done.

    ``ckpt`` is that file as :func:`read_resumable` already read it (saves a second read).

    Raises:
        ModelError: see :func:`read_resumable`, or weights of another model (another dataset).
    """
    if ckpt is None:
        ckpt = read_resumable(path, state.cfg)
    ts = ckpt["train_state"]
    try:
        unwrap(state.model).load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ModelError(f"cannot resume {path}: the model differs ({first_line(exc, with_type=False)}); is it the same dataset?") from None
    state.optimizer.load_state_dict(ts["optimizer"])
    if state.center_optimizer is not None and ts["center_optimizer"] is not None:
        state.center_optimizer.load_state_dict(ts["center_optimizer"])
        state.criterion.center.load_state_dict(ts["center"])  # type: ignore[union-attr]
    state.scheduler.load_state_dict(ts["scheduler"])
    state.scaler.load_state_dict(ts["scaler"])
    sampler.load_state_dict(ts["sampler"])
    set_rng_state(ts["rng"])
    return int(ts["epoch"])
