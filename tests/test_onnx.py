"""ONNX export and the ONNX Runtime extractor, checked against PyTorch and raw ONNX Runtime."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from reid_search.checkpoint import load_model, read_checkpoint
from reid_search.app.cli import main
from reid_search.app.cli.export import export
from reid_search.errors import ModelError
from reid_search.extract import extract_features
from reid_search.extractors import load_extractor
from reid_search.images import load_image
from reid_search.onnx_model import OnnxExtractor, export_onnx
from reid_search.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess, build_eval_transform
from tests.helpers import SHARED, TINY_PRE, shared_path, write_crop

if "export" not in main.commands:
    main.add_command(export)

OSNET = ("models", "osnet_x0_25_market1501.onnx")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def real_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real Market-1501 crops when ../shared is here, else generated ones."""
    samples = SHARED / "data" / "market1501-samples"
    if samples.is_dir():
        return sorted(samples.glob("*.jpg"))[:24]
    folder = tmp_path_factory.mktemp("crops")
    return [write_crop(folder / f"{i:04d}_c1s1_000000_00.jpg", i) for i in range(24)]


@pytest.fixture(scope="module")
def onnx_dynamic(tiny_ckpt: Path, real_images: list[Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return export_onnx(tiny_ckpt, out, verify_images=real_images)


@pytest.fixture(scope="module")
def onnx_fixed1(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("onnx") / "tiny-b1.onnx"
    return export_onnx(tiny_ckpt, out, fixed_batch=1)  # verified on generated images


def tensors(paths: list[Path], pre: Preprocess) -> torch.Tensor:
    t = build_eval_transform(pre)
    return torch.stack([t(load_image(p)) for p in paths])


def test_export_matches_pytorch_on_real_images(onnx_dynamic, tiny_ckpt: Path, real_images: list[Path]) -> None:
    assert onnx_dynamic.min_cosine is not None and onnx_dynamic.min_cosine >= 0.9999
    assert onnx_dynamic.verified_images == len(real_images) and onnx_dynamic.batch is None
    # Independently of OnnxExtractor: a bare ORT session against the PyTorch model, several batch sizes.
    model, meta, _ = load_model(tiny_ckpt)
    sess = ort.InferenceSession(str(onnx_dynamic.path), providers=["CPUExecutionProvider"])
    x = tensors(real_images, meta.preprocess)
    with torch.inference_mode():
        ref = model(x).numpy()
    for n in (1, 3, len(real_images)):
        got = sess.run(None, {"images": x[:n].numpy()})[0]
        assert got.shape == (n, 512)
        assert cosine(ref[:n], got).min() >= 0.9999
    # The output is the raw feature (not normalised), as the metadata says.
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() > 1e-2


def test_metadata_and_graph_shapes(onnx_dynamic, onnx_fixed1, tiny_ckpt: Path) -> None:
    fp = read_checkpoint(tiny_ckpt)["meta"]["fingerprint"]
    for report, batch_dim in ((onnx_dynamic, None), (onnx_fixed1, 1)):
        m = onnx.load(str(report.path))
        props = {p.key: p.value for p in m.metadata_props}
        assert props == report.metadata
        assert props["producer"] == "reid-search" and props["arch"] == "resnet18"
        assert (props["input_height"], props["input_width"], props["feature_dim"]) == ("64", "32", "512")
        assert json.loads(props["mean"]) == list(IMAGENET_MEAN) and json.loads(props["std"]) == list(IMAGENET_STD)
        assert props["fingerprint"] == fp and props["output_normalized"] == "false" and props["precision"] == "fp32"
        dims = m.graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value for d in dims[1:]] == [3, 64, 32]
        assert (dims[0].dim_value or None) == batch_dim and (batch_dim or dims[0].dim_param)
        assert m.graph.input[0].name == "images" and m.graph.output[0].name == "features"
        onnx.checker.check_model(m)


def test_onnx_extractor_equals_torch_extractor(onnx_dynamic, onnx_fixed1, tiny_ckpt: Path, real_images: list[Path]) -> None:
    torch_ex = load_extractor(tiny_ckpt, device="cpu", precision="fp32")
    ref, kept, _ = extract_features(real_images, torch_ex, batch_size=5, num_workers=0)
    for report in (onnx_dynamic, onnx_fixed1):
        ex = load_extractor(report.path, device="cpu")
        assert isinstance(ex, OnnxExtractor)
        assert (ex.preprocess, ex.dim, ex.fingerprint) == (TINY_PRE, 512, torch_ex.fingerprint)
        assert ex.device == torch.device("cpu") and "CPUExecutionProvider" in ex.providers
        got, kept2, failures = extract_features(real_images, ex, batch_size=5, num_workers=0)
        assert kept2 == kept and not failures
        np.testing.assert_allclose(got, ref, atol=2e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # A batch of 32 through a graph that takes exactly one image.
    b1 = load_extractor(onnx_fixed1.path, device="cpu")
    assert b1.batch == 1
    x = torch.cat([tensors(real_images, TINY_PRE)] * 2)[:32]
    np.testing.assert_allclose(b1.embed(x), torch_ex.embed(x), atol=2e-5)


def test_flip_tta_matches_torch(onnx_fixed1, tiny_ckpt: Path, real_images: list[Path]) -> None:
    torch_flip = load_extractor(tiny_ckpt, device="cpu", flip=True, precision="fp32")
    onnx_plain = load_extractor(onnx_fixed1.path, device="cpu")
    onnx_flip = load_extractor(onnx_fixed1.path, device="cpu", flip=True)
    assert onnx_flip.fingerprint == onnx_plain.fingerprint + "+flip" == torch_flip.fingerprint
    x = tensors(real_images[:4], TINY_PRE)
    np.testing.assert_allclose(onnx_flip.embed(x), torch_flip.embed(x), atol=2e-5)
    assert np.abs(onnx_flip.embed(x) - onnx_plain.embed(x)).max() > 1e-4


def test_failed_verification_leaves_the_old_file(tiny_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    import reid_search.onnx_model as om

    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    monkeypatch.setattr(om, "MIN_COSINE_FP32", 1.5)  # unreachable: cosines are ≤ 1
    with pytest.raises(ModelError, match="min cosine .* was not written"):
        export_onnx(tiny_ckpt, out, fixed_batch=2)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_export_rejects_old_opset_and_missing_checkpoint(tiny_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="--opset 18"):
        export_onnx(tiny_ckpt, tmp_path / "m.onnx", opset=17)
    with pytest.raises(ModelError, match="no model at"):
        export_onnx(tmp_path / "nope.pt", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# --- third-party and hand-built graphs ------------------------------------


def test_third_party_osnet_fixed_batch() -> None:
    path = shared_path(*OSNET)
    samples = sorted(shared_path("data", "market1501-samples").glob("*.jpg"))[:5]
    ex = load_extractor(path, device="cpu")
    assert isinstance(ex, OnnxExtractor)
    assert ex.dim == 512 and ex.batch == 1
    assert ex.preprocess == Preprocess(256, 128, IMAGENET_MEAN, IMAGENET_STD)
    assert ex.fingerprint.startswith("onnx:") and len(ex.fingerprint) == 5 + 16
    feats, kept, _ = extract_features(samples, ex, batch_size=5, num_workers=0)
    assert feats.shape == (5, 512) and kept == list(range(5))
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    # Against one bare ORT call per image, normalised by hand.
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = tensors(samples, ex.preprocess).numpy()
    raw = np.concatenate([sess.run(None, {"images": x[i : i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(feats, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    assert cosine(feats[:1], feats[1:2])[0] < 0.999, "different people, different features"
    flip = load_extractor(path, device="cpu", flip=True)
    assert flip.fingerprint == ex.fingerprint + "+flip"
    f2 = flip.embed(torch.from_numpy(x))
    raw_f = np.concatenate([sess.run(None, {"images": np.ascontiguousarray(x[i : i + 1, :, :, ::-1])})[0] for i in range(5)])
    want = raw + raw_f
    np.testing.assert_allclose(f2, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)


def _gap_graph(path: Path, in_shape: list, props: dict[str, str] | None = None, out_shape: list | None = None) -> Path:
    """images [B, C, H, W] → GlobalAveragePool → Flatten: the per-channel mean of the input.

    Inputs of another rank get an Identity graph instead.
    """
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info("feat", TensorProto.FLOAT, out_shape)
    if len(in_shape) == 4:
        nodes = [helper.make_node("GlobalAveragePool", ["images"], ["p"]), helper.make_node("Flatten", ["p"], ["feat"])]
    else:
        nodes = [helper.make_node("Identity", ["images"], ["feat"])]
    model = helper.make_model(helper.make_graph(nodes, "gap", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # onnx's newest IR can be ahead of the runtime (onnxruntime-gpu lags onnxruntime)
    for k, v in (props or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def test_symbolic_size_and_preprocessing_come_from_metadata(tmp_path: Path) -> None:
    mean, std = [0.5, 0.25, 0.125], [0.5, 0.5, 0.25]
    path = _gap_graph(tmp_path / "gap.onnx", ["n", 3, "h", "w"],
                      {"input_height": "20", "input_width": "10", "mean": json.dumps(mean), "std": "0.5, 0.5, 0.25"})
    ex = OnnxExtractor(path, device="cpu")
    assert ex.preprocess == Preprocess(20, 10, tuple(mean), tuple(std))
    assert ex.dim == 3 and ex.batch is None  # dim found by a probe run: the output shape is unknown
    img = write_crop(tmp_path / "a.png", 3, size=(10, 20))  # already 10×20: the resize is the identity
    feats, _, _ = extract_features([img], ex, num_workers=0)
    pixels = np.asarray(load_image(img), dtype=np.float64) / 255.0
    want = (pixels.mean(axis=(0, 1)) - mean) / std
    np.testing.assert_allclose(feats[0], want / np.linalg.norm(want), atol=1e-5)
    # No metadata: the graph's static size, ImageNet statistics, a file-hash fingerprint.
    plain = OnnxExtractor(_gap_graph(tmp_path / "plain.onnx", [2, 3, 16, 8], out_shape=[2, 3]), device="cpu")
    assert plain.preprocess == Preprocess(16, 8) and plain.batch == 2 and plain.dim == 3
    assert plain.fingerprint != ex.fingerprint and plain.fingerprint.startswith("onnx:")
    out = plain.embed(torch.randn(5, 3, 16, 8))  # 5 = 2 + 2 + (1 padded to 2)
    assert out.shape == (5, 3)


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p.write_text("not a model\n"), "cannot load"),
        (lambda p: None, "no ONNX model at"),
        (lambda p: _gap_graph(p, ["n", 10]), "4-D image batch"),
        (lambda p: _gap_graph(p, ["n", 1, 16, 8]), "1 channels"),
        (lambda p: _gap_graph(p, ["n", 3, 16, 8], {"mean": "[0.5, 0.5]"}), "not three numbers"),
    ],
    ids=["text-file", "missing", "2-D-input", "grey-input", "bad-mean"],
)
def test_bad_onnx_files_raise_model_error(tmp_path: Path, make, needle: str) -> None:
    path = tmp_path / "bad.onnx"
    make(path)
    with pytest.raises(ModelError, match=needle) as info:
        load_extractor(path, device="cpu")
    assert "\n" not in str(info.value)


def test_cuda_request_without_cuda_provider(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    path = _gap_graph(tmp_path / "gap.onnx", [1, 3, 16, 8])
    with pytest.raises(ModelError, match="--device cpu"):
        OnnxExtractor(path, device="cuda")
    assert OnnxExtractor(path, device="auto").device == torch.device("cpu")


# --- CLI ------------------------------------------------------------------


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cli_help_has_an_example() -> None:
    r = run("export", "--help")
    assert r.exit_code == 0 and "Example" in r.output and "reid-search export" in r.output


def test_cli_export_fp16_fixed_batch(tiny_ckpt: Path, real_images: list[Path], tmp_path: Path) -> None:
    crops = tmp_path / "crops"
    crops.mkdir()
    for p in real_images[:7]:
        (crops / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "half.onnx"
    r = run("-w", str(tmp_path / "ws"), "export", "--model", str(tiny_ckpt), "--out", str(out),
            "--fp16", "--fixed-batch", "3", "--verify-dir", str(crops))
    assert r.exit_code == 0, r.output
    assert out.is_file() and f"wrote {out}" in r.output and "precision: fp16" in r.output
    cos = re.search(r"on 7 \S+ images, min cosine ([0-9.]+)", r.output)
    assert cos and 0.999 <= float(cos.group(1)) <= 1.0000001, r.output
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert (props["precision"], props["batch"]) == ("fp16", "3")
    assert any(i.data_type == TensorProto.FLOAT16 for i in onnx.load(str(out)).graph.initializer)
    ex = load_extractor(out, device="cpu")
    ref = extract_features(real_images[:7], load_extractor(tiny_ckpt, device="cpu", precision="fp32"), batch_size=7, num_workers=0)[0]
    got = extract_features(real_images[:7], ex, batch_size=7, num_workers=0)[0]  # 3 + 3 + (1 padded to 3)
    assert got.dtype == np.float32 and cosine(ref, got).min() >= 0.999


def test_cli_errors_are_one_line(tiny_ckpt: Path, tmp_path: Path) -> None:
    ws = str(tmp_path / "ws")
    for args, needle in (
        (["--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m.onnx")], "no model at"),
        (["--out", str(tmp_path / "m.onnx")], "no model in workspace"),
    ):
        r = run("-w", ws, "export", *args)
        msg = r.output.strip()
        assert r.exit_code == 1 and msg.startswith("Error: ") and "\n" not in msg and needle in msg, r.output
    onnx_file = _gap_graph(tmp_path / "g.onnx", [1, 3, 16, 8])
    r = run("-w", ws, "export", "--model", str(onnx_file), "--out", str(tmp_path / "m.onnx"))
    assert r.exit_code == 1 and "already an ONNX file" in r.output
    r = run("-w", ws, "export", "--model", str(tiny_ckpt), "--out", str(tmp_path / "m.onnx"), "--dynamic-batch", "--fixed-batch", "2")
    assert r.exit_code == 2 and "exclude each other" in r.output
    r = run("-w", ws, "export", "--model", str(tiny_ckpt), "--out", str(tmp_path / "m.pt"))
    assert r.exit_code == 2 and "*.onnx" in r.output
    assert not (tmp_path / "m.onnx").exists()
