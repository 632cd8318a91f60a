from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from reid_search.transforms import (
    IMAGENET_MEAN,
    AugmentConfig,
    Preprocess,
    build_eval_transform,
    build_train_transform,
    denormalize,
    erasing_box,
)


def _img(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (128, 64, 3), dtype=np.uint8))


def test_eval_transform_resizes_and_normalises() -> None:
    pre = Preprocess()
    img = Image.new("RGB", (64, 128), (124, 116, 104))  # ≈ ImageNet mean colour
    x = build_eval_transform(pre)(img)
    assert x.shape == (3, 256, 128)
    assert x.abs().max() < 0.02
    back = denormalize(x, pre)
    assert torch.allclose(back[:, 0, 0], torch.tensor([124, 116, 104]) / 255, atol=1e-4)


def test_train_transform_shape_and_randomness() -> None:
    t = build_train_transform(Preprocess(), AugmentConfig())
    torch.manual_seed(0)
    a, b = t(_img()), t(_img())
    assert a.shape == b.shape == (3, 256, 128)
    assert not torch.equal(a, b)


def test_flip_only_transform_flips_half_the_time() -> None:
    img = _img(3)
    small = Preprocess(64, 32)  # small tensors keep 400 draws fast; the op does not depend on size
    t = build_train_transform(small, AugmentConfig(flip_p=0.5, pad=0, random_erasing_p=0))
    plain = build_eval_transform(small)(img)
    torch.manual_seed(0)
    flips = 0
    for _ in range(400):
        out = t(img)
        if torch.allclose(out, plain.flip(-1)):
            flips += 1
        else:
            assert torch.allclose(out, plain)
    assert 160 < flips < 240


def _reference_box(rng: random.Random, height: int, width: int) -> tuple[int, int] | None:
    """An independent slow model of reid-strong-baseline's box draw (python's random, 100 tries)."""
    for _ in range(100):
        target = rng.uniform(0.02, 0.4) * height * width
        ratio = rng.uniform(0.3, 1 / 0.3)
        h, w = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if w < width and h < height:
            return h, w
    return None


def _box_stats(boxes, height: int, width: int) -> tuple[float, float]:
    hw = [h / w for h, w in boxes]
    area = [h * w / (height * width) for h, w in boxes]
    return float(np.mean(hw)), float(np.mean(area))


def test_erasing_box_matches_the_reference_distribution() -> None:
    """4,000 draws on 256x128: mean h/w 1.90 and erased area 0.203 (the reference; the old
    torchvision-style draw gave 1.45 and 0.188)."""
    n, H, W = 4000, 256, 128
    g = torch.Generator().manual_seed(0)
    ours = [erasing_box(H, W, generator=g) for _ in range(n)]
    assert all(b is not None for b in ours)
    for top, left, h, w in ours:  # type: ignore[misc]
        assert 0 <= top <= H - h and 0 <= left <= W - w and h < H and w < W
    ours_hw, ours_area = _box_stats([(b[2], b[3]) for b in ours], H, W)  # type: ignore[index]
    rng = random.Random(1)
    ref = [_reference_box(rng, H, W) for _ in range(n)]
    ref_hw, ref_area = _box_stats(ref, H, W)  # type: ignore[arg-type]
    # standard errors over 4,000 draws: h/w ~0.016, area ~0.0017
    assert abs(ours_hw - ref_hw) < 0.08 and abs(ours_area - ref_area) < 0.01
    assert abs(ours_hw - 1.90) < 0.06 and abs(ours_area - 0.203) < 0.007
    # aspect ratio is uniform in [0.3, 1/0.3] before rejection, so h/w < 1 is common, not log-symmetric
    assert 0.15 < np.mean([b[2] < b[3] for b in ours]) < 0.35  # type: ignore[index]


def test_erasing_box_gives_up_after_the_attempts() -> None:
    # 4x1000 with half the area erased: h >= sqrt(2000 * 0.3) = 24 rows never fit, so no box
    g = torch.Generator().manual_seed(0)
    assert erasing_box(4, 1000, scale=(0.5, 0.6), generator=g) is None


def test_random_erasing_fills_the_reference_value() -> None:
    """p=0.5; the box is filled with (0.485, 0.456, 0.406) in normalised space, about (152, 142, 127) in pixels."""
    pre = Preprocess(64, 32)
    img = Image.new("RGB", (32, 64), (250, 10, 10))  # no pixel is near the fill
    t = build_train_transform(pre, AugmentConfig(flip_p=0, pad=0, random_erasing_p=0.5))
    fill = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    torch.manual_seed(0)
    n, erased_count = 600, 0
    for _ in range(n):
        x = t(img)
        erased = (x == fill).all(dim=0)
        if erased.any():
            erased_count += 1
            rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
            h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert erased.sum() == h * w, "the erased region is one rectangle"
            pixel = (denormalize(x, pre)[:, rows.min(), cols.min()] * 255).round()
            assert pixel.tolist() == pytest.approx([152, 142, 127], abs=1)
    assert 0.44 < erased_count / n < 0.56


def test_pad_scales_with_the_input_size() -> None:
    """pad=None pads 10 px at 256x128 and 5 px at 128x64: a crop never moves more than that."""
    pre = Preprocess(128, 64)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 64, 3), dtype=np.uint8))
    plain = build_eval_transform(pre)(img)
    t = build_train_transform(pre, AugmentConfig(flip_p=0, random_erasing_p=0))
    torch.manual_seed(0)
    shifts = set()
    for _ in range(200):
        x = t(img)
        found = [(dy, dx) for dy in range(-5, 6) for dx in range(-5, 6)
                 if torch.equal(x[:, max(dy, 0):128 + min(dy, 0), max(dx, 0):64 + min(dx, 0)],
                                plain[:, max(-dy, 0):128 + min(-dy, 0), max(-dx, 0):64 + min(-dx, 0)])]
        assert found, "the crop moved more than 5 px"
        shifts.update(found)
    assert (5, 5) in shifts or (-5, -5) in shifts or (5, -5) in shifts or (-5, 5) in shifts
