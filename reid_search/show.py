"""Picture of a query and its ranked hits, as ReID papers show them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reid_search.atomic import atomic_write
from reid_search.engine import Hit
from reid_search.images import ImageLoadError, load_image

CELL_W, CELL_H, PAD, TEXT_H = 64, 128, 6, 26
GREEN, RED, GREY = (30, 170, 60), (210, 40, 40), (150, 150, 150)
MATCH = (20, 110, 230)


def _cell(path: str | os.PathLike[str]) -> Image.Image:
    try:
        return load_image(path).resize((CELL_W, CELL_H), Image.BILINEAR)
    except ImageLoadError:
        return Image.new("RGB", (CELL_W, CELL_H), (60, 60, 60))


def render_hits(query_path: str | os.PathLike[str], hits: Sequence[Hit], query_pid: int | None = None, *,
                matches: Sequence[bool | None] | None = None, labels: Sequence[str] | None = None) -> Image.Image:
    """The query then its hits in a row, each with rank and distance; frames green/red when pids are known.

    ``matches``: per hit, whether it is within the calibrated threshold (a thick
    underline, blue for a match, grey for none). ``labels``: a second caption line
    per hit (e.g. the camera and match count of a sighting).
    """
    font = ImageFont.load_default()
    n = len(hits) + 1
    width = n * (CELL_W + 2 * PAD) + PAD * 2
    extra = 12 if labels else 0
    canvas = Image.new("RGB", (width, CELL_H + 2 * PAD + TEXT_H + PAD + extra), "white")
    draw = ImageDraw.Draw(canvas)
    cells = [(Path(query_path), "query", None)] + [
        (Path(h.path), f"#{h.rank} {h.distance:.3f}", None if query_pid is None or h.pid is None else h.pid == query_pid)
        for h in hits
    ]
    x = PAD
    for i, (path, label, correct) in enumerate(cells):
        if i == 1:
            x += PAD * 2  # a gap between the query and the ranking
        colour = GREY if correct is None else (GREEN if correct else RED)
        if i == 0:
            colour = (40, 40, 40)
        draw.rectangle([x, PAD, x + CELL_W + 2 * 3 - 1, PAD + CELL_H + 2 * 3 - 1], fill=colour)
        canvas.paste(_cell(path), (x + 3, PAD + 3))
        draw.text((x, PAD + CELL_H + 8), label, fill=(0, 0, 0), font=font)
        if i > 0 and matches is not None and matches[i - 1] is not None:
            y = PAD + CELL_H + 21
            draw.rectangle([x, y, x + CELL_W + 5, y + 3], fill=MATCH if matches[i - 1] else GREY)
        if i > 0 and labels:
            draw.text((x, PAD + CELL_H + 27), labels[i - 1], fill=(0, 0, 0), font=font)
        x += CELL_W + 2 * PAD
    return canvas


def save_hits_picture(out: str | os.PathLike[str], query_path: str | os.PathLike[str], hits: Sequence[Hit],
                      query_pid: int | None = None, *, matches: Sequence[bool | None] | None = None,
                      labels: Sequence[str] | None = None) -> Path:
    """Render (see :func:`render_hits`) and write the picture atomically (format from the suffix, PNG by default)."""
    out = Path(out)
    img = render_hits(query_path, hits, query_pid, matches=matches, labels=labels)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(out.suffix.lower(), "PNG")
    with atomic_write(out) as fh:
        img.save(fh, format=fmt)
    return out


# --------------------------------------------------------------------------- calibration plot

PLOT_W, PLOT_H, MARGIN = 420, 300, 48
BLUE, ORANGE = (40, 90, 200), (230, 120, 20)


def render_calibration(fpr: np.ndarray, tpr: np.ndarray, edges: np.ndarray, genuine_hist: np.ndarray,
                       impostor_hist: np.ndarray, threshold: float, target_fpr: float) -> Image.Image:
    """Two panels: the ROC (log FPR from 1e-5 to 1) with the target FPR marked, and the genuine
    and impostor distance histograms (each normalised to its peak) with the threshold line."""
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (2 * (PLOT_W + 2 * MARGIN), PLOT_H + 2 * MARGIN), "white")
    d = ImageDraw.Draw(canvas)

    def frame(x0: int, title: str, xlabel: str, ylabel: str) -> tuple[int, int, int, int]:
        box = (x0 + MARGIN, MARGIN, x0 + MARGIN + PLOT_W, MARGIN + PLOT_H)
        d.rectangle(box, outline=(0, 0, 0))
        d.text((box[0], 12), title, fill=(0, 0, 0), font=font)
        d.text((box[0] + PLOT_W // 2 - 3 * len(xlabel), box[3] + 22), xlabel, fill=(0, 0, 0), font=font)
        d.text((x0 + 4, MARGIN - 14), ylabel, fill=(0, 0, 0), font=font)
        return box

    # ROC
    box = frame(0, "ROC", "false-positive rate (log)", "TPR")
    lo_exp = -5.0

    def roc_xy(f: float, t: float) -> tuple[float, float]:
        fx = (max(np.log10(max(f, 1e-12)), lo_exp) - lo_exp) / -lo_exp
        return box[0] + fx * PLOT_W, box[3] - t * PLOT_H

    for e in range(int(lo_exp), 1):
        x, _ = roc_xy(10.0 ** e, 0)
        d.line([(x, box[3]), (x, box[3] + 4)], fill=(0, 0, 0))
        d.text((x - 10, box[3] + 6), f"1e{e}", fill=(0, 0, 0), font=font)
    for t in (0.0, 0.5, 1.0):
        d.text((box[0] - 24, box[3] - t * PLOT_H - 5), f"{t:.1f}", fill=(0, 0, 0), font=font)
    pts = [roc_xy(f, t) for f, t in zip(fpr, tpr) if f > 0]
    if len(pts) > 1:
        d.line(pts, fill=BLUE, width=2)
    x, _ = roc_xy(target_fpr, 0)
    d.line([(x, box[1]), (x, box[3])], fill=RED)
    d.text((x + 3, box[1] + 3), f"FPR {target_fpr:g}", fill=RED, font=font)

    # histograms
    box = frame(PLOT_W + 2 * MARGIN, "distances", "distance", "share")
    lo, hi = float(edges[0]), float(edges[-1])
    span = hi - lo or 1.0

    def hx(v: float) -> float:
        return box[0] + (v - lo) / span * PLOT_W

    centres = (edges[:-1] + edges[1:]) / 2
    for hist, colour, name, row in ((impostor_hist, ORANGE, "impostor", 0), (genuine_hist, BLUE, "genuine", 1)):
        peak = hist.max() if hist.size and hist.max() > 0 else 1
        pts = [(hx(c), box[3] - h / peak * PLOT_H) for c, h in zip(centres, hist)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.text((box[2] - 70, box[1] + 6 + 12 * row), name, fill=colour, font=font)
    for v in (lo, hi):
        d.text((hx(v) - 10, box[3] + 6), f"{v:.2f}", fill=(0, 0, 0), font=font)
    if lo <= threshold <= hi:
        x = hx(threshold)
        d.line([(x, box[1]), (x, box[3])], fill=RED)
        d.text((x + 3, box[1] + 30), f"threshold {threshold:.4f}", fill=RED, font=font)
    return canvas


def save_png(out: str | os.PathLike[str], img: Image.Image) -> Path:
    """Write ``img`` atomically (format from the suffix, PNG by default)."""
    out = Path(out)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(out.suffix.lower(), "PNG")
    with atomic_write(out) as fh:
        img.save(fh, format=fmt)
    return out
