"""int8 ONNX export: static quantisation calibrated on real crops, checked before it is written.

``export_int8`` turns a checkpoint (or an fp32 ONNX file) into an ONNX graph
with int8 per-channel weights and uint8 activations in QDQ form, which ONNX
Runtime runs with integer (VNNI) kernels on CPU. Activation ranges come from
running the fp32 graph on calibration crops (min/max, or a percentile of the
histogram). The convolutions are quantised; the head after the last one
(pooling, neck, embedding) stays in float (:func:`head_nodes`).

Before anything is written, the int8 graph is compared with the fp32 one on
check images that were *not* used for calibration:

* the per-image cosine of the features must reach ``min_cosine``;
* when the check images carry Market names (pid/camid), rank-1 and mAP of the
  int8 features may fall at most ``max_metric_drop`` points below fp32's (rank-1
  also by one query, since n check queries move it in steps of 100/n points and a
  single query that changes its top hit is noise, not evidence of loss):
  query/ against bounding_box_test/ for a Market root, else every image
  against the others (same-camera matches excluded, as in the protocol).

A graph that falls short is refused (:class:`ModelError`, nothing written).
The int8 file keeps its model's fingerprint, as fp16 exports do: the check
above is what licenses answering an fp32 gallery with int8 queries.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from reid_search.atomic import atomic_write_bytes
from reid_search.data import GALLERY_DIR, QUERY_DIR, TRAIN_DIR, ImageRecord, has_identity_labels, list_images
from reid_search.errors import DataError, ModelError, first_line
from reid_search.images import ImageLoadError, load_image
from reid_search.extract import extract_features
from reid_search.limits import DEFAULT_OPSET
from reid_search.metrics import evaluate
from reid_search.onnx_model import PRODUCER, OnnxExtractor, export_onnx
from reid_search.transforms import Preprocess, build_eval_transform

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_CALIBRATION_IMAGES = 256
DEFAULT_CHECK_IMAGES = 1000
# Static int8 ResNets keep a cosine of ~0.99-0.998 to fp32 on real crops; a
# calibration that does not resemble the data (blank frames, another domain)
# drops well below.
DEFAULT_MIN_COSINE = 0.98
DEFAULT_MAX_METRIC_DROP = 0.5  # points of rank-1 and of mAP
CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class MetricCheck:
    """Rank-1 and mAP (in %) of fp32 and int8 features on the same labelled images."""

    protocol: str  # "query/ vs bounding_box_test/" or "each image vs the others"
    num_query: int
    rank1_fp32: float
    rank1_int8: float
    map_fp32: float
    map_int8: float

    @property
    def worst_drop(self) -> float:
        """The larger of the rank-1 and mAP drops, in points (negative: int8 did better)."""
        return max(self.rank1_fp32 - self.rank1_int8, self.map_fp32 - self.map_int8)

    @property
    def rank1_step(self) -> float:
        """Points of rank-1 that one query is worth (100 / ``num_query``)."""
        return 100.0 / self.num_query if self.num_query > 0 else 0.0

    def exceeds(self, max_drop: float) -> bool:
        """Whether int8 falls short: mAP drops by more than ``max_drop`` points, or rank-1
        by more than ``max_drop`` and by more than one query (a NaN drop falls short)."""
        rank1_drop = self.rank1_fp32 - self.rank1_int8
        map_drop = self.map_fp32 - self.map_int8
        rank1_allowed = max(max_drop, self.rank1_step * (1 + 1e-9))
        return not (map_drop <= max_drop and rank1_drop <= rank1_allowed)


@dataclass(frozen=True)
class Int8Report:
    """What :func:`export_int8` wrote and how it compared with fp32."""

    path: Path
    size_bytes: int
    fp32_size_bytes: int
    method: str
    calibration_images: int
    calibration_seconds: float
    check_images: int
    min_cosine: float
    mean_cosine: float
    min_cosine_required: float
    metrics: MetricCheck | None
    max_metric_drop: float
    metadata: dict[str, str] = field(default_factory=dict)


def _ort_quant():
    try:
        from onnxruntime import quantization
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelError(f"int8 export needs onnxruntime's quantisation tools ({exc}); install onnxruntime") from None
    return quantization


def _spread(items: Sequence[ImageRecord], n: int) -> list[ImageRecord]:
    """``n`` items spread evenly over ``items`` (deterministic: the same folder gives the same set)."""
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


def split_images(
    calibrate: Path, check: Path | None, calibration_images: int, check_images: int
) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord] | None, str]:
    """Choose calibration crops and check crops.

    Returns ``(calibration, check_queries, check_gallery, protocol)``;
    ``check_gallery`` is ``None`` when every check image is queried against the others.
    A Market root calibrates on ``bounding_box_train/`` and checks on ``query/``
    against ``bounding_box_test/``; a plain folder is split, calibration images
    never being checked.

    Raises:
        DataError: missing folders, or too few images to calibrate and check.
    """
    calibrate = Path(calibrate)
    if not calibrate.is_dir():
        raise DataError(f"--calibrate {calibrate}: no such folder; pass a folder of person crops like the ones you will index")
    market = (calibrate / TRAIN_DIR).is_dir()
    pool = list_images(calibrate / TRAIN_DIR if market else calibrate)
    check_root = check if check is not None else (calibrate if market else None)
    if check_root is not None and not Path(check_root).is_dir():
        raise DataError(f"--check {check_root}: no such folder; pass a Market root or a folder of named crops")
    if check_root is not None and (Path(check_root) / QUERY_DIR).is_dir() and (Path(check_root) / GALLERY_DIR).is_dir():
        calib = _spread(pool, calibration_images)
        queries = list_images(Path(check_root) / QUERY_DIR, recursive=False)
        gallery = list_images(Path(check_root) / GALLERY_DIR, recursive=False)
        if len(queries) + len(gallery) > check_images:
            share = len(queries) / (len(queries) + len(gallery))
            nq = max(1, round(check_images * share))
            queries, gallery = _spread(queries, nq), _spread(gallery, max(1, check_images - nq))
        return calib, queries, gallery, f"{QUERY_DIR}/ vs {GALLERY_DIR}/"
    if check_root is not None:
        calib = _spread(pool, calibration_images)
        taken = {r.path for r in calib}
        checks = [r for r in list_images(check_root) if r.path not in taken]
    else:
        if len(pool) < 4:
            raise DataError(f"--calibrate {calibrate} holds {len(pool)} images; calibrating and checking needs at least 4 "
                            "(a few hundred is better)")
        # Alternate images between calibration and check until calibration is full.
        calib = _spread(pool[::2], calibration_images)
        taken = {r.path for r in calib}
        checks = [r for r in pool if r.path not in taken]
    if not checks:
        raise DataError("no check images left after calibration; pass --check FOLDER or fewer --calibration-images")
    return calib, _spread(checks, check_images), None, "each image vs the others"


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over decoded crops (``get_next`` → feed dict or None)."""

    def __init__(self, paths: Sequence[Path], pre: Preprocess, input_name: str, batch: int | None,
                 progress: Callable[[int], None] | None) -> None:
        self.paths, self.input_name, self.progress = list(paths), input_name, progress
        self.batch = batch or CALIBRATION_BATCH
        self.transform = build_eval_transform(pre)
        self._it: Iterator[dict[str, np.ndarray]] = self._gen()
        self.used = 0

    def _gen(self) -> Iterator[dict[str, np.ndarray]]:
        buf: list[torch.Tensor] = []
        for p in self.paths:
            try:
                buf.append(self.transform(load_image(p)))
            except ImageLoadError as exc:
                log.warning("calibration skips %s: %s", p, exc.detail)
                continue
            if len(buf) == self.batch:
                yield self._feed(buf)
                buf = []
        if buf and self.batch == CALIBRATION_BATCH:  # a fixed-batch graph takes only full batches
            yield self._feed(buf)

    def _feed(self, buf: list[torch.Tensor]) -> dict[str, np.ndarray]:
        self.used += len(buf)
        if self.progress is not None:
            self.progress(len(buf))
        return {self.input_name: torch.stack(buf).numpy().astype(np.float32)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._gen()


def head_nodes(path: Path) -> list[str]:
    """Names of the nodes after the graph's last convolution: the head, kept in float.

    After the last convolution come the pooling, the neck (BNNeck's BatchNorm,
    OSNet's fc layers) and the output. Quantised, the pooled feature and the
    embedding itself would each be rounded to 256 levels of one per-tensor
    scale, which is where most of int8's error lands (the embedding's channels
    differ in scale; retrieval compares all 2048 of them). In float they cost
    a few thousand multiply-adds per image against ~10^9 in the convolutions.
    """
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node  # ONNX graphs are topologically sorted
    last = max((i for i, n in enumerate(nodes) if n.op_type in ("Conv", "ConvInteger", "QLinearConv")), default=-1)
    return [n.name for n in nodes[last + 1:] if n.name]


def quantize_graph(
    fp32_path: Path, out_path: Path, calibration: Sequence[Path], *, method: str = "minmax",
    progress: Callable[[int], None] | None = None,
) -> tuple[int, float]:
    """Statically quantise the ONNX file ``fp32_path`` into ``out_path`` (not atomic: a scratch file).

    QDQ format, int8 symmetric per-channel weights, uint8 activations with
    ranges from ``calibration``. Returns ``(images used, seconds)``.

    Raises:
        ModelError: unknown method, or ONNX Runtime's quantiser fails.
        DataError: no calibration image could be read.
    """
    if method not in CALIBRATION_METHODS:
        raise ModelError(f"calibration method {method!r}: use one of {', '.join(CALIBRATION_METHODS)}")
    q = _ort_quant()
    src = OnnxExtractor(fp32_path, device="cpu")
    reader = _Batches(calibration, src.preprocess, src.input_name, src.batch, progress)
    prepared = out_path.with_name(out_path.stem + ".pre.onnx")
    t0 = time.perf_counter()
    try:
        # Shape inference and graph fusions (Conv+BN) first, as ONNX Runtime recommends for static quantisation.
        q.quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        calib_method = {"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
                        "entropy": q.CalibrationMethod.Entropy}[method]
        q.quantize_static(
            str(prepared), str(out_path), reader, quant_format=q.QuantFormat.QDQ, per_channel=True,
            activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8, calibrate_method=calib_method,
            nodes_to_exclude=head_nodes(prepared),
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "CalibPercentile": 99.999},
        )
    except (DataError, ModelError):
        raise
    except Exception as exc:
        detail = first_line(exc, with_type=False)[:200]
        if reader.used == 0:
            raise DataError("none of the calibration images could be read; pass a folder of person crops to --calibrate") from None
        raise ModelError(f"ONNX Runtime's quantiser failed ({detail}); try --calibration-method minmax") from None
    finally:
        prepared.unlink(missing_ok=True)
    if reader.used == 0:
        raise DataError("none of the calibration images could be read; pass a folder of person crops to --calibrate")
    return reader.used, time.perf_counter() - t0


