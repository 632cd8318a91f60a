"""What a camera does to a crop: its scene, colour cast, exposure, optics, noise and JPEG."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from reid_search.synthetic.look import K_CAMERA, RGB, jitter, pick, seeded

__all__ = ["Camera", "H", "HEIGHT", "JPEG_QUALITY", "PAD", "SS", "W", "WIDTH", "finish", "make_camera"]

WIDTH = 64
HEIGHT = 128
JPEG_QUALITY = 90

# Drawn at twice the output size and box-reduced, for anti-aliased edges.
SS = 2
W = WIDTH * SS
H = HEIGHT * SS
# Backgrounds are made larger than the crop so each image sees a shifted window.
PAD = 20 * SS
_NOISE_PAD = 32


@dataclass(frozen=True)
class Camera:
    """Per-camera rendering style."""

    background: Image.Image  # (W + 2*PAD) x (H + 2*PAD) RGB
    gains: tuple[float, float, float]
    brightness: float
    gamma: float
    blur: float  # chance of a slightly defocused image
    noise: np.ndarray  # (HEIGHT + _NOISE_PAD, WIDTH + _NOISE_PAD, 3) int16
    low_res: bool  # the camera resolves half the crop's pixels
    scale: float  # typical person height / crop height
    clutter: tuple[RGB, ...]


def make_camera(seed: int, cam: int) -> Camera:
    """The rendering style of camera ``cam``: it depends only on ``(seed, cam)``."""
    rng = seeded(seed, K_CAMERA, cam)
    nrng = np.random.default_rng(rng.getrandbits(64))
    img = _scene(rng, nrng)
    gains = nrng.uniform(0.88, 1.12, size=3)
    gains /= gains.mean()  # a colour cast only; exposure is `brightness`
    noise = rng.uniform(1.5, 5.0)
    return Camera(
        background=img,
        gains=(float(gains[0]), float(gains[1]), float(gains[2])),
        brightness=rng.uniform(0.82, 1.12),
        gamma=rng.uniform(0.85, 1.18),
        blur=rng.uniform(0.0, 0.8),
        # Sensor noise is cut from one bank per camera, at a random offset per image.
        noise=np.rint(nrng.standard_normal((HEIGHT + _NOISE_PAD, WIDTH + _NOISE_PAD, 3)) * noise).astype(np.int16),
        low_res=rng.random() < 0.25,
        scale=rng.uniform(0.86, 0.96),
        clutter=tuple(jitter(rng, nrng.uniform(30, 220, size=3), 0) for _ in range(3)),
    )


def _scene(rng: random.Random, nrng: np.random.Generator) -> Image.Image:
    """The camera's background, (W + 2·PAD) × (H + 2·PAD): a backdrop above a horizon, ground below."""
    bw, bh = W + 2 * PAD, H + 2 * PAD
    # Muted scene colours: mostly greys, concrete, brick and foliage tints.
    upper = 0.5 * nrng.uniform(40, 200) + 0.5 * nrng.uniform(40, 200, size=3)
    ground = 0.6 * nrng.uniform(70, 170) + 0.4 * nrng.uniform(60, 180, size=3)
    horizon = rng.uniform(0.35, 0.7) * bh
    ys = np.arange(bh, dtype=np.float64)[:, None, None]
    # Gradients across the scene, like uneven light.
    g_up = 1.0 + rng.uniform(-0.25, 0.25) * (ys / bh - 0.5)
    arr = np.where(ys < horizon, upper * g_up, ground * (0.85 + 0.3 * ys / bh))
    arr = np.broadcast_to(arr, (bh, bw, 3)).copy()
    xs = np.arange(bw, dtype=np.float64)[None, :, None]
    arr *= 1.0 + rng.uniform(-0.2, 0.2) * (xs / bw - 0.5)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    hz = int(horizon)
    _draw_backdrop(d, rng, upper, bw, hz)
    _draw_ground(d, rng, ground, bw, bh, hz)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))


