"""The strong baseline's losses: label-smoothed ID loss, batch-hard triplet, center loss.

All losses compute in float32 whatever the autocast dtype of their inputs:
distances and log-softmax are where half precision loses the most.

Distributed training: :func:`gather_for_triplet` concatenates every rank's
features (gradient flows only into this rank's own slice) so that each rank's
anchors mine their hardest negatives among the whole global P*K batch. With
:class:`trainer.sampler.DistributedIdentitySampler` every identity's K images
sit on one rank, so hardest positives are always local; only negatives cross
ranks, and the gradient through another rank's negative is left to that rank.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from trainer.config import TrainConfig

log = logging.getLogger(__name__)


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors; float32/float64 pass through (float64 for gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class CrossEntropyLabelSmooth(nn.Module):
    """Cross entropy against ``(1 - eps) * onehot + eps / num_classes`` targets, mean over the batch.

    This is exactly ``F.cross_entropy(..., label_smoothing=eps)`` (Szegedy et
    al. 2016; the strong baseline's ID loss), which is what it computes.
    ``epsilon=0`` is plain cross entropy.
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, not {num_classes}")
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), not {epsilon}")
        self.num_classes, self.epsilon = num_classes, epsilon

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of ``logits`` ``[B, C]`` against integer ``targets`` ``[B]``.

        Raises:
            ValueError: ``logits`` does not have ``num_classes`` columns.
        """
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be [B, {self.num_classes}], got {tuple(logits.shape)}")
        return F.cross_entropy(_at_least_f32(logits), targets, label_smoothing=self.epsilon)


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances ``[M, N]``; squared distances are clamped at 1e-12 before
    the square root so that zero distances (an anchor to itself) have a finite gradient."""
    x, y = _at_least_f32(x), _at_least_f32(y)
    # Autocast would run the matmul in half precision, where ||x||^2 + ||y||^2 - 2xy
    # cancels catastrophically for near neighbours, exactly the pairs mining picks.
    with torch.autocast(device_type=x.device.type, enabled=False):
        d2 = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.t())
    return d2.clamp(min=1e-12).sqrt()


def batch_hard_triplet_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    margin: float | None = 0.3,
    *,
    global_features: torch.Tensor | None = None,
    global_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch-hard triplet loss (Hermans et al. 2017) with ``features`` as anchors.

    For each anchor: hardest positive = farthest sample with the same label
    (the anchor itself counts, so an identity with one image gives d_ap ~ 0;
    in float32 the expansion ||a||^2 + ||b||^2 - 2ab leaves that "0" at up to
    1e-3 * ||a||); hardest negative = nearest sample with another label.
    Loss = mean over anchors of ``relu(d_ap - d_an + margin)``, or of
    ``softplus(d_ap - d_an)`` when ``margin`` is None (soft margin).

    Mining candidates are ``global_features``/``global_labels`` when given
    (the DDP-gathered batch, which must contain the anchors), else the anchors
    themselves. An anchor with no negative among the candidates contributes 0
    and gives ``d_an = inf`` (no error: checking would sync the GPU each step).

    Returns:
        ``(loss, {"d_ap": mean hardest-positive distance, "d_an": mean
        hardest-negative distance})``; the stats are detached.

    Raises:
        ValueError: mismatched shapes, or only one of ``global_*`` given.
    """
    if (global_features is None) != (global_labels is None):
        raise ValueError("pass both global_features and global_labels, or neither")
    if global_features is None:
        global_features, global_labels = features, labels
    assert global_labels is not None
    if features.dim() != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features [B, D] and labels [B] disagree: {tuple(features.shape)} vs {tuple(labels.shape)}")
    if global_features.dim() != 2 or global_features.shape[0] != global_labels.shape[0]:
        raise ValueError(
            f"global_features [N, D] and global_labels [N] disagree: "
            f"{tuple(global_features.shape)} vs {tuple(global_labels.shape)}"
        )
    if global_features.shape[1] != features.shape[1]:
        raise ValueError(f"feature dims differ: {features.shape[1]} vs {global_features.shape[1]}")

    dist = euclidean_dist(features, global_features)
    same = labels.view(-1, 1) == global_labels.view(1, -1)
    d_ap = dist.masked_fill(~same, float("-inf")).amax(dim=1)
    d_an = dist.masked_fill(same, float("inf")).amin(dim=1)
    diff = d_ap - d_an
    if margin is None:
        per_anchor = F.softplus(diff)
    else:
        per_anchor = F.relu(diff + margin)
    loss = per_anchor.mean()
    stats = {"d_ap": d_ap.detach().mean(), "d_an": d_an.detach().mean()}
    return loss, stats


def gather_for_triplet(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's ``features``/``labels`` in rank order.

    This rank's slice is ``features`` itself, so gradient flows into it; the
    other ranks' slices are constants. Without an initialised process group
    (or with one rank) the inputs are returned unchanged. Every rank must pass
    tensors of the same shape (the identity sampler guarantees it).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, labels
    world, rank = dist.get_world_size(), dist.get_rank()
    feats = [torch.empty_like(features) for _ in range(world)]
    labs = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(feats, features.detach().contiguous())
    dist.all_gather(labs, labels.contiguous())
    feats[rank] = features
    return torch.cat(feats, 0), torch.cat(labs, 0)


class CenterLoss(nn.Module):
    """Center loss (Wen et al. 2016) with one learnable centre per class.

    Value: mean over the batch of the squared Euclidean distance
    ``||f_i - c_{y_i}||^2`` (no 1/2 factor), each clamped to [1e-12, 1e12]. This
    is the value of ``layers/center_loss.py`` in michuanhaohao/reid-strong-baseline
    (it picks each sample's own-class entry of the clamped distance matrix and
    averages; later copies that clamp the whole masked matrix and divide by the
    batch size add (C-1)*1e-12 per sample, nothing more). Centres start as
    ``randn(num_classes, feat_dim)`` like there.
    """

    def __init__(self, num_classes: int, feat_dim: int) -> None:
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(f"num_classes and feat_dim must be >= 1, not {num_classes}, {feat_dim}")
        self.num_classes, self.feat_dim = num_classes, feat_dim
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of ``features`` ``[B, feat_dim]`` with integer ``labels`` ``[B]``.

        Raises:
            ValueError: wrong feature shape.
        """
        if features.dim() != 2 or features.shape[1] != self.feat_dim or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"features must be [B, {self.feat_dim}] with B labels, got {tuple(features.shape)} "
                f"and {tuple(labels.shape)}"
            )
        diff = _at_least_f32(features) - self.centers[labels]
        return diff.pow(2).sum(1).clamp(min=1e-12, max=1e12).mean()