def _metrics(qf: np.ndarray, qr: list[ImageRecord], gf: np.ndarray, gr: list[ImageRecord]) -> tuple[float, float]:
    dist = 1.0 - qf @ gf.T
    res = evaluate(dist, np.array([r.pid for r in qr]), np.array([r.pid for r in gr]),
                   np.array([r.camid for r in qr]), np.array([r.camid for r in gr]))
    return 100.0 * float(res["cmc"][0]), 100.0 * float(res["mAP"])


def compare(
    fp32: OnnxExtractor, int8: OnnxExtractor, queries: list[ImageRecord], gallery: list[ImageRecord] | None,
    protocol: str, progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, MetricCheck | None]:
    """Per-image cosines of int8 vs fp32 features on the check images, and the metric check when labelled."""
    records = queries + (gallery or [])
    paths = [r.path for r in records]
    a, kept_a, _ = extract_features(paths, fp32, num_workers=0, progress=progress)
    b, kept_b, _ = extract_features(paths, int8, num_workers=0, progress=progress)
    if not kept_a or kept_a != kept_b:
        raise DataError("none of the check images could be read; pass a folder of person crops to --check")
    cos = (a * b).sum(1)  # both unit-norm
    kept = [records[i] for i in kept_a]
    if not has_identity_labels(kept):
        return cos, None
    try:
        if gallery is None:
            r1a, mapa = _metrics(a, kept, a, kept)
            r1b, mapb = _metrics(b, kept, b, kept)
            nq = len(kept)
        else:
            nq = sum(1 for i in kept_a if i < len(queries))
            qa, ga, qb, gb = a[:nq], a[nq:], b[:nq], b[nq:]
            r1a, mapa = _metrics(qa, kept[:nq], ga, kept[nq:])
            r1b, mapb = _metrics(qb, kept[:nq], gb, kept[nq:])
    except ValueError as exc:  # e.g. no query has a positive among the check images
        log.warning("metric check skipped: %s", exc)
        return cos, None
    return cos, MetricCheck(protocol, nq, r1a, r1b, mapa, mapb)


