"""Shared fixtures: a tiny checkpoint, a tiny Market folder, the two gallery stores.

Plain helpers (builders, the stand-in model, the oracle) are in ``tests/helpers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from reid_search.checkpoint import save_checkpoint
from reid_search.model import build_model
from tests.helpers import TINY_PRE, write_market


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly initialised resnet18 BNNeck checkpoint with 64×32 inputs."""
    import torch

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model, TINY_PRE)
    return path


@pytest.fixture()
def market_dir(tmp_path: Path) -> Path:
    """A tiny Market-layout root: 4 train ids, 3 test ids over 2 cameras, one junk, one distractor."""
    return write_market(tmp_path / "market")


# ---- the two gallery stores ---------------------------------------------------------------------------
#
# Store-level tests take ``store`` (a ``--store`` value) and run once per store: FAISS, and Milvus Lite.
# Every Milvus gallery of a session shares one Lite file: each gallery has its own collections
# (named after its DB's id), and Lite starts one in-process server per file that lives until exit,
# so one file costs one start-up instead of one per test.

STORE_KINDS = ("faiss", "milvus")


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