def center_grad_rescale_(center_loss: nn.Module, weight: float) -> None:
    """Divide the centres' gradients by ``weight`` (in place), before stepping their optimiser.

    The total loss carries ``weight * center_loss``; undoing the weight for the
    centres means their SGD step (lr ``center_lr``) does not depend on how much
    the center term pulls on the network (reid-strong-baseline's trainer).

    Raises:
        ValueError: ``weight`` is not positive.
    """
    if not weight > 0:
        raise ValueError(f"center loss weight must be > 0 to rescale by it, not {weight}")
    for p in center_loss.parameters():
        if p.grad is not None:
            p.grad.mul_(1.0 / weight)


class ReIDLoss(nn.Module):
    """The recipe's total loss: ``id_weight * ID + triplet_weight * triplet + center_loss_weight * center``.

    The ID loss (label-smoothed when ``cfg.label_smoothing > 0``) is on the
    logits; triplet and center losses are on the pre-BNNeck features. A loss
    whose weight is 0 is not computed; ``self.center`` is None when the center
    loss is off, else the :class:`CenterLoss` whose parameters need their own
    optimiser (SGD, ``cfg.center_lr``) and :func:`center_grad_rescale_`.
    """

    def __init__(self, cfg: "TrainConfig", num_classes: int, feat_dim: int) -> None:
        super().__init__()
        self.id_weight = cfg.id_weight
        self.triplet_weight = cfg.triplet_weight
        self.center_weight = cfg.center_loss_weight
        self.margin = cfg.triplet_margin
        self.id_loss = CrossEntropyLabelSmooth(num_classes, cfg.label_smoothing)
        self.center: CenterLoss | None = CenterLoss(num_classes, feat_dim) if cfg.center_loss_weight > 0 else None

    def forward(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        global_features: torch.Tensor | None = None,
        global_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its parts.

        ``global_features``/``global_labels`` (from :func:`gather_for_triplet`)
        widen triplet mining to the global batch in DDP.

        Returns:
            ``(total, parts)``; ``parts`` holds detached scalar tensors:
            ``loss`` (= total), ``acc`` (top-1 on the logits) and the unweighted
            ``id`` / ``triplet`` (+ ``d_ap``, ``d_an``) / ``center`` of the losses
            that are on. Tensors, not floats, so logging need not sync the GPU
            every step.
        """
        total = logits.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        if self.id_weight > 0:
            id_loss = self.id_loss(logits, labels)
            total = total + self.id_weight * id_loss
            parts["id"] = id_loss.detach()
        if self.triplet_weight > 0:
            tri, stats = batch_hard_triplet_loss(
                features, labels, self.margin, global_features=global_features, global_labels=global_labels
            )
            total = total + self.triplet_weight * tri
            parts["triplet"] = tri.detach()
            parts.update(stats)
        if self.center is not None:
            cen = self.center(features, labels)
            total = total + self.center_weight * cen
            parts["center"] = cen.detach()
        parts["acc"] = (logits.detach().argmax(1) == labels).float().mean()
        parts["loss"] = total.detach()
        return total, parts
