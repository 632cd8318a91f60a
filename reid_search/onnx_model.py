"""ONNX export of reid-search checkpoints and an ONNX Runtime feature extractor.

Exported graphs map a normalised image batch ``images`` ``[B, 3, H, W]``
(float32) to the retrieval feature ``features`` ``[B, D]`` (float32), **not**
L2-normalised: flip TTA sums the raw features of both views before
normalising, exactly as :class:`reid_search.extract.TorchExtractor` does, and
third-party ReID graphs (OSNet, fast-reid exports) return raw features too.
The extractor always normalises.

What a graph expects is written into the model's ``metadata_props`` (all
values are strings; ``mean``/``std`` are JSON lists; exports before ``layout``
was written are NCHW all the same)::

    producer=reid-search  format=reid-search-onnx/1  producer_version
    arch  neck  last_stride  feature_dim  fingerprint
    input_height  input_width  mean  std  color=RGB  input_scale=1/255  layout=NCHW
    output_normalized=false  precision=fp32|fp16  batch=dynamic|N

:class:`OnnxExtractor` also runs third-party files, NCHW or NHWC, whose
preprocessing (layout, channel order, scale, mean, std, input size) is
declared by ``metadata_props``, a sidecar ``MODEL.onnx.json`` or the caller,
or read off the graph's shape where that is unambiguous: the keys and rules
are in :mod:`reid_search.preprocess`. A fixed batch dimension is handled by
splitting and padding.

Fingerprints. An export keeps its checkpoint's fingerprint: its features
equal PyTorch's to a cosine ≥ 0.9999 (checked at export), so a gallery indexed
with the ``.pt`` can be queried with the ``.onnx`` and vice versa, just as the
CUDA extractor (autocast fp16) shares the fingerprint of the CPU one. fp16
exports share it for the same reason. A third-party file gets
``onnx:`` + the first 16 hex digits of the sha256 of its bytes, and, when its
preprocessing is not what reid-search assumed before it could be declared
(:func:`reid_search.preprocess.legacy_preprocess`), ``+pre-`` + 8 hex digits
of that preprocessing: a gallery indexed with BGR is not queried with RGB.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from reid_search import __version__
from reid_search.atomic import atomic_write_bytes
from reid_search.checkpoint import ModelMeta, load_model
from reid_search.devices import cpu_fallback, cuda_visible, device_from_name
from reid_search.errors import DataError, ModelError, first_line
from reid_search.images import ImageLoadError, load_image
from reid_search.limits import DEFAULT_OPSET, MIN_OPSET, VERIFY_MAX_IMAGES
from reid_search.preprocess import declaration_metadata, legacy_preprocess, preprocess_tag, read_sidecar, resolve_preprocess
from reid_search.transforms import Preprocess, build_eval_transform

log = logging.getLogger(__name__)

PRODUCER = "reid-search"
EXPORT_FORMAT = "reid-search-onnx/1"
INPUT_NAME = "images"
OUTPUT_NAME = "features"
# fp32: ONNX Runtime and PyTorch differ only by kernel rounding (~1e-7 in
# cosine). fp16 weights and activations drift more (~1e-5..1e-4 on trained
# ResNets), so their bar is lower.
MIN_COSINE_FP32 = 0.9999
MIN_COSINE_FP16 = 0.999
_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"
_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how well it matched PyTorch."""

    path: Path
    size_bytes: int
    opset: int
    batch: int | None  # None: dynamic batch dimension
    fp16: bool
    metadata: dict[str, str] = field(default_factory=dict)
    verified_images: int = 0
    min_cosine: float | None = None  # None: not verified
    threshold: float | None = None


# ---------------------------------------------------------------------------
# export


class _FeatureGraph(nn.Module):
    """What is exported: float32 image batch → float32 retrieval feature (not normalised)."""

    def __init__(self, net: nn.Module, half: bool) -> None:
        super().__init__()
        self.net, self.half = net, half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.half:
            # Casts inside the graph keep the I/O float32, so callers need not care.
            return self.net(x.to(torch.float16)).float()
        return self.net(x)


