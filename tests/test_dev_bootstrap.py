"""The cpu/gpu install variants that scripts/dev.py sets up.

* scripts/dev.py picks the variant from a (fake) nvidia-smi, or REID_SEARCH_VARIANT.
* uv.lock resolves both variants from one torch, and never both faiss or both
  onnxruntime builds; this environment holds exactly one variant.
* (slow) dev.py installs the gpu variant into a throwaway environment, where
  `faiss` has its GPU classes and no CPU wheel is left, and switches back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_DISTS = {"faiss-gpu-cu12", "onnxruntime-gpu"}
CPU_DISTS = {"faiss-cpu", "onnxruntime"}


def load_dev() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reid_dev_script", ROOT / "scripts" / "dev.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


dev = load_dev()


def fake_nvidia_smi(bin_dir: Path, stdout: str, code: int = 0, stderr: str = "") -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\nprintf '%s' {shlex.quote(stdout)}\nprintf '%s' {shlex.quote(stderr)} >&2\nexit {code}\n")
    exe.chmod(0o755)


H100S = ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0b1c)\n"
         "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-77aa)\n")


# ---- scripts/dev.py chooses the variant ----------------------------------------------


def test_gpu_variant_when_nvidia_smi_lists_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path / "bin", H100S)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert dev.choose_variant({}) == ("gpu", "nvidia-smi lists 2 GPUs: NVIDIA H100 80GB HBM3")


def test_cpu_variant_when_nvidia_smi_fails_or_is_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path / "broken", "", 9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver")
    monkeypatch.setenv("PATH", str(tmp_path / "broken"))
    variant, why = dev.choose_variant({})
    assert variant == "cpu" and why.startswith("nvidia-smi lists no GPU (NVIDIA-SMI has failed")
    fake_nvidia_smi(tmp_path / "none", "No devices were found\n", 6)
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert dev.choose_variant({}) == ("cpu", "nvidia-smi lists no GPU (No devices were found)")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert dev.choose_variant({}) == ("cpu", "no nvidia-smi on PATH")


def test_variant_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path / "bin", H100S)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert dev.choose_variant({"REID_SEARCH_VARIANT": "CPU"}) == ("cpu", "REID_SEARCH_VARIANT=cpu")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert dev.choose_variant({"REID_SEARCH_VARIANT": "gpu"}) == ("gpu", "REID_SEARCH_VARIANT=gpu")
    with pytest.raises(ValueError, match="use cpu or gpu"):
        dev.choose_variant({"REID_SEARCH_VARIANT": "cuda"})


def test_main_syncs_the_chosen_variant_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    fake_nvidia_smi(tmp_path / "bin", H100S)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("REID_SEARCH_VARIANT", raising=False)
    monkeypatch.delenv("UV_PROJECT_ENVIRONMENT", raising=False)
    calls: list[tuple[list[str], dict]] = []

    real_run = subprocess.run

    def fake_run(cmd, **kw):
        if Path(cmd[0]).name == "nvidia-smi":
            return real_run(cmd, **kw)
        calls.append((list(cmd), kw))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(dev, "find_uv", lambda: "uv")
    monkeypatch.setattr(dev.subprocess, "run", fake_run)
    assert dev.main(["run", "true"]) == 0
    (sync, sync_kw), (run, run_kw) = calls
    assert sync == ["uv", "sync", "--frozen", "--quiet", "--extra", "gpu"]
    assert run == ["uv", "run", "--frozen", "--no-sync", "true"]
    assert sync_kw["env"]["UV_PROJECT_ENVIRONMENT"] == str(ROOT / ".venv")
    err = capsys.readouterr().err
    assert "dev.py: gpu variant (nvidia-smi lists 2 GPUs: NVIDIA H100 80GB HBM3;" in err

    calls.clear()
    monkeypatch.setenv("REID_SEARCH_VARIANT", "cpu")
    monkeypatch.setenv("UV_PROJECT_ENVIRONMENT", str(tmp_path / "env"))
    assert dev.main(["test", "-x"]) == 0
    assert calls[0][0][-2:] == ["--extra", "cpu"] and calls[1][0][-4:] == ["python", "-m", "pytest", "-x"]
    assert calls[0][1]["env"]["UV_PROJECT_ENVIRONMENT"] == str(tmp_path / "env")
    assert "dev.py: cpu variant (REID_SEARCH_VARIANT=cpu;" in capsys.readouterr().err


def test_bad_variant_is_one_line_and_installs_nothing(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("REID_SEARCH_VARIANT", "rocm")
    monkeypatch.setattr(dev, "find_uv", lambda: pytest.fail("must not reach uv"))
    assert dev.main(["demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dev.py: REID_SEARCH_VARIANT='rocm': use cpu or gpu, or unset it to choose by nvidia-smi"]


# ---- the lock resolves both variants ----------------------------------------------


def uv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([dev.find_uv(), *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def export(variant: str) -> dict[str, str]:
    """``{name: 'name==version ; marker'}`` of what ``uv sync --extra variant`` installs (per Python version)."""
    out = uv("export", "--frozen", "--no-hashes", "--no-annotate", "--no-header", "--no-emit-project",
             "--no-dev", "--extra", variant)
    assert out.returncode == 0, out.stderr
    pins: dict[str, str] = {}
    for line in out.stdout.splitlines():
        if line.strip() and not line.startswith(("#", " ", "-")):
            name = line.split("==")[0].strip().lower()
            pins[name] = pins.get(name, "") + line.strip() + "\n"
    return pins


def test_lock_is_current_and_resolves_both_variants_with_one_torch() -> None:
    check = uv("lock", "--check", "--offline")
    assert check.returncode == 0, f"uv.lock is stale: run `uv lock` ({check.stderr.strip()})"
    cpu, gpu = export("cpu"), export("gpu")
    assert CPU_DISTS <= cpu.keys() and not GPU_DISTS & cpu.keys()
    assert GPU_DISTS <= gpu.keys() and not CPU_DISTS & gpu.keys(), "the gpu variant must not pull faiss-cpu/onnxruntime"
    assert not any(n.startswith(("faiss-gpu", "nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12")) for n in cpu)
    # Everything but the variant packages (and the CUDA 12 runtime faiss-gpu-cu12 links) is pinned alike.
    extra_gpu = gpu.keys() - cpu.keys() - GPU_DISTS
    assert extra_gpu and all(n.startswith("nvidia-") and n.endswith("-cu12") for n in extra_gpu), extra_gpu
    assert cpu.keys() - gpu.keys() == CPU_DISTS
    for name in cpu.keys() & gpu.keys():
        assert cpu[name] == gpu[name], f"{name} differs between variants:\n{cpu[name]}{gpu[name]}"
    assert "torch" in cpu and "milvus-lite" in gpu


def test_both_variants_at_once_are_refused(tmp_path: Path) -> None:
    out = uv("sync", "--frozen", "--extra", "cpu", "--extra", "gpu", "--dry-run",
             env={"UV_PROJECT_ENVIRONMENT": str(tmp_path / "env")})
    assert out.returncode != 0 and "incompatible" in out.stderr, out.stderr


def installed(name: str) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def test_this_environment_holds_exactly_one_variant() -> None:
    import faiss

    have = {n for n in CPU_DISTS | GPU_DISTS if installed(n)}
    assert have in (CPU_DISTS, GPU_DISTS), f"mixed or missing variant packages: {sorted(have)}"
    owners = [d.metadata["Name"] for d in metadata.distributions()
              if any(str(f).replace("\\", "/") == "faiss/__init__.py" for f in (d.files or ()))]
    assert len(owners) == 1, f"faiss/ is claimed by {owners}"
    assert hasattr(faiss, "StandardGpuResources") == (have == GPU_DISTS)


# ---- (slow) the gpu variant installed for real, and back ----------------------------

CHECK = """
import json, importlib.metadata as m
import faiss, onnxruntime
def has(n):
    try: m.distribution(n); return True
    except m.PackageNotFoundError: return False
