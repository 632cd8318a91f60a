"""The extractor factory: a model file (``.pt`` checkpoint or ``.onnx`` graph) → an :class:`Extractor`.

The factory imports the implementations; no implementation imports the factory
(timm's ``_factory.py`` shape), so :mod:`reid_search.extract` (streaming),
:mod:`reid_search.torch_extractor` and :mod:`reid_search.onnx_model` stay free
of each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from reid_search.checkpoint import load_model
from reid_search.errors import ModelError
from reid_search.extract import Extractor
from reid_search.precision import choose_precision, validate_precision
from reid_search.torch_extractor import TorchExtractor, resolve_device
from reid_search.transforms import Preprocess


def load_extractor(
    model_path: str | os.PathLike[str],
    device: str | None = "auto",
    flip: bool = False,
    precision: str = "auto",
    compile: str = "auto",
    preprocess: Preprocess | Mapping[str, Any] | None = None,
) -> Extractor:
    """Open a checkpoint (``.pt``) or an ONNX file (``.onnx``) as an :class:`Extractor`.

    ``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``) applies to checkpoints;
    an ONNX graph's precision was fixed when it was exported, so it takes
    ``auto`` or ``fp32`` only. ``compile``: see :class:`TorchExtractor`.
    ``preprocess`` declares what an ONNX graph expects (see
    :class:`reid_search.onnx_model.OnnxExtractor`); a checkpoint carries its own.

    Raises:
        ModelError: the file is missing, unreadable or of an unknown kind, an
            unknown precision, bf16/fp16 asked of an ONNX file, a bad or
            contradictory ``preprocess``, or ``preprocess`` given for a checkpoint.
    """
    precision = validate_precision(precision)
    path = Path(model_path)
    if path.suffix.lower() != ".onnx" and preprocess is not None:
        raise ModelError(f"{path.name} is a checkpoint, which carries its own preprocessing; --input-layout, "
                         "--input-color, --input-scale, --input-mean, --input-std and --input-size apply to ONNX "
                         "models only: drop them")
    if path.suffix.lower() == ".onnx":
        if precision not in ("auto", "fp32"):
            raise ModelError(f"--precision {precision} does not apply to the ONNX model {path.name}: its precision was "
                             "fixed by `reid-search export` (--fp16, --int8); pass --precision auto")
        try:
            from reid_search.onnx_model import OnnxExtractor
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ModelError(f"cannot run ONNX models here ({exc}); install onnxruntime") from None
        return OnnxExtractor(path, device=device, flip=flip, preprocess=preprocess)
    # The CPU-fallback line names the precision the CPU will run (auto: bf16 on AVX512_BF16/AMX).
    dev = resolve_device(device, f"in {choose_precision(precision, 'cpu')}")
    model, meta, _ = load_model(path, dev)
    return TorchExtractor(model, meta.preprocess, meta.fingerprint, dev, flip=flip, precision=precision, compile=compile)
