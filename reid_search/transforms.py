"""Image preprocessing: the paper's training augmentations and the eval pipeline."""

from __future__ import annotations

import math
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


# The strong baseline pads 256x128 crops by 10 px before its random crop.
REFERENCE_PAD = 10
REFERENCE_SIZE = (256, 128)


def scaled_pad(height: int, width: int) -> tuple[int, int]:
    """``(horizontal, vertical)`` padding: the reference's 10 px at 256x128, scaled to ``height``x``width``.

    At 128x64 it is 5 px; at 64x32, 2 (rounded half to even, as :func:`round`).
    """
    return round(REFERENCE_PAD * width / REFERENCE_SIZE[1]), round(REFERENCE_PAD * height / REFERENCE_SIZE[0])


@dataclass(frozen=True)
class AugmentConfig:
    """The training-time augmentations of the strong baseline.

    ``pad=None`` (the default) scales the reference's 10 px at 256x128 to the
    input size (:func:`scaled_pad`); an int pads every side by that many pixels.
    Random erasing is the reference's: fill ``erasing_value`` in normalised
    space (pixels of about 152, 142, 127), area uniform in ``erasing_scale``,
    aspect ratio uniform in ``[erasing_min_aspect, 1/erasing_min_aspect]``, up
    to ``erasing_attempts`` draws for a box that fits.
    """

    flip_p: float = 0.5
    pad: int | None = None
    random_erasing_p: float = 0.5
    erasing_scale: tuple[float, float] = (0.02, 0.4)
    erasing_min_aspect: float = 0.3
    erasing_value: tuple[float, float, float] = IMAGENET_MEAN
    erasing_attempts: int = 100
    extra: dict[str, Any] = field(default_factory=dict)

    def padding(self, pre: Preprocess) -> tuple[int, int]:
        """``(horizontal, vertical)`` pixels of padding before the random crop at ``pre``'s size."""
        if self.pad is None:
            return scaled_pad(pre.height, pre.width)
        return self.pad, self.pad


def erasing_box(
    height: int, width: int, scale: tuple[float, float] = (0.02, 0.4), min_aspect: float = 0.3,
    attempts: int = 100, generator: torch.Generator | None = None,
) -> tuple[int, int, int, int] | None:
    """Draw reid-strong-baseline's random-erasing box on a ``height``x``width`` image.

    Each attempt draws the area fraction uniformly in ``scale`` and the aspect
    ratio h/w uniformly in ``[min_aspect, 1/min_aspect]``, rounds
    ``h = sqrt(area*ratio)``, ``w = sqrt(area/ratio)`` and keeps the box when
    it is strictly smaller than the image on both sides. Returns ``(top, left,
    h, w)``, or None when no attempt fits. Random numbers come from torch (the
    global generator unless ``generator``), so DataLoader seeding and resume
    cover them.
    """
    area = height * width
    for _ in range(attempts):
        target = float(torch.empty(()).uniform_(scale[0], scale[1], generator=generator)) * area
        ratio = float(torch.empty(()).uniform_(min_aspect, 1.0 / min_aspect, generator=generator))
        h = int(round(math.sqrt(target * ratio)))
        w = int(round(math.sqrt(target / ratio)))
        if h < height and w < width:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    return None


class RandomErasing(torch.nn.Module):
    """Random erasing (Zhong et al. 2017) exactly as reid-strong-baseline applies it, on a normalised CHW tensor.

    With probability ``p`` one box from :func:`erasing_box` is filled with
    ``value`` (per channel, in normalised space: the reference fills its pixel
    mean *after* normalising, about (152, 142, 127) in pixels).
    """

    def __init__(self, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.4), min_aspect: float = 0.3,
                 value: tuple[float, ...] = IMAGENET_MEAN, attempts: int = 100) -> None:
        super().__init__()
        self.p, self.scale, self.min_aspect, self.value, self.attempts = p, scale, min_aspect, tuple(value), attempts

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Erase in place (of a fresh tensor from ToTensor/Normalize) and return ``img``."""
        if float(torch.rand(())) >= self.p:
            return img
        box = erasing_box(img.shape[-2], img.shape[-1], self.scale, self.min_aspect, self.attempts)
        if box is not None:
            top, left, h, w = box
            fill = torch.tensor(self.value[: img.shape[-3]], dtype=img.dtype).view(-1, 1, 1)
            img[..., top:top + h, left:left + w] = fill
        return img

    def extra_repr(self) -> str:
        return f"p={self.p}, scale={self.scale}, min_aspect={self.min_aspect}, value={self.value}, attempts={self.attempts}"


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

    The padding scales with the input size unless ``aug.pad`` fixes it
    (:meth:`AugmentConfig.padding`); random erasing is :class:`RandomErasing`.
    """
    ops: list[Any] = [T.Resize((pre.height, pre.width), interpolation=T.InterpolationMode.BILINEAR)]
    if aug.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(aug.flip_p))
    pad_x, pad_y = aug.padding(pre)
    if pad_x > 0 or pad_y > 0:
        ops += [T.Pad((pad_x, pad_y)), T.RandomCrop((pre.height, pre.width))]
    ops += [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    if aug.random_erasing_p > 0:
        ops.append(RandomErasing(aug.random_erasing_p, aug.erasing_scale, aug.erasing_min_aspect,
                                 aug.erasing_value, aug.erasing_attempts))
    return T.Compose(ops)


def denormalize(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Undo :func:`build_eval_transform`'s normalisation (for pictures)."""
    mean = torch.tensor(pre.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype).view(-1, 1, 1)
    return x * std + mean
