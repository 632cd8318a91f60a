"""ROC, TPR@FPR, thresholds and open-set rates against hand-computed cases and a slow implementation."""

from __future__ import annotations

import numpy as np
import pytest

from reid_search.calibration import (
    collect_pairs,
    fpr_at_threshold,
    open_set_rates,
    roc_curve,
    threshold_at_fpr,
    tpr_at_fpr,
    tpr_at_threshold,
)

# q0: pid 1 cam 0, q1: pid 2 cam 0. g0 is q0's own camera (excluded), g4 is junk, g5 a distractor.
G_PIDS = np.array([1, 1, 2, 3, -1, 0])
G_CAMS = np.array([0, 1, 1, 1, 1, 1])
Q_PIDS = np.array([1, 2])
Q_CAMS = np.array([0, 0])
DIST = np.array([[0.1, 0.5, 0.3, 0.9, 0.0, 0.7],
                 [0.6, 0.8, 0.2, 0.4, 0.05, 0.4]])
# genuine: 0.5, 0.2; impostors sorted: 0.3 0.4 0.4 0.6 0.7 0.8 0.9 (7)


def _stats(dist=DIST, fprs=(0.01, 0.1, 0.2, 0.3, 0.5, 0.99), **kw):
    return collect_pairs(dist, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, fprs=fprs, **kw)


def test_hand_computed_pairs_and_thresholds():
    s = _stats()
    assert s.genuine.tolist() == [0.2, 0.5]
    assert s.num_impostor == 7 and s.complete
    assert s.impostor_low.tolist() == [0.3, 0.4, 0.4, 0.6, 0.7, 0.8, 0.9]
    # m = floor(f * 7) impostors may be accepted; threshold stays below the (m+1)-th.
    assert threshold_at_fpr(s, 0.01) == 0.2
    assert threshold_at_fpr(s, 0.1) == 0.2
    assert threshold_at_fpr(s, 0.2) == 0.3
    # m = 2, but the 2nd and 3rd smallest impostors tie at 0.4: accepting 0.4 accepts 3 of 7 > 30%.
    assert threshold_at_fpr(s, 0.3) == 0.3
    assert threshold_at_fpr(s, 0.5) == 0.5
    assert tpr_at_threshold(s, 0.3) == 0.5
    assert tpr_at_threshold(s, 0.5) == 1.0
    assert fpr_at_threshold(s, 0.5) == pytest.approx(3 / 7)
    assert tpr_at_fpr(s, (0.1, 0.5)) == {"0.1": 0.5, "0.5": 1.0}


def test_hand_computed_open_set():
    s = _stats()
    # top-1 of q0 is the impostor g2 (0.3; g0 excluded, g4 junk); q1's is its genuine g2 (0.2).
    assert s.top1_genuine.tolist() == [False, True]
    o = open_set_rates(s, 0.3)
    assert (o.detection_identification_rate, o.false_alarm_rate) == (0.5, 0.5)
    o = open_set_rates(s, 0.2)
    assert (o.detection_identification_rate, o.false_alarm_rate) == (0.5, 0.0)
    assert (o.num_known, o.num_query) == (2, 2)


def test_nothing_below_the_first_impostor():
    d = DIST.copy()
    d[1, 2] = 0.35  # q1's genuine now above the smallest impostor (0.3)
    s = _stats(d)
    t = threshold_at_fpr(s, 0.1)
    assert t < 0.3 and np.nextafter(t, np.inf) == 0.3
    assert tpr_at_threshold(s, t) == 0.0


def test_top1_ties_break_by_gallery_index():
    d = np.array([[0.1, 0.3, 0.3, 0.9, 0.0, 0.7],   # g1 (genuine) ties g2 (impostor): g1 first
                  [0.2, 0.8, 0.2, 0.4, 0.05, 0.4]])  # g0 (impostor) ties g2 (genuine): g0 first
    s = _stats(d)
    assert s.top1_genuine.tolist() == [True, False]


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        _stats(np.where(DIST > 0.85, np.nan, DIST))
    with pytest.raises(ValueError, match="no genuine"):
        collect_pairs(DIST, np.array([7, 8]), G_PIDS, Q_CAMS, G_CAMS)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        _stats(fprs=(1.0,))
    s = _stats(fprs=(0.1,))
    with pytest.raises(ValueError, match="kept"):
        threshold_at_fpr(s, 0.5)


# ------------------------------------------------------------ slow reference

