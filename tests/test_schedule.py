"""Warmup + multi-step schedule: reid-strong-baseline's per-epoch lr and the LambdaLR wrapper."""

from __future__ import annotations

import bisect
import warnings

import pytest
import torch

from trainer.config import resolve_config
from trainer.schedule import build_scheduler, describe_schedule, warmup_multistep_factor

# The reference's per-epoch lr (issue 15, measured on reid-strong-baseline):
# epoch 0 3.815e-5, 1 7.28e-5, 5 2.11e-4, 9..38 3.5e-4, 39..68 3.5e-5, 69..119 3.5e-6.
#   epoch 0 trains at step 1: 0.01 * 0.9 + 0.1 = 0.109 -> 3.815e-5
#   epoch 5 trains at step 6: 0.01 * 0.4 + 0.6 = 0.604 -> 2.114e-4
REFERENCE_LR = {0: 3.815e-5, 1: 7.28e-5, 5: 2.114e-4}
REFERENCE_LR.update({e: 3.5e-4 for e in range(9, 39)})
REFERENCE_LR.update({e: 3.5e-5 for e in range(39, 69)})
REFERENCE_LR.update({e: 3.5e-6 for e in range(69, 120)})


class _ReferenceStyleScheduler(torch.optim.lr_scheduler.LRScheduler):
    """An independent model of the reference: a chainable scheduler whose lr is a
    function of ``last_epoch``, built (which steps it once) and then stepped at the
    START of every epoch, as reid-strong-baseline's trainer does."""

    def __init__(self, optimizer, milestones, gamma, warmup_factor, warmup_iters, warmup=True):
        self.milestones, self.gamma = list(milestones), gamma
        self.warmup_factor, self.warmup_iters, self.warmup = warmup_factor, warmup_iters, warmup
        super().__init__(optimizer)

    def get_lr(self):
        f = 1.0
        if self.warmup and self.last_epoch < self.warmup_iters:
            a = self.last_epoch / self.warmup_iters
            f = self.warmup_factor * (1 - a) + a
        return [b * f * self.gamma ** bisect.bisect_right(self.milestones, self.last_epoch) for b in self.base_lrs]


def _reference_lrs(epochs, lr, **kw) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = _ReferenceStyleScheduler(opt, **kw)
    out = []
    with warnings.catch_warnings():  # stepping before optimizer.step() is the reference's order
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(epochs):
            sched.step()  # the reference's EPOCH_STARTED handler
            out.append(opt.param_groups[0]["lr"])
    return out


def _our_lrs(cfg) -> list[float]:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    out = []
    for _ in range(cfg.epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()  # our trainer steps at the end of each epoch
    return out


def test_paper_schedule_equals_reference_table_in_all_120_epochs():
    cfg = resolve_config()
    lrs = _our_lrs(cfg)
    assert len(lrs) == 120
    for epoch, lr in REFERENCE_LR.items():
        assert lrs[epoch] == pytest.approx(lr, rel=1e-3), epoch
    # the shape: the first decay is in epoch 39, the second in epoch 69 (the old schedule had 40 and 70)
    assert lrs[38] > lrs[39] and lrs[68] > lrs[69]
    assert lrs[0] == pytest.approx(3.5e-4 * 0.109, rel=1e-12)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["epochs=12", "milestones=8,11", "warmup_epochs=3"],
        ["epochs=30", "milestones=5,20,25", "gamma=0.5", "warmup_epochs=7", "warmup_factor=0.1"],
        ["epochs=9", "warmup=false", "milestones=4"],
        ["epochs=5", "warmup_epochs=1"],
    ],
)
def test_same_shape_as_reference_for_other_schedules(overrides):
    cfg = resolve_config("softmax_triplet_with_center", overrides)
    ref = _reference_lrs(cfg.epochs, cfg.lr, milestones=cfg.milestones, gamma=cfg.gamma,
                         warmup_factor=cfg.warmup_factor, warmup_iters=cfg.warmup_epochs, warmup=cfg.warmup)
    assert _our_lrs(cfg) == pytest.approx(ref, rel=1e-12)


def test_factor_values_and_options():
    assert warmup_multistep_factor(0) == pytest.approx(0.109)
    assert warmup_multistep_factor(8) == pytest.approx(0.01 * 0.1 + 0.9)
    assert warmup_multistep_factor(9) == 1.0
    assert warmup_multistep_factor(39) == pytest.approx(0.1)
    assert warmup_multistep_factor(69) == pytest.approx(0.01)
    assert warmup_multistep_factor(0, warmup=False) == 1.0
    assert warmup_multistep_factor(0, warmup_epochs=0) == 1.0
    # unsorted milestones; epoch 49 trains at step 50
    assert warmup_multistep_factor(49, milestones=(70, 40), gamma=0.5) == 0.5
    # warmup and decay overlap: step 5 -> 0.01*(1-0.5)+0.5 = 0.505, one milestone passed
    assert warmup_multistep_factor(4, milestones=(3,), gamma=0.1) == pytest.approx(0.0505)


def test_negative_epoch_raises():
    with pytest.raises(ValueError):
        warmup_multistep_factor(-1)


def test_lambda_lr_resume_is_exact():
    cfg = resolve_config()
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    lrs, saved = [], None
    for epoch in range(72):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if epoch == 40:
            saved = sched.state_dict()  # checkpoint written after epoch 40; next epoch is 41
    opt2 = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched2 = build_scheduler(opt2, cfg)
    sched2.load_state_dict(saved)
    resumed = []
    for _ in range(41, 72):
        resumed.append(sched2.get_last_lr()[0])
        opt2.step()
        sched2.step()
    assert resumed == lrs[41:72]


def test_baseline_recipe_has_no_warmup():
    cfg = resolve_config("baseline")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    build_scheduler(opt, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_describe_schedule_lists_runs():
    cfg = resolve_config("softmax_triplet_with_center", ["epochs=6", "lr=1e-3", "warmup_epochs=2", "milestones=4"])
    # epoch 0 at step 1: 0.01*0.5+0.5 = 0.505; epochs 1-2 at 1; step 4 passes the milestone: epochs 3-5 at 1e-4
    assert describe_schedule(cfg) == "lr by epoch 0: 0.000505, 1-2: 0.001, 3-5: 0.0001"