def _draw_backdrop(d: ImageDraw.ImageDraw, rng: random.Random, upper: np.ndarray, bw: int, hz: int) -> None:
    """Windows, pillars, foliage or nothing above the horizon ``hz``."""
    kind = pick(rng, ("windows", "pillars", "foliage", "plain"))
    if kind == "windows":
        c = jitter(rng, upper * rng.uniform(0.5, 0.8), 10)
        sx, sy = rng.randrange(18, 34), rng.randrange(22, 40)
        for x in range(rng.randrange(0, sx), bw, sx):
            for y in range(rng.randrange(0, sy), hz - 8, sy):
                d.rectangle([x, y, x + sx * 0.55, min(y + sy * 0.6, hz - 2)], fill=c)
    elif kind == "pillars":
        c = jitter(rng, upper * rng.uniform(0.55, 1.3), 10)
        x = rng.uniform(0, 30)
        while x < bw:
            w = rng.uniform(6, 16)
            d.rectangle([x, 0, x + w, hz], fill=c)
            x += w + rng.uniform(14, 50)
    elif kind == "foliage":
        base = np.array([60.0, 110.0, 50.0]) * rng.uniform(0.6, 1.2)
        for _ in range(rng.randrange(40, 70)):
            cx, cy = rng.uniform(0, bw), rng.uniform(-10, hz)
            r = rng.uniform(6, 22)
            d.ellipse([cx - r, cy - r * 0.8, cx + r, cy + r * 0.8], fill=jitter(rng, base, 30))


def _draw_ground(d: ImageDraw.ImageDraw, rng: random.Random, ground: np.ndarray, bw: int, bh: int, hz: int) -> None:
    """Tiles, stripes or a plain floor below the horizon ``hz``, and the horizon line."""
    ground_kind = pick(rng, ("tiles", "stripes", "plain"))
    gc = jitter(rng, ground * rng.uniform(0.7, 0.9), 6)
    if ground_kind == "tiles":
        step = rng.randrange(16, 30)
        for y in range(hz + step, bh, step):
            d.line([(0, y), (bw, y)], fill=gc, width=2)
        for x in range(rng.randrange(0, step), bw, step):
            d.line([(x, hz), (x, bh)], fill=gc, width=2)
    elif ground_kind == "stripes":
        step = rng.randrange(10, 24)
        for y in range(hz, bh, step):
            d.line([(0, y), (bw, y)], fill=gc, width=rng.randrange(2, 5))
    d.line([(0, hz), (bw, hz)], fill=jitter(rng, ground * 0.6, 5), width=3)


def _smooth(a: np.ndarray) -> np.ndarray:
    """[1 2 1]/4 blur along both image axes of an int16 HxWxC array, edges repeated."""
    for axis in (0, 1):
        a = np.moveaxis(a, axis, 0)
        b = a * 2
        b[1:] += a[:-1]
        b[:-1] += a[1:]
        b[0] += a[0]
        b[-1] += a[-1]
        a = np.moveaxis(b, 0, axis)
    return (a + 8) >> 4


def finish(img: Image.Image, cam: Camera, rng: random.Random) -> bytes:
    """The JPEG of a drawn crop: reduce to output size and apply the camera's optics, exposure and noise."""
    # A low-resolution camera resolves half the crop's pixels: soft upscaled crops.
    img = img.reduce(SS * 2 if cam.low_res else SS)
    # Exposure, gamma and colour cast as one lookup table per channel.
    gamma = cam.gamma * rng.uniform(0.93, 1.07)
    exposure = 255.0 * cam.brightness * rng.uniform(0.88, 1.12)
    curve = (np.arange(256) / 255.0) ** gamma
    lut = np.concatenate([curve * (exposure * g * rng.uniform(0.96, 1.04)) for g in cam.gains])
    img = img.point(np.clip(lut + 0.5, 0, 255).astype(np.int64).tolist())
    a = np.asarray(img, dtype=np.int16)
    if cam.low_res:
        a = _smooth(np.repeat(np.repeat(a, 2, axis=0), 2, axis=1))
    elif rng.random() < cam.blur:
        a = _smooth(a)  # slight defocus or motion
    oy, ox = rng.randrange(_NOISE_PAD + 1), rng.randrange(_NOISE_PAD + 1)
    a = a + cam.noise[oy : oy + HEIGHT, ox : ox + WIDTH]
    out = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()
