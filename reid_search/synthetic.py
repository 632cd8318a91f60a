"""Seeded synthetic person re-id dataset in the Market-1501 layout.

Each identity is a drawn pedestrian with fixed clothing colours and pattern,
lower-body garment, shoes, hair, body shape and carried bag. Everything a camera
does varies per camera and per image: background, colour cast, brightness and
gamma, resolution, blur, noise, crop scale/position, occlusion by poles and
boxes, bystanders at the crop edge, and pose (facing, arm swing, stride). So
identity lives only in the person, and raw-pixel nearest neighbour across
cameras is far from perfect while a learned model can do well.

Every image is drawn from its own random generator seeded by
``(seed, pid, camera, index)``, so files do not depend on generation order and
the same seed gives byte-identical output. An identity's look depends only on
``(seed, pid)``, so it is the same whatever ``ids``/``cameras`` are asked for.

Layout written under ``out``::

    bounding_box_train/  train identities (pids 1..n_train)
    bounding_box_test/   gallery of test identities, plus pid 0 distractors
                         and pid -1 junk boxes
    query/               about one image per (test identity, camera)

Names follow Market: ``0002_c1s1_000451_03.jpg`` (junk: ``-1_c3s2_000120_00.jpg``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

__all__ = ["SyntheticSummary", "generate", "WIDTH", "HEIGHT"]

WIDTH = 64
HEIGHT = 128
JPEG_QUALITY = 90

# Drawn at twice the output size and box-reduced, for anti-aliased edges.
_SS = 2
_W = WIDTH * _SS
_H = HEIGHT * _SS
# Backgrounds are made larger than the crop so each image sees a shifted window.
_PAD = 20 * _SS
_NOISE_PAD = 32

TRAIN_DIR = "bounding_box_train"
GALLERY_DIR = "bounding_box_test"
QUERY_DIR = "query"

# Domain tags keep the random streams of different purposes apart.
_K_LOOK = 1
_K_CAMERA = 2
_K_IMAGE = 3
_K_TRACK = 4
_K_EXTRA = 5

# Frames must fit Market's six digits: tracks start below 900,000 and step 25.
_MAX_FRAME_START = 900_000
_FRAME_STEP = 25
_MAX_IMAGES_PER_ID = 1000
_MAX_EXTRA = 39_000  # distractors or junk: frames 1 + 25 * i stay below 10**6

RGB = tuple[int, int, int]
T = TypeVar("T")

# Clothing palette with rough real-world frequencies: many dark/neutral
# garments, so colour alone does not separate identities.
_PALETTE: tuple[tuple[RGB, float], ...] = (
    ((25, 25, 28), 3.0),  # black
    ((60, 60, 65), 1.6),  # charcoal
    ((125, 125, 128), 1.4),  # grey
    ((225, 225, 220), 2.2),  # white
    ((200, 185, 150), 0.9),  # beige
    ((110, 75, 45), 0.7),  # brown
    ((30, 40, 90), 1.6),  # navy
    ((55, 95, 175), 1.0),  # blue
    ((130, 175, 220), 0.8),  # light blue
    ((35, 120, 125), 0.6),  # teal
    ((45, 115, 55), 0.7),  # green
    ((110, 120, 60), 0.5),  # olive
    ((185, 35, 40), 0.9),  # red
    ((120, 25, 40), 0.5),  # maroon
    ((235, 200, 40), 0.7),  # yellow
    ((230, 120, 35), 0.5),  # orange
    ((235, 150, 180), 0.7),  # pink
    ((110, 55, 140), 0.6),  # purple
    ((160, 210, 150), 0.5),  # mint
)

_SKIN: tuple[RGB, ...] = (
    (245, 215, 190),
    (230, 190, 160),
    (205, 160, 125),
    (170, 120, 85),
    (120, 80, 55),
    (85, 55, 40),
)
_HAIR: tuple[RGB, ...] = (
    (20, 18, 18),
    (20, 18, 18),
    (45, 30, 20),
    (90, 60, 35),
    (160, 120, 70),
    (215, 190, 130),
    (150, 150, 150),
)
_SHOE: tuple[RGB, ...] = (
    (20, 20, 20),
    (235, 235, 235),
    (90, 60, 40),
    (110, 110, 115),
    (40, 60, 130),
    (190, 40, 40),
)


@dataclass(frozen=True)
class SyntheticSummary:
    """What :func:`generate` wrote."""

    root: Path
    num_ids: int
    num_train_ids: int
    num_test_ids: int
    cameras: int
    train_images: int
    query_images: int
    gallery_images: int  # includes distractors and junk
    distractor_images: int
    junk_images: int
    seed: int

    @property
    def total_images(self) -> int:
        return self.train_images + self.query_images + self.gallery_images


@dataclass(frozen=True)
class _Look:
    """An identity's appearance: what stays the same across cameras."""

    skin: RGB
    hair: RGB
    hair_style: str  # short | long | buzz | cap
    hat: RGB
    shirt: RGB
    shirt2: RGB
    pattern: str  # plain | hstripes | vstripes | plaid | jacket | print
    long_sleeves: bool
    lower: RGB
    lower_style: str  # trousers | shorts | skirt
    shoes: RGB
    height: float
    width: float
    head: float
    bag: str  # none | backpack | shoulder | hand
    bag_colour: RGB
    bag_side: int  # -1 left, +1 right (as seen from the front)


