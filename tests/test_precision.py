"""Extraction precision (auto/fp32/bf16/fp16), wide-range images and torch.compile of long runs."""

from __future__ import annotations

import logging
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from reid_search.app.cli import main
from reid_search.errors import ModelError
from reid_search.torch_extractor import COMPILE_MIN_IMAGES, TorchExtractor
from reid_search.extract import extract_features
from reid_search.extractors import load_extractor
from reid_search.images import load_image, to_rgb
from reid_search.precision import choose_precision, parse_cpuinfo, resolve_precision, validate_precision
from tests.helpers import write_crop

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_tile
processor\t: 1
flags\t\t: fpu
"""
OLD_XEON = "model name\t: Intel(R) Xeon(R) CPU E5-2686 v4\nflags\t\t: fpu sse avx avx2 fma\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp\n"


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --------------------------------------------------------------------------- choosing the precision


def test_cpuinfo_flags_decide_auto() -> None:
    epyc, xeon, arm = parse_cpuinfo(EPYC), parse_cpuinfo(OLD_XEON), parse_cpuinfo(GRAVITON)
    assert epyc.model.startswith("AMD EPYC") and epyc.bf16 and epyc.int8 and not epyc.fp16
    assert "avx512_bf16" in epyc.summary()
    assert not xeon.bf16 and not xeon.int8 and not arm.bf16 and "asimd" in arm.flags
    assert resolve_precision("auto", "cpu", epyc) == "bf16"
    assert resolve_precision("auto", torch.device("cpu"), xeon) == "fp32"
    assert resolve_precision("auto", "cpu", arm) == "fp32"
    assert resolve_precision("AUTO", "cuda:1", xeon) == "fp16"  # autocast on GPUs whatever the host CPU
    assert resolve_precision("bf16", "cuda", xeon) == "bf16"


def test_explicit_precision_is_honoured_with_a_warning_when_emulated(caplog: pytest.LogCaptureFixture) -> None:
    xeon = parse_cpuinfo(OLD_XEON)
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("bf16", "cpu", xeon) == "bf16"
    assert "emulated" in caplog.text
    assert resolve_precision("fp32", "cpu", parse_cpuinfo(EPYC)) == "fp32"
    with pytest.raises(ModelError, match="--precision int4: unknown; use one of auto, fp32, bf16, fp16"):
        validate_precision("int4")


def test_choose_precision_is_resolve_without_the_warning(caplog: pytest.LogCaptureFixture) -> None:
    cpus = [parse_cpuinfo(t) for t in (EPYC, OLD_XEON, GRAVITON)]
    with caplog.at_level(logging.WARNING):
        for feats in cpus:
            for device in ("cpu", "cuda:0"):
                for p in ("auto", "fp32", "bf16", "fp16"):
                    assert choose_precision(p, device, feats) == resolve_precision(p, device, feats)
        n_resolve = len(caplog.records)
        caplog.clear()
        for feats in cpus:
            for p in ("auto", "fp32", "bf16", "fp16"):
                choose_precision(p, "cpu", feats)
    assert n_resolve > 0 and caplog.records == []


def test_bf16_features_match_fp32_and_share_the_fingerprint(tiny_ckpt: Path, tmp_path: Path) -> None:
    crops = [write_crop(tmp_path / f"{i:04d}_c1s1_000000_00.jpg", i) for i in range(6)]
    fp32 = load_extractor(tiny_ckpt, device="cpu", precision="fp32")
    bf16 = load_extractor(tiny_ckpt, device="cpu", precision="bf16")
    assert isinstance(bf16, TorchExtractor) and (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert bf16.fingerprint == fp32.fingerprint and "bf16" in bf16.description
    a = extract_features(crops, fp32, num_workers=0)[0]
    b = extract_features(crops, bf16, num_workers=0)[0]
    assert b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert cosine(a, b).min() >= 0.999
    assert np.abs(a - b).max() > 0, "bf16 really ran in bf16"
    # Built directly, the extractor takes the same choice.
    model = bf16.model
    assert TorchExtractor(model, bf16.preprocess, "fp", "cpu", precision="fp32").precision == "fp32"
    assert TorchExtractor(model, bf16.preprocess, "fp", "cpu", precision="bf16").precision == "bf16"


def test_onnx_models_refuse_a_torch_precision(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not apply to the ONNX model m.onnx.*pass --precision auto"):
        load_extractor(tmp_path / "m.onnx", device="cpu", precision="bf16")


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_gallery_indexed_in_fp32_answers_bf16_queries(tiny_ckpt: Path, market_dir: Path, tmp_path: Path) -> None:
    ws = str(tmp_path / "ws")
    r = _run("-q", "-w", ws, "index", str(market_dir / "bounding_box_test"), "--model", str(tiny_ckpt),
             "--device", "cpu", "--precision", "fp32")
    assert r.exit_code == 0, r.output
    q = next((market_dir / "query").iterdir())
    hits = {}
    for precision in ("fp32", "bf16"):
        r = _run("-w", ws, "query", str(q), "--model", str(tiny_ckpt), "--device", "cpu", "--precision", precision, "--json")
        assert r.exit_code == 0, r.output
        hits[precision] = r.output
    import json

    a, b = (json.loads(hits[p])["hits"] for p in ("fp32", "bf16"))
    assert [h["path"] for h in a][:3] == [h["path"] for h in b][:3]
    assert max(abs(x["distance"] - y["distance"]) for x, y in zip(a, b)) < 2e-2
    r = _run("-w", ws, "eval", "--model", str(tiny_ckpt), "--device", "cpu", "--precision", "bf16", "--json")
    assert r.exit_code == 0, r.output


def test_unknown_precision_is_a_usage_error(tiny_ckpt: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["-w", str(tmp_path), "embed", str(tmp_path), "--precision", "int3"])
    assert r.exit_code == 2 and "'int3' is not one of" in r.output


@pytest.mark.parametrize("cmd", ["index", "query", "eval", "embed", "serve"])
def test_every_embedding_command_takes_precision(cmd: str) -> None:
    r = CliRunner().invoke(main, [cmd, "--help"])
    assert r.exit_code == 0 and "--precision [auto|fp32|bf16|fp16]" in r.output


# --------------------------------------------------------------------------- images wider than 8 bits


def _png_rgb16(path: Path, rgb16: np.ndarray) -> Path:
    """A 48-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    be = rgb16.astype(">u2")
    raw = b"".join(b"\x00" + be[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def gray8(tmp_path: Path) -> np.ndarray:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (128, 64), dtype=np.uint8)
    a[:40] = 200
    a[90:] = 30
    return a


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_gray_keeps_its_range(gray8: np.ndarray, tmp_path: Path, suffix: str) -> None:
    """Regression: Pillow's convert("RGB") clipped 16-bit crops to 255 (nearly white)."""
    p = tmp_path / f"g16{suffix}"
    Image.fromarray(gray8.astype(np.uint16) * 257).save(p)
    assert Image.open(p).mode.startswith("I;16")
    got = np.asarray(load_image(p))
    assert got.shape == (128, 64, 3)
    np.testing.assert_array_equal(got[..., 0], gray8)
    # 12-bit data in a 16-bit container keeps its own (dark) look, not clipped to white
    Image.fromarray(gray8.astype(np.uint16) * 16).save(p)
    np.testing.assert_array_equal(np.asarray(load_image(p))[..., 1], np.rint(gray8.astype(np.float64) * 16 * 255 / 65535).astype(np.uint8))


def test_float_tiff_is_not_black(gray8: np.ndarray, tmp_path: Path) -> None:
    p = tmp_path / "f.tif"
    Image.fromarray(gray8.astype(np.float32) / 255.0).save(p)
    assert Image.open(p).mode == "F"
    np.testing.assert_array_equal(np.asarray(load_image(p))[..., 2], gray8)
    # floats on a 0..255 scale, with a NaN, stay on it
    f = gray8.astype(np.float32)
    f[0, 0] = np.nan
    img = to_rgb(Image.fromarray(f))
    assert np.asarray(img)[0, 0, 0] == 0 and np.array_equal(np.asarray(img)[1:, :, 0], gray8[1:])


def test_32bit_integer_image(gray8: np.ndarray) -> None:
    small = Image.fromarray(gray8.astype(np.int32))  # mode I holding 8-bit values
    assert small.mode == "I" and np.array_equal(np.asarray(to_rgb(small))[..., 0], gray8)
    wide = Image.fromarray(gray8.astype(np.int32) * 257)
    assert np.array_equal(np.asarray(to_rgb(wide))[..., 0], gray8)


def test_8_and_16_bit_copies_of_a_crop_embed_alike(tiny_ckpt: Path, tmp_path: Path) -> None:
    """The issue's check: cosine ≥ 0.99 between the features of the 8-bit and 16-bit copies of one crop."""
    src = write_crop(tmp_path / "src.png", 7)
    rgb = np.asarray(Image.open(src).convert("RGB"))
    gray = np.asarray(Image.open(src).convert("L"))
    Image.fromarray(gray).save(tmp_path / "g8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray(gray.astype(np.float32) / 255).save(tmp_path / "gf.tif")
    _png_rgb16(tmp_path / "rgb16.png", rgb.astype(np.uint16) * 257)
    ex = load_extractor(tiny_ckpt, device="cpu", precision="fp32")
    names = ["src.png", "rgb16.png", "g8.png", "g16.png", "gf.tif"]
    f, kept, failures = extract_features([tmp_path / n for n in names], ex, num_workers=0)
    assert kept == list(range(5)) and not failures
    assert cosine(f[0:1], f[1:2])[0] >= 0.99
    assert cosine(f[2:3], f[3:4])[0] >= 0.99 and cosine(f[2:3], f[4:5])[0] >= 0.99


def test_undecodable_tiff_says_what_to_do(tmp_path: Path) -> None:
    p = tmp_path / "x.tif"
    p.write_bytes(b"II*\x00" + b"\x00" * 60)
    from reid_search.images import ImageLoadError

    with pytest.raises(ImageLoadError, match="save it as 8- or 16-bit RGB") as e:
        load_image(p)
    assert e.value.reason == "not-an-image"


# --------------------------------------------------------------------------- torch.compile


def test_compile_only_for_long_runs_and_falls_back(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def broken_compile(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setattr(torch, "compile", broken_compile)
    ex = load_extractor(tiny_ckpt, device="cpu", precision="fp32")
    ex.prepare(1, 32)  # one query: never compiled
    ex.prepare(COMPILE_MIN_IMAGES - 1, 32)  # short run under auto
    assert calls == []
    with caplog.at_level(logging.WARNING):
        ex.prepare(COMPILE_MIN_IMAGES, 32)
    assert calls == [1] and "torch.compile failed (no C++ compiler); running the model eagerly" in caplog.text
    assert ex.compile == "off" and ex.compile_seconds is None
    x = torch.randn(3, 3, 64, 32)
    assert ex.embed(x).shape == (3, 512)
    with pytest.raises(ModelError, match="compile='sometimes'"):
        TorchExtractor(ex.model, ex.preprocess, "fp", compile="sometimes")


@pytest.mark.slow
def test_compiled_features_equal_eager(tiny_ckpt: Path) -> None:
    eager = load_extractor(tiny_ckpt, device="cpu", precision="fp32", compile="off")
    comp = load_extractor(tiny_ckpt, device="cpu", precision="fp32", compile="on")
    comp.prepare(20, 8)
    assert comp.compile_seconds is not None and comp.compile_seconds > 0
    torch.manual_seed(1)
    for n in (8, 5):  # a full batch and a padded last batch
        x = torch.randn(n, 3, 64, 32)
        np.testing.assert_allclose(comp.embed(x), eager.embed(x), atol=1e-4)


def test_index_reports_the_compile_time_when_it_compiled(tiny_ckpt: Path, market_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import reid_search.torch_extractor as extract_mod
    from reid_search.app.cli import main

    gallery = market_dir / "bounding_box_test"
    args = ["-w", str(tmp_path / "a"), "index", str(gallery), "--model", str(tiny_ckpt), "--batch-size", "2"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "torch.compile" not in r.output, r.output  # a short run: never compiled

    compiled: list[int] = []

    def instant_compile(fn, **kwargs):  # stands in for inductor: the eager function, counted
        compiled.append(1)
        return fn

    monkeypatch.setattr(extract_mod, "COMPILE_MIN_IMAGES", 2)
    monkeypatch.setattr(torch, "compile", instant_compile)
    args[1] = str(tmp_path / "b")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and compiled == [1], r.output
    assert re.search(r"torch\.compile took \d+\.\ds of that", r.output), r.output
