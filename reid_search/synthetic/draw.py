"""Drawing one crop: the pedestrian (legs, arms, torso, bag, head), clutter and occluders."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from reid_search.synthetic.camera import PAD, Camera, H, W, finish
from reid_search.synthetic.look import K_IMAGE, Look, jitter, make_look, pick, seeded
from reid_search.synthetic.plan import Item

__all__ = ["draw_person", "render"]

# Heights of the shoulders, hips and feet as fractions of the person's height from the top.
_Y_SHOULDER, _Y_HIP, _Y_FOOT = 0.165, 0.535, 0.975
_FACINGS = ("front", "back", "left", "right")
Point = tuple[float, float]


@dataclass(frozen=True)
class _Figure:
    """Where a pedestrian stands, how the camera sees it, and its body's half-widths."""

    cx: float
    top: float
    h: float
    side: bool  # seen from the left or the right
    back: bool
    dirn: float  # +1 facing right, -1 left, 0 towards or away from the camera
    bag_side: int  # on screen: seen from behind, the person's left/right swap
    sw: float  # shoulders
    ww: float  # waist
    hw: float  # hips
    hcx: float  # head centre and radii
    hcy: float
    hrx: float
    hry: float

    def at(self, fx: float, fy: float) -> Point:
        """Image coordinates of a body point (``fx``, ``fy`` in person heights from the head top)."""
        return (self.cx + fx * self.h, self.top + fy * self.h)


def _figure(look: Look, *, cx: float, feet_y: float, h: float, facing: str) -> _Figure:
    top = feet_y - h
    side = facing in ("left", "right")
    back = facing == "back"
    dirn = 1.0 if facing == "right" else -1.0 if facing == "left" else 0.0
    wf = look.width * (0.6 if side else 1.0)
    return _Figure(
        cx=cx, top=top, h=h, side=side, back=back, dirn=dirn,
        bag_side=-look.bag_side if back else look.bag_side,
        sw=0.14 * wf, ww=0.115 * wf, hw=0.12 * wf,
        hcx=cx + dirn * 0.012 * h, hcy=top + 0.072 * h,
        hrx=0.053 * look.head * h, hry=0.066 * look.head * h,
    )


def draw_person(
    img: Image.Image,
    look: Look,
    rng: random.Random,
    *,
    cx: float,
    feet_y: float,
    h: float,
    facing: str,
) -> None:
    """Draw a pedestrian ``h`` pixels tall standing at ``(cx, feet_y)``, back to front."""
    d = ImageDraw.Draw(img)
    fig = _figure(look, cx=cx, feet_y=feet_y, h=h, facing=facing)
    if look.hair_style == "long" and not fig.back:
        # Long hair hangs behind the shoulders when seen from the front.
        off = -fig.dirn * fig.hrx * 0.5
        d.rectangle([fig.hcx - fig.hrx * 1.1 + off, fig.hcy, fig.hcx + fig.hrx * 1.1 + off, fig.top + 0.3 * h],
                    fill=look.hair)
    _draw_legs(d, look, fig, rng)
    shoulders, angles = _arm_pose(fig, rng)
    arm_w = max(2, int(0.048 * look.width * h))
    hands: dict[int, Point] = {}
    # In side view the far arm is behind the torso.
    if fig.side:
        hands[0] = _draw_arm(d, look, fig, shoulders[0], angles[0], arm_w)
    _draw_body(img, d, look, fig)
    _draw_worn_bag(d, look, fig)
    for i in ((1,) if fig.side else (0, 1)):
        hands[i] = _draw_arm(d, look, fig, shoulders[i], angles[i], arm_w)
    if look.bag == "hand":
        hx, hy = hands[0 if (fig.bag_side < 0 or fig.side) else 1]
        bw_, bh_ = 0.05 * h, 0.08 * h
        d.line([(hx, hy), (hx, hy + 0.02 * h)], fill=look.bag_colour, width=2)
        d.rectangle([hx - bw_, hy + 0.015 * h, hx + bw_, hy + 0.015 * h + bh_], fill=look.bag_colour)
    _draw_head(d, look, fig)


def _draw_legs(d: ImageDraw.ImageDraw, look: Look, fig: _Figure, rng: random.Random) -> None:
    """Legs (trousers, or skin under shorts or a skirt) and shoes; walking, in side view one
    foot forward and one back."""
    P, h, side, dirn, hw = fig.at, fig.h, fig.side, fig.dirn, fig.hw
    y_hip, y_foot = _Y_HIP, _Y_FOOT
    stride = rng.uniform(0.0, 0.11) if side else rng.uniform(0.0, 0.035)
    leg_w = 0.062 * look.width
    hip_dx = 0.02 if side else 0.052 * look.width
    feet_dx = (stride, -stride) if side else (-hip_dx - stride, hip_dx + stride)
    hip_xs = (-hip_dx * 0.5, hip_dx * 0.5) if side else (-hip_dx, hip_dx)

    def leg(i: int, t0: float, t1: float, grow: float = 1.0) -> list[Point]:
        x0, x1 = hip_xs[i], feet_dx[i]
        ya, yb = y_hip - 0.01 + (y_foot - y_hip) * t0, y_hip - 0.01 + (y_foot - y_hip) * t1
        xa, xb = x0 + (x1 - x0) * t0, x0 + (x1 - x0) * t1
        wa = leg_w * (1 - 0.3 * t0) * grow / 2
        wb = leg_w * (1 - 0.3 * t1) * grow / 2
        return [P(xa - wa, ya), P(xa + wa, ya), P(xb + wb, yb), P(xb - wb, yb)]

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


