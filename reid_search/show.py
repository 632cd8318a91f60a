"""Picture of a query and its ranked hits, as ReID papers show them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from reid_search.atomic import atomic_write
from reid_search.engine import Hit
from reid_search.extract import ImageLoadError, load_image

CELL_W, CELL_H, PAD, TEXT_H = 64, 128, 6, 26
GREEN, RED, GREY = (30, 170, 60), (210, 40, 40), (150, 150, 150)


def _cell(path: str | os.PathLike[str]) -> Image.Image:
    try:
        return load_image(path).resize((CELL_W, CELL_H), Image.BILINEAR)
    except ImageLoadError:
        return Image.new("RGB", (CELL_W, CELL_H), (60, 60, 60))


def render_hits(query_path: str | os.PathLike[str], hits: Sequence[Hit], query_pid: int | None = None) -> Image.Image:
    """The query then its hits in a row, each with rank and distance; frames green/red when pids are known."""
    font = ImageFont.load_default()
    n = len(hits) + 1
    width = n * (CELL_W + 2 * PAD) + PAD * 2
    canvas = Image.new("RGB", (width, CELL_H + 2 * PAD + TEXT_H + PAD), "white")
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
        x += CELL_W + 2 * PAD
    return canvas


def save_hits_picture(out: str | os.PathLike[str], query_path: str | os.PathLike[str], hits: Sequence[Hit],
                      query_pid: int | None = None) -> Path:
    """Render and write the picture atomically (format from the suffix, PNG by default)."""
    out = Path(out)
    img = render_hits(query_path, hits, query_pid)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(out.suffix.lower(), "PNG")
    with atomic_write(out) as fh:
        img.save(fh, format=fmt)
    return out
