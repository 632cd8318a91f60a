"""Image preprocessing: the paper's training augmentations and the eval pipeline."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """What a model expects of its input; stored inside every checkpoint and export."""

    height: int = 256
    width: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["height"]), int(d["width"]), tuple(d["mean"]), tuple(d["std"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class AugmentConfig:
    """The training-time augmentations of the strong baseline."""

    flip_p: float = 0.5
    pad: int = 10
    random_erasing_p: float = 0.5
    erasing_scale: tuple[float, float] = (0.02, 0.4)
    erasing_min_aspect: float = 0.3
    extra: dict[str, Any] = field(default_factory=dict)


def build_eval_transform(pre: Preprocess) -> T.Compose:
    """Resize to the model's input size, to tensor, normalise."""
    return T.Compose(
        [
            T.Resize((pre.height, pre.width), interpolation=T.InterpolationMode.BILINEAR),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )


def build_train_transform(pre: Preprocess, aug: AugmentConfig = AugmentConfig()) -> T.Compose:
    """Resize, flip, pad + random crop, normalise, random erasing (Luo et al. 2019).

    Random erasing runs after normalisation and fills with 0, which is the
    per-channel dataset mean in pixel space.
    """
    ops: list[Any] = [T.Resize((pre.height, pre.width), interpolation=T.InterpolationMode.BILINEAR)]
    if aug.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(aug.flip_p))
    if aug.pad > 0:
        ops += [T.Pad(aug.pad), T.RandomCrop((pre.height, pre.width))]
    ops += [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    if aug.random_erasing_p > 0:
        r = aug.erasing_min_aspect
        ops.append(T.RandomErasing(p=aug.random_erasing_p, scale=aug.erasing_scale, ratio=(r, 1.0 / r), value=0))
    return T.Compose(ops)


def denormalize(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Undo :func:`build_eval_transform`'s normalisation (for pictures)."""
    mean = torch.tensor(pre.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype).view(-1, 1, 1)
    return x * std + mean