def _arm_pose(fig: _Figure, rng: random.Random) -> tuple[tuple[Point, Point], tuple[float, float]]:
    """Both shoulders' positions and the arms' angles from the vertical (a swing in side view)."""
    P, dirn, sw, y_sh = fig.at, fig.dirn, fig.sw, _Y_SHOULDER
    if fig.side:
        swing = rng.uniform(-0.45, 0.45)
        angles = (swing, -swing)
        shoulders = (P(-dirn * 0.01, y_sh + 0.03), P(dirn * 0.01, y_sh + 0.03))
    else:
        angles = (-rng.uniform(0.03, 0.22), rng.uniform(0.03, 0.22))
        shoulders = (P(-sw * 0.88, y_sh + 0.025), P(sw * 0.88, y_sh + 0.025))
    return shoulders, angles


def _draw_arm(d: ImageDraw.ImageDraw, look: Look, fig: _Figure, shoulder: Point, a: float, arm_w: int) -> Point:
    """Upper arm, forearm (sleeve or skin) and hand; returns where the hand is."""
    h, side, dirn = fig.h, fig.side, fig.dirn
    sleeve = look.shirt
    sx, sy = shoulder
    bend = 0.15 if side else 0.05
    ex, ey = sx + math.sin(a) * 0.16 * h, sy + math.cos(a) * 0.16 * h
    a2 = a + bend * (1 if a >= 0 else -1) * (dirn if side else 1)
    hx, hy = ex + math.sin(a2) * 0.17 * h, ey + math.cos(a2) * 0.17 * h
    d.line([(sx, sy), (ex, ey)], fill=sleeve, width=arm_w + 1, joint="curve")
    d.line([(ex, ey), (hx, hy)], fill=sleeve if look.long_sleeves else look.skin, width=arm_w, joint="curve")
    r = 0.022 * h
    d.ellipse([hx - r, hy - r, hx + r, hy + r], fill=look.skin)
    return (hx, hy)


def _draw_body(img: Image.Image, d: ImageDraw.ImageDraw, look: Look, fig: _Figure) -> None:
    """Neck and torso."""
    P, sw, ww, hw, h = fig.at, fig.sw, fig.ww, fig.hw, fig.h
    y_sh, y_hip = _Y_SHOULDER, _Y_HIP
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
    d.rectangle([fig.hcx - neck_w, fig.hcy, fig.hcx + neck_w, fig.top + (y_sh + 0.01) * h], fill=look.skin)
    _draw_torso(img, d, look, fig, torso)


def _draw_worn_bag(d: ImageDraw.ImageDraw, look: Look, fig: _Figure) -> None:
    """A backpack or a shoulder bag (a hand bag is drawn with the hand)."""
    P, sw, hw, h, side, back, dirn = fig.at, fig.sw, fig.hw, fig.h, fig.side, fig.back, fig.dirn
    y_sh, bag_side = _Y_SHOULDER, fig.bag_side
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


def _draw_head(d: ImageDraw.ImageDraw, look: Look, fig: _Figure) -> None:
    """Head, hair and cap."""
    hcx, hcy, hrx, hry = fig.hcx, fig.hcy, fig.hrx, fig.hry
    back, side, dirn = fig.back, fig.side, fig.dirn
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
        d.rectangle([hcx - hrx * 1.1, hcy, hcx + hrx * 1.1, fig.top + 0.3 * fig.h], fill=look.hair)
    if look.hair_style == "cap":
        d.chord([hcx - hrx * 1.1, hcy - hry * 1.12, hcx + hrx * 1.1, hcy + hry * 0.7], 180, 360, fill=look.hat)
        if side:
            vx = hcx + dirn * hrx * 1.6
            d.polygon([(hcx, hcy - hry * 0.25), (vx, hcy - hry * 0.1), (hcx, hcy)], fill=look.hat)
        elif not back:
            d.ellipse([hcx - hrx * 0.9, hcy - hry * 0.35, hcx + hrx * 0.9, hcy - hry * 0.05], fill=look.hat)


def _draw_torso(img: Image.Image, d: ImageDraw.ImageDraw, look: Look, fig: _Figure,
                torso: list[tuple[float, float]]) -> None:
    """The shirt, with the identity's pattern clipped to the torso's outline."""
    P, sw, h = fig.at, fig.sw, fig.h
    back, side, dirn = fig.back, fig.side, fig.dirn
    y_sh, y_hip = _Y_SHOULDER, _Y_HIP
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


