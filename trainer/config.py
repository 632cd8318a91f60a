"""The training configuration: one frozen dataclass and three named recipes.

The defaults reproduce the ``softmax_triplet_with_center`` recipe of Luo et al.,
"Bag of Tricks and A Strong Baseline for Deep Person Re-identification" (CVPRW
2019). The other recipes are small overrides of those defaults (:data:`RECIPES`),
so a recipe is always "the strong baseline minus some tricks".

The resolved config travels inside every checkpoint as a JSON-safe dict
(:func:`config_to_dict` / :func:`config_from_dict`), and a resume is refused
when the new config would not fit the saved weights or optimiser state
(:func:`compatibility_problems`).
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reid_search.errors import ReidSearchError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_RECIPE = "softmax_triplet_with_center"

ARCH_NECKS = ("bnneck", "none")
NECK_FEATS = ("after", "before")
OPTIMIZERS = ("adam", "adamw", "sgd")
AMP_MODES = ("auto", "bf16", "fp16", "off")


class ConfigError(ReidSearchError, ValueError):
    """A recipe name, override key or value that cannot make a valid :class:`TrainConfig`.

    A :class:`ReidSearchError`, so every CLI command prints it as one line; still
    a ``ValueError`` for callers that catch that.
    """


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (defaults: the full strong baseline)."""

    recipe: str = DEFAULT_RECIPE

    # model
    arch: str = "resnet50"
    pretrained: str = "none"  # "imagenet" | "none" | path of a torchvision state dict
    last_stride: int = 1
    neck: str = "bnneck"  # "bnneck" | "none"
    neck_feat: str = "after"  # retrieval feature: after the BNNeck or before it

    # input and augmentation
    height: int = 256
    width: int = 128
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    pad: int | None = None  # None: the paper's 10 px at 256x128, scaled to height x width
    flip_p: float = 0.5
    random_erasing_p: float = 0.5

    # optimiser and schedule (the schedule is stepped once per epoch)
    optimizer: str = "adam"
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    weight_decay_bias: float = 5e-4
    bias_lr_factor: float = 1.0
    momentum: float = 0.9  # SGD only
    epochs: int = 120
    warmup: bool = True
    warmup_epochs: int = 10
    warmup_factor: float = 0.01
    milestones: tuple[int, ...] = (40, 70)
    gamma: float = 0.1

    # batch: P identities x K instances (P is global across DDP ranks)
    num_identities: int = 16
    num_instances: int = 4

    # losses; a weight of 0 switches that loss off
    id_weight: float = 1.0
    label_smoothing: float = 0.1  # 0 = plain cross entropy
    triplet_weight: float = 1.0
    triplet_margin: float | None = 0.3  # None = soft margin (softplus)
    center_loss_weight: float = 5e-4
    center_lr: float = 0.5  # SGD on the centres, gradient rescaled by 1/center_loss_weight

    # runtime
    amp: str = "auto"  # "auto" | "bf16" | "fp16" | "off"
    channels_last: bool = True
    num_workers: int = 4
    seed: int = 0
    eval_period: int = 40
    save_period: int = 40
    log_period: int = 20
    eval_batch_size: int = 128
    max_steps_per_epoch: int | None = None  # cap on iterations per epoch (tests, smoke runs)

    def __post_init__(self) -> None:
        problems = validation_problems(self)
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    @property
    def batch_size(self) -> int:
        """Global batch size P*K."""
        return self.num_identities * self.num_instances

    @property
    def uses_triplet(self) -> bool:
        """Whether the batch-hard triplet loss is on."""
        return self.triplet_weight > 0

    @property
    def uses_center(self) -> bool:
        """Whether the center loss (and its centre parameters) is on."""
        return self.center_loss_weight > 0


# Each recipe is the strong baseline with some tricks removed; the default
# recipe is the empty override.
RECIPES: dict[str, dict[str, Any]] = {
    "baseline": {
        "last_stride": 2,
        "neck": "none",
        "warmup": False,
        "random_erasing_p": 0.0,
        "label_smoothing": 0.0,
        "center_loss_weight": 0.0,
    },
    "softmax_triplet": {"center_loss_weight": 0.0},
    "softmax_triplet_with_center": {},
}

FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig))
_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)

# Fields that define what the saved weights and optimiser state are; a resume
# with any of them changed would load state into a different model/problem.
_MUST_MATCH: tuple[str, ...] = ("arch", "neck", "last_stride", "height", "width", "mean", "std", "optimizer")


