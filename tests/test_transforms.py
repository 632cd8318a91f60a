from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from reid_search.transforms import AugmentConfig, Preprocess, build_eval_transform, build_train_transform, denormalize


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


def test_random_erasing_statistics() -> None:
    """p=0.5, erased area 2–40 % of the image, filled with the mean (0 after normalising)."""
    img = Image.new("RGB", (64, 128), (250, 10, 10))  # no pixel is near the mean
    t = build_train_transform(Preprocess(128, 64), AugmentConfig(flip_p=0, pad=0, random_erasing_p=0.5))
    torch.manual_seed(0)
    areas = []
    n = 600
    for _ in range(n):
        x = t(img)
        erased = (x == 0).all(dim=0)
        if erased.any():
            areas.append(erased.float().mean().item())
            rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
            h = rows.max() - rows.min() + 1
            w = cols.max() - cols.min() + 1
            assert erased.sum() == h * w, "the erased region is one rectangle"
            assert 0.3 - 0.05 <= (h / w).item() <= 1 / 0.3 + 0.05
    frac = len(areas) / n
    assert 0.44 < frac < 0.56
    assert min(areas) >= 0.02 - 0.005 and max(areas) <= 0.4 + 0.005
    assert 0.15 < float(np.mean(areas)) < 0.27  # uniform on [0.02, 0.4] → mean 0.21