def _draw_clutter(d: ImageDraw.ImageDraw, cam: Camera, rng: random.Random) -> None:
    """Background objects (railing, bike, bench, sign) behind the person."""
    kind = pick(rng, ("railing", "bike", "sign", "bench"))
    c = jitter(rng, cam.clutter[rng.randrange(len(cam.clutter))], 20)
    if kind == "railing":
        y = rng.uniform(0.55, 0.8) * H
        d.line([(0, y), (W, y)], fill=c, width=4)
        x = rng.uniform(0, 20)
        while x < W:
            d.line([(x, y), (x, y + 0.2 * H)], fill=c, width=3)
            x += rng.uniform(12, 30)
    elif kind == "bike":
        cx, cy, r = rng.uniform(0, W), rng.uniform(0.7, 0.9) * H, rng.uniform(14, 24)
        for dx in (-r * 1.2, r * 1.2):
            d.ellipse([cx + dx - r, cy - r, cx + dx + r, cy + r], outline=c, width=3)
        d.line([(cx - r * 1.2, cy), (cx, cy - r), (cx + r * 1.2, cy)], fill=c, width=3)
    elif kind == "sign":
        x, y = rng.uniform(0, W), rng.uniform(0.05, 0.4) * H
        d.rectangle([x, y, x + rng.uniform(15, 40), y + rng.uniform(10, 25)], fill=c)
    else:
        y = rng.uniform(0.6, 0.8) * H
        x = rng.uniform(-20, W * 0.6)
        d.rectangle([x, y, x + rng.uniform(40, 90), y + 8], fill=c)
        d.rectangle([x + 4, y, x + 10, y + 30], fill=c)


def render(item: Item, seed: int, cam: Camera, look: Look | None) -> bytes:
    """The JPEG of one planned file, drawn from its own seeded generator.

    ``look`` is the person's (``None`` only for a clutter-only distractor).
    """
    rng = seeded(seed, K_IMAGE, item.pid + 1, item.cam, item.idx)
    ox, oy = rng.randrange(0, 2 * PAD + 1), rng.randrange(0, 2 * PAD + 1)
    img = cam.background.crop((ox, oy, ox + W, oy + H))
    d = ImageDraw.Draw(img)
    if rng.random() < 0.45:
        _draw_clutter(d, cam, rng)
    facing = pick(rng, _FACINGS)
    if item.kind == "clutter":
        for _ in range(rng.randrange(1, 4)):
            _draw_clutter(d, cam, rng)
        return finish(img, cam, rng)
    # A bystander partly in the box, as detector crops often have.
    if rng.random() < 0.18:
        other = make_look(rng)
        s = 1.0 if rng.random() < 0.5 else -1.0
        draw_person(
            img,
            other,
            rng,
            cx=W / 2 + s * rng.uniform(0.45, 0.65) * W,
            feet_y=H * rng.uniform(0.9, 1.02),
            h=H * cam.scale * rng.uniform(0.85, 1.05),
            facing=pick(rng, _FACINGS),
        )
    assert look is not None
    h = H * cam.scale * look.height * rng.uniform(0.9, 1.06)
    cx = W / 2 + rng.uniform(-0.12, 0.12) * W
    feet_y = H * (0.975 + rng.uniform(-0.04, 0.03)) - (H * 0.92 - h) * 0.3
    if item.kind == "junk":
        # A bad detection: a fragment of a person, too big or cut off.
        h *= rng.uniform(1.7, 2.6)
        feet_y = H * rng.uniform(0.6, 1.9)
        cx += rng.uniform(-0.4, 0.4) * W
    draw_person(img, look, rng, cx=cx, feet_y=feet_y, h=h, facing=facing)
    if rng.random() < 0.2:
        _draw_occluder(d, cam, rng)
    return finish(img, cam, rng)


def _draw_occluder(d: ImageDraw.ImageDraw, cam: Camera, rng: random.Random) -> None:
    """A pole, or a box over the lower or a side part of the body, in front of the person."""
    c = jitter(rng, cam.clutter[rng.randrange(len(cam.clutter))], 25)
    if rng.random() < 0.5:  # pole
        x, w = rng.uniform(0.1, 0.9) * W, rng.uniform(5, 12)
        d.rectangle([x - w / 2, 0, x + w / 2, H], fill=c)
    elif rng.random() < 0.6:
        y = rng.uniform(0.6, 0.85) * H
        d.rectangle([rng.uniform(-20, 0.3 * W), y, rng.uniform(0.7 * W, W + 20), H], fill=c)
    else:
        s = rng.random() < 0.5
        x = rng.uniform(0.25, 0.4) * W
        d.rectangle([0 if s else W - x, rng.uniform(0.2, 0.6) * H, x if s else W, H], fill=c)
