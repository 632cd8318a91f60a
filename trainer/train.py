"""The training loop of the strong baseline: a few plain functions.

``main(cfg, data_root, out_dir)`` builds everything from a :class:`TrainConfig`,
then alternates :func:`train_one_epoch` and (every ``eval_period`` epochs)
:func:`evaluate`, saving ``latest.pt`` each epoch, ``epoch_N.pt`` every
``save_period`` and ``model.pt`` at the end. One step function serves fp32,
bf16 and fp16 (with a gradient scaler). Under ``torchrun`` it trains with
DistributedDataParallel: the P×K sampler hands each rank disjoint identities
of one global batch and triplet mining sees the gathered global batch.

Learning rate and DDP: ``num_identities`` (P) is global, so the global batch
stays P×K whatever the world size and the paper's lr applies unchanged. If you
raise P to use more GPUs, scale lr linearly with the global batch
(lr = 3.5e-4 × P×K / 64) and keep the warmup.

Seeding, the random state and the checkpoints a run saves and resumes from are in
:mod:`trainer.checkpointing`; joining a ``torchrun`` job and wrapping the model in
:mod:`trainer.distributed`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from reid_search.atomic import atomic_write_json
from reid_search.data import ImageRecord, MarketDataset, load_market, training_labels
from reid_search.devices import auto_device
from reid_search.errors import DataError, ModelError
from reid_search.extract import extract_features
from reid_search.images import ImageLoadError, load_image
from reid_search.metrics import evaluate as evaluate_ranking
from reid_search.model import ReIDNet, build_model
from reid_search.torch_extractor import TorchExtractor
from reid_search.transforms import AugmentConfig, Preprocess, build_train_transform
from trainer.checkpointing import (
    load_training,
    preprocess_of,
    rank_seed,
    read_resumable,
    save_model,
    save_training,
    seed_everything,
)
from trainer.config import TrainConfig, config_to_dict
from trainer.distributed import DistInfo, average_gradients_, init_distributed, unwrap, wrap_model
from trainer.losses import ReIDLoss, center_grad_rescale_, gather_for_triplet
from trainer.sampler import RandomIdentitySampler
from trainer.schedule import build_scheduler, describe_schedule

log = logging.getLogger(__name__)

# Called with (epoch, total_steps) at the start of an epoch; returns a
# per-step callback taking the step's stats dict, and a close function.
ProgressFactory = Callable[[int, int], tuple[Callable[[dict[str, float]], None], Callable[[], None]]]


# ---------------------------------------------------------------- data


class TrainSet(Dataset):
    """Training crops with labels; an unreadable image is replaced by another of the same identity."""

    def __init__(self, records: Sequence[ImageRecord], labels: Sequence[int], transform: Callable) -> None:
        self.records, self.labels, self.transform = list(records), list(labels), transform
        by_label: dict[int, list[int]] = {}
        for i, lab in enumerate(self.labels):
            by_label.setdefault(lab, []).append(i)
        self.by_label = by_label
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        lab = self.labels[i]
        candidates = [i] + [j for j in self.by_label[lab] if j != i]
        for j in candidates:
            if j in self.bad:
                continue
            try:
                return self.transform(load_image(self.records[j].path)), lab
            except ImageLoadError as exc:
                self.bad.add(j)
                log.warning("skipping unreadable training image %s (%s)", self.records[j].path, exc.detail)
        # Every image of this identity is unusable: fall back to any readable one.
        for j in range(len(self.records)):
            if j not in self.bad:
                try:
                    return self.transform(load_image(self.records[j].path)), self.labels[j]
                except ImageLoadError:
                    self.bad.add(j)
        raise DataError("no readable training image left; check the dataset")


def build_train_loader(ds: MarketDataset, cfg: TrainConfig, info: DistInfo) -> tuple[DataLoader, RandomIdentitySampler, int]:
    """P×K loader over the training split; returns (loader, sampler, num_classes).

    Raises:
        DataError: no trainable images, fewer identities than a batch needs, …
    """
    records, labels, pid2label = training_labels(ds.train)
    num_classes = len(pid2label)
    if num_classes < 2:
        raise DataError(f"{ds.root / 'bounding_box_train'} has {num_classes} identity; training needs at least 2")
    p = cfg.num_identities
    if num_classes < p:
        raise DataError(
            f"the training set has {num_classes} identities but a batch takes num_identities={p}; "
            f"pass -o num_identities={num_classes - num_classes % info.world or num_classes} or add identities"
        )
    try:
        sampler = RandomIdentitySampler(labels, p, cfg.num_instances, cfg.seed, info.world, info.rank)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    aug = AugmentConfig(flip_p=cfg.flip_p, pad=cfg.pad, random_erasing_p=cfg.random_erasing_p)
    dataset = TrainSet(records, labels, build_train_transform(preprocess_of(cfg), aug))
    workers = min(cfg.num_workers, max(0, (os.cpu_count() or 1) - 1))
    loader = DataLoader(
        dataset, batch_size=sampler.local_batch_size, sampler=sampler, num_workers=workers,
        pin_memory=torch.cuda.is_available(), drop_last=False, persistent_workers=False,
    )
    return loader, sampler, num_classes


# ---------------------------------------------------------------- model + optim


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32). ``auto`` is bf16 on GPUs that have it, fp16 on older ones, fp32 on CPU."""
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam/AdamW/SGD with the paper's weight decay and lr factor for biases.

    Two parameter groups (weights, biases) rather than one per tensor: the
    multi-tensor (foreach) kernels batch whole groups.
    """
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    groups = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if biases:
        groups.append({"params": biases, "lr": cfg.lr * cfg.bias_lr_factor, "weight_decay": cfg.weight_decay_bias})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adam(groups, lr=cfg.lr)


@dataclass
class TrainState:
    """Everything one step needs and a checkpoint saves."""

    model: nn.Module
    criterion: ReIDLoss
    optimizer: torch.optim.Optimizer
    center_optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None
    cfg: TrainConfig
    info: DistInfo


def build_train_state(cfg: TrainConfig, num_classes: int, device: torch.device, info: DistInfo | None = None) -> TrainState:
    """Model, loss (with centres), both optimisers, schedule and scaler for ``cfg``.

    The model is in ``cfg``'s memory format on ``device`` and wrapped in
    DistributedDataParallel (SyncBatchNorm on GPUs) when ``info.world > 1``.

    Raises:
        ModelError: unknown architecture or unreadable pretrained weights.
    """
    info = info or DistInfo()
    model = build_model(cfg.arch, num_classes, cfg.last_stride, cfg.neck, cfg.pretrained, cfg.neck_feat).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = ReIDLoss(cfg, num_classes, model.feat_dim).to(device)
    optimizer = build_optimizer(model, cfg)
    center_opt = torch.optim.SGD(criterion.center.parameters(), lr=cfg.center_lr) if criterion.center is not None else None
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    wrapped = wrap_model(model, device, info)
    return TrainState(wrapped, criterion, optimizer, center_opt, build_scheduler(optimizer, cfg), scaler, device, dtype, cfg, info)


def train_step(state: TrainState, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One optimisation step, the same code for fp32, bf16 and fp16."""
    cfg, device = state.cfg, state.device
    images = images.to(device, non_blocking=True)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = labels.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=state.dtype or torch.float32, enabled=state.dtype is not None):
        logits, feats = state.model(images)
    # Losses in fp32: the triplet distances and the centre terms are sensitive.
    logits, feats = logits.float(), feats.float()
    gfeats = glabels = None
    if state.info.world > 1 and cfg.uses_triplet:
        gfeats, glabels = gather_for_triplet(feats, labels)
    loss, parts = state.criterion(logits, feats, labels, global_features=gfeats, global_labels=glabels)
    state.optimizer.zero_grad(set_to_none=True)
    if state.center_optimizer is not None:
        state.center_optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    if state.center_optimizer is not None:
        assert state.criterion.center is not None
        average_gradients_(state.criterion.center.parameters(), state.info)  # centres live outside DDP
        # Undo the loss weight so the centres move at center_lr (Luo et al. §4.5).
        center_grad_rescale_(state.criterion.center, cfg.center_loss_weight)
        state.scaler.step(state.center_optimizer)
    state.scaler.update()
    return parts


