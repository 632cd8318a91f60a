from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from reid_search.app.cli import main
from tests.helpers import one_line_error, write_crop


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_embed_one_image(tiny_ckpt: Path, tmp_path: Path) -> None:
    img = write_crop(tmp_path / "0001_c1s1_000001_00.jpg", 0)
    r = run("--workspace", str(tmp_path / "ws"), "embed", str(img), "--model", str(tiny_ckpt))
    assert r.exit_code == 0, r.output
    name, vec = r.output.strip().split("\t")
    v = np.array(vec.split(), dtype=float)
    assert name == img.name and v.shape == (512,)
    assert abs(np.linalg.norm(v) - 1) < 1e-4
    r = run("-w", str(tmp_path / "ws"), "embed", str(img), "--model", str(tiny_ckpt), "--json")
    obj = json.loads(r.output)
    assert (obj["pid"], obj["camid"], obj["dim"]) == (1, 1, 512)
    np.testing.assert_allclose(obj["feature"], v, atol=1e-5)


def test_embed_folder_npy_and_npz(tiny_ckpt: Path, market_dir: Path, tmp_path: Path) -> None:
    gallery = market_dir / "bounding_box_test"
    r = run("-q", "embed", str(gallery), "--model", str(tiny_ckpt), "--out", str(tmp_path / "g.npy"))
    assert r.exit_code == 0, r.output
    feats = np.load(tmp_path / "g.npy")
    names = (tmp_path / "g.paths.txt").read_text().split()
    assert feats.shape == (8, 512) and len(names) == 8
    r = run("-q", "embed", str(gallery), "--model", str(tiny_ckpt), "--out", str(tmp_path / "g.npz"))
    z = np.load(tmp_path / "g.npz")
    np.testing.assert_allclose(z["features"], feats, atol=1e-6)
    assert sorted(set(z["pids"].tolist())) == [-1, 0, 5, 6, 7]


def test_embed_uses_workspace_model(tiny_ckpt: Path, tmp_path: Path) -> None:
    from reid_search.app.workspace import Workspace

    ws = tmp_path / "ws"
    Workspace(ws).set_model(tiny_ckpt)
    img = write_crop(tmp_path / "a.jpg", 0)
    r = run("embed", str(img), env={"REID_SEARCH_WORKSPACE": str(ws)})
    assert r.exit_code == 0 and len(r.output.split("\t")[1].split()) == 512


def test_cli_errors_are_one_line(tiny_ckpt: Path, tmp_path: Path) -> None:
    ws = str(tmp_path / "ws")
    img = write_crop(tmp_path / "a.jpg", 0)
    one_line_error(run("-w", ws, "embed", str(img)), "no model in workspace", "reid-search train")
    one_line_error(run("-w", ws, "embed", str(tmp_path / "nope"), "--model", str(tiny_ckpt)), "no such image or folder")
    (tmp_path / "empty").mkdir()
    one_line_error(run("-w", ws, "embed", str(tmp_path / "empty"), "--model", str(tiny_ckpt), "--json"), "no images")
    one_line_error(run("-w", ws, "embed", str(tmp_path), "--model", str(tiny_ckpt)), "--out")
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    one_line_error(run("-w", ws, "embed", str(bad), "--model", str(tiny_ckpt)), "not an image")
    one_line_error(run("-w", ws, "embed", str(img), "--model", str(tmp_path / "m.pt")), "no model at")


@pytest.mark.parametrize("cmd", ["embed", "make-synthetic"])
def test_help_has_example(cmd: str) -> None:
    r = run(cmd, "--help")
    assert r.exit_code == 0 and "Example" in r.output and "reid-search " + cmd in r.output


def test_cli_starts_without_heavy_libraries() -> None:
    """`reid-search --help` (and every command's --help) must not wait for torch, faiss or SQLAlchemy
    (importing torchvision alone takes seconds); the command bodies import them when they run."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from reid_search.app.cli import main\n"
        "for args in ([], *[[c] for c in main.commands], ['db', 'upgrade']):\n"
        "    r = CliRunner().invoke(main, [*args, '--help'])\n"
        "    assert r.exit_code == 0 and 'Example' in r.output, (args, r.output)\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'faiss', 'sqlalchemy', 'alembic', 'fastapi', 'onnx')\n"
        "               if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"--help imported: {out.stdout.strip()}"
