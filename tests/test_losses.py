"""Losses against hand-computed values and brute-force loops."""

from __future__ import annotations

import math
import os
import socket
import time

import pytest
import torch
import torch.nn.functional as F

from trainer.config import resolve_config
from trainer.losses import (
    CenterLoss,
    CrossEntropyLabelSmooth,
    ReIDLoss,
    batch_hard_triplet_loss,
    center_grad_rescale_,
    euclidean_dist,
    gather_for_triplet,
)

# Four 2-D points, two identities:
#   a0=(0,0), a1=(3,4) -> label 0;  b0=(1,0), b1=(0,2) -> label 1
# Distances: a0a1=5, a0b0=1, a0b1=2, a1b0=sqrt(20), a1b1=sqrt(13), b0b1=sqrt(5).
# Hardest positive / negative per anchor:
#   a0: d_ap=5,       d_an=min(1,2)=1            -> 5-1+0.3           = 4.3
#   a1: d_ap=5,       d_an=min(sqrt20,sqrt13)    -> 5-sqrt13+0.3      = 5.3-sqrt13
#   b0: d_ap=sqrt5,   d_an=min(1,sqrt20)=1       -> sqrt5-1+0.3       = sqrt5-0.7
#   b1: d_ap=sqrt5,   d_an=min(2,sqrt13)=2       -> sqrt5-2+0.3       = sqrt5-1.7
# Mean = (7.2 - sqrt13 + 2*sqrt5) / 4 ~= 2.01665
POINTS = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
LABELS = torch.tensor([0, 0, 1, 1])
S5, S13 = math.sqrt(5), math.sqrt(13)
D_AP = [5.0, 5.0, S5, S5]
D_AN = [1.0, S13, 1.0, 2.0]


def brute_triplet_per_anchor(feats, labels, margin, cand_feats=None, cand_labels=None):
    """Independent slow version: explicit loops over anchors and candidates."""
    if cand_feats is None:
        cand_feats, cand_labels = feats, labels
    out = []
    for i in range(len(feats)):
        pos, neg = [], []
        for j in range(len(cand_feats)):
            d = math.sqrt(max(float(((feats[i] - cand_feats[j]) ** 2).sum()), 1e-12))
            (pos if int(labels[i]) == int(cand_labels[j]) else neg).append(d)
        diff = max(pos) - min(neg)
        out.append(math.log1p(math.exp(diff)) if margin is None else max(0.0, diff + margin))
    return out


def test_triplet_hand_computed_example():
    loss, stats = batch_hard_triplet_loss(POINTS, LABELS, margin=0.3)
    assert loss.item() == pytest.approx((7.2 - S13 + 2 * S5) / 4, abs=1e-5)
    assert stats["d_ap"].item() == pytest.approx(sum(D_AP) / 4, abs=1e-5)
    assert stats["d_an"].item() == pytest.approx(sum(D_AN) / 4, abs=1e-5)


def test_triplet_soft_margin_hand_computed():
    loss, _ = batch_hard_triplet_loss(POINTS, LABELS, margin=None)
    expected = sum(math.log1p(math.exp(p - n)) for p, n in zip(D_AP, D_AN)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_triplet_zero_when_clusters_are_far_apart():
    feats = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.0, 0.1]])
    loss, stats = batch_hard_triplet_loss(feats, LABELS, margin=0.3)
    assert loss.item() == 0.0
    assert stats["d_an"].item() == pytest.approx((10.0 + 9.9 + 9.9 + math.hypot(9.9, 0.1)) / 4, abs=1e-4)


@pytest.mark.parametrize("margin", [0.3, 1.0, None])
def test_triplet_matches_brute_force_with_uneven_groups(margin):
    g = torch.Generator().manual_seed(0)
    # float64: a singleton's d_ap is its distance to itself, which the float32
    # ||x||^2 + ||x||^2 - 2x.x expansion only gets to ~1e-3.
    feats = torch.randn(11, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4])  # ids 3 and 4 have a single image
    loss, _ = batch_hard_triplet_loss(feats, labels, margin=margin)
    expected = brute_triplet_per_anchor(feats, labels, margin)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-9)


def test_triplet_gradient_is_finite_and_correct():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert torch.autograd.gradcheck(lambda f: batch_hard_triplet_loss(f, labels, 0.3)[0], (feats,))
    loss, _ = batch_hard_triplet_loss(feats, labels, 0.3)
    loss.backward()
    assert torch.isfinite(feats.grad).all()


