"""Shared fixtures: the read-only ../shared data, tiny checkpoints, tiny Market folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reid_search.checkpoint import save_checkpoint
from reid_search.model import build_model
from reid_search.transforms import Preprocess

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when this clone has none."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present (../shared is only beside the development checkout)")
    return p


# Small inputs keep CPU tests fast; the checkpoint carries them, as a real one does.
TINY_PRE = Preprocess(height=64, width=32)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly initialised resnet18 BNNeck checkpoint with 64×32 inputs."""
    import torch

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model, TINY_PRE)
    return path


def write_crop(path: Path, seed: int, size: tuple[int, int] = (64, 128), mode: str = "RGB") -> Path:
    """A random-noise-plus-blocks JPEG/PNG crop; different seeds give different images."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    arr[: size[1] // 2] = rng.integers(0, 255, 3, dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def iter_batches(ids: np.ndarray, x: np.ndarray, batch: int = 65_536):
    """Split in-memory ``(ids, feats)`` into batches (a ``VectorIndex.build`` source)."""
    for s in range(0, len(ids), batch):
        yield ids[s : s + batch], x[s : s + batch]


@pytest.fixture()
def market_dir(tmp_path: Path) -> Path:
    """A tiny Market-layout root: 4 train ids, 3 test ids over 2 cameras, one junk, one distractor."""
    root = tmp_path / "market"
    seed = 0
    for pid in range(1, 5):
        for cam in (1, 2):
            for k in range(2):
                seed += 1
                write_crop(root / "bounding_box_train" / f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg", seed)
    for pid in range(5, 8):
        seed += 1
        write_crop(root / "query" / f"{pid:04d}_c1s1_000000_00.jpg", seed)
        for k in range(2):
            seed += 1
            write_crop(root / "bounding_box_test" / f"{pid:04d}_c2s1_{k + 1:06d}_00.jpg", seed)
    write_crop(root / "bounding_box_test" / "-1_c1s1_000009_00.jpg", 999)
    write_crop(root / "bounding_box_test" / "0000_c2s1_000010_00.jpg", 998)
    return root


def one_line_error(result, *needles: str, after: str | None = None) -> str:
    """Check a CLI result failed with exit 1 and a one-line ``Error: …`` holding every needle.

    ``after``: a prefix that lines before the error may carry (e.g. per-file
    ``skipped `` warnings logged during the run). Returns the error line.
    """
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines, "no output"
    msg = lines[-1]
    assert msg.startswith("Error: "), result.output
    assert all(after is not None and ln.startswith(after) for ln in lines[:-1]), result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in msg, msg
    return msg



# ---- the two gallery stores ---------------------------------------------------------------------------
#
# Store-level tests take ``store`` (a ``--store`` value) and run once per store: FAISS, and Milvus Lite.
# Every Milvus gallery of a session shares one Lite file: each gallery has its own collections
# (named after its DB's id), and Lite starts one in-process server per file that lives until exit,
# so one file costs one start-up instead of one per test.

STORE_KINDS = ("faiss", "milvus")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faiss_only: tests FAISS internals (the index file, training); "
                                       "not run against the Milvus store")


@pytest.fixture(scope="session")
def milvus_lite_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``--store milvus:PATH.db`` of the session's shared Milvus Lite file (skips where milvus-lite cannot run)."""
    pytest.importorskip("milvus_lite", reason="milvus-lite cannot run here")
    return f"milvus:{tmp_path_factory.mktemp('milvus') / 'store_tests.db'}"


def store_value(kind: str, request: pytest.FixtureRequest) -> str:
    """The ``--store`` value for a store kind (``faiss`` or ``milvus``)."""
    return "faiss" if kind == "faiss" else request.getfixturevalue("milvus_lite_store")


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest) -> str:
    """A ``--store`` value, once per store kind: ``faiss``, then the shared Milvus Lite file."""
    return store_value(request.param, request)


def store_workspace(path: Path, store: str):  # -> Workspace (imported lazily: conftest loads for every test)
    """A workspace at ``path`` whose gallery lives in ``store`` (recorded at the first open)."""
    from reid_search.app.workspace import Workspace

    return Workspace(path, store_override=store)
