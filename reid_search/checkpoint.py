"""Checkpoints that carry their model description, preprocessing and config.

A checkpoint is a plain dict saved with ``torch.save`` and read with
``torch.load(weights_only=True)``::

    {"format": "reid-search/1",
     "model": state_dict,
     "meta": {"arch", "num_classes", "last_stride", "neck", "feat_dim",
              "preprocess": {...}, "fingerprint"},
     "config": {... resolved training config ...},
     "train_state": {... optimizers, scheduler, RNG, epoch ...}}   # optional
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from reid_search.atomic import atomic_write_bytes
from reid_search.errors import ModelError, first_line
from reid_search.model import ReIDNet, build_model, fingerprint_state
from reid_search.transforms import Preprocess

log = logging.getLogger(__name__)

FORMAT = "reid-search/1"


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to rebuild a model and feed it."""

    arch: str
    num_classes: int
    last_stride: int
    neck: str
    feat_dim: int
    preprocess: Preprocess
    fingerprint: str
    neck_feat: str = "after"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            "arch": self.arch, "num_classes": self.num_classes, "last_stride": self.last_stride,
            "neck": self.neck, "feat_dim": self.feat_dim, "preprocess": self.preprocess.to_dict(),
            "fingerprint": self.fingerprint, "neck_feat": self.neck_feat,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelMeta":
        """Inverse of :meth:`to_dict`."""
        return cls(
            str(d["arch"]), int(d["num_classes"]), int(d["last_stride"]), str(d["neck"]),
            int(d["feat_dim"]), Preprocess.from_dict(d["preprocess"]), str(d["fingerprint"]),
            str(d.get("neck_feat", "after")),
        )


def embedding_fingerprint(model: ReIDNet) -> str:
    """Hash of the weights that define the embedding (the classifier does not)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    # The pre-BN feature is another embedding of the same weights.
    return fingerprint_state(state) + ("-prebn" if model.neck_feat == "before" else "")


def model_meta(model: ReIDNet, preprocess: Preprocess) -> ModelMeta:
    """Describe ``model`` for a checkpoint."""
    return ModelMeta(
        model.arch, model.num_classes, model.last_stride, model.neck_type, model.feat_dim,
        preprocess, embedding_fingerprint(model), model.neck_feat,
    )


def _unwrap(model: torch.nn.Module) -> ReIDNet:
    inner = getattr(model, "module", model)  # DDP / compiled wrappers
    inner = getattr(inner, "_orig_mod", inner)
    if not isinstance(inner, ReIDNet):
        raise TypeError(f"expected a ReIDNet, got {type(inner).__name__}")
    return inner


def save_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    preprocess: Preprocess,
    *,
    config: Mapping[str, Any] | None = None,
    train_state: Mapping[str, Any] | None = None,
) -> ModelMeta:
    """Save ``model`` (and optionally the training state) atomically; return its meta."""
    net = _unwrap(model)
    meta = model_meta(net, preprocess)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "meta": meta.to_dict(),
        "config": dict(config or {}),
    }
    if train_state is not None:
        payload["train_state"] = dict(train_state)
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    log.info("saved checkpoint %s (fingerprint %s)", path, meta.fingerprint)
    return meta


def _weights_only_reason(exc: BaseException) -> str | None:
    """What a ``weights_only`` load objected to, without torch's advice; None for other errors."""
    text = str(exc)
    if not isinstance(exc, pickle.UnpicklingError) and "weights_only" not in text.lower().replace(" ", "_"):
        return None
    m = re.search(r"WeightsUnpickler error:\s*([^\n]*)", text)
    reason = m.group(1).strip() if m else ""
    # torch goes on with what to allowlist or how to load unsafely: keep only the objection
    reason = re.split(r"\.\s|;\s", reason, maxsplit=1)[0].rstrip(".")
    return reason or "not plain tensors and containers"


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the raw checkpoint dict with ``weights_only=True``.

    A file that holds arbitrary pickled objects is refused, never loaded unsafely.

    Raises:
        ModelError: missing, unreadable, unsafe (pickled objects) or not a reid-search checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no model at {path}: run `reid-search train` or pass --model CHECKPOINT")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = _weights_only_reason(exc)
        if reason is not None and "global" in reason.lower():
            raise ModelError(
                f"refusing {path}: it holds pickled Python objects ({reason}), which are not loaded for safety; "
                f"use a checkpoint written by `reid-search train`"
            ) from None
        detail = reason if reason is not None else first_line(exc)
        raise ModelError(f"cannot read {path} as a checkpoint ({detail}); is it a reid-search .pt file?") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ModelError(f"{path} is not a reid-search checkpoint (format {FORMAT}); train one with `reid-search train`")
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("meta"), dict):
        missing = "model" if not isinstance(ckpt.get("model"), dict) else "meta"
        raise ModelError(f"{path} is a damaged checkpoint: its '{missing}' entry is missing or not a dict; "
                         f"use another checkpoint or retrain with `reid-search train`")
    return ckpt


def checkpoint_meta(ckpt: Mapping[str, Any], path: str | os.PathLike[str]) -> ModelMeta:
    """The :class:`ModelMeta` of a :func:`read_checkpoint` dict.

    Raises:
        ModelError: a missing, mistyped or inconsistent ``meta`` entry (named).
    """
    d = ckpt.get("meta")
    try:
        if not isinstance(d, Mapping):
            raise TypeError(f"meta is {type(d).__name__}, not a dict")
        meta = ModelMeta.from_dict(d)
        if meta.num_classes < 0 or meta.feat_dim < 1 or meta.last_stride not in (1, 2):
            raise ValueError(f"num_classes={meta.num_classes}, feat_dim={meta.feat_dim}, last_stride={meta.last_stride}")
        pre = meta.preprocess
        if pre.height < 1 or pre.width < 1 or len(pre.mean) != 3 or len(pre.std) != 3:
            raise ValueError(f"preprocess {pre.to_dict()}")
    except KeyError as exc:
        raise ModelError(f"{path} is a damaged checkpoint: its meta lacks {exc}; use another checkpoint or retrain "
                         f"with `reid-search train`") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"{path} is a damaged checkpoint: bad meta ({first_line(exc, with_type=False)}); use another checkpoint "
                         f"or retrain with `reid-search train`") from None
    return meta


def load_model(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> tuple[ReIDNet, ModelMeta, dict[str, Any]]:
    """Rebuild the model of a checkpoint in eval mode.

    Returns ``(model, meta, config)``.

    Raises:
        ModelError: see :func:`read_checkpoint` and :func:`checkpoint_meta`, or
            weights that do not fit the described model.
    """
    ckpt = read_checkpoint(path)
    meta = checkpoint_meta(ckpt, path)
    try:
        model = build_model(meta.arch, meta.num_classes, meta.last_stride, meta.neck, "none", meta.neck_feat)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path} is a damaged checkpoint: its meta describes no buildable model "
                         f"({first_line(exc, with_type=False)}); use another checkpoint") from None
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ModelError(f"{path}: weights do not match the model they describe ({first_line(exc, with_type=False)})") from None
    model.eval().to(device)
    config = ckpt.get("config", {})
    return model, meta, dict(config) if isinstance(config, Mapping) else {}
