"""End-to-end tests of the trainer: exact resume, bad input, outputs, learning.

Everything runs on CPU with resnet18 on 64×32 inputs, tiny P×K batches and a
couple of steps per epoch, on seeded synthetic data. Torch runs one intra-op
thread here: these batches are too small to gain from more, and on a busy
2-core machine OpenMP threads that wait for each other make steps several
times slower.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import trainer.train as train_mod
from reid_search.checkpoint import load_model
from reid_search.app.cli import main as cli
from reid_search.data import load_market
from reid_search.errors import ModelError
from reid_search.model import build_model
from reid_search.synthetic import generate
from tests.helpers import one_line_error, write_crop
from trainer.config import RECIPES, TrainConfig, config_to_dict, resolve_config
from trainer.train import evaluate, preprocess_of

# A run that takes a few seconds: 2 steps of 4 identities x 2 images per epoch.
TINY = (
    "arch=resnet18", "height=64", "width=32", "num_identities=4", "num_instances=2",
    "max_steps_per_epoch=2", "num_workers=0", "epochs=1", "eval_period=100", "save_period=100",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 training identities with 6 images each; 6 test identities for query/gallery."""
    root = tmp_path_factory.mktemp("syn") / "d"
    generate(root, ids=12, cameras=3, images_per_id=6, seed=1)
    return root


def tiny_market(root: Path, pids: range, per_id: int) -> Path:
    """A training split only: ``per_id`` random crops of each pid over 2 cameras."""
    for pid in pids:
        for k in range(per_id):
            write_crop(root / "bounding_box_train" / f"{pid:04d}_c{k % 2 + 1}s1_{k:06d}_00.jpg", 100 * pid + k)
    return root


def overrides(*extra: str) -> list[str]:
    out: list[str] = []
    for kv in TINY + extra:
        out += ["-o", kv]
    return out


def run(*args: str):
    return CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)


