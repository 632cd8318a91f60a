"""The built wheel installs into a fresh environment and its CLI indexes, queries and evaluates.

Catches what a source checkout hides: files the wheel leaves out (the Alembic
scripts, which live outside the packages and are force-included), imports of
the source tree, undeclared dependencies. Installs with uv (its cache makes
torch cheap; pins from uv.lock keep the versions the tests ran with).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _uv() -> str:
    found = shutil.which("uv") or next(
        (str(p) for p in (ROOT / ".bootstrap" / "bin" / "uv",) if p.is_file()), None)
    if found is None:
        pytest.skip("uv not found on PATH or in .bootstrap/ (python3 scripts/dev.py run true installs it)")
    return found


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _extras(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return {ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Provides-Extra:")}


def test_wheel_installs_and_runs_index_query_eval(tmp_path: Path, market_dir: Path, tiny_ckpt: Path) -> None:
    uv = _uv()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "UV_PROJECT"))}
    env.update(OMP_NUM_THREADS="1", UV_NO_PROGRESS="1")
    dist = tmp_path / "dist"
    _run([uv, "build", "--wheel", "--out-dir", str(dist)], ROOT, env)
    (wheel,) = dist.glob("reid_search-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert "indexer/alembic/env.py" in names and any(n.startswith("indexer/alembic/versions/") for n in names)
    assert not any(n.startswith("tests/") for n in names)

    pins = tmp_path / "pins.txt"
    cpu = "cpu" in _extras(wheel)  # the cpu/gpu variants are conflicting extras: pin and install the cpu one
    _run([uv, "export", "--frozen", "--no-hashes", "--no-dev", "--no-emit-project",
          *(["--extra", "cpu"] if cpu else []), "-o", str(pins)], ROOT, env)
    venv = tmp_path / "venv"
    _run([uv, "venv", "--python", sys.executable, str(venv)], tmp_path, env)
    py = venv / "bin" / "python"
    target = f"{wheel}[cpu]" if cpu else str(wheel)
    _run([uv, "pip", "install", "--python", str(py), "-c", str(pins), target], tmp_path, env, timeout=1200)

    # the installed package, not this checkout, answers (the Alembic scripts from inside the wheel)
    r = _run([str(py), "-c", "import indexer.migrations as m, reid_search; print(m.script_location()); "
              "print(reid_search.__file__)"], tmp_path, env)
    for line in r.stdout.split():
        assert Path(line).resolve().is_relative_to(venv.resolve()), r.stdout

    cli = str(venv / "bin" / "reid-search")
    ws = tmp_path / "ws"
    _run([cli, "-q", "-w", str(ws), "index", str(market_dir / "bounding_box_test"), "--model", str(tiny_ckpt)],
         tmp_path, env)
    query = sorted((market_dir / "query").iterdir())[0]
    r = _run([cli, "-q", "-w", str(ws), "query", str(query), "--top-k", "3", "--json",
              "--model", str(tiny_ckpt)], tmp_path, env)
    hits = json.loads(r.stdout)["hits"]
    assert len(hits) == 3 and [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    r = _run([cli, "-q", "-w", str(ws), "eval", "--json", "--model", str(tiny_ckpt)], tmp_path, env)
    metrics = json.loads(r.stdout)
    assert metrics["num_query"] == 3 and 0.0 <= metrics["mAP"] <= 1.0
