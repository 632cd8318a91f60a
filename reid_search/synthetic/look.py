"""An identity's look (what stays the same across cameras) and the seeded random draws."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence, TypeVar

__all__ = [
    "K_CAMERA", "K_EXTRA", "K_IMAGE", "K_LOOK", "K_TRACK", "RGB", "Look",
    "identity_look", "jitter", "make_look", "pick", "seeded",
]

# Domain tags keep the random streams of different purposes apart.
K_LOOK = 1
K_CAMERA = 2
K_IMAGE = 3
K_TRACK = 4
K_EXTRA = 5

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
class Look:
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


def seeded(*keys: int) -> random.Random:
    """The random generator of one purpose (a ``K_*`` tag among ``keys``) and one item."""
    # String seeds are hashed with SHA-512 by `random`, stable across versions
    # and platforms; Python's scalar draws are much cheaper than numpy's here.
    return random.Random("reid-synthetic/" + "/".join(str(k) for k in keys))


def jitter(rng: random.Random, c: Sequence[float], amount: float) -> RGB:
    """``c`` with each channel moved by up to ``amount``, clipped to 0..255."""
    r, g, b = (min(255, max(0, int(v + rng.uniform(-amount, amount)))) for v in c)
    return (r, g, b)


def pick(rng: random.Random, options: Sequence[T], weights: Sequence[float] | None = None) -> T:
    """One of ``options``, uniformly or by ``weights``."""
    if weights is None:
        return options[rng.randrange(len(options))]
    return rng.choices(options, weights=weights)[0]


def _palette_colour(rng: random.Random, avoid: int | None = None) -> tuple[int, RGB]:
    weights = [0.0 if i == avoid else w for i, (_, w) in enumerate(_PALETTE)]
    i = rng.choices(range(len(_PALETTE)), weights=weights)[0]
    return i, jitter(rng, _PALETTE[i][0], 14)


def make_look(rng: random.Random) -> Look:
    """A random appearance (an identity's, or a bystander's)."""
    shirt_i, shirt = _palette_colour(rng)
    return Look(
        skin=jitter(rng, pick(rng, _SKIN), 10),
        hair=jitter(rng, pick(rng, _HAIR), 8),
        hair_style=pick(rng, ("short", "long", "buzz", "cap"), (0.45, 0.3, 0.1, 0.15)),
        hat=_palette_colour(rng)[1],
        shirt=shirt,
        shirt2=_palette_colour(rng, avoid=shirt_i)[1],
        pattern=pick(
            rng, ("plain", "hstripes", "vstripes", "plaid", "jacket", "print"), (0.42, 0.15, 0.07, 0.1, 0.14, 0.12)
        ),
        long_sleeves=rng.random() < 0.45,
        lower=_palette_colour(rng)[1],
        lower_style=pick(rng, ("trousers", "shorts", "skirt"), (0.62, 0.24, 0.14)),
        shoes=jitter(rng, pick(rng, _SHOE), 10),
        height=rng.uniform(0.9, 1.06),
        width=rng.uniform(0.8, 1.25),
        head=rng.uniform(0.87, 1.15),
        bag=pick(rng, ("none", "backpack", "shoulder", "hand"), (0.4, 0.3, 0.2, 0.1)),
        bag_colour=_palette_colour(rng)[1],
        bag_side=1 if rng.random() < 0.5 else -1,
    )


def identity_look(seed: int, pid: int) -> Look:
    """The look of identity ``pid``: it depends only on ``(seed, pid)``."""
    return make_look(seeded(seed, K_LOOK, pid))