def train_cli(ws: Path, data: Path, out: Path, *extra: str, resume: bool = False, recipe: str | None = None):
    args = ["-w", str(ws), "train", "--data", str(data), "--output", str(out)]
    if recipe is not None:
        args += ["--recipe", recipe]
    if resume:
        args.append("--resume")
    return run(*args, *overrides(*extra))


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Recursive exact equality of checkpoint contents (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def spy_batches(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Record the labels of every training step."""
    seen: list[torch.Tensor] = []
    step = train_mod.train_step

    def spy(state, images, labels):
        seen.append(labels.clone())
        return step(state, images, labels)

    monkeypatch.setattr(train_mod, "train_step", spy)
    return seen


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "workers, channels_last", [(0, True), (1, False)], ids=["workers0", "workers1-contiguous"]
)
def test_resume_matches_uninterrupted_run(syn: Path, tmp_path: Path, workers: int, channels_last: bool) -> None:
    # The first half ends with an evaluation (its last epoch) that the straight
    # run does not do: evaluating must not disturb RNG or weight layout.
    extra = (f"num_workers={workers}", f"channels_last={channels_last}")
    ws = tmp_path / "ws"
    r = train_cli(ws, syn, tmp_path / "straight", *extra, "epochs=2")
    assert r.exit_code == 0, r.output
    r = train_cli(ws, syn, tmp_path / "split", *extra)
    assert r.exit_code == 0, r.output
    # A resume takes the run's saved config; only the new epochs are given.
    r = run("-w", str(ws), "train", "--data", str(syn), "--output", str(tmp_path / "split"), "--resume",
            "-o", "epochs=2")
    assert r.exit_code == 0, r.output
    for name in ("model.pt", "latest.pt"):
        a = torch.load(tmp_path / "straight" / name, weights_only=True)
        b = torch.load(tmp_path / "split" / name, weights_only=True)
        assert_same(a, b, name)
    ts = torch.load(tmp_path / "split" / "latest.pt", weights_only=True)["train_state"]
    assert ts["epoch"] == 2 and ts["center"]["centers"].shape == (6, 512)
    assert ts["optimizer"]["state"] and ts["center_optimizer"] is not None
    assert "(from 1)" in (tmp_path / "split" / "train.log").read_text()


def test_resume_refuses_incompatible_config_but_allows_more_epochs(syn: Path, tmp_path: Path) -> None:
    ws, out = tmp_path / "ws", tmp_path / "run"
    assert train_cli(ws, syn, out).exit_code == 0
    config_before = (out / "config.json").read_bytes()

    one_line_error(train_cli(ws, syn, out), "already holds a run", "--resume", "--output")
    one_line_error(train_cli(ws, syn, out, "arch=resnet34", resume=True),
                   "cannot resume", "arch", "resnet18", "resnet34", "config.json")
    one_line_error(train_cli(ws, syn, out, resume=True, recipe="baseline"),
                   "cannot resume", "recipe", "softmax_triplet_with_center")
    one_line_error(run("-w", str(ws), "train", "--data", str(syn), "--output", str(out), "--resume",
                       "-o", "center_loss_weight=0"), "cannot resume", "center_loss_weight")
    # The library refuses too, before it writes anything.
    cfg = resolve_config("softmax_triplet", list(TINY))
    with pytest.raises(ModelError, match="recipe: checkpoint has 'softmax_triplet_with_center'"):
        train_mod.main(cfg, syn, out, resume=True, device="cpu")
    assert (out / "config.json").read_bytes() == config_before

    r = run("-w", str(ws), "train", "--data", str(syn), "--output", str(out), "--resume", "-o", "epochs=2")
    assert r.exit_code == 0, r.output
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["train_state"]["epoch"] == 2 and ckpt["config"]["epochs"] == 2
    assert ckpt["config"]["arch"] == "resnet18"
    assert json.loads((out / "config.json").read_text())["epochs"] == 2


def test_resume_with_nothing_to_resume(syn: Path, tmp_path: Path) -> None:
    one_line_error(train_cli(tmp_path / "ws", syn, tmp_path / "none", resume=True),
                   "nothing to resume", "latest.pt", "drop --resume")
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------- bad input


def test_missing_data(tmp_path: Path) -> None:
    ws = str(tmp_path / "ws")
    one_line_error(run("-w", ws, "train", *overrides()), "--data")
    one_line_error(run("-w", ws, "train", "--data", str(tmp_path / "nope"), *overrides()),
                   "no such dataset folder", "nope")
    (tmp_path / "notmarket").mkdir()
    one_line_error(run("-w", ws, "train", "--data", str(tmp_path / "notmarket"), *overrides()),
                   "bounding_box_train")


def test_empty_training_folder(tmp_path: Path) -> None:
    (tmp_path / "d" / "bounding_box_train").mkdir(parents=True)
    one_line_error(run("-w", str(tmp_path / "ws"), "train", "--data", str(tmp_path / "d"), *overrides()),
                   "no images in", "bounding_box_train")


def test_one_identity(tmp_path: Path) -> None:
    data = tiny_market(tmp_path / "d", range(1, 2), 4)
    one_line_error(run("-w", str(tmp_path / "ws"), "train", "--data", str(data), *overrides()),
                   "1 identity", "at least 2")


def test_more_identities_per_batch_than_the_dataset_has(syn: Path, tmp_path: Path) -> None:
    one_line_error(train_cli(tmp_path / "ws", syn, tmp_path / "run", "num_identities=8"),
                   "6 identities", "num_identities=8", "-o num_identities=6")


def test_k_larger_than_every_identity_samples_with_replacement(
    syn: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = spy_batches(monkeypatch)
    r = train_cli(tmp_path / "ws", syn, tmp_path / "run", "num_identities=2", "num_instances=8",
                  "max_steps_per_epoch=1")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "model.pt").is_file()
    assert len(seen) == 1
    labels, counts = seen[0].unique(return_counts=True)
    # Every identity has 6 images, so 8 per identity means repeats.
    assert len(labels) == 2 and counts.tolist() == [8, 8]


def test_unreadable_image_is_skipped_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 4 identities x 2 images with P=4, K=2: the one batch holds every image.
    data = tiny_market(tmp_path / "d", range(1, 5), 2)
    bad = data / "bounding_box_train" / "0003_c2s1_000001_00.jpg"
    bad.write_bytes(b"this is not a jpeg")
    seen = spy_batches(monkeypatch)
    r = run("-w", str(tmp_path / "ws"), "train", "--data", str(data), "--output", str(tmp_path / "run"),
            *overrides())
    assert r.exit_code == 0, r.output
    assert bad.name in r.output and "unreadable" in r.output
    log = (tmp_path / "run" / "train.log").read_text()
    assert "WARNING" in log and str(bad) in log
    assert (tmp_path / "run" / "model.pt").is_file()
    # The bad image was replaced by its identity's other image: the batch is still 4 x 2.
    assert len(seen) == 1 and seen[0].unique(return_counts=True)[1].tolist() == [2, 2, 2, 2]


def test_unknown_recipe_and_keys(tmp_path: Path) -> None:
    ws = str(tmp_path / "ws")
    msg = one_line_error(run("-w", ws, "train", "--recipe", "strong", "--print-config"), "unknown recipe 'strong'")
    assert all(name in msg for name in RECIPES)
    msg = one_line_error(run("-w", ws, "train", "-o", "epoch=3", "--print-config"), "unknown config key 'epoch'")
    assert "epochs" in msg and "num_instances" in msg and "center_loss_weight" in msg
    one_line_error(run("-w", ws, "train", "-o", "epochs=many", "--print-config"), "epochs")
    one_line_error(run("-w", ws, "train", "-o", "epochs", "--print-config"), "key=value")


# ---------------------------------------------------------------- config and outputs


def test_print_config(tmp_path: Path) -> None:
    def cfg_of(*args: str) -> dict:
        r = run("-w", str(tmp_path / "ws"), "train", "--print-config", *args)
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    default = cfg_of()
    assert default == config_to_dict(TrainConfig())
    assert default["recipe"] == "softmax_triplet_with_center" and default["center_loss_weight"] == 5e-4
    assert (default["lr"], default["epochs"], default["milestones"]) == (3.5e-4, 120, [40, 70])
    st = cfg_of("--recipe", "softmax_triplet")
    assert {k for k in st if st[k] != default[k]} == {"recipe", "center_loss_weight"}
    base = cfg_of("--recipe", "baseline")
    assert base["last_stride"] == 2 and base["neck"] == "none" and base["warmup"] is False
    assert base["random_erasing_p"] == 0 and base["label_smoothing"] == 0 and base["center_loss_weight"] == 0
    assert cfg_of("-o", "epochs=7", "-o", "milestones=3,5")["milestones"] == [3, 5]
    assert not (tmp_path / "ws").exists()


def test_run_folder_contents(syn: Path, tmp_path: Path) -> None:
    ws, out = tmp_path / "ws", tmp_path / "run"
    r = train_cli(ws, syn, out, "epochs=2", "save_period=1", "eval_period=1", "log_period=1")
    assert r.exit_code == 0, r.output
    assert "epoch 1: R1" in r.output and "epoch 2: R1" in r.output and str(out / "model.pt") in r.output
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "epoch_1.pt", "epoch_2.pt", "latest.pt", "model.pt", "train.log"]
    log = (out / "train.log").read_text()
    for key in ("id=", "triplet=", "center=", "acc=", "lr=", "img_s=", "epoch 1 step 2/2", "epoch 2/2 done"):
        assert key in log, key
    assert log.count(" eval: R1 ") == 2 and "mAP" in log
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == config_to_dict(resolve_config(overrides=[*TINY, "epochs=2", "save_period=1", "eval_period=1",
                                                           "log_period=1"]))
    assert json.loads((ws / "model.json").read_text())["path"] == str((out / "model.pt").resolve())
    for name in ("epoch_1.pt", "epoch_2.pt", "latest.pt", "model.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        assert ckpt["config"]["arch"] == "resnet18" and ckpt["meta"]["preprocess"]["height"] == 64
        assert ("train_state" in ckpt) == (name != "model.pt")
    assert torch.load(out / "epoch_1.pt", weights_only=True)["train_state"]["epoch"] == 1
    assert torch.load(out / "epoch_2.pt", weights_only=True)["train_state"]["metrics"]["mAP"] > 0
    model, meta, _ = load_model(out / "model.pt")
    assert (meta.preprocess.height, meta.preprocess.width, meta.feat_dim) == (64, 32, 512)
    assert model(torch.randn(2, 3, 64, 32)).shape == (2, 512)


def test_evaluate_leaves_rng_mode_and_layout_alone(syn: Path) -> None:
    ds = load_market(syn)
    model = build_model("resnet18", 6).train()
    pre = preprocess_of(resolve_config(overrides=list(TINY)))
    rng = torch.get_rng_state()
    m = evaluate(model, ds.query, ds.gallery, pre, torch.device("cpu"))
    assert set(m) == {"rank1", "rank5", "rank10", "mAP", "mINP"} and 0 < m["mAP"] <= 1
    assert m["rank1"] <= m["rank5"] <= m["rank10"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    assert all(p.is_contiguous() for p in model.parameters())


# ---------------------------------------------------------------- learning


@pytest.mark.slow
def test_training_beats_untrained_model_on_held_out_identities(tmp_path: Path) -> None:
    data = tmp_path / "syn60"
    generate(data, ids=60, cameras=4, images_per_id=8, seed=0)
    # A short from-scratch schedule: no warmup, a higher lr, padding scaled to
    # the 32-pixel width (the default 10 is for 128) and no random erasing.
    # Measured (seed 0): untrained mAP 0.115 / R1 0.078, trained 0.469 / 0.478.
    cfg = resolve_config(overrides=[
        "arch=resnet18", "height=64", "width=32", "num_identities=8", "num_instances=4", "epochs=4",
        "warmup=false", "lr=1e-3", "pad=2", "random_erasing_p=0", "num_workers=0", "save_period=100",
        "eval_period=100",
    ])
    ds = load_market(data)
    torch.manual_seed(cfg.seed)  # the trained run starts from this same initialisation
    untrained = evaluate(build_model(cfg.arch, 30, cfg.last_stride, cfg.neck), ds.query, ds.gallery,
                         preprocess_of(cfg), torch.device("cpu"))
    result = train_mod.main(cfg, data, tmp_path / "run", device="cpu")
    trained = result.metrics
    assert trained["mAP"] > untrained["mAP"] + 0.15, (untrained, trained)
    assert trained["rank1"] > untrained["rank1"] + 0.15, (untrained, trained)
    # int8 of a trained model (the case `export --int8` exists for) passes its own checks at the
    # defaults: min cosine, no mAP drop beyond 0.5 points, no rank-1 drop beyond 0.5 points and one
    # query. Measured (seed 0, 90 queries, AVX512-VNNI CPU): rank-1 47.8 → 46.7 (one query of 90),
    # mAP 46.9 → 46.6; earlier, on another CPU, rank-1 57.8 → 60.0, mAP 49.8 → 50.3.
    from reid_search.quantize import DEFAULT_MAX_METRIC_DROP, DEFAULT_MIN_COSINE, export_int8

    report = export_int8(tmp_path / "run" / "model.pt", tmp_path / "int8.onnx", data, max_metric_drop=100.0)
    assert report.min_cosine >= DEFAULT_MIN_COSINE and report.metrics is not None, report
    assert not report.metrics.exceeds(DEFAULT_MAX_METRIC_DROP), report.metrics
    assert report.metrics.map_fp32 - report.metrics.map_int8 <= DEFAULT_MAX_METRIC_DROP, report.metrics