def export_int8(
    model: str | Path,
    out: str | Path,
    calibrate: str | Path,
    *,
    check: str | Path | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    check_images: int = DEFAULT_CHECK_IMAGES,
    method: str = "minmax",
    min_cosine: float = DEFAULT_MIN_COSINE,
    max_metric_drop: float = DEFAULT_MAX_METRIC_DROP,
    opset: int = DEFAULT_OPSET,
    progress: Callable[[int], None] | None = None,
) -> Int8Report:
    """Quantise ``model`` (a ``.pt`` checkpoint or an fp32 ``.onnx``) to int8, check it, write ``out`` atomically.

    See the module docstring for the choice of images and the checks.

    Raises:
        ModelError: an unreadable or non-fp32 model, a quantiser failure, or an
            int8 graph below ``min_cosine`` or more than ``max_metric_drop``
            points of rank-1/mAP below fp32 (``out`` is then left as it was).
        DataError: missing or unusable calibration/check folders.
    """
    model, out = Path(model), Path(out)
    calib, queries, gallery, protocol = split_images(Path(calibrate), Path(check) if check else None,
                                                     calibration_images, check_images)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=out.parent if out.parent.is_dir() else None) as tmp:
        scratch = Path(tmp)
        if model.suffix.lower() == ".onnx":
            fp32_path = model
        else:
            fp32_path = export_onnx(model, scratch / "fp32.onnx", opset=opset).path
        fp32 = OnnxExtractor(fp32_path, device="cpu")
        if fp32.metadata.get("precision", "fp32") != "fp32":
            raise ModelError(f"{model} is a {fp32.metadata['precision']} graph; quantise the checkpoint (.pt) or an fp32 export")
        q_path = scratch / "int8.onnx"
        used, seconds = quantize_graph(fp32_path, q_path, [r.path for r in calib], method=method, progress=progress)
        log.info("calibrated on %d images in %.1f s (%s)", used, seconds, method)
        metadata = _write_metadata(q_path, fp32, method, used)
        int8 = OnnxExtractor(q_path, device="cpu")
        if int8.fingerprint != fp32.fingerprint or int8.preprocess != fp32.preprocess:
            raise ModelError(f"the int8 graph does not describe itself like its source ({int8.fingerprint}, "
                             f"{int8.preprocess}); this is a bug in reid-search")
        cos, metrics = compare(fp32, int8, queries, gallery, protocol, progress)
        report = Int8Report(out, q_path.stat().st_size, fp32_path.stat().st_size, method, used, seconds, len(cos),
                            float(cos.min()), float(cos.mean()), min_cosine, metrics, max_metric_drop, metadata)
        _refuse_if_short(report, out)
        atomic_write_bytes(out, q_path.read_bytes())
    log.info("wrote %s (%d bytes)", out, report.size_bytes)
    return report