def test_triplet_local_anchors_among_global_batch_equal_full_batch_restricted():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(12, 5, generator=g)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    full_per_anchor = brute_triplet_per_anchor(feats, labels, 0.3)
    full_loss, _ = batch_hard_triplet_loss(feats, labels, 0.3)
    rank_losses = []
    for lo, hi in ((0, 4), (4, 12)):  # "rank 0" owns id 0, "rank 1" ids 1 and 2
        local = feats[lo:hi].clone().requires_grad_(True)
        # What gather_for_triplet builds: other ranks' features are constants, ours carry grad.
        global_feats = torch.cat([feats[:lo], local, feats[hi:]])
        loss, _ = batch_hard_triplet_loss(local, labels[lo:hi], 0.3, global_features=global_feats, global_labels=labels)
        expected = sum(full_per_anchor[lo:hi]) / (hi - lo)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        loss.backward()
        assert local.grad is not None and local.grad.abs().sum() > 0
        rank_losses.append(loss.item() * (hi - lo))
    assert sum(rank_losses) / 12 == pytest.approx(full_loss.item(), rel=1e-5)


def test_triplet_argument_errors():
    with pytest.raises(ValueError, match="both"):
        batch_hard_triplet_loss(POINTS, LABELS, global_features=POINTS)
    with pytest.raises(ValueError):
        batch_hard_triplet_loss(POINTS, LABELS[:3])


def test_euclidean_dist_stays_fp32_under_autocast():
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = euclidean_dist(x.bfloat16(), x.bfloat16())
    assert d.dtype == torch.float32
    assert torch.allclose(d, torch.cdist(x.bfloat16().float(), x.bfloat16().float()), atol=1e-3)


def test_gather_for_triplet_without_process_group_is_identity():
    f, lab = torch.randn(4, 3), torch.arange(4)
    gf, gl = gather_for_triplet(f, lab)
    assert gf is f and gl is lab


