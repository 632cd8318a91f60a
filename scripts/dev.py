#!/usr/bin/env python3
"""Bootstrap uv and the locked environment, then run the demo or the tests.

Needs only python3. uv comes from PATH, or is pip-installed once into
.bootstrap/ (a private virtual environment); the project's own environment
is `.venv/`, created by `uv sync --frozen` from the committed uv.lock.

    python3 scripts/dev.py demo [DEMO ARGS]   # the whole system end to end
    python3 scripts/dev.py test [PYTEST ARGS] # the test suite
    python3 scripts/dev.py run CMD ARGS       # anything inside the environment
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOT = ROOT / ".bootstrap"


def find_uv() -> str:
    """Return a uv executable, installing it into .bootstrap/ if needed."""
    found = shutil.which("uv")
    if found:
        return found
    exe = BOOT / "bin" / "uv"
    if exe.exists():
        return str(exe)
    print("dev.py: installing uv into .bootstrap/ (once)", file=sys.stderr)
    venv.EnvBuilder(with_pip=True, clear=True).create(BOOT)
    subprocess.run([str(BOOT / "bin" / "python"), "-m", "pip", "install", "--quiet", "uv>=0.5"], check=True)
    return str(exe)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "run"}:
        print(__doc__, file=sys.stderr)
        return 2
    what, rest = argv[0], argv[1:]
    uv = find_uv()
    env = dict(os.environ, UV_PROJECT_ENVIRONMENT=str(ROOT / ".venv"))
    subprocess.run([uv, "sync", "--frozen", "--quiet"], cwd=ROOT, env=env, check=True)
    if what == "demo":
        cmd = ["reid-search", "demo", *rest]
    elif what == "test":
        cmd = ["python", "-m", "pytest", *rest]
    else:
        cmd = rest
    return subprocess.run([uv, "run", "--frozen", "--no-sync", *cmd], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