def _slow(dist, qp, gp, qc, gc, fpr):
    gen, imp = [], []
    top1 = []
    for i in range(len(qp)):
        items = []
        for j in range(len(gp)):
            if gp[j] == -1 or (gp[j] == qp[i] and gc[j] == qc[i]):
                continue
            (gen if gp[j] == qp[i] else imp).append(float(dist[i, j]))
            items.append((float(dist[i, j]), j, gp[j] == qp[i]))
        items.sort()
        top1.append((items[0][0], items[0][2], any(x[2] for x in items),
                     min((x[0] for x in items if not x[2]), default=np.inf)))
    allowed = int(np.floor(fpr * len(imp)))
    cands = [d for d in sorted(set(gen + imp)) if sum(x <= d for x in imp) <= allowed]
    t = max(cands) if cands else float(np.nextafter(min(imp), -np.inf))
    tpr = sum(x <= t for x in gen) / len(gen)
    known = [r for r in top1 if r[2]]
    dir_ = sum(r[1] and r[0] <= t for r in known) / len(known)
    far = sum(r[3] <= t for r in top1) / len(top1)
    return t, tpr, dir_, far


@pytest.mark.parametrize("seed", range(6))
def test_against_slow_implementation(seed):
    rng = np.random.default_rng(seed)
    nq, ng = 13, 40
    qp, gp = rng.integers(0, 6, nq), rng.integers(-1, 6, ng)
    qc, gc = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    qp[0], gp[0], gc[0], qc[0] = 2, 2, 1, 0  # at least one genuine pair
    # Rounded distances: plenty of ties, between and across genuine and impostor pairs.
    dist = np.round(rng.random((nq, ng)), 1)
    for fpr in (0.01, 0.05, 0.2, 0.5):
        s = collect_pairs(dist, qp, gp, qc, gc, fprs=(fpr,), block_size=4)
        t, tpr, dir_, far = _slow(dist, qp, gp, qc, gc, fpr)
        assert threshold_at_fpr(s, fpr) == t
        assert tpr_at_threshold(s, t) == pytest.approx(tpr)
        o = open_set_rates(s, t)
        assert o.detection_identification_rate == pytest.approx(dir_)
        assert o.false_alarm_rate == pytest.approx(far)
        # The block size and how many impostors are kept change nothing.
        s2 = collect_pairs(dist, qp, gp, qc, gc, fprs=(fpr, 0.9), block_size=100)
        assert threshold_at_fpr(s2, fpr) == t


def test_roc_curve_is_exact_at_its_points():
    rng = np.random.default_rng(3)
    qp, gp = rng.integers(0, 5, 20), rng.integers(0, 5, 60)
    qc, gc = np.zeros(20, int), np.ones(60, int)
    dist = rng.random((20, 60))
    s = collect_pairs(dist, qp, gp, qc, gc, fprs=(0.99,), bins=16)
    fpr, tpr, thr = roc_curve(s)
    same = qp[:, None] == gp[None, :]
    for f, t, th in zip(fpr, tpr, thr):
        assert f == pytest.approx((dist[~same] <= th).mean())
        assert t == pytest.approx((dist[same] <= th).mean())
    assert np.all(np.diff(thr) >= 0) and np.all(np.diff(fpr) >= -1e-12)
    assert fpr[-1] == pytest.approx(1.0) and tpr[-1] == pytest.approx(1.0)


def _clusters(rng, ids, per_id, centres, sigma):
    pids = np.repeat(ids, per_id)
    f = centres[pids] + sigma * rng.standard_normal((pids.size, centres.shape[1]))
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32), pids


def test_threshold_holds_its_fpr_on_held_out_identities():
    rng = np.random.default_rng(0)
    dim, n_ids = 32, 200
    centres = rng.standard_normal((n_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def split(ids):
        q, qp = _clusters(rng, ids, 3, centres, 0.1)
        g, gp = _clusters(rng, ids, 6, centres, 0.1)
        d = np.maximum(2 - 2 * q @ g.T, 0)
        return d, qp, gp, np.zeros(qp.size, int), np.ones(gp.size, int)

    calib, held = split(np.arange(100)), split(np.arange(100, 200))
    target = 1e-3
    s = collect_pairs(*calib, fprs=(target,))
    assert s.num_impostor >= 100_000
    t = threshold_at_fpr(s, target)
    assert fpr_at_threshold(s, t) <= target
    d, qp, gp, _, _ = held
    measured = (d[qp[:, None] != gp[None, :]] <= t).mean()
    assert target / 2 <= measured <= 2 * target
    assert tpr_at_threshold(s, t) > 0.5  # the clusters separate: the threshold is not trivially tight
