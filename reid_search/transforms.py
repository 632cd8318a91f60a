"""Image preprocessing: the paper's training augmentations and the eval pipeline."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


LAYOUTS = ("NCHW", "NHWC")
COLORS = ("RGB", "BGR")
# ToTensor's pixel range (0..1); a scale of 1 feeds 0..255.
DEFAULT_SCALE = 1 / 255


@dataclass(frozen=True)
class Preprocess:
    """What a model expects of its input; stored inside every checkpoint and export.

    A decoded crop is resized to ``height``x``width``, put in ``color`` channel
    order, multiplied by ``scale`` (pixel values 0..255 times 1/255 give 0..1;
    a scale of 1 keeps 0..255), normalised as ``(x - mean) / std`` (both in
    the scaled units) and fed to the graph in ``layout`` (``NCHW`` or
    ``NHWC``). The defaults are the ReID convention (RGB, 0..1, ImageNet
    statistics, NCHW). Eval batches stay ``[B, 3, H, W]`` inside reid-search;
    only an extractor whose graph is ``NHWC`` transposes them.

    Raises:
        ValueError: an unknown layout or channel order, a scale that is not a
            positive finite number, a non-positive size or std.
    """

    height: int = 256
    width: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    layout: str = "NCHW"
    color: str = "RGB"
    scale: float = DEFAULT_SCALE

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.color not in COLORS:
            raise ValueError(f"channel order {self.color!r} is not one of {', '.join(COLORS)}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not 0 < self.scale < math.inf:
            raise ValueError(f"scale {self.scale!r} is not a positive number")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std {tuple(self.std)} has a value that is not positive")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form.

        ``layout``, ``color`` and ``scale`` are written only when they differ
        from the defaults, so a checkpoint of a default model is what older
        versions wrote (and read).
        """
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        for key in ("layout", "color", "scale"):
            if d[key] == getattr(Preprocess, key):
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        """Inverse of :meth:`to_dict`; a dict without ``layout``/``color``/``scale`` gets the defaults.

        Raises:
            KeyError: no height, width, mean or std.
            ValueError: see the class.
        """
        return cls(int(d["height"]), int(d["width"]), tuple(d["mean"]), tuple(d["std"]),  # type: ignore[arg-type]
                   str(d.get("layout", "NCHW")), str(d.get("color", "RGB")), float(d.get("scale", DEFAULT_SCALE)))


class ToModelPixels(torch.nn.Module):
    """After ``ToTensor`` (RGB, 0..1, CHW): reorder channels to BGR if asked, and rescale by ``scale * 255``."""

    def __init__(self, color: str = "RGB", scale: float = DEFAULT_SCALE) -> None:
        super().__init__()
        self.color, self.scale = color, scale

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.color == "BGR":
            img = img.flip(-3)
        if self.scale != DEFAULT_SCALE:
            img = img * (self.scale * 255.0)
        return img

    def extra_repr(self) -> str:
        return f"color={self.color}, scale={self.scale}"


def _pixel_ops(pre: Preprocess) -> list[Any]:
    # Nothing is added for RGB 0..1, so the default pipeline is exactly the one before these fields existed.
    if pre.color == "RGB" and pre.scale == DEFAULT_SCALE:
        return []
    return [ToModelPixels(pre.color, pre.scale)]


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
    """Resize to the model's input size, to tensor, channel order and scale, normalise.

    The result is always ``[3, H, W]``; an ``NHWC`` graph's extractor transposes the batch.
    """
    return T.Compose(
        [
            T.Resize((pre.height, pre.width), interpolation=T.InterpolationMode.BILINEAR),
            T.ToTensor(),
            *_pixel_ops(pre),
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
    ops += [T.ToTensor(), *_pixel_ops(pre), T.Normalize(pre.mean, pre.std)]
    if aug.random_erasing_p > 0:
        ops.append(RandomErasing(aug.random_erasing_p, aug.erasing_scale, aug.erasing_min_aspect,
                                 aug.erasing_value, aug.erasing_attempts))
    return T.Compose(ops)


def denormalize(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Undo :func:`build_eval_transform`'s normalisation, scale and channel order: RGB in 0..1 (for pictures)."""
    mean = torch.tensor(pre.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype).view(-1, 1, 1)
    x = x * std + mean
    if pre.scale != DEFAULT_SCALE:
        x = x / (pre.scale * 255.0)
    return x.flip(-3) if pre.color == "BGR" else x
