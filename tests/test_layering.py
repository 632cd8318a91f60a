"""The layering stays as designed: import-linter's contracts (pyproject.toml) and the size rule.

The contracts: base → core → store (``indexer``) and trainer → app, every module of
``reid_search`` and ``indexer`` placed in a layer (exhaustive), no import cycle
between sibling modules or packages. Lazy imports inside functions count.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reid_search", "indexer", "trainer")
MAX_LINES = 500
# Library files allowed past MAX_LINES, each with its reason.
LONG_FILES: dict[str, str] = {
    "indexer/coordinator.py": "one class (Gallery) with one job, keeping SQL and the vectors consistent; "
                              "splitting it would spread its private state over modules (its docstring)",
    "indexer/metadata.py": "MetadataDB: one class turning gallery operations into SQL (the codecs and "
                           "the engine factory already live in indexer/db.py and indexer/paths.py)",
}


def test_import_contracts_hold() -> None:
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.skip("import-linter is not installed (it is in the dev group: uv sync)")
    out = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout, out.stdout[-4000:]


def test_no_library_file_is_too_long() -> None:
    long = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            n = len(path.read_text(encoding="utf-8").splitlines())
            rel = path.relative_to(ROOT).as_posix()
            if n > MAX_LINES and rel not in LONG_FILES:
                long[rel] = n
    assert not long, f"split these (or give a reason in LONG_FILES): {long}"
