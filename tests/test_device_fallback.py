"""The CPU fallback of every GPU user: FAISS search, training (AMP, DDP backend), extraction and
ONNX Runtime run on the CPU with one log line when no GPU is visible (GPUs hidden here by
CUDA_VISIBLE_DEVICES or by patching torch/faiss).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import reid_search.devices as devices


@pytest.fixture(autouse=True)
def _fresh_fallback_notes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "_said", set())


def lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def hide_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_extraction_falls_back_with_one_line(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from reid_search.torch_extractor import resolve_device

    hide_gpus(monkeypatch)
    caplog.set_level(logging.INFO, logger="reid_search.devices")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert lines(caplog, "reid_search.devices") == [
        "CUDA_VISIBLE_DEVICES hides every GPU: feature extraction runs on the CPU"]


def test_auto_device_uses_a_visible_gpu_silently(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    caplog.set_level(logging.INFO, logger="reid_search.devices")
    assert devices.auto_device("training", 1) == torch.device("cuda", 1)
    assert lines(caplog, "reid_search.devices") == []


def test_ddp_backend(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import torch.distributed as dist

    caplog.set_level(logging.INFO, logger="reid_search.devices")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert devices.ddp_backend("auto") == "nccl"
    assert devices.ddp_backend("cpu") == "gloo"
    assert lines(caplog, "reid_search.devices") == []
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    assert devices.ddp_backend("auto") == "gloo"
    assert "no NCCL" in lines(caplog, "reid_search.devices")[0]
    caplog.clear()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.ddp_backend("auto") == devices.ddp_backend("cuda") == "gloo"
    assert lines(caplog, "reid_search.devices") == [
        "no CUDA GPU visible: DDP runs on the CPU with the gloo backend instead of NCCL"]


def test_training_falls_back_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from reid_search.synthetic import generate
    from trainer.config import resolve_config
    from trainer.train import main as train_main

    hide_gpus(monkeypatch)
    data = tmp_path / "d"
    generate(data, ids=8, cameras=2, images_per_id=4, seed=3)
    cfg = resolve_config(overrides=["arch=resnet18", "height=64", "width=32", "num_identities=4", "num_instances=2",
                                "max_steps_per_epoch=1", "num_workers=0", "epochs=1", "eval_period=100",
                                "save_period=100"])
    caplog.set_level(logging.INFO, logger="reid_search.devices")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_main(cfg, data, tmp_path / "run")
    finally:
        torch.set_num_threads(n)
    said = lines(caplog, "reid_search.devices")
    assert said[0] == "CUDA_VISIBLE_DEVICES hides every GPU: training runs on the CPU in fp32 (no AMP)"
    assert sum("training" in s for s in said) == 1


def test_onnx_runtime_falls_back_with_one_line(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import onnxruntime

    from reid_search.onnx_model import select_providers

    caplog.set_level(logging.INFO, logger="reid_search.devices")
    # The gpu variant's onnxruntime lists its CUDA provider even where no GPU is visible.
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_providers("auto") == ([("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"],
                                        torch.device("cuda", 0))
    assert lines(caplog, "reid_search.devices") == []
    hide_gpus(monkeypatch)
    assert select_providers("auto") == (["CPUExecutionProvider"], torch.device("cpu"))
    assert select_providers(None) == (["CPUExecutionProvider"], torch.device("cpu"))
    assert lines(caplog, "reid_search.devices") == [
        "CUDA_VISIBLE_DEVICES hides every GPU: ONNX Runtime runs on the CPU (CPUExecutionProvider)"]


def test_cpu_onnxruntime_on_a_gpu_machine_warns(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import onnxruntime

    from reid_search.onnx_model import select_providers

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    caplog.set_level(logging.INFO, logger="reid_search.devices")
    assert select_providers("auto")[1] == torch.device("cpu")
    (rec,) = [r for r in caplog.records if r.name == "reid_search.devices"]
    assert rec.levelno == logging.WARNING and "the cpu variant is installed" in rec.getMessage()


@pytest.mark.parametrize("kind", ["flat", "ivf"])
@pytest.mark.parametrize("gpu_build", [False, True])
def test_faiss_search_falls_back_with_one_line(kind: str, gpu_build: bool, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import faiss

    from indexer.faiss.index import VectorIndex
    from indexer.spec import IndexSpec
    from tests.helpers import iter_batches

    if gpu_build:  # a faiss GPU build where CUDA_VISIBLE_DEVICES hides the GPUs
        monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        why = "CUDA_VISIBLE_DEVICES hides every GPU"
    else:
        if hasattr(faiss, "StandardGpuResources"):
            monkeypatch.delattr(faiss, "StandardGpuResources")
        why = "this faiss build has no GPU support (the cpu variant is installed)"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((800, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(800, dtype=np.int64)
    caplog.set_level(logging.INFO, logger="indexer.faiss.index")
    idx = VectorIndex.build(IndexSpec(kind, min_train=100), 8, lambda: iter_batches(ids, x, 256), len(x))
    _, got = idx.search(x[:5], 1)
    idx.search(x[5:9], 1)
    np.testing.assert_array_equal(got[:, 0], ids[:5])
    said = [s for s in lines(caplog, "indexer.faiss.index") if "search runs on" in s]
    assert len(said) == 1 and said[0].startswith(f"faiss {kind} search runs on CPU") and why in said[0], said
