"""Declared preprocessing of ONNX graphs: NHWC/BGR/0..255 graphs, sidecars, explicit values, unchanged old files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from reid_search.checkpoint import ModelMeta, read_checkpoint
from reid_search.errors import ModelError
from reid_search.extract import extract_features
from reid_search.images import load_image
from reid_search.onnx_model import OnnxExtractor, export_onnx, file_fingerprint
from reid_search.preprocess import declaration_metadata, sidecar_path
from reid_search.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, Preprocess, build_eval_transform, denormalize,
)
from tests.helpers import TINY_PRE, shared_path

RETAIL = ("models", "person-reidentification-retail-0288.onnx")
RETAIL_SIDECAR = {"layout": "NHWC", "color": "BGR", "input_scale": 1, "mean": [0, 0, 0], "std": [1, 1, 1]}
H, W = 4, 2
# A hand-checkable declaration: BGR, 0..255, per-channel mean and std in pixel units.
DECL = {"color": "BGR", "input_scale": 1, "mean": [10, 20, 30], "std": [2, 4, 8]}


def pixel_graph(path: Path, in_shape: list, props: dict[str, str] | None = None) -> Path:
    """A graph that returns its input pixels: ``[B, ...] → Flatten → [B, prod(...)]`` (layout order kept)."""
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Flatten", ["pixels"], ["out"])], "pixels", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    for k, v in (props or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def known_image(path: Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A lossless H×W RGB image and its pixels ``[H, W, 3]`` (uint8)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path, pixels


def write_sidecar(model: Path, content: dict | str) -> Path:
    side = sidecar_path(model)
    side.write_text(content if isinstance(content, str) else json.dumps(content))
    return side


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# --- Preprocess: defaults, storage, transforms --------------------------------------------------


def test_defaults_and_old_dicts_are_unchanged() -> None:
    old = {"height": 256, "width": 128, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}  # what checkpoints hold
    pre = Preprocess.from_dict(old)
    assert pre == Preprocess() == Preprocess(256, 128, IMAGENET_MEAN, IMAGENET_STD)
    assert (pre.layout, pre.color, pre.scale) == ("NCHW", "RGB", 1 / 255)
    assert pre.to_dict() == old  # byte-identical checkpoints for default models
    odd = Preprocess(64, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "NHWC", "BGR", 1.0)
    d = odd.to_dict()
    assert (d["layout"], d["color"], d["scale"]) == ("NHWC", "BGR", 1.0)
    assert Preprocess.from_dict(json.loads(json.dumps(d))) == odd
    for bad in ({"layout": "CHW"}, {"color": "GRB"}, {"scale": 0.0}, {"scale": float("nan")}, {"std": (1.0, 0.0, 1.0)}):
        with pytest.raises(ValueError):
            Preprocess(**bad)


def test_old_checkpoint_meta_loads_identically(tiny_ckpt: Path) -> None:
    stored = read_checkpoint(tiny_ckpt)["meta"]
    assert set(stored["preprocess"]) == {"height", "width", "mean", "std"}
    meta = ModelMeta.from_dict(stored)
    assert meta.preprocess == TINY_PRE and meta.to_dict() == stored


def test_default_transform_is_todays_and_declared_pixels_are_applied(tmp_path: Path) -> None:
    img_path, pixels = known_image(tmp_path / "a.png")
    img = load_image(img_path)
    t = build_eval_transform(Preprocess(H, W))
    assert [type(op).__name__ for op in t.transforms] == ["Resize", "ToTensor", "Normalize"]
    want = (pixels / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(t(img).permute(1, 2, 0).numpy(), want, atol=1e-6)

    pre = Preprocess(H, W, (10.0, 20.0, 30.0), (2.0, 4.0, 8.0), color="BGR", scale=1.0)
    x = build_eval_transform(pre)(img)
    want = (pixels[..., ::-1].astype(np.float64) - [10, 20, 30]) / [2, 4, 8]
    assert x.shape == (3, H, W)  # eval tensors stay CHW whatever the graph's layout
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), want, atol=1e-4)
    np.testing.assert_allclose(denormalize(x, pre).permute(1, 2, 0).numpy(), pixels / 255.0, atol=1e-6)
    half = build_eval_transform(Preprocess(H, W, (0.5,) * 3, (0.5,) * 3, scale=1 / 127.5))(img)  # 0..2 pixels
    np.testing.assert_allclose(half.permute(1, 2, 0).numpy(), (pixels / 127.5 - 0.5) / 0.5, atol=1e-5)


# --- hand-built graphs: layouts, sidecar, explicit values ----------------------------------------


@pytest.mark.parametrize("layout, batch", [("NHWC", 1), ("NHWC", "n"), ("NCHW", 1)])
def test_pixel_graph_output_is_computed_by_hand(tmp_path: Path, layout: str, batch) -> None:
    shape = [batch, H, W, 3] if layout == "NHWC" else [batch, 3, H, W]
    model = pixel_graph(tmp_path / "pix.onnx", shape)
    images = [known_image(tmp_path / f"{i}.png", i) for i in range(3)]
    expected = []
    for _, px in images:
        v = (px[..., ::-1].astype(np.float64) - DECL["mean"]) / DECL["std"]  # BGR, 0..255, mean/std per channel
        expected.append((v if layout == "NHWC" else v.transpose(2, 0, 1)).ravel())
    expected = unit(np.stack(expected))

    write_sidecar(model, DECL)  # the layout comes from the shape
    side = OnnxExtractor(model, device="cpu")
    assert side.preprocess == Preprocess(H, W, (10.0, 20.0, 30.0), (2.0, 4.0, 8.0), layout, "BGR", 1.0)
    assert side.batch == (1 if batch == 1 else None) and side.dim == H * W * 3
    feats, kept, _ = extract_features([p for p, _ in images], side, batch_size=3, num_workers=0)  # 3 runs where batch is 1
    assert kept == [0, 1, 2]
    np.testing.assert_allclose(feats, expected, atol=1e-6)

    sidecar_path(model).unlink()
    for declared in (DECL, Preprocess(H, W, (10.0, 20.0, 30.0), (2.0, 4.0, 8.0), layout, "BGR", 1.0)):
        ex = OnnxExtractor(model, device="cpu", preprocess=declared)
        assert ex.preprocess == side.preprocess and ex.fingerprint == side.fingerprint
        np.testing.assert_allclose(extract_features([p for p, _ in images], ex, num_workers=0)[0], expected, atol=1e-6)

    # Flip TTA flips the width, whatever the layout.
    flip = OnnxExtractor(model, device="cpu", preprocess=DECL, flip=True)
    x = torch.stack([build_eval_transform(side.preprocess)(load_image(p)) for p, _ in images])
    np.testing.assert_allclose(flip.embed(x), unit(side.raw_features(x) + side.raw_features(x.flip(3))), atol=1e-6)


def test_fingerprint_follows_the_declared_preprocessing(tmp_path: Path) -> None:
    model = pixel_graph(tmp_path / "pix.onnx", [1, H, W, 3])
    file_fp = file_fingerprint(model)
    bgr = OnnxExtractor(model, device="cpu", preprocess=DECL)
    rgb = OnnxExtractor(model, device="cpu", preprocess={**DECL, "color": "RGB"})
    other_mean = OnnxExtractor(model, device="cpu", preprocess={**DECL, "mean": 0})
    fps = {bgr.fingerprint, rgb.fingerprint, other_mean.fingerprint}
    assert len(fps) == 3 and all(fp.startswith(file_fp + "+pre-") for fp in fps)
    assert OnnxExtractor(model, device="cpu", preprocess=DECL).fingerprint == bgr.fingerprint  # stable
    assert OnnxExtractor(model, device="cpu", preprocess=DECL, flip=True).fingerprint == bgr.fingerprint + "+flip"

    # An NCHW graph that declares nothing keeps the ReID convention and its fingerprint of old;
    # declaring exactly that convention changes nothing; declaring anything else does.
    nchw = pixel_graph(tmp_path / "nchw.onnx", [1, 3, H, W])
    plain = OnnxExtractor(nchw, device="cpu")
    assert plain.preprocess == Preprocess(H, W) and plain.fingerprint == file_fingerprint(nchw)
    same = OnnxExtractor(nchw, device="cpu", preprocess={"color": "RGB", "input_scale": "1/255", "layout": "NCHW"})
    assert same.fingerprint == plain.fingerprint
    assert OnnxExtractor(nchw, device="cpu", preprocess={"color": "BGR"}).fingerprint.startswith(plain.fingerprint + "+pre-")


def test_metadata_declares_and_takes_precedence(tmp_path: Path) -> None:
    props = {"layout": "NHWC", "color": "BGR", "input_scale": "1", "mean": "[10, 20, 30]", "std": "2, 4, 8",
             "input_height": str(H), "input_width": str(W)}
    model = pixel_graph(tmp_path / "meta.onnx", ["n", "h", "w", 3], props)  # symbolic size: from metadata
    ex = OnnxExtractor(model, device="cpu")
    assert ex.preprocess == Preprocess(H, W, (10.0, 20.0, 30.0), (2.0, 4.0, 8.0), "NHWC", "BGR", 1.0)
    assert ex.fingerprint.startswith(file_fingerprint(model) + "+pre-")  # the file was refused before
    # A sidecar or explicit value may repeat the metadata, not contradict it.
    write_sidecar(model, {"color": "BGR", "mean": [10, 20, 30]})
    assert OnnxExtractor(model, device="cpu", preprocess={"input_scale": "1/1"}).preprocess == ex.preprocess
    with pytest.raises(ModelError, match=r"sidecar meta.onnx.json says color=RGB but metadata says BGR") as info:
        write_sidecar(model, {"color": "RGB"})
        OnnxExtractor(model, device="cpu")
    assert "\n" not in str(info.value)


def test_written_metadata_reads_back(tmp_path: Path) -> None:
    pre = Preprocess(H, W, (0.5, 0.25, 0.125), (0.5, 2.0, 4.0), "NHWC", "BGR", 1 / 127.5)
    model = pixel_graph(tmp_path / "w.onnx", ["n", "h", "w", 3], declaration_metadata(pre))
    assert OnnxExtractor(model, device="cpu").preprocess == pre


def test_our_exports_are_unchanged(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.onnx"
    report = export_onnx(tiny_ckpt, out, fixed_batch=1, verify=False)
    fp = read_checkpoint(tiny_ckpt)["meta"]["fingerprint"]
    assert report.metadata["layout"] == "NCHW" and report.metadata["color"] == "RGB"
    assert report.metadata["input_scale"] == "1/255"
    ex = OnnxExtractor(out, device="cpu")
    assert ex.preprocess == TINY_PRE and ex.fingerprint == fp

    # An export written before `layout` existed: the same model without that key.
    m = onnx.load(str(out))
    kept = [(p.key, p.value) for p in m.metadata_props if p.key != "layout"]
    del m.metadata_props[:]
    for k, v in kept:
        m.metadata_props.add(key=k, value=v)
    old = tmp_path / "old.onnx"
    onnx.save(m, str(old))
    old_ex = OnnxExtractor(old, device="cpu")
    assert (old_ex.preprocess, old_ex.fingerprint, old_ex.dim) == (TINY_PRE, fp, ex.dim)
    x = torch.randn(2, 3, TINY_PRE.height, TINY_PRE.width)
    np.testing.assert_array_equal(old_ex.embed(x), ex.embed(x))
    # A sidecar that agrees changes nothing; one that disagrees is refused.
    write_sidecar(old, {"layout": "NCHW", "color": "RGB"})
    assert OnnxExtractor(old, device="cpu").fingerprint == fp
    write_sidecar(old, {"color": "BGR"})
    with pytest.raises(ModelError, match="color=BGR but metadata says RGB"):
        OnnxExtractor(old, device="cpu")
    with pytest.raises(ModelError, match="declared preprocessing says layout=NHWC but metadata says NCHW"):
        OnnxExtractor(out, device="cpu", preprocess=Preprocess(64, 32, layout="NHWC"))


# --- what cannot be inferred, and bad declarations: one line each --------------------------------


def test_layout_inference(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"NHWC graph's preprocessing must be declared \(missing: color, input_scale, "
                                         r"mean, std\).*pix.onnx.json.*\"color\": \"BGR\"") as info:
        OnnxExtractor(pixel_graph(tmp_path / "pix.onnx", [1, H, W, 3]), device="cpu")
    assert "\n" not in str(info.value)
    ambiguous = pixel_graph(tmp_path / "amb.onnx", [1, 3, 3, 3])
    with pytest.raises(ModelError, match="cannot tell NCHW from NHWC.*amb.onnx.json"):
        OnnxExtractor(ambiguous, device="cpu")
    assert OnnxExtractor(ambiguous, device="cpu", preprocess={"layout": "NCHW"}).preprocess == Preprocess(3, 3)
    symbolic = pixel_graph(tmp_path / "sym.onnx", ["n", "a", "b", "c"])
    with pytest.raises(ModelError, match="cannot tell NCHW from NHWC"):
        OnnxExtractor(symbolic, device="cpu")
    nhwc_sym = OnnxExtractor(symbolic, device="cpu", preprocess={**DECL, "layout": "NHWC", "input_height": 6, "input_width": 2})
    assert (nhwc_sym.preprocess.height, nhwc_sym.preprocess.width, nhwc_sym.dim) == (6, 2, 36)


@pytest.mark.parametrize(
    "shape, sidecar, explicit, needle",
    [
        ([1, H, W, 3], "{not json", None, r"not valid JSON \(Expecting property name .* line 1 column 2\)"),
        ([1, H, W, 3], "[1, 2]", None, "holds a JSON list, not an object"),
        ([1, H, W, 3], {**DECL, "scale": 1}, None, "unknown key 'scale'; the keys are layout, color, input_scale"),
        ([1, H, W, 3], {**DECL, "layout": "HWC"}, None, "layout='HWC' is not NCHW or NHWC"),
        ([1, H, W, 3], {**DECL, "color": "gray"}, None, "color='gray' is not RGB or BGR"),
        ([1, H, W, 3], {**DECL, "input_scale": 0}, None, "input_scale=0 is not a positive number"),
        ([1, H, W, 3], {**DECL, "input_scale": "1/0"}, None, "input_scale='1/0' is not a positive number"),
        ([1, H, W, 3], {**DECL, "mean": [1, 2]}, None, r"mean=\[1, 2\] is not three numbers"),
        ([1, H, W, 3], {**DECL, "std": [1, 0, 1]}, None, "std=.* has a value that is not positive"),
        ([1, H, W, 3], {**DECL, "input_height": "tall"}, None, "input_height='tall' is not a positive integer"),
        ([1, H, W, 3], {**DECL, "input_height": 8}, None, "says input_height=8 but the graph's input .* fixes it at 4"),
        ([1, H, W, 3], {**DECL, "layout": "NCHW"}, None, "says layout=NCHW but the input .* has 4 channels there"),
        ([1, H, W, 3], DECL, {"color": "RGB"}, "declared preprocessing says color=RGB but sidecar pix.onnx.json says BGR"),
        ([1, H, W, 3], None, {"colour": "RGB"}, "declared preprocessing: unknown key 'colour'"),
        ([1, 3, H, W], {"input_scale": 1}, None, "input_scale=1 is declared without both mean and std"),
        ([1, 1, H, W], None, None, "neither 3 channels first .*1 channels.* nor last"),
    ],
    ids=["json", "not-object", "unknown-key", "layout", "color", "scale-0", "scale-div0", "mean-2", "std-0",
         "height-text", "height-vs-graph", "layout-vs-graph", "explicit-vs-sidecar", "explicit-unknown",
         "scale-without-stats", "grey"],
)
def test_bad_declarations_are_one_line(tmp_path: Path, shape, sidecar, explicit, needle: str) -> None:
    model = pixel_graph(tmp_path / "pix.onnx", shape)
    if sidecar is not None:
        write_sidecar(model, sidecar)
    with pytest.raises(ModelError, match=needle) as info:
        OnnxExtractor(model, device="cpu", preprocess=explicit)
    assert "\n" not in str(info.value)


def test_bad_metadata_value_is_one_line(tmp_path: Path) -> None:
    model = pixel_graph(tmp_path / "pix.onnx", [1, 3, H, W], {"color": "YUV"})
    with pytest.raises(ModelError, match="color='YUV' is not RGB or BGR; fix or remove it from metadata_props"):
        OnnxExtractor(model, device="cpu")


# --- OpenVINO's person-reidentification-retail-0288 ----------------------------------------------


def bare_retail(session: ort.InferenceSession, paths: list[Path]) -> np.ndarray:
    """The model run by hand: 128×256 bilinear resize, BGR, 0..255, NHWC, one image per call, L2-normalised."""
    out = []
    for p in paths:
        rgb = np.asarray(load_image(p).resize((128, 256), Image.BILINEAR), dtype=np.float32)
        out.append(session.run(None, {"inputs:0": np.ascontiguousarray(rgb[None, :, :, ::-1])})[0][0])
    return unit(np.stack(out))


def test_retail_0288_sidecar_and_explicit(tmp_path: Path) -> None:
    src = shared_path(*RETAIL)
    gallery = sorted(shared_path("data", "cuhk03-labeled", "bounding_box_test").glob("*.jpg"))
    pids = np.array([int(p.name[:4]) for p in gallery])
    chosen = np.isin(pids, np.unique(pids)[:10])  # ten identities, ~70 crops
    paths, pids = [p for p, c in zip(gallery, chosen) if c], pids[chosen]

    with pytest.raises(ModelError, match="NHWC graph's preprocessing must be declared"):
        OnnxExtractor(src, device="cpu")
    link = tmp_path / "retail.onnx"
    link.symlink_to(src)
    write_sidecar(link, RETAIL_SIDECAR)
    ex = OnnxExtractor(link, device="cpu")
    assert ex.preprocess == Preprocess(256, 128, (0.0,) * 3, (1.0,) * 3, "NHWC", "BGR", 1.0)
    assert (ex.dim, ex.batch) == (256, 1) and ex.fingerprint.startswith(file_fingerprint(src) + "+pre-")
    feats, kept, _ = extract_features(paths, ex, batch_size=16, num_workers=0)
    assert feats.shape == (len(paths), 256) and kept == list(range(len(paths)))
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(feats[:6], bare_retail(ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]),
                                                      paths[:6]), atol=2e-3)

    sim = feats @ feats.T
    same, off = pids[:, None] == pids[None], ~np.eye(len(pids), dtype=bool)
    assert sim[same & off].mean() > sim[~same].mean() + 0.05, "same people closer than different people"

    explicit = OnnxExtractor(src, device="cpu", preprocess={k: v for k, v in RETAIL_SIDECAR.items()})
    assert explicit.fingerprint == ex.fingerprint and explicit.preprocess == ex.preprocess
    np.testing.assert_allclose(extract_features(paths[:4], explicit, num_workers=0)[0], feats[:4], atol=1e-6)
    rgb = OnnxExtractor(src, device="cpu", preprocess={**RETAIL_SIDECAR, "color": "RGB"})
    assert rgb.fingerprint != ex.fingerprint
