from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid_search.images import ImageLoadError, load_image
from reid_search.torch_extractor import TorchExtractor, cpu_chunk
from reid_search.extract import extract_features, iter_features
from reid_search.extractors import load_extractor
from reid_search.model import build_model
from reid_search.transforms import Preprocess
from tests.helpers import write_crop


@pytest.fixture()
def crops(tmp_path: Path) -> list[Path]:
    return [write_crop(tmp_path / f"{i:04d}_c1s1_000000_00.jpg", i) for i in range(11)]


def test_batched_equals_one_by_one(tiny_ckpt: Path, crops: list[Path]) -> None:
    ex = load_extractor(tiny_ckpt, device="cpu", precision="fp32")
    batched, kept, failures = extract_features(crops, ex, batch_size=4, num_workers=2)
    assert kept == list(range(11)) and failures == []
    singles = np.concatenate([extract_features([p], ex, batch_size=1, num_workers=0)[0] for p in crops])
    assert batched.shape == (11, 512) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, singles, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 1e-3, "different images, different features"


def test_cpu_chunks_give_the_features_of_whole_batches(tiny_ckpt: Path) -> None:
    ex = load_extractor(tiny_ckpt, device="cpu", precision="fp32")
    x = torch.randn(7, 3, ex.preprocess.height, ex.preprocess.width)
    whole = TorchExtractor(ex.model, ex.preprocess, "fp", "cpu", precision="fp32", chunk=0)
    calls: list[int] = []
    whole.model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    want = whole.embed(x)
    assert calls == [7]
    chunked = TorchExtractor(ex.model, ex.preprocess, "fp", "cpu", precision="fp32", chunk=3)
    chunked.model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    got = chunked.embed(x)
    assert calls == [7, 3, 3, 1]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_cpu_chunk_sizes_follow_the_activation_footprint() -> None:
    # Measured fastest on 2 cores: ResNet50 256x128 in chunks of 8; ResNet18 128x64 whole batches of 32+.
    assert cpu_chunk(Preprocess(256, 128), 2048) == 8
    assert cpu_chunk(Preprocess(384, 128), 2048) == 5
    assert cpu_chunk(Preprocess(128, 64), 512) >= 32
    assert cpu_chunk(Preprocess(4096, 4096), 2048) == 1
    ex = TorchExtractor(build_model("resnet50"), Preprocess(256, 128), "fp", "cpu", precision="fp32")
    assert ex.chunk == 8


def test_streaming_yields_bounded_batches(tiny_ckpt: Path, crops: list[Path]) -> None:
    ex = load_extractor(tiny_ckpt, device="cpu", precision="fp32")
    seen: list[int] = []
    sizes = [len(b.indices) for b in iter_features(crops, ex, batch_size=3, num_workers=0, progress=seen.append)]
    assert sizes == [3, 3, 3, 2] and seen == sizes


def test_flip_tta_changes_features_and_fingerprint(tiny_ckpt: Path, crops: list[Path]) -> None:
    plain = load_extractor(tiny_ckpt, device="cpu", precision="fp32")
    flip = load_extractor(tiny_ckpt, device="cpu", flip=True, precision="fp32")
    assert flip.fingerprint == plain.fingerprint + "+flip"
    a = extract_features(crops[:2], plain, num_workers=0)[0]
    b = extract_features(crops[:2], flip, num_workers=0)[0]
    assert np.abs(a - b).max() > 1e-4
    # flip TTA of a flipped image equals flip TTA of the image
    flipped = crops[0].with_name("flipped.png")
    Image.open(crops[0]).transpose(Image.FLIP_LEFT_RIGHT).save(flipped)
    c = extract_features([crops[0]], flip, num_workers=0)[0]
    d = extract_features([flipped], flip, num_workers=0)[0]
    # JPEG→PNG of the decoded pixels is lossless, so only float rounding differs
    np.testing.assert_allclose(c, d, atol=1e-4)


def test_bad_images_are_reported_not_fatal(tiny_ckpt: Path, tmp_path: Path) -> None:
    good = write_crop(tmp_path / "good.jpg", 1)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.read_bytes()[:300])
    broken = tmp_path / "broken.jpg"
    os.symlink(tmp_path / "nowhere.jpg", broken)
    ex = load_extractor(tiny_ckpt, device="cpu", precision="fp32")
    feats, kept, failures = extract_features([empty, good, text, trunc, broken], ex, num_workers=0)
    assert kept == [1] and feats.shape == (1, 512)
    assert {i: r for i, r, _ in failures} == {0: "empty", 2: "not-an-image", 3: "corrupt", 4: "missing"}


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_modes_load_as_rgb(tmp_path: Path, mode: str) -> None:
    src = write_crop(tmp_path / "src.png", 3)
    img = Image.open(src)
    img = img.convert("I;16") if mode == "I;16" else img.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (64, 128)


def test_transparent_pixels_become_grey(tmp_path: Path) -> None:
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (124, 116, 104)