def _ddp_worker(rank: int, world: int, init: str, result_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # forked from a parent whose thread pools may be busy
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(3)
        all_feats = torch.randn(8, 4, generator=g)
        all_labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        local = all_feats[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
        gf, gl = gather_for_triplet(local, all_labels[rank * 4 : (rank + 1) * 4])
        ok = torch.equal(gf.detach(), all_feats) and torch.equal(gl, all_labels)
        loss, _ = batch_hard_triplet_loss(local, all_labels[rank * 4 : (rank + 1) * 4], 0.3,
                                          global_features=gf, global_labels=gl)
        loss.backward()
        ok = ok and local.grad is not None and bool(torch.isfinite(local.grad).all())
        with open(os.path.join(result_dir, f"rank{rank}"), "w") as fh:
            fh.write(f"{int(ok)} {loss.item():.8f}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_for_triplet_two_gloo_ranks(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    with socket.socket() as s:  # gloo needs a loopback interface; skip in sandboxes without one
        try:
            s.bind(("127.0.0.1", 0))
        except OSError:
            pytest.skip("no loopback networking")
    init = f"file://{tmp_path / 'pg'}"
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    # fork: no re-import of torch in the children (spawn costs ~10-20 s on a busy 2-core box)
    ctx = mp.start_processes(_ddp_worker, args=(2, init, str(tmp_path)), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("gloo workers did not finish within 120 s")
    g = torch.Generator().manual_seed(3)
    all_feats = torch.randn(8, 4, generator=g)
    all_labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    per_anchor = brute_triplet_per_anchor(all_feats, all_labels, 0.3)
    for rank in range(2):
        ok, loss = (tmp_path / f"rank{rank}").read_text().split()
        assert ok == "1"
        assert float(loss) == pytest.approx(sum(per_anchor[rank * 4 : (rank + 1) * 4]) / 4, rel=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_manual_formula(eps):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 5, generator=g)
    targets = torch.tensor([0, 4, 2, 2, 1, 3])
    loss = CrossEntropyLabelSmooth(5, eps)(logits, targets)
    log_p = torch.log_softmax(logits, dim=1)
    q = torch.full((6, 5), eps / 5) + (1 - eps) * F.one_hot(targets, 5)
    manual = (-(q * log_p).sum(1)).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    if eps == 0.0:
        assert loss.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)


def test_label_smoothing_rejects_wrong_width():
    with pytest.raises(ValueError):
        CrossEntropyLabelSmooth(4)(torch.randn(2, 5), torch.tensor([0, 1]))


def test_center_loss_hand_computed_and_brute_force():
    cl = CenterLoss(3, 2)
    with torch.no_grad():
        cl.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    feats = torch.tensor([[3.0, 4.0], [1.0, 2.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    # ||(3,4)-(0,0)||^2=25, ||(1,2)-(1,1)||^2=1, ||(0,0)-(1,1)||^2=2 -> mean 28/3
    assert cl(feats, labels).item() == pytest.approx(28 / 3)
    g = torch.Generator().manual_seed(5)
    cl2 = CenterLoss(4, 7)
    f = torch.randn(9, 7, generator=g)
    y = torch.randint(0, 4, (9,), generator=g)
    # reid-strong-baseline's formulation: full distance matrix, own-class entries, mean.
    distmat = (f.pow(2).sum(1, keepdim=True) + cl2.centers.pow(2).sum(1) - 2 * f @ cl2.centers.t()).detach()
    expected = sum(distmat[i, y[i]].clamp(1e-12, 1e12).item() for i in range(9)) / 9
    assert cl2(f, y).item() == pytest.approx(expected, rel=1e-5)


def test_center_sgd_step_with_rescale_moves_centre_by_expected_amount():
    weight, lr = 5e-4, 0.5
    cl = CenterLoss(2, 2)
    with torch.no_grad():
        cl.centers.zero_()
    feats = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1])
    opt = torch.optim.SGD(cl.parameters(), lr=lr)
    (weight * cl(feats, labels)).backward()
    # d/dc_y of mean_i ||f_i - c_y||^2 = -(2/B) * sum_{i: y_i = y}(f_i - c_y); B = 2
    # -> grad c0 = -(1, 0), grad c1 = -(0, 2), times weight; the rescale removes the weight.
    center_grad_rescale_(cl, weight)
    assert torch.allclose(cl.centers.grad, torch.tensor([[-1.0, 0.0], [0.0, -2.0]]))
    opt.step()
    # c <- c - lr * grad: c0 = (0.5, 0), c1 = (0, 1.0)
    assert torch.allclose(cl.centers.detach(), torch.tensor([[0.5, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError):
        center_grad_rescale_(cl, 0.0)


def test_reid_loss_full_recipe_equals_sum_of_parts():
    torch.manual_seed(6)
    cfg = resolve_config("softmax_triplet_with_center")
    crit = ReIDLoss(cfg, num_classes=5, feat_dim=8)
    logits = torch.randn(8, 5, requires_grad=True)
    feats = torch.randn(8, 8, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 4, 4])
    total, parts = crit(logits, feats, labels)
    ce = F.cross_entropy(logits, labels, label_smoothing=0.1)
    tri, _ = batch_hard_triplet_loss(feats, labels, 0.3)
    cen = crit.center(feats, labels)
    assert total.item() == pytest.approx((ce + tri + 5e-4 * cen).item(), rel=1e-6)
    assert set(parts) == {"id", "triplet", "d_ap", "d_an", "center", "acc", "loss"}
    assert parts["acc"].item() == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert not any(v.requires_grad for v in parts.values())
    total.backward()
    assert crit.center.centers.grad is not None and feats.grad is not None and logits.grad is not None


def test_reid_loss_baseline_has_no_center_and_plain_ce():
    cfg = resolve_config("baseline")
    crit = ReIDLoss(cfg, num_classes=3, feat_dim=4)
    assert crit.center is None and list(crit.parameters()) == []
    logits, feats = torch.randn(4, 3), torch.randn(4, 4)
    labels = torch.tensor([0, 0, 2, 2])
    total, parts = crit(logits, feats, labels)
    expected = F.cross_entropy(logits, labels) + batch_hard_triplet_loss(feats, labels, 0.3)[0]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert "center" not in parts


def test_reid_loss_half_precision_inputs_give_fp32_loss():
    cfg = resolve_config()
    crit = ReIDLoss(cfg, num_classes=3, feat_dim=4)
    total, _ = crit(torch.randn(4, 3).half(), torch.randn(4, 4).bfloat16(), torch.tensor([0, 0, 1, 1]))
    assert total.dtype == torch.float32 and torch.isfinite(total)
