"""The ``--input-*`` options: what a third-party ONNX model expects of its input.

They are the keys of a ``MODEL.onnx.json`` sidecar (:mod:`reid_search.preprocess`) on the
command line. The types check the syntax while the command line is parsed, so a bad value
is a usage error (exit 2) before any model loads; whether the values fit the graph (and
agree with its metadata, its sidecar and the preprocessing recorded with the gallery) is
decided when the model opens. Nothing here imports torch: ``--help`` stays fast.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import click

# reid_search.transforms.LAYOUTS/COLORS, which import torch.
LAYOUTS = ("NCHW", "NHWC")
COLORS = ("RGB", "BGR")
# Option → the sidecar key its value is passed as (--input-size sets two).
_OPTIONS = {"input_layout": "layout", "input_color": "color", "input_scale": "input_scale",
            "input_mean": "mean", "input_std": "std"}
RETAIL_EXAMPLE = "--input-layout NHWC --input-color BGR --input-scale 1 --input-mean 0,0,0 --input-std 1,1,1"


def _number(text: str) -> float:
    """``0.5``, ``1/255``: a finite float; ValueError otherwise."""
    text = text.strip()
    if "/" in text:
        num, den = text.split("/", 1)
        value = float(num) / float(den) if float(den) != 0 else math.inf
    else:
        value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


class OneOf(click.ParamType):
    """One of a few upper-case words, in any case (``nhwc`` is ``NHWC``)."""

    name = "word"

    def __init__(self, words: tuple[str, ...], what: str) -> None:
        self.words, self.what = words, what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        word = str(value).strip().upper()
        if word not in self.words:
            self.fail(f"{value!r} is not {' or '.join(self.words)} ({self.what})", param, ctx)
        return word


class PixelScale(click.ParamType):
    """A positive factor for 0..255 pixels: ``1/255`` (0..1), ``1`` (0..255), any X."""

    name = "scale"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            scale = _number(str(value))
        except ValueError:
            scale = math.nan
        if not scale > 0:
            self.fail(f"{value!r} is not a positive number: 1/255 feeds pixels as 0..1, 1 as 0..255 "
                      "(or any factor, e.g. 1/127.5)", param, ctx)
        return scale


class ChannelTriple(click.ParamType):
    """``R,G,B`` (in the scaled units; one number stands for all three), positive with ``positive``."""

    name = "R,G,B"

    def __init__(self, positive: bool = False, example: str = "0.485,0.456,0.406") -> None:
        self.positive, self.example = positive, example

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[float]:
        if isinstance(value, list):
            return value
        parts = [p for p in str(value).replace(" ", ",").split(",") if p]
        try:
            nums = [_number(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) == 1:
            nums *= 3
        if len(nums) != 3:
            self.fail(f"{value!r} is not three numbers R,G,B (in the scaled units, e.g. {self.example})", param, ctx)
        if self.positive and not all(v > 0 for v in nums):
            self.fail(f"{value!r} has a value that is not positive (e.g. {self.example})", param, ctx)
        return nums


class InputSize(click.ParamType):
    """``HxW`` in pixels, e.g. ``256x128``."""

    name = "HxW"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        parts = str(value).lower().replace("×", "x").split("x")
        try:
            h, w = (int(p) for p in parts)
        except ValueError:
            h = w = 0
        if h < 1 or w < 1:
            self.fail(f"{value!r} is not HEIGHTxWIDTH in pixels (e.g. 256x128)", param, ctx)
        return h, w


def declared_preprocess(input_layout: str | None = None, input_color: str | None = None,
                        input_scale: float | None = None, input_mean: list[float] | None = None,
                        input_std: list[float] | None = None,
                        input_size: tuple[int, int] | None = None) -> dict[str, Any] | None:
    """The given ``--input-*`` values in the sidecar's keys; None when none was given."""
    given = {"input_layout": input_layout, "input_color": input_color, "input_scale": input_scale,
             "input_mean": input_mean, "input_std": input_std}
    out: dict[str, Any] = {_OPTIONS[k]: v for k, v in given.items() if v is not None}
    if input_size is not None:
        out["input_height"], out["input_width"] = input_size
    return out or None


_DECLARED = "ONNX models; default: the graph's metadata, else its MODEL.onnx.json sidecar"

_PARAMS = [
    click.option("--input-layout", type=OneOf(LAYOUTS, "where the 3 channels are in the input tensor"), default=None, metavar="NCHW|NHWC",
                 help=f"What the model expects of its input ({_DECLARED}, else the graph's shape and the ReID "
                      "convention: RGB, 0..1, ImageNet mean/std). The gallery remembers it. E.g. OpenVINO's "
                      f"person-reidentification-retail-0288: {RETAIL_EXAMPLE}"),
    click.option("--input-color", type=OneOf(COLORS, "the channel order the model takes"), default=None, metavar="RGB|BGR",
                 help="Channel order the model takes."),
    click.option("--input-scale", type=PixelScale(), default=None, metavar="1/255|1|X",
                 help="Factor on 0..255 pixels: 1/255 feeds 0..1, 1 feeds 0..255."),
    click.option("--input-mean", type=ChannelTriple(example="0,0,0"), default=None,
                 help="Subtracted per channel after the scale."),
    click.option("--input-std", type=ChannelTriple(positive=True, example="1,1,1"), default=None,
                 help="Divided per channel after the mean."),
    click.option("--input-size", type=InputSize(), default=None, metavar="HxW",
                 help="Input height x width, for a graph whose shape leaves it open (e.g. 256x128)."),
]


def model_input_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the ``--input-*`` options; the command gets them as one ``preprocess`` argument
    (:func:`declared_preprocess`: the sidecar keys, or None), for ``open_extractor(preprocess=...)``."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        decl = declared_preprocess(**{k: kwargs.pop(k) for k in (*_OPTIONS, "input_size")})
        return fn(*args, preprocess=decl, **kwargs)

    for opt in reversed(_PARAMS):
        command = opt(command)
    return command