def validation_problems(cfg: TrainConfig) -> list[str]:
    """All the reasons ``cfg`` is invalid (empty when it is valid)."""
    p: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    need(cfg.recipe in RECIPES, f"recipe must be one of {', '.join(RECIPES)}, not {cfg.recipe!r}")
    need(bool(cfg.arch), "arch must not be empty")
    need(bool(cfg.pretrained), "pretrained must be 'imagenet', 'none' or a path")
    need(cfg.last_stride in (1, 2), f"last_stride must be 1 or 2, not {cfg.last_stride}")
    need(cfg.neck in ARCH_NECKS, f"neck must be one of {', '.join(ARCH_NECKS)}, not {cfg.neck!r}")
    need(cfg.neck_feat in NECK_FEATS, f"neck_feat must be one of {', '.join(NECK_FEATS)}, not {cfg.neck_feat!r}")
    need(cfg.height >= 1 and cfg.width >= 1, f"height and width must be >= 1, not {cfg.height}x{cfg.width}")
    need(len(cfg.mean) == 3, f"mean needs 3 values (RGB), got {len(cfg.mean)}")
    need(len(cfg.std) == 3 and all(s > 0 for s in cfg.std), f"std needs 3 positive values (RGB), got {cfg.std}")
    need(cfg.pad is None or cfg.pad >= 0, f"pad must be >= 0 or none (scaled to the input size), not {cfg.pad}")
    for name in ("flip_p", "random_erasing_p"):
        v = getattr(cfg, name)
        need(0.0 <= v <= 1.0, f"{name} is a probability and must be in [0, 1], not {v}")
    need(cfg.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {cfg.optimizer!r}")
    need(cfg.lr > 0, f"lr must be > 0, not {cfg.lr}")
    need(cfg.weight_decay >= 0 and cfg.weight_decay_bias >= 0, "weight_decay and weight_decay_bias must be >= 0")
    need(cfg.bias_lr_factor > 0, f"bias_lr_factor must be > 0, not {cfg.bias_lr_factor}")
    need(0.0 <= cfg.momentum < 1.0, f"momentum must be in [0, 1), not {cfg.momentum}")
    need(cfg.epochs >= 1, f"epochs must be >= 1, not {cfg.epochs}")
    need(cfg.warmup_epochs >= 0, f"warmup_epochs must be >= 0, not {cfg.warmup_epochs}")
    need(0.0 < cfg.warmup_factor <= 1.0, f"warmup_factor must be in (0, 1], not {cfg.warmup_factor}")
    need(
        all(m >= 1 for m in cfg.milestones) and all(a < b for a, b in zip(cfg.milestones, cfg.milestones[1:])),
        f"milestones must be strictly increasing epochs >= 1, not {cfg.milestones}",
    )
    need(0.0 < cfg.gamma <= 1.0, f"gamma must be in (0, 1], not {cfg.gamma}")
    need(cfg.num_instances >= 1, f"num_instances (K) must be >= 1, not {cfg.num_instances}")
    need(cfg.num_identities >= 1, f"num_identities (P) must be >= 1, not {cfg.num_identities}")
    if cfg.triplet_weight > 0:
        need(
            cfg.num_identities >= 2,
            f"the triplet loss needs negatives: num_identities (P) must be >= 2, not {cfg.num_identities}",
        )
    need(cfg.id_weight >= 0, f"id_weight must be >= 0, not {cfg.id_weight}")
    need(cfg.triplet_weight >= 0, f"triplet_weight must be >= 0, not {cfg.triplet_weight}")
    need(cfg.center_loss_weight >= 0, f"center_loss_weight must be >= 0, not {cfg.center_loss_weight}")
    need(cfg.id_weight > 0 or cfg.triplet_weight > 0, "at least one of id_weight and triplet_weight must be > 0")
    need(0.0 <= cfg.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), not {cfg.label_smoothing}")
    need(
        cfg.triplet_margin is None or cfg.triplet_margin >= 0,
        f"triplet_margin must be >= 0 or none (soft margin), not {cfg.triplet_margin}",
    )
    need(cfg.center_lr > 0, f"center_lr must be > 0, not {cfg.center_lr}")
    need(cfg.amp in AMP_MODES, f"amp must be one of {', '.join(AMP_MODES)}, not {cfg.amp!r}")
    need(cfg.num_workers >= 0, f"num_workers must be >= 0, not {cfg.num_workers}")
    need(cfg.seed >= 0, f"seed must be >= 0, not {cfg.seed}")
    for name in ("eval_period", "save_period", "log_period", "eval_batch_size"):
        v = getattr(cfg, name)
        need(v >= 1, f"{name} must be >= 1, not {v}")
    need(
        cfg.max_steps_per_epoch is None or cfg.max_steps_per_epoch >= 1,
        f"max_steps_per_epoch must be >= 1 or none, not {cfg.max_steps_per_epoch}",
    )
    return p


# ---------------------------------------------------------------- parsing

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
_NONE = {"none", "null", ""}


def _optional_inner(tp: Any) -> Any | None:
    """``X`` when ``tp`` is ``X | None``, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _coerce(tp: Any, value: Any) -> Any:
    """Convert ``value`` (a CLI string or a JSON/Python value) to type ``tp``.

    Raises ValueError/TypeError with a short reason on failure.
    """
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return _coerce(inner, value)
    if typing.get_origin(tp) is tuple:
        (elem, *rest) = typing.get_args(tp)
        if isinstance(value, str):
            s = value.strip().strip("()[]").strip()
            items: list[Any] = [x.strip() for x in s.split(",")] if s else []
            if items and items[-1] == "":  # "40," is a 1-tuple
                items.pop()
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise TypeError(f"expected a comma-separated list, got {type(value).__name__}")
        return tuple(_coerce(elem, x) for x in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            s = value.strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
        raise ValueError("expected true/false (also 1/0, yes/no, on/off)")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError("expected an integer, got a bool")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    if tp is float:
        if isinstance(value, bool):
            raise TypeError("expected a number, got a bool")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise TypeError(f"expected a number, got {type(value).__name__}")
    if tp is str:
        if isinstance(value, str):
            return value.strip()
        raise TypeError(f"expected a string, got {type(value).__name__}")
    raise TypeError(f"unsupported field type {tp!r}")  # pragma: no cover - guards new fields


def _type_name(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} or none"
    if typing.get_origin(tp) is tuple:
        return f"comma-separated {_type_name(typing.get_args(tp)[0])}s"
    return getattr(tp, "__name__", str(tp))


def _unknown_key(key: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(FIELD_NAMES))}")


def _parse_overrides(overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """``["k=v", ...]`` or a mapping -> ``{field: typed value}``; later keys win."""
    if isinstance(overrides, Mapping):
        pairs = list(overrides.items())
    elif isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of key=value strings, not the string {overrides!r}")
    else:
        pairs = []
        for item in overrides:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key, value = item.split("=", 1)
            pairs.append((key.strip(), value))
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key not in _FIELD_TYPES:
            raise _unknown_key(key)
        tp = _FIELD_TYPES[key]
        try:
            out[key] = _coerce(tp, value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot parse {key}={value!r} as {_type_name(tp)}: {e}") from None
    return out


def resolve_config(
    recipe: str = DEFAULT_RECIPE, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> TrainConfig:
    """Defaults, then the recipe's overrides, then the caller's ``overrides``.

    ``overrides`` is a list of ``"key=value"`` strings (values parsed into the
    field's type: bools as true/false/1/0/yes/no, tuples as ``"40,70"``,
    optional values as ``"none"``) or a mapping of keys to values.

    Raises:
        ConfigError: unknown recipe (lists the recipes), unknown key (lists the
            keys), a value that does not parse (names it), ``recipe`` given as an
            override, or an invalid resulting config (says which values).
    """
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
    parsed = _parse_overrides(overrides)
    if "recipe" in parsed:
        raise ConfigError("choose the recipe with the recipe argument, not as an override")
    values = {**RECIPES[recipe], **parsed, "recipe": recipe}
    return TrainConfig(**values)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """JSON-safe dict of every field (tuples become lists)."""
    out: dict[str, Any] = {}
    for name in FIELD_NAMES:
        v = getattr(cfg, name)
        out[name] = list(v) if isinstance(v, tuple) else v
    return out


def config_from_dict(d: Mapping[str, Any]) -> TrainConfig:
    """Inverse of :func:`config_to_dict`.

    Keys missing from ``d`` (an older checkpoint) take the value of ``d``'s
    recipe, so a partial dict means "that recipe with these changes".

    Raises:
        ConfigError: unknown recipe or key, unparseable or invalid value.
    """
    rest = dict(d)
    recipe = rest.pop("recipe", DEFAULT_RECIPE)
    if not isinstance(recipe, str):
        raise ConfigError(f"recipe must be a string, not {recipe!r}")
    return resolve_config(recipe, rest)


def compatibility_problems(old: TrainConfig, new: TrainConfig) -> list[str]:
    """Why a run saved with config ``old`` cannot be resumed with config ``new``.

    Architecture, neck, last stride, input size and normalisation must match
    (they define the weights and what they expect), as must the optimiser type
    (its state is restored) and whether the triplet and center losses are on
    (the recipe; center loss also owns parameters and an optimiser). Anything
    else (epochs, periods, workers, lr, ...) may change. Empty list = compatible.
    """
    problems = [
        f"{name}: checkpoint has {getattr(old, name)!r}, requested {getattr(new, name)!r}"
        for name in _MUST_MATCH
        if getattr(old, name) != getattr(new, name)
    ]
    for switch, weight in (("uses_triplet", "triplet_weight"), ("uses_center", "center_loss_weight")):
        if getattr(old, switch) != getattr(new, switch):
            problems.append(
                f"{weight}: checkpoint was trained with {weight}={getattr(old, weight)}, requested "
                f"{getattr(new, weight)} (this switches the loss {'off' if getattr(old, switch) else 'on'})"
            )
    return problems