def _write_metadata(path: Path, fp32: OnnxExtractor, method: str, used: int) -> dict[str, str]:
    import json

    import onnx

    proto = onnx.load(str(path))
    pre = fp32.preprocess
    meta = dict(fp32.metadata)
    # A third-party source keeps its identity (its file hash) and its preprocessing, now written down.
    meta.update({"producer": PRODUCER, "fingerprint": fp32.fingerprint, "feature_dim": str(fp32.dim),
                 "input_height": str(pre.height), "input_width": str(pre.width),
                 "mean": json.dumps(list(pre.mean)), "std": json.dumps(list(pre.std)), "precision": "int8",
                 "quantization": f"static QDQ, int8 per-channel weights, uint8 activations, "
                                 f"{method} calibration on {used} images"})
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return meta


def _refuse_if_short(r: Int8Report, out: Path) -> None:
    if not r.min_cosine >= r.min_cosine_required:  # also NaN
        raise ModelError(f"int8 features differ from fp32: min cosine {r.min_cosine:.4f} < {r.min_cosine_required} over "
                         f"{r.check_images} check images; calibrate on crops like the ones you index "
                         f"(or try --calibration-method percentile); {out} was not written")
    m = r.metrics
    if m is not None and m.exceeds(r.max_metric_drop):
        raise ModelError(f"int8 loses {m.worst_drop:.2f} points (rank-1 {m.rank1_fp32:.1f}→{m.rank1_int8:.1f}, "
                         f"mAP {m.map_fp32:.1f}→{m.map_int8:.1f}, {m.protocol}) > {r.max_metric_drop}; "
                         f"calibrate on more or closer crops; {out} was not written")