@dataclass(frozen=True)
class _Camera:
    """Per-camera rendering style."""

    background: Image.Image  # (_W + 2*_PAD) x (_H + 2*_PAD) RGB
    gains: tuple[float, float, float]
    brightness: float
    gamma: float
    blur: float  # chance of a slightly defocused image
    noise: np.ndarray  # (HEIGHT + _NOISE_PAD, WIDTH + _NOISE_PAD, 3) int16
    low_res: bool  # the camera resolves half the crop's pixels
    scale: float  # typical person height / crop height
    clutter: tuple[RGB, ...]


@dataclass(frozen=True)
class _Item:
    folder: str
    pid: int
    cam: int  # 1-based, as in the name
    seq: int
    frame: int
    bbox: int
    idx: int  # per-(pid) index, part of the image seed
    kind: str  # person | other_person | clutter | junk

    @property
    def name(self) -> str:
        pid = "-1" if self.pid == -1 else f"{self.pid:04d}"
        return f"{pid}_c{self.cam}s{self.seq}_{self.frame:06d}_{self.bbox:02d}.jpg"


def _rng(*keys: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, stable across versions
    # and platforms; Python's scalar draws are much cheaper than numpy's here.
    return random.Random("reid-synthetic/" + "/".join(str(k) for k in keys))


def _jitter(rng: random.Random, c: Sequence[float], amount: float) -> RGB:
    r, g, b = (min(255, max(0, int(v + rng.uniform(-amount, amount)))) for v in c)
    return (r, g, b)


def _pick(rng: random.Random, options: Sequence[T], weights: Sequence[float] | None = None) -> T:
    if weights is None:
        return options[rng.randrange(len(options))]
    return rng.choices(options, weights=weights)[0]


def _palette_colour(rng: random.Random, avoid: int | None = None) -> tuple[int, RGB]:
    weights = [0.0 if i == avoid else w for i, (_, w) in enumerate(_PALETTE)]
    i = rng.choices(range(len(_PALETTE)), weights=weights)[0]
    return i, _jitter(rng, _PALETTE[i][0], 14)


def _make_look(rng: random.Random) -> _Look:
    shirt_i, shirt = _palette_colour(rng)
    return _Look(
        skin=_jitter(rng, _pick(rng, _SKIN), 10),
        hair=_jitter(rng, _pick(rng, _HAIR), 8),
        hair_style=_pick(rng, ("short", "long", "buzz", "cap"), (0.45, 0.3, 0.1, 0.15)),
        hat=_palette_colour(rng)[1],
        shirt=shirt,
        shirt2=_palette_colour(rng, avoid=shirt_i)[1],
        pattern=_pick(
            rng, ("plain", "hstripes", "vstripes", "plaid", "jacket", "print"), (0.42, 0.15, 0.07, 0.1, 0.14, 0.12)
        ),
        long_sleeves=rng.random() < 0.45,
        lower=_palette_colour(rng)[1],
        lower_style=_pick(rng, ("trousers", "shorts", "skirt"), (0.62, 0.24, 0.14)),
        shoes=_jitter(rng, _pick(rng, _SHOE), 10),
        height=rng.uniform(0.9, 1.06),
        width=rng.uniform(0.8, 1.25),
        head=rng.uniform(0.87, 1.15),
        bag=_pick(rng, ("none", "backpack", "shoulder", "hand"), (0.4, 0.3, 0.2, 0.1)),
        bag_colour=_palette_colour(rng)[1],
        bag_side=1 if rng.random() < 0.5 else -1,
    )


def _identity_look(seed: int, pid: int) -> _Look:
    return _make_look(_rng(seed, _K_LOOK, pid))


def _make_camera(seed: int, cam: int) -> _Camera:
    rng = _rng(seed, _K_CAMERA, cam)
    nrng = np.random.default_rng(rng.getrandbits(64))
    bw, bh = _W + 2 * _PAD, _H + 2 * _PAD
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
    kind = _pick(rng, ("windows", "pillars", "foliage", "plain"))
    if kind == "windows":
        c = _jitter(rng, upper * rng.uniform(0.5, 0.8), 10)
        sx, sy = rng.randrange(18, 34), rng.randrange(22, 40)
        for x in range(rng.randrange(0, sx), bw, sx):
            for y in range(rng.randrange(0, sy), hz - 8, sy):
                d.rectangle([x, y, x + sx * 0.55, min(y + sy * 0.6, hz - 2)], fill=c)
    elif kind == "pillars":
        c = _jitter(rng, upper * rng.uniform(0.55, 1.3), 10)
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
            d.ellipse([cx - r, cy - r * 0.8, cx + r, cy + r * 0.8], fill=_jitter(rng, base, 30))
    ground_kind = _pick(rng, ("tiles", "stripes", "plain"))
    gc = _jitter(rng, ground * rng.uniform(0.7, 0.9), 6)
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
    d.line([(0, hz), (bw, hz)], fill=_jitter(rng, ground * 0.6, 5), width=3)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    gains = nrng.uniform(0.88, 1.12, size=3)
    gains /= gains.mean()  # a colour cast only; exposure is `brightness`
    noise = rng.uniform(1.5, 5.0)
    return _Camera(
        background=img,
        gains=(float(gains[0]), float(gains[1]), float(gains[2])),
        brightness=rng.uniform(0.82, 1.12),
        gamma=rng.uniform(0.85, 1.18),
        blur=rng.uniform(0.0, 0.8),
        # Sensor noise is cut from one bank per camera, at a random offset per image.
        noise=np.rint(nrng.standard_normal((HEIGHT + _NOISE_PAD, WIDTH + _NOISE_PAD, 3)) * noise).astype(np.int16),
        low_res=rng.random() < 0.25,
        scale=rng.uniform(0.86, 0.96),
        clutter=tuple(_jitter(rng, nrng.uniform(30, 220, size=3), 0) for _ in range(3)),
    )


def _draw_person(
    img: Image.Image,
    look: _Look,
    rng: random.Random,
    *,
    cx: float,
    feet_y: float,
    h: float,
    facing: str,
) -> None:
    """Draw a pedestrian ``h`` pixels tall standing at ``(cx, feet_y)``."""
    d = ImageDraw.Draw(img)
    top = feet_y - h

    def P(fx: float, fy: float) -> tuple[float, float]:
        return (cx + fx * h, top + fy * h)

    side = facing in ("left", "right")
    back = facing == "back"
    dirn = 1.0 if facing == "right" else -1.0 if facing == "left" else 0.0
    # Seen from behind, the person's left/right swap on screen.
    bag_side = -look.bag_side if back else look.bag_side
    wf = look.width * (0.6 if side else 1.0)
    sw, ww, hw = 0.14 * wf, 0.115 * wf, 0.12 * wf
    y_sh, y_hip, y_foot = 0.165, 0.535, 0.975

    # Legs. Walking: in side view one foot forward and one back.
    stride = rng.uniform(0.0, 0.11) if side else rng.uniform(0.0, 0.035)
    leg_w = 0.062 * look.width
    hip_dx = 0.02 if side else 0.052 * look.width
    feet_dx = (stride, -stride) if side else (-hip_dx - stride, hip_dx + stride)
    hip_xs = (-hip_dx * 0.5, hip_dx * 0.5) if side else (-hip_dx, hip_dx)

    def leg(i: int, t0: float, t1: float, grow: float = 1.0) -> list[tuple[float, float]]:
        x0, x1 = hip_xs[i], feet_dx[i]
        ya, yb = y_hip - 0.01 + (y_foot - y_hip) * t0, y_hip - 0.01 + (y_foot - y_hip) * t1
        xa, xb = x0 + (x1 - x0) * t0, x0 + (x1 - x0) * t1
        wa = leg_w * (1 - 0.3 * t0) * grow / 2
        wb = leg_w * (1 - 0.3 * t1) * grow / 2
        return [P(xa - wa, ya), P(xa + wa, ya), P(xb + wb, yb), P(xb - wb, yb)]

    # Long hair hangs behind the shoulders when seen from the front.
    hcx, hcy = cx + dirn * 0.012 * h, top + 0.072 * h
    hry, hrx = 0.066 * look.head * h, 0.053 * look.head * h
    if look.hair_style == "long" and not back:
        off = -dirn * hrx * 0.5
        d.rectangle([hcx - hrx * 1.1 + off, hcy, hcx + hrx * 1.1 + off, top + 0.3 * h], fill=look.hair)

    for i in (0, 1):
        if look.lower_style == "trousers":
            d.polygon(leg(i, 0, 1), fill=look.lower)
        else:
            d.polygon(leg(i, 0, 1, 0.85), fill=look.skin)
            if look.lower_style == "shorts":
                d.polygon(leg(i, 0, 0.42, 1.1), fill=look.lower)
        fx, fy = P(feet_dx[i], y_foot)
        sl = 0.05 * h if side else 0.034 * h
        fx += dirn * 0.02 * h  # shoes point where the person faces
        d.ellipse([fx - sl, fy - 0.018 * h, fx + sl, fy + 0.014 * h], fill=look.shoes)
    if look.lower_style == "skirt":
        d.polygon([P(-hw, y_hip - 0.03), P(hw, y_hip - 0.03), P(hw * 1.55, 0.72), P(-hw * 1.55, 0.72)], fill=look.lower)

    # Arms. In side view the far arm is behind the torso.
    if side:
        swing = rng.uniform(-0.45, 0.45)
        angles = (swing, -swing)
        shoulders = (P(-dirn * 0.01, y_sh + 0.03), P(dirn * 0.01, y_sh + 0.03))
    else:
        angles = (-rng.uniform(0.03, 0.22), rng.uniform(0.03, 0.22))
        shoulders = (P(-sw * 0.88, y_sh + 0.025), P(sw * 0.88, y_sh + 0.025))
    arm_w = max(2, int(0.048 * look.width * h))
    sleeve = look.shirt
    hands: list[tuple[float, float]] = []

    def arm(i: int) -> None:
        (sx, sy), a = shoulders[i], angles[i]
        bend = 0.15 if side else 0.05
        ex, ey = sx + math.sin(a) * 0.16 * h, sy + math.cos(a) * 0.16 * h
        a2 = a + bend * (1 if a >= 0 else -1) * (dirn if side else 1)
        hx, hy = ex + math.sin(a2) * 0.17 * h, ey + math.cos(a2) * 0.17 * h
        d.line([(sx, sy), (ex, ey)], fill=sleeve, width=arm_w + 1, joint="curve")
        d.line([(ex, ey), (hx, hy)], fill=sleeve if look.long_sleeves else look.skin, width=arm_w, joint="curve")
        r = 0.022 * h
        d.ellipse([hx - r, hy - r, hx + r, hy + r], fill=look.skin)
        hands.append((hx, hy))

    if side:
        arm(0)

    # Torso, with the identity's pattern clipped to its outline.
    torso = [
        P(-sw * 0.75, y_sh - 0.005),
        P(sw * 0.75, y_sh - 0.005),
        P(sw, y_sh + 0.03),
        P(ww, 0.4),
        P(hw, y_hip),
        P(-hw, y_hip),
        P(-ww, 0.4),
        P(-sw, y_sh + 0.03),
    ]
    neck_w = 0.028 * h
    d.rectangle([hcx - neck_w, hcy, hcx + neck_w, top + (y_sh + 0.01) * h], fill=look.skin)
    _draw_torso(img, d, look, torso, P, sw=sw, y_sh=y_sh, y_hip=y_hip, h=h, back=back, side=side, dirn=dirn)

    if look.bag == "backpack":
        if back:
            box = [*P(-sw * 0.72, y_sh + 0.03), *P(sw * 0.72, 0.44)]
            d.rounded_rectangle(box, radius=0.02 * h, fill=look.bag_colour)
        elif side:
            x0 = -dirn * (sw * 0.8)
            xs = sorted((x0, x0 - dirn * 0.085))
            d.rounded_rectangle([*P(xs[0], y_sh + 0.03), *P(xs[1], 0.43)], radius=0.015 * h, fill=look.bag_colour)
        else:  # from the front only the straps show
            strap = max(2, int(0.02 * h))
            for s in (-1, 1):
                d.line([P(s * sw * 0.55, y_sh), P(s * sw * 0.62, 0.38)], fill=look.bag_colour, width=strap)
    elif look.bag == "shoulder":
        if not side:
            strap = max(2, int(0.016 * h))
            d.line([P(-bag_side * sw * 0.7, y_sh), P(bag_side * hw, 0.47)], fill=look.bag_colour, width=strap)
        bx = (bag_side * (hw + 0.045)) if not side else -dirn * 0.03
        d.rectangle([*P(bx - 0.05, 0.45), *P(bx + 0.05, 0.57)], fill=look.bag_colour)

    if side:
        arm(1)
    else:
        arm(0)
        arm(1)
    if look.bag == "hand":
        hx, hy = hands[0 if (bag_side < 0 or side) else 1]
        bw_, bh_ = 0.05 * h, 0.08 * h
        d.line([(hx, hy), (hx, hy + 0.02 * h)], fill=look.bag_colour, width=2)
        d.rectangle([hx - bw_, hy + 0.015 * h, hx + bw_, hy + 0.015 * h + bh_], fill=look.bag_colour)

    # Head and hair.
    head_box = [hcx - hrx, hcy - hry, hcx + hrx, hcy + hry]
    if look.hair_style == "buzz":
        d.ellipse(head_box, fill=look.skin)
        d.chord(head_box, 190, 350, fill=look.hair)
    elif back:
        d.ellipse(head_box, fill=look.hair if look.hair_style != "cap" else look.skin)
    else:
        hb = [hcx - hrx * 1.08, hcy - hry * 1.08, hcx + hrx * 1.08, hcy + hry * 0.5]
        d.ellipse(hb, fill=look.hair)
        fo = dirn * hrx * 0.3
        d.ellipse([hcx - hrx * 0.86 + fo, hcy - hry * 0.45, hcx + hrx * 0.86 + fo, hcy + hry], fill=look.skin)
    if look.hair_style == "long" and back:
        d.rectangle([hcx - hrx * 1.1, hcy, hcx + hrx * 1.1, top + 0.3 * h], fill=look.hair)
    if look.hair_style == "cap":
        d.chord([hcx - hrx * 1.1, hcy - hry * 1.12, hcx + hrx * 1.1, hcy + hry * 0.7], 180, 360, fill=look.hat)
        if side:
            vx = hcx + dirn * hrx * 1.6
            d.polygon([(hcx, hcy - hry * 0.25), (vx, hcy - hry * 0.1), (hcx, hcy)], fill=look.hat)
        elif not back:
            d.ellipse([hcx - hrx * 0.9, hcy - hry * 0.35, hcx + hrx * 0.9, hcy - hry * 0.05], fill=look.hat)


def _draw_torso(
    img: Image.Image,
    d: ImageDraw.ImageDraw,
    look: _Look,
    torso: list[tuple[float, float]],
    P: Callable[[float, float], tuple[float, float]],
    *,
    sw: float,
    y_sh: float,
    y_hip: float,
    h: float,
    back: bool,
    side: bool,
    dirn: float,
) -> None:
    d.polygon(torso, fill=look.shirt)
    pat = look.pattern
    if pat == "plain" or (pat == "print" and back) or (pat == "jacket" and back):
        return
    if pat == "print":
        # A chest print: visible from the front (and partly from the side).
        x0 = dirn * sw * 0.3 - sw * 0.4
        d.rectangle([*P(x0, y_sh + 0.07), *P(x0 + sw * 0.8, y_sh + 0.15)], fill=look.shirt2)
        return
    if pat == "jacket":
        # Open jacket: the inner shirt shows as a band down the front.
        if side:
            x0 = dirn * sw * 0.7
            xs = sorted((x0, x0 - dirn * sw * 0.35))
            d.rectangle([*P(xs[0], y_sh + 0.02), *P(xs[1], y_hip - 0.01)], fill=look.shirt2)
        else:
            band = [P(-sw * 0.3, y_sh), P(sw * 0.3, y_sh), P(sw * 0.22, y_hip), P(-sw * 0.22, y_hip)]
            d.polygon(band, fill=look.shirt2)
        return
    xs = [p[0] for p in torso]
    ys = [p[1] for p in torso]
    x0, x1, y0, y1 = int(min(xs)) - 1, int(max(xs)) + 2, int(min(ys)) - 1, int(max(ys)) + 2
    box_w, box_h = x1 - x0, y1 - y0
    if box_w <= 0 or box_h <= 0:
        return
    layer = Image.new("RGB", (box_w, box_h), look.shirt)
    ld = ImageDraw.Draw(layer)
    step = max(4.0, 0.045 * h)
    if pat == "hstripes":
        y = 0.0
        while y < box_h:
            ld.rectangle([0, y, box_w, y + step * 0.5], fill=look.shirt2)
            y += step
    elif pat == "vstripes":
        x = 0.0
        while x < box_w:
            ld.rectangle([x, 0, x + step * 0.4, box_h], fill=look.shirt2)
            x += step
    else:  # plaid
        lw = max(2, int(step * 0.3))
        y = 0.0
        while y < box_h:
            ld.line([(0, y), (box_w, y)], fill=look.shirt2, width=lw)
            y += step * 1.2
        x = 0.0
        while x < box_w:
            ld.line([(x, 0), (x, box_h)], fill=look.shirt2, width=lw)
            x += step * 1.2
    mask = Image.new("L", (box_w, box_h), 0)
    ImageDraw.Draw(mask).polygon([(px - x0, py - y0) for px, py in torso], fill=255)
    img.paste(layer, (x0, y0), mask)


def _draw_clutter(d: ImageDraw.ImageDraw, cam: _Camera, rng: random.Random) -> None:
    """Background objects (railing, bike, bench, sign) behind the person."""
    kind = _pick(rng, ("railing", "bike", "sign", "bench"))
    c = _jitter(rng, cam.clutter[rng.randrange(len(cam.clutter))], 20)
    if kind == "railing":
        y = rng.uniform(0.55, 0.8) * _H
        d.line([(0, y), (_W, y)], fill=c, width=4)
        x = rng.uniform(0, 20)
        while x < _W:
            d.line([(x, y), (x, y + 0.2 * _H)], fill=c, width=3)
            x += rng.uniform(12, 30)
    elif kind == "bike":
        cx, cy, r = rng.uniform(0, _W), rng.uniform(0.7, 0.9) * _H, rng.uniform(14, 24)
        for dx in (-r * 1.2, r * 1.2):
            d.ellipse([cx + dx - r, cy - r, cx + dx + r, cy + r], outline=c, width=3)
        d.line([(cx - r * 1.2, cy), (cx, cy - r), (cx + r * 1.2, cy)], fill=c, width=3)
    elif kind == "sign":
        x, y = rng.uniform(0, _W), rng.uniform(0.05, 0.4) * _H
        d.rectangle([x, y, x + rng.uniform(15, 40), y + rng.uniform(10, 25)], fill=c)
    else:
        y = rng.uniform(0.6, 0.8) * _H
        x = rng.uniform(-20, _W * 0.6)
        d.rectangle([x, y, x + rng.uniform(40, 90), y + 8], fill=c)
        d.rectangle([x + 4, y, x + 10, y + 30], fill=c)


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


def _finish(img: Image.Image, cam: _Camera, rng: random.Random) -> bytes:
    """Reduce to output size and apply the camera's optics, exposure and noise."""
    # A low-resolution camera resolves half the crop's pixels: soft upscaled crops.
    img = img.reduce(_SS * 2 if cam.low_res else _SS)
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


def _render(item: _Item, seed: int, cam: _Camera, look: _Look | None) -> bytes:
    rng = _rng(seed, _K_IMAGE, item.pid + 1, item.cam, item.idx)
    ox, oy = rng.randrange(0, 2 * _PAD + 1), rng.randrange(0, 2 * _PAD + 1)
    img = cam.background.crop((ox, oy, ox + _W, oy + _H))
    d = ImageDraw.Draw(img)
    if rng.random() < 0.45:
        _draw_clutter(d, cam, rng)
    facing = _pick(rng, ("front", "back", "left", "right"))
    if item.kind == "clutter":
        for _ in range(rng.randrange(1, 4)):
            _draw_clutter(d, cam, rng)
        return _finish(img, cam, rng)
    # A bystander partly in the box, as detector crops often have.
    if rng.random() < 0.18:
        other = _make_look(rng)
        s = 1.0 if rng.random() < 0.5 else -1.0
        _draw_person(
            img,
            other,
            rng,
            cx=_W / 2 + s * rng.uniform(0.45, 0.65) * _W,
            feet_y=_H * rng.uniform(0.9, 1.02),
            h=_H * cam.scale * rng.uniform(0.85, 1.05),
            facing=_pick(rng, ("front", "back", "left", "right")),
        )
    assert look is not None
    h = _H * cam.scale * look.height * rng.uniform(0.9, 1.06)
    cx = _W / 2 + rng.uniform(-0.12, 0.12) * _W
    feet_y = _H * (0.975 + rng.uniform(-0.04, 0.03)) - (_H * 0.92 - h) * 0.3
    if item.kind == "junk":
        # A bad detection: a fragment of a person, too big or cut off.
        h *= rng.uniform(1.7, 2.6)
        feet_y = _H * rng.uniform(0.6, 1.9)
        cx += rng.uniform(-0.4, 0.4) * _W
    _draw_person(img, look, rng, cx=cx, feet_y=feet_y, h=h, facing=facing)
    if rng.random() < 0.2:
        c = _jitter(rng, cam.clutter[rng.randrange(len(cam.clutter))], 25)
        if rng.random() < 0.5:  # pole
            x, w = rng.uniform(0.1, 0.9) * _W, rng.uniform(5, 12)
            d.rectangle([x - w / 2, 0, x + w / 2, _H], fill=c)
        else:  # box over the lower or a side part of the body
            if rng.random() < 0.6:
                y = rng.uniform(0.6, 0.85) * _H
                d.rectangle([rng.uniform(-20, 0.3 * _W), y, rng.uniform(0.7 * _W, _W + 20), _H], fill=c)
            else:
                s = rng.random() < 0.5
                x = rng.uniform(0.25, 0.4) * _W
                d.rectangle([0 if s else _W - x, rng.uniform(0.2, 0.6) * _H, x if s else _W, _H], fill=c)
    return _finish(img, cam, rng)


def _plan(
    *,
    ids: int,
    cameras: int,
    images_per_id: int,
    seed: int,
    n_train: int,
    distractors: int,
    junk: int,
) -> list[_Item]:
    """Decide every file (split, pid, camera, name) without drawing anything."""
    items: list[_Item] = []
    # At least two images per camera where possible, so a camera can give a query
    # and still keep a gallery image.
    k_max = min(cameras, max(2, images_per_id // 2))
    for pid in range(1, ids + 1):
        rng = _rng(seed, _K_TRACK, pid)
        k = rng.randint(2, k_max)
        cams = sorted(c + 1 for c in rng.sample(range(cameras), k))
        base = 2 if images_per_id >= 2 * k else 1
        counts = [base] * k
        for _ in range(images_per_id - base * k):
            counts[rng.randrange(k)] += 1
        test = pid > n_train
        # Query: the first image of each camera that has a second one left for the
        # gallery; with one image per camera, only the first camera's.
        query_cams = {c for c, n in zip(cams, counts) if n >= 2} or {cams[0]}
        idx = 0
        for cam, n in zip(cams, counts):
            seq = rng.randrange(1, 7)
            start = rng.randrange(1, _MAX_FRAME_START)
            for j in range(n):
                frame = start + _FRAME_STEP * j + rng.randrange(0, _FRAME_STEP - 5)
                bbox = rng.choices(range(4), weights=(0.55, 0.25, 0.12, 0.08))[0]
                if not test:
                    folder = TRAIN_DIR
                elif j == 0 and cam in query_cams:
                    folder = QUERY_DIR
                else:
                    folder = GALLERY_DIR
                items.append(_Item(folder, pid, cam, seq, frame, bbox, idx, "person"))
                idx += 1
    for pid, count in ((0, distractors), (-1, junk)):
        rng = _rng(seed, _K_EXTRA, pid + 1)
        for i in range(count):
            cam = rng.randrange(1, cameras + 1)
            seq = rng.randrange(1, 7)
            # Spaced frames keep the names unique whatever the camera.
            frame = 1 + i * _FRAME_STEP + rng.randrange(0, _FRAME_STEP - 5)  # unique, < 10**6
            kind = "junk" if pid == -1 else ("other_person" if rng.random() < 0.5 else "clutter")
            items.append(_Item(GALLERY_DIR, pid, cam, seq, frame, rng.randrange(0, 3), i, kind))
    return items


def _check_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{out} exists and is not a folder: choose an empty or new folder for the dataset")
        if any(out.iterdir()):
            raise ValueError(
                f"{out} is not empty: choose an empty or new folder for the dataset (or delete its contents)"
            )


def generate(
    out: Path | str,
    *,
    ids: int = 60,
    cameras: int = 4,
    images_per_id: int = 8,
    seed: int = 0,
    train_fraction: float = 0.5,
    distractors: int | None = None,
    junk: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SyntheticSummary:
    """Write a seeded synthetic Market-1501-layout dataset to ``out``.

    Pids ``1..n_train`` (``n_train = round(ids * train_fraction)``, at least one
    each side) go to ``bounding_box_train``; the rest are test identities split
    into ``query`` (about one image per identity and camera) and
    ``bounding_box_test``, such that every query has a gallery image of its pid
    from another camera. Each identity appears in 2 or more cameras.
    ``distractors`` pid-0 and ``junk`` pid -1 images go to the gallery; ``None``
    picks about 5% and 3% of the test images (at least 2 each).

    The dataset is built in a temporary folder beside ``out`` and renamed into
    place, so a failure leaves no partial dataset. ``progress(done, total)`` is
    called after each image. The same arguments (and the same numpy/Pillow
    versions) give byte-identical files.

    Raises:
        ValueError: ``ids < 2``, ``ids > 9999``, ``cameras`` outside 2..9 (one
            digit in Market names), ``images_per_id`` outside 2..1000,
            ``train_fraction`` outside (0, 1), negative ``seed``, ``distractors``
            or ``junk`` outside 0..39000, or ``out`` existing and not an empty
            folder.
    """
    out = Path(out)
    if ids < 2:
        raise ValueError(f"ids must be at least 2 (one train and one test identity), got {ids}")
    if ids > 9999:
        raise ValueError(f"ids must be at most 9999 (Market names have 4-digit pids), got {ids}")
    if not 2 <= cameras <= 9:
        raise ValueError(
            f"cameras must be between 2 and 9 (matching is across cameras; names have one-digit cameras), got {cameras}"
        )
    if not 2 <= images_per_id <= _MAX_IMAGES_PER_ID:
        raise ValueError(
            f"images_per_id must be between 2 and {_MAX_IMAGES_PER_ID} (an identity needs two cameras), "
            f"got {images_per_id}"
        )
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be strictly between 0 and 1, got {train_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    for label, v in (("distractors", distractors), ("junk", junk)):
        if v is not None and not 0 <= v <= _MAX_EXTRA:
            raise ValueError(f"{label} must be between 0 and {_MAX_EXTRA}, got {v}")
    _check_out(out)

    n_train = min(ids - 1, max(1, round(ids * train_fraction)))
    n_test_images = (ids - n_train) * images_per_id
    if distractors is None:
        distractors = min(_MAX_EXTRA, max(2, round(0.05 * n_test_images)))
    if junk is None:
        junk = min(_MAX_EXTRA, max(2, round(0.03 * n_test_images)))
    items = _plan(
        ids=ids,
        cameras=cameras,
        images_per_id=images_per_id,
        seed=seed,
        n_train=n_train,
        distractors=distractors,
        junk=junk,
    )
    log.info("generating %d synthetic images (%d ids, %d cameras, seed %d) in %s", len(items), ids, cameras, seed, out)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for sub in (TRAIN_DIR, GALLERY_DIR, QUERY_DIR):
            (tmp / sub).mkdir()
        cams = {c: _make_camera(seed, c) for c in range(1, cameras + 1)}
        looks: dict[int, _Look] = {}
        for n, item in enumerate(items, 1):
            if item.kind == "person":
                look = looks.get(item.pid)
                if look is None:
                    look = looks[item.pid] = _identity_look(seed, item.pid)
            elif item.kind == "clutter":
                look = None
            else:  # someone who is not one of the identities
                look = _make_look(_rng(seed, _K_EXTRA, 10 + item.pid, item.idx))
            (tmp / item.folder / item.name).write_bytes(_render(item, seed, cams[item.cam], look))
            if progress is not None:
                progress(n, len(items))
        os.chmod(tmp, 0o755)
        _check_out(out)  # something may have appeared there meanwhile
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise

    counts = {sub: sum(1 for it in items if it.folder == sub) for sub in (TRAIN_DIR, GALLERY_DIR, QUERY_DIR)}
    summary = SyntheticSummary(
        root=out,
        num_ids=ids,
        num_train_ids=n_train,
        num_test_ids=ids - n_train,
        cameras=cameras,
        train_images=counts[TRAIN_DIR],
        query_images=counts[QUERY_DIR],
        gallery_images=counts[GALLERY_DIR],
        distractor_images=distractors,
        junk_images=junk,
        seed=seed,
    )
    log.info("wrote %d images to %s", summary.total_images, out)
    return summary
