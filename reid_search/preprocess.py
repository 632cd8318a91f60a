"""Declared preprocessing of ONNX ReID graphs: metadata, a sidecar file, explicit values, the graph's shape.

One vocabulary serves an ONNX file's ``metadata_props`` and its sidecar
``MODEL.onnx.json`` (the model's file name plus ``.json``, so it sorts beside
the model and cannot be mistaken for another model's)::

    layout        "NCHW" or "NHWC"
    color         "RGB" or "BGR" (channel order)
    input_scale   the factor applied to 0..255 pixels: "1/255" (0..1) or 1 (0..255), any positive number
    mean, std     three numbers (or one for all channels), in the scaled units
    input_height, input_width   positive integers (needed only where the graph's are not fixed)

In metadata every value is a string (``mean``/``std`` a JSON list or
``"a, b, c"``); in the sidecar, JSON numbers, lists and strings all do. A
sidecar for OpenVINO's ``person-reidentification-retail-0288``::

    {"layout": "NHWC", "color": "BGR", "input_scale": 1, "mean": [0, 0, 0], "std": [1, 1, 1]}

:func:`resolve_preprocess` takes each value from the first source that has it
(metadata, then the sidecar, then explicit values) and refuses a later source
that contradicts an earlier one, or a declaration the graph's fixed input
shape contradicts. What nothing declares comes from the graph where it is
unambiguous (NCHW vs NHWC from a fixed 3-channel dimension, the input size);
the colour statistics of an NCHW graph default to the ReID convention (RGB,
0..1, ImageNet mean/std), as reid-search always assumed; an NHWC graph must
declare them (OpenVINO's are BGR 0..255, Keras's RGB at various scales: no
default is safe).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from reid_search.errors import ModelError
from reid_search.transforms import COLORS, DEFAULT_SCALE, IMAGENET_MEAN, IMAGENET_STD, LAYOUTS, Preprocess

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"
# Declaration key → Preprocess field.
KEYS = {"layout": "layout", "color": "color", "input_scale": "scale", "mean": "mean", "std": "std",
        "input_height": "height", "input_width": "width"}
_KEY_OF = {f: k for k, f in KEYS.items()}
# What an NHWC graph must declare (the rest can come from its shape).
_NHWC_REQUIRED = ("color", "scale", "mean", "std")
# When a graph has symbolic H/W and declares none: the ReID convention.
FALLBACK_SIZE = (256, 128)
SIDECAR_EXAMPLE = '{"layout": "NHWC", "color": "BGR", "input_scale": 1, "mean": [0, 0, 0], "std": [1, 1, 1]}'


def sidecar_path(model: str | Path) -> Path:
    """``MODEL.onnx`` → ``MODEL.onnx.json``, beside the path as given (a symlink's own folder)."""
    model = Path(model)
    return model.with_name(model.name + SIDECAR_SUFFIX)


@dataclass(frozen=True)
class Resolved:
    """A resolved :class:`Preprocess` and where each of its fields came from (``graph``, ``metadata``...)."""

    preprocess: Preprocess
    sources: dict[str, str]

    def describe(self) -> str:
        """One line: ``layout=NHWC (graph), color=BGR (sidecar x.onnx.json), ...``."""
        pre = self.preprocess
        return ", ".join(f"{_KEY_OF[f]}={_show(getattr(pre, f))} ({self.sources[f]})" for f in _KEY_OF)


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(f"{x:g}" for x in v) + "]"
    if isinstance(v, float):
        return "1/255" if v == DEFAULT_SCALE else f"{v:g}"
    return str(v)


def _number(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError
    if isinstance(raw, str):
        text = raw.strip()
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    return float(raw)


def _parse_value(field: str, raw: Any) -> Any:
    """One declared value → the Preprocess field's value; ValueError saying what it should be."""
    if field in ("layout", "color"):
        allowed = LAYOUTS if field == "layout" else COLORS
        value = raw.strip().upper() if isinstance(raw, str) else None
        if value not in allowed:
            raise ValueError(f"is not {' or '.join(allowed)}")
        return value
    if field == "scale":
        try:
            value = _number(raw)
        except (ValueError, TypeError, ZeroDivisionError):
            value = math.nan
        if not 0 < value < math.inf:
            raise ValueError("is not a positive number (1/255 for 0..1 pixels, 1 for 0..255)")
        return value
    if field in ("height", "width"):
        try:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            value = int(raw.strip()) if isinstance(raw, str) else int(raw)
        except (ValueError, TypeError, OverflowError):
            value = 0
        if value < 1:
            raise ValueError("is not a positive integer")
        return value
    # mean / std
    vals: Any = raw
    if isinstance(raw, str):
        text = raw.strip()
        try:
            vals = json.loads(text) if text.startswith("[") else text.replace(",", " ").split()
        except json.JSONDecodeError:
            vals = None
    if not isinstance(vals, (list, tuple)):
        vals = [vals]
    try:
        nums = [_number(v) for v in vals]
    except (ValueError, TypeError, ZeroDivisionError):
        nums = []
    if len(nums) == 1:
        nums *= 3
    if len(nums) != 3 or not all(math.isfinite(v) for v in nums):
        raise ValueError("is not three numbers")
    if field == "std" and not all(v > 0 for v in nums):
        raise ValueError("has a value that is not positive")
    return tuple(nums)


def parse_declaration(values: Mapping[str, Any], source: str, remedy: str, *, strict: bool) -> dict[str, Any]:
    """The known keys of ``values`` (see the module docstring) → Preprocess field values.

    ``strict``: refuse unknown keys (a sidecar; metadata carries other keys too).

    Raises:
        ModelError: one line naming ``source``, the key and value, and ``remedy``.
    """
    if strict:
        unknown = sorted(set(values) - set(KEYS))
        if unknown:
            raise ModelError(f"{source}: unknown key {unknown[0]!r}; the keys are {', '.join(KEYS)}; {remedy}")
    out: dict[str, Any] = {}
    for key, field in KEYS.items():
        if key in values:
            try:
                out[field] = _parse_value(field, values[key])
            except ValueError as exc:
                raise ModelError(f"{source}: {key}={values[key]!r} {exc}; {remedy}") from None
    return out


def read_sidecar(model: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The parsed sidecar of ``model`` (``MODEL.onnx.json``), or None when there is none.

    Raises:
        ModelError: an unreadable file, invalid JSON, not an object, an unknown key or a bad value (one line).
    """
    path = sidecar_path(model)
    if not path.exists():
        return None
    remedy = f"fix {path.name} (keys: {', '.join(KEYS)}) or remove it"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read the preprocessing sidecar {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); {remedy}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: holds a JSON {type(data).__name__}, not an object such as {SIDECAR_EXAMPLE}; {remedy}")
    return path, parse_declaration(data, str(path), remedy, strict=True)


def _static(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b))
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def _graph_layout(shape: Sequence[Any], name: str) -> str | None:
    """NCHW/NHWC where a fixed 3-channel dimension says so; None when ambiguous."""
    c1, c3 = _static(shape[1]), _static(shape[3])
    if c1 == 3 and c3 != 3:
        return "NCHW"
    if c3 == 3 and c1 != 3:
        return "NHWC"
    if c1 is not None and c3 is not None and c1 != 3 and c3 != 3:
        raise ModelError(f"{name}: input {list(shape)} has neither 3 channels first (NCHW: {c1} channels) nor last "
                         f"(NHWC: {c3}); reid-search feeds 3-channel colour images")
    return None


def resolve_preprocess(
    shape: Sequence[Any],
    name: str,
    *,
    metadata: Mapping[str, str] | None = None,
    sidecar: tuple[Path, Mapping[str, Any]] | None = None,
    explicit: Preprocess | Mapping[str, Any] | None = None,
    ours: bool = False,
) -> Resolved:
    """What a graph with the 4-D input ``shape`` expects, from its declarations and its shape.

    ``metadata``: the graph's ``metadata_props``; ``sidecar``: :func:`read_sidecar`'s
    result; ``explicit``: a full :class:`Preprocess` (e.g. remembered with a
    gallery) or a mapping of some of the declaration keys (e.g. command-line
    options); ``ours``: a reid-search export (NCHW even where old exports do
    not say so). ``name`` names the model in messages.

    Raises:
        ModelError: a bad declared value, two sources that disagree, a
            declaration the graph's fixed shape contradicts, a layout that is
            neither declared nor fixed by the shape, or an NHWC graph whose
            colour statistics nobody declares (one line, naming the sidecar keys).
    """
    meta_remedy = "fix or remove it from metadata_props"
    sources: list[tuple[str, dict[str, Any]]] = []
    meta_decl = parse_declaration(metadata or {}, name, meta_remedy, strict=False)
    if ours:
        meta_decl.setdefault("layout", "NCHW")
    sources.append(("metadata", meta_decl))
    if sidecar is not None:
        sources.append((f"sidecar {sidecar[0].name}", dict(sidecar[1])))
    if isinstance(explicit, Preprocess):
        sources.append(("declared preprocessing", {f: getattr(explicit, f) for f in _KEY_OF}))
    elif explicit is not None:
        sources.append(("declared preprocessing", parse_declaration(explicit, f"{name}: declared preprocessing",
                                                      f"use the keys {', '.join(KEYS)}", strict=True)))

    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for src, decl in sources:
        for field, value in decl.items():
            if field not in values:
                values[field], origin[field] = value, src
            elif not _same(values[field], value):
                key = _KEY_OF[field]
                fix = f"drop {key} from {sidecar[0].name}" if src.startswith("sidecar") and sidecar else f"do not declare {key}"
                raise ModelError(f"{name}: {src} says {key}={_show(value)} but {origin[field]} says "
                                 f"{_show(values[field])}; {fix}, or make them agree")

    how_to = (f"declare it in {sidecar_path(name).name} beside the model, e.g. {SIDECAR_EXAMPLE} "
              f"(keys: {', '.join(KEYS)})")
    graph_layout = _graph_layout(shape, name)
    if "layout" in values:
        layout = values["layout"]
        cdim = 1 if layout == "NCHW" else 3
        if _static(shape[cdim]) not in (None, 3):
            raise ModelError(f"{name}: {origin['layout']} says layout={layout} but the input {list(shape)} has "
                             f"{shape[cdim]} channels there; fix the layout")
    elif graph_layout is not None:
        values["layout"], origin["layout"] = graph_layout, "graph"
    else:
        raise ModelError(f"{name}: cannot tell NCHW from NHWC from the input {list(shape)}; {how_to}")
    hdim, wdim = (2, 3) if values["layout"] == "NCHW" else (1, 2)

    for field, dim in (("height", hdim), ("width", wdim)):
        fixed = _static(shape[dim])
        if fixed is None:
            continue
        if field in values and values[field] != fixed:
            if origin[field] != "metadata":
                raise ModelError(f"{name}: {origin[field]} says {_KEY_OF[field]}={values[field]} but the graph's "
                                 f"input {list(shape)} fixes it at {fixed}; fix or drop it")
            log.warning("%s: metadata says %s=%s but the graph takes %d; using the graph's",
                        name, _KEY_OF[field], values[field], fixed)
        values[field], origin[field] = fixed, "graph"

    if values["layout"] == "NHWC":
        missing = [_KEY_OF[f] for f in (*_NHWC_REQUIRED, "height", "width") if f not in values]
        if missing:
            raise ModelError(f"{name}: an NHWC graph's preprocessing must be declared (missing: {', '.join(missing)}); "
                             f"{how_to}")
    elif values.get("scale", DEFAULT_SCALE) != DEFAULT_SCALE and not {"mean", "std"} <= set(values):
        raise ModelError(f"{name}: input_scale={_show(values['scale'])} is declared without both mean and std "
                         f"(they are in the scaled units, so ImageNet's do not apply); {how_to}")

    defaults = {"color": "RGB", "scale": DEFAULT_SCALE, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    for field, value in defaults.items():
        if field not in values:
            values[field], origin[field] = value, "default"
    for field, fallback in zip(("height", "width"), FALLBACK_SIZE):
        if field not in values:
            log.warning("%s: input %s is not fixed in the graph nor declared; assuming %d", name, _KEY_OF[field], fallback)
            values[field], origin[field] = fallback, "default"
    try:
        pre = Preprocess(**values)
    except ValueError as exc:  # pragma: no cover - every value was checked above
        raise ModelError(f"{name}: {exc}; {how_to}") from None
    return Resolved(pre, origin)


def preprocess_tag(pre: Preprocess) -> str:
    """8 hex digits naming every field of ``pre``: the part of a third-party fingerprint its declaration adds."""
    canon = {"height": pre.height, "width": pre.width, "mean": [float(v) for v in pre.mean],
             "std": [float(v) for v in pre.std], "layout": pre.layout, "color": pre.color, "scale": float(pre.scale)}
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()[:8]


def declaration_metadata(pre: Preprocess) -> dict[str, str]:
    """``pre`` as ``metadata_props`` strings in the declaration keys (what :func:`resolve_preprocess` reads back)."""
    return {
        "input_height": str(pre.height),
        "input_width": str(pre.width),
        "mean": json.dumps(list(pre.mean)),
        "std": json.dumps(list(pre.std)),
        "color": pre.color,
        "input_scale": "1/255" if pre.scale == DEFAULT_SCALE else repr(float(pre.scale)),
        "layout": pre.layout,
    }


def legacy_preprocess(shape: Sequence[Any], metadata: Mapping[str, str]) -> Preprocess | None:
    """What reid-search fed a third-party graph before preprocessing could be declared (None: it refused the graph).

    NCHW, RGB, 0..1; the graph's fixed size, else ``input_height``/``input_width``
    metadata, else 256x128; ``mean``/``std`` metadata, else ImageNet's. A
    fingerprint stays the file's hash while the resolved preprocessing equals this.

    Raises:
        ModelError: a bad metadata value.
    """
    if len(shape) != 4 or _static(shape[1]) not in (None, 3):
        return None
    meta = parse_declaration(metadata, "metadata", "fix or remove it from metadata_props", strict=False)
    h = _static(shape[2]) or meta.get("height") or FALLBACK_SIZE[0]
    w = _static(shape[3]) or meta.get("width") or FALLBACK_SIZE[1]
    return Preprocess(h, w, meta.get("mean", IMAGENET_MEAN), meta.get("std", IMAGENET_STD))
