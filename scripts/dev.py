#!/usr/bin/env python3
"""Bootstrap uv and the locked environment, then run the demo or the tests.

Needs only python3. uv comes from PATH (when recent enough), or is
pip-installed once into .bootstrap/ (a private virtual environment); the
project's own environment is `.venv/` (or $UV_PROJECT_ENVIRONMENT), made by
`uv sync --frozen --extra VARIANT` from the committed uv.lock.

VARIANT is `gpu` (faiss-gpu-cu12, onnxruntime-gpu) when `nvidia-smi -L` lists
a GPU and `cpu` (faiss-cpu, onnxruntime) otherwise; REID_SEARCH_VARIANT=cpu|gpu
overrides. The two provide the same `faiss` and `onnxruntime` modules, so the
lock never installs both; switching variants replaces one with the other.

    python3 scripts/dev.py demo [DEMO ARGS]   # the whole system end to end
    python3 scripts/dev.py test [PYTEST ARGS] # the test suite
    python3 scripts/dev.py run CMD ARGS       # anything inside the environment
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Mapping

ROOT = Path(__file__).resolve().parents[1]
BOOT = ROOT / ".bootstrap"
VARIANTS = ("cpu", "gpu")
MIN_UV = (0, 13)  # package-scoped exclude-dependencies in uv.lock (milvus-lite without faiss-cpu)


def _uv_version(exe: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def find_uv() -> str:
    """Return a uv executable (at least MIN_UV), installing it into .bootstrap/ if needed."""
    for exe in (shutil.which("uv"), str(BOOT / "bin" / "uv")):
        if exe and Path(exe).exists():
            version = _uv_version(exe)
            if version is not None and version[:2] >= MIN_UV:
                return exe
    print(f"dev.py: installing uv>={'.'.join(map(str, MIN_UV))} into .bootstrap/ (once)", file=sys.stderr)
    venv.EnvBuilder(with_pip=True, clear=True).create(BOOT)
    subprocess.run([str(BOOT / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    f"uv>={'.'.join(map(str, MIN_UV))}"], check=True)
    return str(BOOT / "bin" / "uv")


def detect_gpu() -> tuple[bool, str]:
    """Whether `nvidia-smi -L` lists a CUDA GPU here, and the evidence in a few words."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False, "no nvidia-smi on PATH"
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"nvidia-smi did not answer ({type(exc).__name__})"
    gpus = [line.strip() for line in out.stdout.splitlines() if line.strip().startswith("GPU ")]
    if out.returncode != 0 or not gpus:
        said = (out.stderr.strip() or out.stdout.strip()).splitlines()
        return False, "nvidia-smi lists no GPU" + (f" ({said[0][:100]})" if said else "")
    name = gpus[0].split(":", 1)[1].split("(UUID")[0].strip() if ":" in gpus[0] else gpus[0]
    return True, f"nvidia-smi lists {len(gpus)} GPU{'s' if len(gpus) > 1 else ''}: {name}"


def choose_variant(environ: Mapping[str, str]) -> tuple[str, str]:
    """``(variant, why)``: REID_SEARCH_VARIANT when set, else gpu exactly when nvidia-smi lists a GPU.

    Raises:
        ValueError: REID_SEARCH_VARIANT is set to something other than cpu or gpu.
    """
    forced = environ.get("REID_SEARCH_VARIANT", "").strip()
    if forced:
        if forced.lower() not in VARIANTS:
            raise ValueError(f"REID_SEARCH_VARIANT={forced!r}: use cpu or gpu, or unset it to choose by nvidia-smi")
        return forced.lower(), f"REID_SEARCH_VARIANT={forced.lower()}"
    has_gpu, why = detect_gpu()
    return ("gpu" if has_gpu else "cpu"), why


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "run"}:
        print(__doc__, file=sys.stderr)
        return 2
    what, rest = argv[0], argv[1:]
    try:
        variant, why = choose_variant(os.environ)
    except ValueError as exc:
        print(f"dev.py: {exc}", file=sys.stderr)
        return 2
    print(f"dev.py: {variant} variant ({why}; REID_SEARCH_VARIANT=cpu|gpu overrides)", file=sys.stderr)
    uv = find_uv()
    env = dict(os.environ, UV_PROJECT_ENVIRONMENT=os.environ.get("UV_PROJECT_ENVIRONMENT") or str(ROOT / ".venv"))
    subprocess.run([uv, "sync", "--frozen", "--quiet", "--extra", variant], cwd=ROOT, env=env, check=True)
    if what == "demo":
        cmd = ["reid-search", "demo", *rest]
    elif what == "test":
        cmd = ["python", "-m", "pytest", *rest]
    else:
        cmd = rest
    return subprocess.run([uv, "run", "--frozen", "--no-sync", *cmd], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