def export_metadata(meta: ModelMeta, *, fp16: bool, batch: int | None) -> dict[str, str]:
    """The ``metadata_props`` written into an export of a model described by ``meta``."""
    pre = meta.preprocess
    return {
        "producer": PRODUCER,
        "producer_version": __version__,
        "format": EXPORT_FORMAT,
        "arch": meta.arch,
        "neck": meta.neck,
        "last_stride": str(meta.last_stride),
        "feature_dim": str(meta.feat_dim),
        "fingerprint": meta.fingerprint,
        **declaration_metadata(pre),
        "layout": "NCHW",  # what torch.onnx traces
        "output_normalized": "false",
        "precision": "fp16" if fp16 else "fp32",
        "batch": "dynamic" if batch is None else str(batch),
    }


def export_onnx(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    fixed_batch: int | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    verify_images: Sequence[str | os.PathLike[str]] | None = None,
) -> ExportReport:
    """Export a checkpoint's eval-mode model to ONNX, check it against PyTorch, write it atomically.

    Args:
        checkpoint: a reid-search ``.pt`` checkpoint.
        out: the ``.onnx`` file to write (replaced only when the export passes).
        dynamic_batch: symbolic batch dimension; ``False`` fixes it to 1.
        fixed_batch: fix the batch dimension to this size (overrides ``dynamic_batch``).
        fp16: float16 weights and compute, float32 input and output.
        opset: ONNX opset, at least :data:`MIN_OPSET`.
        verify: run ONNX Runtime (CPU) and PyTorch (CPU, fp32) on the same images
            and require a per-image cosine ≥ 0.9999 (fp32) or ≥ 0.999 (fp16).
        verify_images: images to verify on (at most :data:`VERIFY_MAX_IMAGES`
            are used); ``None`` generates seeded synthetic crops.

    Raises:
        ModelError: unreadable checkpoint, unsupported opset/batch, export
            failure, or ONNX Runtime features that do not match PyTorch's.
        DataError: none of ``verify_images`` can be read.
    """
    if opset < MIN_OPSET:
        raise ModelError(f"opset {opset} is not supported: the exporter writes opset {MIN_OPSET} or newer; pass --opset {MIN_OPSET}")
    if fixed_batch is not None and fixed_batch < 1:
        raise ModelError(f"fixed batch size must be at least 1, not {fixed_batch}")
    batch = fixed_batch if fixed_batch is not None else (None if dynamic_batch else 1)
    model, meta, _ = load_model(checkpoint, "cpu")
    graph = _FeatureGraph(copy.deepcopy(model).half() if fp16 else model, fp16).eval()
    pre = meta.preprocess
    # torch.export specialises dimensions of size 0 and 1, so a dynamic batch is traced with 2.
    example = torch.randn(batch or 2, 3, pre.height, pre.width)
    dynamic_shapes = None if batch is not None else ({0: torch.export.Dim("batch", min=1)},)
    log.info("exporting %s (%s) to ONNX opset %d, batch %s, %s", checkpoint, meta.arch, opset,
             batch or "dynamic", "fp16" if fp16 else "fp32")
    try:
        program = torch.onnx.export(
            graph, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes, verbose=False, optimize=True,
        )
        proto = program.model_proto
    except Exception as exc:
        raise ModelError(f"ONNX export of {checkpoint} failed ({first_line(exc)}); "
                         "try the default --opset, or report the error with -vv output") from None
    metadata = export_metadata(meta, fp16=fp16, batch=batch)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"reid-search {meta.arch} feature extractor; see metadata_props"
    try:
        data = proto.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GiB limit
        raise ModelError(f"the ONNX model is too large to serialise in one file ({exc})") from None

    min_cos: float | None = None
    threshold: float | None = None
    n_checked = 0
    if verify:
        threshold = MIN_COSINE_FP16 if fp16 else MIN_COSINE_FP32
        x = _verification_batch(pre, verify_images)
        n_checked = x.shape[0]
        extractor = OnnxExtractor._from_bytes(data, f"{Path(out).name} (in memory)", device="cpu")
        if extractor.preprocess != pre or extractor.dim != meta.feat_dim or extractor.fingerprint != meta.fingerprint:
            raise ModelError(f"the exported graph does not describe itself like its checkpoint "
                             f"({extractor.preprocess}, dim {extractor.dim}); this is a bug in reid-search")
        with torch.inference_mode():
            ref = model(x).float().numpy()
        got = extractor.raw_features(x)
        min_cos = float(_rowwise_cosine(ref, got).min())
        log.info("ONNX Runtime vs PyTorch on %d images: min cosine %.7f", n_checked, min_cos)
        if not min_cos >= threshold:  # also catches NaN
            hint = " (fp16 overflow? export without --fp16)" if fp16 else ""
            raise ModelError(f"ONNX Runtime features differ from PyTorch's: min cosine {min_cos:.6f} < {threshold} "
                             f"over {n_checked} images{hint}; {out} was not written")
    atomic_write_bytes(out, data)
    log.info("wrote %s (%d bytes)", out, len(data))
    return ExportReport(Path(out), len(data), opset, batch, fp16, metadata, n_checked, min_cos, threshold)


