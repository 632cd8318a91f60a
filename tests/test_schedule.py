"""Warmup + multi-step schedule: the paper's values and the LambdaLR wrapper."""

from __future__ import annotations

import pytest
import torch

from trainer.config import resolve_config
from trainer.schedule import build_scheduler, warmup_multistep_factor

# Paper defaults: warmup 0.01 -> 1 over 10 epochs, x0.1 at 40 and 70.
#   epoch 5: alpha = 0.5, 0.01 * 0.5 + 0.5 = 0.505
EXPECTED = {0: 0.01, 1: 0.109, 5: 0.505, 9: 0.901, 10: 1.0, 39: 1.0, 40: 0.1, 69: 0.1, 70: 0.01, 119: 0.01}


@pytest.mark.parametrize("epoch, factor", sorted(EXPECTED.items()))
def test_paper_schedule_values(epoch, factor):
    assert warmup_multistep_factor(epoch) == pytest.approx(factor, rel=1e-12)


def test_no_warmup_and_unsorted_milestones():
    assert warmup_multistep_factor(0, warmup=False) == 1.0
    assert warmup_multistep_factor(0, warmup_epochs=0) == 1.0
    assert warmup_multistep_factor(50, milestones=(70, 40), gamma=0.5) == 0.5
    # warmup and decay overlap: 0.01*(1-0.5)+0.5 = 0.505, one milestone passed
    assert warmup_multistep_factor(5, milestones=(3,), gamma=0.1) == pytest.approx(0.0505)


def test_negative_epoch_raises():
    with pytest.raises(ValueError):
        warmup_multistep_factor(-1)


def test_lambda_lr_per_epoch_and_resume():
    cfg = resolve_config()
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    lrs, saved = [], None
    for epoch in range(72):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if epoch == 40:
            saved = sched.state_dict()  # checkpoint written after epoch 40; next epoch is 41
    for epoch, factor in EXPECTED.items():
        if epoch < 72:
            assert lrs[epoch] == pytest.approx(cfg.lr * factor, rel=1e-9)
    opt2 = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched2 = build_scheduler(opt2, cfg)
    sched2.load_state_dict(saved)
    resumed = []
    for _ in range(41, 72):
        resumed.append(sched2.get_last_lr()[0])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(lrs[41:72], rel=1e-12)


def test_baseline_recipe_has_no_warmup():
    cfg = resolve_config("baseline")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    build_scheduler(opt, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
