"""DistributedDataParallel training: 2 CPU processes with gloo, launched by torchrun.

The workers run the real command (``torchrun -m ...`` equivalent: the CLI
group called inside each rank) with a few spies patched into
``trainer.train``: the labels of each step, what triplet mining gathered,
which checkpoints each rank wrote, and the final parameters of each rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from reid_search.data import load_market, training_labels
from reid_search.synthetic import generate
from trainer.sampler import identity_batches

REPO = Path(__file__).resolve().parents[1]
P, K, STEPS, EPOCHS, SEED = 4, 2, 2, 2, 3

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import torch

    import trainer.checkpointing as C
    import trainer.train as T

    rank = int(os.environ["RANK"])
    out = Path(os.environ["SPY_DIR"])
    record = {"labels": [], "gathered": [], "saved": [], "world": int(os.environ["WORLD_SIZE"])}
    last = {}
    step, gather, save = T.train_step, T.gather_for_triplet, C.save_checkpoint

    def spy_step(state, images, labels):
        record["labels"].append(labels.tolist())
        last["state"] = state
        return step(state, images, labels)

    def spy_gather(features, labels):
        gf, gl = gather(features, labels)
        record["gathered"].append([features.shape[0], gf.shape[0], gl.tolist(), bool(gf.requires_grad)])
        return gf, gl

    def spy_save(path, *args, **kwargs):
        record["saved"].append(Path(path).name)
        return save(path, *args, **kwargs)

    T.train_step, T.gather_for_triplet, C.save_checkpoint = spy_step, spy_gather, spy_save

    from reid_search.app.cli import main

    try:
        main(sys.argv[1:], prog_name="reid-search", standalone_mode=False)
    finally:
        state = last.get("state")
        if state is not None:
            params = {n: p.detach().clone() for n, p in state.model.module.named_parameters()}
            params["center.centers"] = state.criterion.center.centers.detach().clone()
            torch.save(params, out / f"params{rank}.pt")
        (out / f"record{rank}.json").write_text(json.dumps(record))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable")
def test_two_process_gloo_training(tmp_path: Path) -> None:
    data = tmp_path / "syn"
    generate(data, ids=12, cameras=3, images_per_id=6, seed=1)
    ws, out, spy = tmp_path / "ws", tmp_path / "run", tmp_path / "spy"
    spy.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    opts = [
        "arch=resnet18", "height=64", "width=32", f"num_identities={P}", f"num_instances={K}",
        f"max_steps_per_epoch={STEPS}", f"epochs={EPOCHS}", "num_workers=0", f"seed={SEED}",
        "eval_period=100", "save_period=1",
    ]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
        "-q", "-w", str(ws), "train", "--data", str(data), "--output", str(out), "--device", "cpu",
    ] + [a for o in opts for a in ("-o", o)]
    env = {
        **os.environ, "SPY_DIR": str(spy), "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        log, _ = proc.communicate()
        pytest.fail(f"2-process training did not finish in 420 s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]

    rec = [json.loads((spy / f"record{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in rec] == [2, 2]
    assert len(rec[0]["labels"]) == len(rec[1]["labels"]) == EPOCHS * STEPS  # both ranks trained every step

    # Each step's two local batches are the two halves of the single-process global batch.
    _, labels, _ = training_labels(load_market(data).train)
    expected = []
    for epoch in range(EPOCHS):
        for batch in identity_batches(labels, P, K, SEED, epoch)[:STEPS]:
            expected.append([labels[i] for chunk in batch for i in chunk])
    for step, want in enumerate(expected):
        a, b = rec[0]["labels"][step], rec[1]["labels"][step]
        assert len(a) == len(b) == P * K // 2
        assert not set(a) & set(b), f"step {step}: ranks share identities {set(a) & set(b)}"
        assert a + b == want
        # Triplet mining on every rank saw the whole global batch, in rank order.
        for r, mine in ((0, a), (1, b)):
            n_local, n_global, gathered, grad = rec[r]["gathered"][step]
            assert (n_local, n_global, gathered, grad) == (P * K // 2, P * K, a + b, True)

    # DDP kept the weights in sync; the centres, outside DDP, too (their gradients are all-reduced).
    p0, p1 = (torch.load(spy / f"params{r}.pt", weights_only=True) for r in (0, 1))
    assert p0.keys() == p1.keys() and len(p0) > 10
    for name in p0:
        assert torch.equal(p0[name], p1[name]), f"{name} differs between ranks"

    # Rank 0 alone wrote the files, model.pt once; the saved weights are the trained ones.
    assert rec[1]["saved"] == []
    assert rec[0]["saved"].count("model.pt") == 1
    assert rec[0]["saved"].count("latest.pt") == EPOCHS
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "epoch_1.pt", "epoch_2.pt", "latest.pt", "model.pt", "train.log"]
    final = torch.load(out / "model.pt", weights_only=True)["model"]
    for name, value in p0.items():
        if name != "center.centers":
            assert torch.equal(final[name], value), name
    log_text = (out / "train.log").read_text()
    assert "world 2" in log_text and "epoch 2 eval: R1" in log_text
    assert json.loads((ws / "model.json").read_text())["path"] == str((out / "model.pt").resolve())