def _verification_batch(pre: Preprocess, paths: Sequence[str | os.PathLike[str]] | None) -> torch.Tensor:
    transform = build_eval_transform(pre)
    if paths is None:
        images = synthetic_crops(8)
    else:
        images = []
        for p in list(paths):
            if len(images) == VERIFY_MAX_IMAGES:
                break
            try:
                images.append(load_image(p))
            except ImageLoadError as exc:
                log.warning("verification skips %s: %s", p, exc.detail)
        if not images:
            raise DataError("no readable images to verify the export on; pass a folder of crops (--verify-dir) or --no-verify")
    return torch.stack([transform(im) for im in images])


def synthetic_crops(n: int, seed: int = 0, size: tuple[int, int] = (64, 128)) -> list[Image.Image]:
    """``n`` seeded pedestrian-sized RGB images: smooth colour fields, a few blocks, mild noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(n):
        base = rng.uniform(0, 255, 3) + rng.uniform(-1, 1, 3) * yy[..., None] + rng.uniform(-1, 1, 3) * xx[..., None]
        for _ in range(3):
            y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
            base[y0 : y0 + rng.integers(8, h // 2), x0 : x0 + rng.integers(8, w // 2)] = rng.uniform(0, 255, 3)
        base += rng.normal(0, 8, base.shape)
        out.append(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB"))
    return out


def _rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


# ---------------------------------------------------------------------------
# ONNX Runtime extractor


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelError(f"cannot run ONNX models here ({exc}); install onnxruntime (or onnxruntime-gpu)") from None
    return onnxruntime


def select_providers(device: str | None) -> tuple[list[Any], torch.device]:
    """ONNX Runtime execution providers for ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    The device is chosen as for PyTorch extraction
    (:func:`reid_search.devices.device_from_name`); ``auto`` also stays on the
    CPU, with a warning, where a GPU is visible but this onnxruntime has no CUDA provider.

    Raises:
        ModelError: an unknown device, CUDA asked for where no GPU is visible,
            or CUDA asked for and this onnxruntime has no CUDA provider.
    """
    has_cuda = _CUDA_EP in _ort().get_available_providers()
    if device in (None, "auto") and not has_cuda and cuda_visible():
        cpu_fallback("ONNX Runtime", "(CPUExecutionProvider)",
                     "this onnxruntime has no CUDA provider (the cpu variant is installed)", logging.WARNING)
        dev = torch.device("cpu")
    else:
        dev = device_from_name(device, "ONNX Runtime", "(CPUExecutionProvider)")
    if dev.type == "cpu":
        return [_CPU_EP], dev
    if not has_cuda:
        raise ModelError(f"--device {device}: this onnxruntime has no CUDA execution provider "
                         "(install onnxruntime-gpu); use --device cpu or auto")
    index = dev.index or 0
    return [(_CUDA_EP, {"device_id": index}), _CPU_EP], torch.device("cuda", index)


def _static(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """``onnx:`` + 16 hex digits of the sha256 of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "onnx:" + h.hexdigest()[:16]


