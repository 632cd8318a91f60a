"""Checkpoints a user may hand us: broken meta, pickled objects, bad overrides -> one-line errors."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from reid_search.checkpoint import load_model, read_checkpoint
from reid_search.app.cli import main
from reid_search.errors import ModelError
from tests.helpers import one_line_error, write_crop


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


class _Evil:
    """Stands for any pickled object a safe load must refuse."""

    def __reduce__(self):
        return (print, ("this must never run",))


def _rewrite(src: Path, dst: Path, change) -> Path:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    change(ckpt)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    dst.write_bytes(buf.getvalue())
    return dst


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda c: c["meta"].pop("arch"), "meta lacks 'arch'"),
        (lambda c: c["meta"].pop("preprocess"), "meta lacks 'preprocess'"),
        (lambda c: c["meta"].update(num_classes="many"), "bad meta"),
        (lambda c: c["meta"].update(preprocess=None), "bad meta"),
        (lambda c: c["meta"]["preprocess"].update(mean=3), "bad meta"),
        (lambda c: c["meta"].update(last_stride=7), "bad meta"),
        (lambda c: c.update(meta=[1, 2]), "'meta' entry is missing"),
        (lambda c: c.pop("model"), "'model' entry is missing"),
    ],
)
def test_broken_meta_is_a_model_error(tiny_ckpt: Path, tmp_path: Path, change, needle: str) -> None:
    bad = _rewrite(tiny_ckpt, tmp_path / "bad.pt", change)
    with pytest.raises(ModelError, match="damaged checkpoint") as e:
        load_model(bad)
    assert needle in str(e.value) and "\n" not in str(e.value)
    img = write_crop(tmp_path / "a.jpg", 1)
    one_line_error(_run("-w", str(tmp_path / "ws"), "embed", str(img), "--model", str(bad)), str(bad), needle)


def test_pickled_objects_are_refused_in_one_line_without_unsafe_advice(tmp_path: Path, tiny_ckpt: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    ckpt["extra"] = _Evil()
    evil = tmp_path / "evil.pt"
    torch.save(ckpt, evil)
    with pytest.raises(ModelError) as e:
        read_checkpoint(evil)
    msg = str(e.value)
    assert "\n" not in msg and "pickled Python objects" in msg and "print" in msg
    assert "weights_only" not in msg and "trust" not in msg.lower()
    assert "this must never run" not in capsys.readouterr().out
    img = write_crop(tmp_path / "a.jpg", 1)
    line = one_line_error(_run("-w", str(tmp_path / "ws"), "embed", str(img), "--model", str(evil)), "refusing")
    assert "weights_only" not in line


@pytest.mark.parametrize("content", [b"PK\x03\x04 not really a zip" * 10, b"not a checkpoint", b""])
def test_unreadable_file_is_one_line(tmp_path: Path, content: bytes) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(content)
    with pytest.raises(ModelError, match="cannot read") as e:
        read_checkpoint(junk)
    msg = str(e.value)
    assert "\n" not in msg and "weights_only" not in msg and "trust" not in msg


def test_bad_override_is_one_line(tmp_path: Path) -> None:
    ws = str(tmp_path / "ws")
    one_line_error(_run("-w", ws, "demo", "-o", "bogus=1"), "unknown config key 'bogus'")
    one_line_error(_run("-w", ws, "demo", "-o", "epochs=zero"), "cannot parse epochs")
    one_line_error(_run("-w", ws, "train", "--data", ws, "-o", "lr=-1"), "lr must be > 0")
    one_line_error(_run("-w", ws, "train", "--recipe", "nope", "--print-config"), "unknown recipe")