def test_decompression_bomb_guard(tmp_path: Path) -> None:
    Image.new("L", (3000, 3000)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "big.png", max_pixels=1_000_000)
    assert info.value.reason == "too-large"
    assert load_image(tmp_path / "big.png").size == (3000, 3000)


def _jpeg(seed: int = 3) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (128, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _odd_file(kind: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make ``path`` one kind of file that :func:`load_image` refuses."""
    data = _jpeg()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        path.write_bytes(data[:600] + bytes(500) + data[1100:])
    elif kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "non-image":
        path.write_text("<html>not a picture</html>")
    elif kind == "bomb":
        path = path.with_suffix(".png")
        Image.new("1", (8000, 6000)).save(path)  # 48 MP, a few KB on disk: over the default limit
    elif kind == "unreadable":
        path.write_bytes(data)
        if os.geteuid() == 0:  # root reads anything: make the open fail as it would for a user
            import reid_search.images as images

            real = images.Image.open

            def deny(p, *a, **kw):  # type: ignore[no-untyped-def]
                if Path(p) == path:
                    raise PermissionError(13, "Permission denied")
                return real(p, *a, **kw)

            monkeypatch.setattr(images.Image, "open", deny)
        else:
            path.chmod(0)
    elif kind == "broken-symlink":
        os.symlink(path.parent / "gone.jpg", path)
    return path


@pytest.mark.parametrize("kind, reason", [
    ("truncated", "corrupt"), ("corrupt", "corrupt"), ("zero-byte", "empty"), ("non-image", "not-an-image"),
    ("bomb", "too-large"), ("unreadable", "unreadable"), ("broken-symlink", "missing"),
])
def test_load_image_refuses_odd_files_with_a_reason(kind: str, reason: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = _odd_file(kind, tmp_path / "0002_c1s1_000001_00.jpg", monkeypatch)
    try:
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
    finally:
        if path.exists() and not path.is_symlink():
            path.chmod(0o644)
    assert info.value.reason == reason and info.value.path == path
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_symlinked_crop_loads_as_its_target(tmp_path: Path) -> None:
    target = write_crop(tmp_path / "elsewhere" / "x.jpg", seed=5)
    os.symlink(target, tmp_path / "0002_c1s1_000001_00.jpg")
    out = load_image(tmp_path / "0002_c1s1_000001_00.jpg")
    assert out.mode == "RGB" and out.tobytes() == load_image(target).tobytes()


def test_extractor_uses_checkpoint_preprocessing(tiny_ckpt: Path) -> None:
    ex = load_extractor(tiny_ckpt, device="cpu", precision="fp32")
    assert (ex.preprocess.height, ex.preprocess.width) == (64, 32)
    out = ex.embed(torch.randn(3, 3, 64, 32))
    assert out.shape == (3, 512)


# ---- one device path for PyTorch and ONNX Runtime -------------------------------------------


def _hide_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from reid_search import devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_said", set())


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_cpu_fallback_line_names_the_precision_that_runs(tiny_ckpt: Path, precision: str,
                                                         monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    # Regression: the line said "in fp32" whatever --precision chose (bf16 on AVX512_BF16 CPUs by default).
    import logging

    _hide_gpus(monkeypatch)
    caplog.set_level(logging.INFO, logger="reid_search.devices")
    ex = load_extractor(tiny_ckpt, device="auto", precision=precision)
    said = [r.getMessage() for r in caplog.records if r.name == "reid_search.devices"]
    assert ex.precision == precision
    assert said == [f"CUDA_VISIBLE_DEVICES hides every GPU: feature extraction runs on the CPU in {precision}"]


@pytest.mark.parametrize("name", ["tpu", "gpu0", "cuda:x", "mps"])
def test_unknown_device_is_a_one_line_model_error(tiny_ckpt: Path, tmp_path: Path, name: str) -> None:
    # Regression: `--device gpu0` escaped as torch's RuntimeError for checkpoints (ONNX files said it in one line).
    from reid_search.errors import ModelError
    from reid_search.onnx_model import select_providers

    with pytest.raises(ModelError, match=f"--device {name}: ") as info:
        load_extractor(tiny_ckpt, device=name)
    assert "\n" not in str(info.value) and "cpu" in str(info.value)
    with pytest.raises(ModelError, match=f"--device {name}: "):
        select_providers(name)


def test_cuda_without_a_gpu_is_refused_alike_for_torch_and_onnx(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reid_search.errors import ModelError
    from reid_search.onnx_model import select_providers

    _hide_gpus(monkeypatch)
    for call in (lambda: load_extractor(tiny_ckpt, device="cuda:1"), lambda: select_providers("cuda:1")):
        with pytest.raises(ModelError, match=r"--device cuda:1: CUDA_VISIBLE_DEVICES hides every GPU here; use --device cpu"):
            call()
    assert select_providers("cpu") == (["CPUExecutionProvider"], torch.device("cpu"))