class OnnxExtractor:
    """An :class:`reid_search.extract.Extractor` backed by an ONNX Runtime session.

    Attributes beyond the protocol: ``path``, ``metadata`` (the file's
    ``metadata_props``), ``input_name``, ``batch`` (the fixed batch size or
    ``None``), ``providers`` (those the session actually uses).
    """

    def __init__(self, path: str | os.PathLike[str], device: str | None = "auto", flip: bool = False,
                 preprocess: Preprocess | Mapping[str, Any] | None = None) -> None:
        """Open ``path`` (``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``).

        ``preprocess`` declares what the graph expects where neither its
        metadata nor its sidecar ``MODEL.onnx.json`` does: a full
        :class:`Preprocess` (e.g. remembered with a gallery) or some of the
        keys of :mod:`reid_search.preprocess` (e.g. from options).

        Raises:
            ModelError: missing or unreadable file, not an ONNX model, a graph
                that does not take one ``[B, 3, H, W]`` or ``[B, H, W, 3]`` float
                image batch or does not return ``[B, D]`` features, a bad or
                contradictory sidecar/metadata/``preprocess`` declaration, an
                undeclared preprocessing that cannot be inferred, or CUDA asked
                for and unavailable.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"no ONNX model at {path}: pass an existing .onnx file, or write one with `reid-search export`")
        try:
            fingerprint = file_fingerprint(path)
        except OSError as exc:
            raise ModelError(f"cannot read {path}: {exc.strerror}") from None
        self._setup(str(path), path, fingerprint, device, flip, read_sidecar(path), preprocess)

    @classmethod
    def _from_bytes(cls, data: bytes, name: str, device: str | None = "cpu", flip: bool = False) -> "OnnxExtractor":
        """An extractor for a serialised model not (yet) on disk."""
        self = cls.__new__(cls)
        self._setup(data, Path(name), "onnx:" + hashlib.sha256(data).hexdigest()[:16], device, flip)
        return self

    def _setup(self, model: str | bytes, path: Path, file_fp: str, device: str | None, flip: bool,
               sidecar: tuple[Path, dict[str, Any]] | None = None,
               declared: Preprocess | Mapping[str, Any] | None = None) -> None:
        ort = _ort()
        providers, self.device = select_providers(device)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # ORT's own warnings (unused initialisers...) are not the user's concern
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        except Exception as exc:
            detail = first_line(exc, with_type=False)[:200]
            raise ModelError(f"cannot load {path} as an ONNX model ({detail}); "
                             "is it an .onnx file? Re-export it with `reid-search export`") from None
        self.providers = self.session.get_providers()
        if self.device.type == "cuda" and _CUDA_EP not in self.providers:
            # ORT falls back silently when the CUDA libraries do not load.
            if device in (None, "auto"):
                log.warning("ONNX Runtime could not start its CUDA provider; running %s on CPU", path.name)
                self.device = torch.device("cpu")
            else:
                raise ModelError(f"--device {device}: ONNX Runtime could not start its CUDA provider (CUDA/cuDNN libraries?); use --device cpu")
        self.path, self.flip = path, flip
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        ours = self.metadata.get("producer") == PRODUCER

        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise ModelError(f"{path} takes {len(inputs)} inputs ({names}); reid-search feeds one image batch [B, 3, H, W] or [B, H, W, 3]")
        inp = inputs[0]
        shape = list(inp.shape or [])
        if len(shape) != 4:
            raise ModelError(f"{path}: input {inp.name!r} has shape {shape}; a ReID model must take a 4-D image batch "
                             "[B, 3, H, W] or [B, H, W, 3]")
        if inp.type not in _INPUT_DTYPES:
            raise ModelError(f"{path}: input {inp.name!r} is {inp.type}; reid-search feeds float32 or float16 images")
        self.input_name, self._in_dtype = inp.name, _INPUT_DTYPES[inp.type]
        self.batch: int | None = _static(shape[0])

        outputs = self.session.get_outputs()
        if len(outputs) > 1:
            log.info("%s has %d outputs; using the first, %r", path.name, len(outputs), outputs[0].name)
        self.output_name = outputs[0].name
        self.output_normalized = self.metadata.get("output_normalized", "false").lower() == "true"

        resolved = resolve_preprocess(shape, str(path), metadata=self.metadata, sidecar=sidecar, explicit=declared, ours=ours)
        self.preprocess = resolved.preprocess
        log.info("%s preprocessing: %s", path.name, resolved.describe())
        self.dim = self._feature_dim(outputs[0].shape, path)
        if ours and self.metadata.get("fingerprint"):
            base_fp = self.metadata["fingerprint"]
        elif self.preprocess == legacy_preprocess(shape, self.metadata):
            base_fp = file_fp  # what this file's fingerprint always was
        else:
            base_fp = f"{file_fp}+pre-{preprocess_tag(self.preprocess)}"
        # Flip TTA changes the embedding, so it is part of the fingerprint.
        self.fingerprint = base_fp + ("+flip" if flip else "")
        what = self.metadata.get("arch", path.name) if ours else path.name
        ep = "CUDA" if _CUDA_EP in self.providers else "CPU"
        self.description = f"ONNX {what} ({'flip TTA, ' if flip else ''}onnxruntime {ep})"

    def _feature_dim(self, out_shape: Sequence[Any] | None, path: Path) -> int:
        dims = list(out_shape or [])[1:]
        if dims and all(_static(d) for d in dims):
            dim = int(np.prod(dims))
        else:  # symbolic feature dimensions: ask the graph
            probe = torch.zeros(1, 3, self.preprocess.height, self.preprocess.width)
            dim = self.raw_features(probe).shape[1]
        if dim < 1:
            raise ModelError(f"{path}: the output {self.output_name!r} is empty; not a feature extractor")
        declared = self.metadata.get("feature_dim")
        if declared is not None and declared != str(dim):
            log.warning("%s: metadata feature_dim=%s but the graph returns %d", path.name, declared, dim)
        return dim

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            out = self.session.run([self.output_name], {self.input_name: x})[0]
        except Exception as exc:
            raise ModelError(f"{self.path}: ONNX Runtime failed on a {list(x.shape)} batch ({first_line(exc, with_type=False)[:200]})") from None
        if out.ndim < 2 or out.shape[0] != x.shape[0]:
            raise ModelError(f"{self.path}: output {self.output_name!r} has shape {list(out.shape)} for {x.shape[0]} images; "
                             "expected [B, D] features")
        return out.reshape(out.shape[0], -1)

    def raw_features(self, batch: torch.Tensor) -> np.ndarray:
        """The graph's output for a normalised ``[B, 3, H, W]`` batch, float32, not normalised.

        An NHWC graph gets the batch transposed to ``[B, H, W, 3]``. A fixed
        batch dimension ``N`` is served in chunks of ``N``, the last padded with zeros.

        Raises:
            ModelError: ONNX Runtime fails or returns something that is not ``[B, D]``.
        """
        x = batch.detach().to("cpu", torch.float32).numpy()
        if self.preprocess.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        x = np.ascontiguousarray(x, dtype=self._in_dtype)
        n = x.shape[0]
        if n == 0:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        if self.batch is None or n == self.batch:
            return self._run(x).astype(np.float32, copy=False)
        parts = []
        for start in range(0, n, self.batch):
            chunk = x[start : start + self.batch]
            k = chunk.shape[0]
            if k < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - k, *chunk.shape[1:]), chunk.dtype)])
            parts.append(self._run(chunk)[:k])
        return np.concatenate(parts).astype(np.float32, copy=False)

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """``[B, 3, H, W]`` normalised images → ``[B, dim]`` float32, unit L2 norm.

        Raises:
            ModelError: see :meth:`raw_features`.
        """
        f = self.raw_features(batch).astype(np.float32)
        if self.flip:
            f = f + self.raw_features(torch.flip(batch, dims=[3]))
        norms = np.linalg.norm(f, axis=1, keepdims=True)
        return (f / np.maximum(norms, 1e-12)).astype(np.float32)