names = ["faiss-cpu", "faiss-gpu-cu12", "onnxruntime", "onnxruntime-gpu", "milvus-lite", "torch"]
print(json.dumps({"dists": [n for n in names if has(n)], "faiss": faiss.__version__,
                  "gpu_classes": all(hasattr(faiss, c) for c in ("StandardGpuResources", "GpuIndexFlatIP",
                                                                 "index_cpu_to_all_gpus", "get_num_gpus")),
                  "ngpu": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else None,
                  "providers": onnxruntime.get_available_providers()}))
"""


def dev_run_check(env_dir: Path, variant: str) -> dict:
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(env_dir), "REID_SEARCH_VARIANT": variant,
           "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "dev.py"), "run", "python", "-c", CHECK],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"dev.py: {variant} variant (REID_SEARCH_VARIANT={variant};" in out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_gpu_variant_installs_alone_and_switches_back(tmp_path: Path) -> None:
    """The issue's failure: faiss-cpu's files over faiss-gpu's left `faiss` without GPU classes.

    Installs through dev.py into a throwaway environment (hard links from uv's
    cache: the GPU wheels download once); no GPU is needed to import them.
    """
    env_dir = tmp_path / "venv"
    cpu = dev_run_check(env_dir, "cpu")
    assert set(cpu["dists"]) == {"faiss-cpu", "onnxruntime", "milvus-lite", "torch"}
    assert not cpu["gpu_classes"] and "CUDAExecutionProvider" not in cpu["providers"]
    gpu = dev_run_check(env_dir, "gpu")  # switching: faiss-cpu out, faiss-gpu-cu12 in
    assert set(gpu["dists"]) == {"faiss-gpu-cu12", "onnxruntime-gpu", "milvus-lite", "torch"}
    assert gpu["gpu_classes"] and gpu["ngpu"] == 0
    assert "CUDAExecutionProvider" in gpu["providers"]
    back = dev_run_check(env_dir, "cpu")
    assert back == cpu