def train_one_epoch(
    state: TrainState, loader: DataLoader, sampler: RandomIdentitySampler, epoch: int,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Run one epoch; returns the epoch's mean loss parts, accuracy, lr and images/s."""
    state.model.train()
    sampler.set_epoch(epoch)
    steps = len(loader) if state.cfg.max_steps_per_epoch is None else min(len(loader), state.cfg.max_steps_per_epoch)
    lr = state.optimizer.param_groups[0]["lr"]
    sums: dict[str, float] = {}
    seen, t0 = 0, time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        if step >= steps:
            break
        parts = train_step(state, images, labels)
        vals = {k: float(v) for k, v in parts.items()}
        if not math.isfinite(vals["loss"]):
            raise FloatingPointError(f"loss became {vals['loss']} at epoch {epoch + 1} step {step + 1}; lower lr or use -o amp=off")
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + v
        seen += images.shape[0] * state.info.world
        vals.update(lr=lr, img_s=seen / max(time.perf_counter() - t0, 1e-9))
        if on_step is not None:
            on_step(vals)
        if state.info.is_main and (step + 1) % state.cfg.log_period == 0:
            log.info("epoch %d step %d/%d %s", epoch + 1, step + 1, steps, _fmt(vals))
    n = max(1, min(steps, step + 1)) if steps else 1
    out = {k: v / n for k, v in sums.items()}
    out.update(lr=lr, img_s=seen / max(time.perf_counter() - t0, 1e-9), steps=float(n))
    return out


def _fmt(vals: dict[str, float]) -> str:
    keys = ("loss", "id", "triplet", "center", "acc", "lr", "img_s")
    return " ".join(f"{k}={vals[k]:.4g}" for k in keys if k in vals)


@torch.inference_mode()
def evaluate(
    model: ReIDNet, query: Sequence[ImageRecord], gallery: Sequence[ImageRecord], pre: Preprocess,
    device: torch.device, batch_size: int = 128,
) -> dict[str, float]:
    """R1/R5/R10/mAP/mINP of ``model`` on a query/gallery split (Market protocol, the engine's metric code).

    Leaves the model as it found it (the extractor runs a BatchNorm-folded copy
    of it) and the global RNG untouched, so evaluating mid-run does not change
    the training that follows (a resumed run must match an uninterrupted one).
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    # The extractor's DataLoader draws its base seed from the global RNG.
    with torch.random.fork_rng(devices=devices):
        ex = TorchExtractor(model, pre, "eval", device)
        qf, qk, _ = extract_features([r.path for r in query], ex, batch_size)
        gf, gk, _ = extract_features([r.path for r in gallery], ex, batch_size)
    q = [query[i] for i in qk]
    g = [gallery[i] for i in gk]
    dist_ = 2.0 - 2.0 * (qf @ gf.T)  # squared Euclidean on unit vectors
    res = evaluate_ranking(
        dist_, np.array([r.pid for r in q]), np.array([r.pid for r in g]),
        np.array([r.camid for r in q]), np.array([r.camid for r in g]),
    )
    cmc = res["cmc"]
    return {"rank1": float(cmc[0]), "rank5": float(cmc[min(4, len(cmc) - 1)]),
            "rank10": float(cmc[min(9, len(cmc) - 1)]), "mAP": float(res["mAP"]), "mINP": float(res["mINP"])}


# ---------------------------------------------------------------- main


@dataclass(frozen=True)
class TrainResult:
    """Where the run left its model, and its last evaluation."""

    out_dir: Path
    model_path: Path
    epochs: int
    metrics: dict[str, float]
    history: tuple[dict[str, float], ...]
    is_main: bool = True  # False on the DDP ranks that wrote nothing


def _attach_file_log(out_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(out_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger("trainer").addHandler(handler)
    logging.getLogger("trainer").setLevel(logging.INFO)
    return handler


def main(
    cfg: TrainConfig,
    data_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    device: str = "auto",
    progress: ProgressFactory | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``cfg`` on the Market-layout ``data_root``, writing into ``out_dir``.

    Under ``torchrun`` every rank calls this; rank 0 alone writes files and
    evaluates, and the process group is torn down on return if this call set it up.

    Raises:
        DataError: bad dataset (missing, one identity, too few identities for P).
        ModelError: ``out_dir`` already holds a run (and not ``resume``), resume
            without a checkpoint, or with an incompatible config.
    """
    info = init_distributed(device)
    try:
        return _train(cfg, Path(data_root), Path(out_dir), info, resume, device, progress, on_epoch)
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _start_run(
    cfg: TrainConfig, data_root: Path, info: DistInfo, dev: torch.device, latest: Path, ckpt: dict[str, Any] | None,
) -> tuple[MarketDataset, DataLoader, RandomIdentitySampler, int, TrainState, int]:
    """Dataset, loader, sampler, number of classes and state, seeded and restored from
    ``ckpt`` when resuming; and the epoch to start from."""
    ds = load_market(data_root, need_train=True, need_eval=False)
    # Same seed on every rank: identical initial weights and centres (DDP only broadcasts the model).
    seed_everything(cfg.seed)
    loader, sampler, num_classes = build_train_loader(ds, cfg, info)
    state = build_train_state(cfg, num_classes, dev, info)
    if info.world > 1:
        # From here on each rank draws its own augmentations (and DataLoader worker seeds).
        seed_everything(rank_seed(cfg.seed, info.rank, 0))
    start = 0
    if ckpt is not None:
        start = load_training(latest, state, sampler, ckpt)
        if info.rank > 0:
            # latest.pt holds rank 0's RNG; the other ranks re-derive theirs.
            seed_everything(rank_seed(cfg.seed, info.rank, start))
    return ds, loader, sampler, num_classes, state, start


def _evaluate_epoch(model: ReIDNet, ds: MarketDataset, cfg: TrainConfig, dev: torch.device, done: int) -> dict[str, float]:
    metrics = evaluate(model, ds.query, ds.gallery, preprocess_of(cfg), dev, cfg.eval_batch_size)
    log.info("epoch %d eval: R1 %.2f%% R5 %.2f%% R10 %.2f%% mAP %.2f%% mINP %.2f%%", done,
             100 * metrics["rank1"], 100 * metrics["rank5"], 100 * metrics["rank10"],
             100 * metrics["mAP"], 100 * metrics["mINP"])
    return metrics


def _train(
    cfg: TrainConfig, data_root: Path, out: Path, info: DistInfo, resume: bool, device: str,
    progress: ProgressFactory | None, on_epoch: Callable[[int, dict[str, float]], None] | None,
) -> TrainResult:
    dev = torch.device("cpu") if device == "cpu" else auto_device(
        "training", info.local_rank, "in fp32 (no AMP)" if cfg.amp in ("auto", "off") else f"with amp={cfg.amp}")
    latest = out / "latest.pt"
    if resume and not latest.is_file():
        raise ModelError(f"nothing to resume: {latest} does not exist; drop --resume to start a new run")
    if not resume and latest.is_file():
        raise ModelError(f"{out} already holds a run; pass --resume to continue it or --output DIR for a new one")
    # Refuse an incompatible resume before building anything or touching the run folder.
    ckpt = read_resumable(latest, cfg) if resume else None
    ds, loader, sampler, num_classes, state, start = _start_run(cfg, data_root, info, dev, latest, ckpt)
    del ckpt
    model = unwrap(state.model)
    handler, trainer_log = None, logging.getLogger("trainer")
    old_level = trainer_log.level
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        handler = _attach_file_log(out)
        atomic_write_json(out / "config.json", config_to_dict(cfg))
    has_eval = bool(ds.query) and bool(ds.gallery)
    metrics: dict[str, float] = {}
    history: list[dict[str, float]] = []
    final = out / "model.pt"
    try:
        if info.is_main:
            log.info("training %s on %s: %d images, %d ids, %d epochs (from %d), batch %d, device %s, amp %s, world %d",
                     cfg.recipe, ds.root, len(loader.dataset), num_classes, cfg.epochs, start, cfg.batch_size,  # type: ignore[arg-type]
                     dev, state.dtype, info.world)
            log.info("%s", describe_schedule(cfg))
        for epoch in range(start, cfg.epochs):
            steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
            on_step, close = progress(epoch, steps) if (progress and info.is_main) else (None, lambda: None)
            try:
                stats = train_one_epoch(state, loader, sampler, epoch, on_step)
            finally:
                close()
            state.scheduler.step()
            done = epoch + 1
            if info.is_main:
                log.info("epoch %d/%d done: %s", done, cfg.epochs, _fmt(stats))
            if has_eval and (done % cfg.eval_period == 0 or done == cfg.epochs) and info.is_main:
                metrics = _evaluate_epoch(model, ds, cfg, dev, done)
                stats = {**stats, **metrics}
            history.append({"epoch": float(done), **stats})
            if info.is_main:
                save_training(latest, state, done, sampler, metrics)
                if done % cfg.save_period == 0:
                    save_training(out / f"epoch_{done}.pt", state, done, sampler, metrics)
                if on_epoch is not None:
                    on_epoch(done, stats)
        if info.is_main:
            save_model(final, model, cfg)
            log.info("final model: %s", final)
        if info.world > 1:
            dist.barrier()
    finally:
        if handler is not None:
            trainer_log.removeHandler(handler)
            trainer_log.setLevel(old_level)
            handler.close()
    return TrainResult(out, final, cfg.epochs, metrics, tuple(history), info.is_main)
