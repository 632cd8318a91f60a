"""CMC / mAP / mINP against hand-computed cases and a slow per-query implementation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reid_search.metrics import evaluate

# Gallery of five: two views of pid 1 (cams 1 and 2), pid 2 (cam 1), a distractor
# (pid 0) and a junk image (pid -1).
G_PIDS = np.array([1, 1, 2, 0, -1])
G_CAMS = np.array([1, 2, 1, 2, 1])
Q_PIDS = np.array([1, 2, 1])
Q_CAMS = np.array([1, 2, 3])
DIST = np.array(
    [
        # q0 (pid 1, cam 1): g0 is the same view (removed, although nearest), g4 junk
        # (removed). Kept order: g2 0.1, g3 0.2, g1 0.3 -> the only positive at rank 3.
        [0.05, 0.3, 0.1, 0.2, 0.5],
        # q1 (pid 2, cam 2): g3 0.1, then a three-way tie at 0.4 kept in gallery
        # order g0, g1, g2 -> the positive g2 at rank 4 (rank 2 if ties favoured it).
        [0.4, 0.4, 0.4, 0.1, 0.4],
        # q2 (pid 1, cam 3): junk g4 at 0.0 is dropped; g3 0.1, then g0 and g1 tie at
        # 0.2 (both positives), g2 0.9 -> positives at ranks 2 and 3.
        [0.2, 0.2, 0.9, 0.1, 0.0],
    ]
)
# AP: 1/3, 1/4, (1/2 + 2/3)/2 = 7/12 -> mAP = 7/18.
# INP: 1/3, 1/4, 2/3 -> mINP = 5/12.
# First hits at ranks 3, 4, 2; CMC over the 4 non-junk gallery items.
EXPECTED_CMC = np.array([0.0, 1 / 3, 2 / 3, 1.0])


def slow_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """Obvious per-query version: sort by (distance, index), drop junk, walk the list."""
    num_q, num_g = distmat.shape
    kept_total = int(np.sum(g_pids != -1))
    length = min(max_rank, kept_total)
    firsts, aps, inps = [], [], []
    for i in range(num_q):
        ranked = sorted(range(num_g), key=lambda j: (distmat[i, j], j))
        kept = [
            j
            for j in ranked
            if g_pids[j] != -1 and not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])
        ]
        hits = [r + 1 for r, j in enumerate(kept) if g_pids[j] == q_pids[i]]
        if not hits:
            continue
        firsts.append(hits[0])
        aps.append(sum((n + 1) / r for n, r in enumerate(hits)) / len(hits))
        inps.append(len(hits) / hits[-1])
    if not firsts:
        return None
    cmc = np.array([sum(f <= r for f in firsts) / len(firsts) for r in range(1, length + 1)])
    return {
        "cmc": cmc,
        "mAP": float(np.mean(aps)),
        "mINP": float(np.mean(inps)),
        "num_valid": len(firsts),
        "num_query": num_q,
    }


def assert_same(got, want, tol=1e-9):
    assert got["num_valid"] == want["num_valid"]
    assert got["num_query"] == want["num_query"]
    assert got["cmc"].shape == want["cmc"].shape
    np.testing.assert_allclose(got["cmc"], want["cmc"], rtol=0, atol=tol)
    assert got["mAP"] == pytest.approx(want["mAP"], abs=tol)
    assert got["mINP"] == pytest.approx(want["mINP"], abs=tol)


def test_hand_case():
    res = evaluate(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)
    assert res["num_valid"] == 3 and res["num_query"] == 3
    np.testing.assert_allclose(res["cmc"], EXPECTED_CMC, atol=1e-12)
    assert res["mAP"] == pytest.approx(7 / 18, abs=1e-12)
    assert res["mINP"] == pytest.approx(5 / 12, abs=1e-12)


def test_hand_case_per_query_and_max_rank():
    ap = [1 / 3, 1 / 4, 7 / 12]
    inp = [1 / 3, 1 / 4, 2 / 3]
    first = [3, 4, 2]
    for i in range(3):
        res = evaluate(DIST[i : i + 1], Q_PIDS[i : i + 1], G_PIDS, Q_CAMS[i : i + 1], G_CAMS, max_rank=2)
        assert res["mAP"] == pytest.approx(ap[i], abs=1e-12)
        assert res["mINP"] == pytest.approx(inp[i], abs=1e-12)
        np.testing.assert_array_equal(res["cmc"], [float(first[i] <= 1), float(first[i] <= 2)])


def test_ties_rank_lower_gallery_index_first():
    # One query, all distances equal: the order is gallery order.
    g_pids = np.array([5, 7, 7, 5, 7])
    g_cams = np.zeros(5, dtype=int)
    res = evaluate(np.zeros((1, 5)), np.array([7]), g_pids, np.array([1]), g_cams)
    # positives at ranks 2, 3, 5
    assert res["mAP"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    assert res["mINP"] == pytest.approx(3 / 5)
    np.testing.assert_allclose(res["cmc"], [0, 1, 1, 1, 1])
    # Same row in float32 and with the tie broken the other way by a tiny margin.
    d = np.array([[0.5, 0.5, 0.5, 0.5 - 1e-3, 0.5]], dtype=np.float32)
    res = evaluate(d, np.array([7]), g_pids, np.array([1]), g_cams)
    # order: g3 (neg), g0 (neg), g1, g2, g4 -> positives at 3, 4, 5
    assert res["mAP"] == pytest.approx((1 / 3 + 2 / 4 + 3 / 5) / 3)


def test_distractors_count_as_negatives_and_junk_is_dropped():
    # Same ranking twice, once with the item in front being junk (-1), once a
    # distractor (0): junk disappears, the distractor pushes the positive to rank 2.
    d = np.array([[0.1, 0.2]])
    junk = evaluate(d, np.array([3]), np.array([-1, 3]), np.array([0]), np.array([1, 1]))
    distractor = evaluate(d, np.array([3]), np.array([0, 3]), np.array([0]), np.array([1, 1]))
    assert junk["mAP"] == 1.0 and distractor["mAP"] == 0.5
    assert junk["cmc"].shape == (1,) and distractor["cmc"].shape == (2,)


def test_query_without_valid_match_is_skipped():
    dist = np.vstack([DIST, [0.3, 0.1, 0.2, 0.4, 0.5]])
    q_pids = np.append(Q_PIDS, 9)  # pid 9 is not in the gallery
    q_cams = np.append(Q_CAMS, 1)
    res = evaluate(dist, q_pids, G_PIDS, q_cams, G_CAMS)
    assert res["num_valid"] == 3 and res["num_query"] == 4
    assert res["mAP"] == pytest.approx(7 / 18)
    # Only same-camera views of its identity: skipped as well.
    with pytest.raises(ValueError, match="no query has a valid"):
        evaluate(DIST[1:2], np.array([2]), G_PIDS, np.array([1]), G_CAMS)


def test_all_invalid_raises():
    with pytest.raises(ValueError, match="no query has a valid"):
        evaluate(DIST, np.array([8, 9, 10]), G_PIDS, Q_CAMS, G_CAMS)
    with pytest.raises(ValueError, match="no query has a valid"):
        evaluate(DIST[:, 4:], Q_PIDS, G_PIDS[4:], Q_CAMS, G_CAMS[4:])  # all junk


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.zeros(5), Q_PIDS, G_PIDS, Q_CAMS, G_CAMS), "distmat must be 2-D"),
        ((DIST, Q_PIDS[:2], G_PIDS, Q_CAMS, G_CAMS), "q_pids has 2 entries"),
        ((DIST, Q_PIDS, G_PIDS[:4], Q_CAMS, G_CAMS), "g_pids has 4 entries"),
        ((DIST, Q_PIDS, G_PIDS, Q_CAMS[:1], G_CAMS), "q_camids has 1 entries"),
        ((DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS[:3]), "g_camids has 3 entries"),
        ((DIST, Q_PIDS.astype(float), G_PIDS, Q_CAMS, G_CAMS), "q_pids must hold integers"),
        ((DIST, Q_PIDS[:, None], G_PIDS, Q_CAMS, G_CAMS), "q_pids must be 1-D"),
    ],
)
def test_validation(args, message):
    with pytest.raises(ValueError, match=message):
        evaluate(*args)


def test_rejects_nan_and_bad_max_rank():
    d = DIST.copy()
    d[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate(d, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)
    with pytest.raises(ValueError, match="max_rank"):
        evaluate(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=0)


def test_dtypes_and_id_types_agree():
    base = evaluate(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)
    other = evaluate(
        DIST.astype(np.float32),
        Q_PIDS.astype(np.int32),
        G_PIDS.astype(np.int16),
        Q_CAMS.astype(np.uint8),
        G_CAMS.astype(np.int64),
    )
    assert_same(other, base)
    assert_same(evaluate(DIST.astype(np.float16), Q_PIDS, G_PIDS, Q_CAMS, G_CAMS), base)
    as_int = np.round(DIST * 20).astype(np.int64)  # same order, same ties
    assert_same(evaluate(as_int, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS), base)


def test_infinite_distances_rank_last():
    d = np.array([[np.inf, 1.0, np.inf, 2.0]])
    res = evaluate(d, np.array([1]), np.array([1, 2, 1, 3]), np.array([0]), np.array([1, 1, 1, 1]))
    want = slow_evaluate(d, np.array([1]), np.array([1, 2, 1, 3]), np.array([0]), np.array([1, 1, 1, 1]))
    assert_same(res, want)
    assert res["mAP"] == pytest.approx((1 / 3 + 2 / 4) / 2)


@st.composite
def problems(draw):
    num_q = draw(st.integers(1, 8))
    num_g = draw(st.integers(1, 14))
    ids = st.integers(-1, 4)
    q_pids = np.array(draw(st.lists(st.integers(0, 4), min_size=num_q, max_size=num_q)))
    g_pids = np.array(draw(st.lists(ids, min_size=num_g, max_size=num_g)))
    q_cams = np.array(draw(st.lists(st.integers(0, 2), min_size=num_q, max_size=num_q)))
    g_cams = np.array(draw(st.lists(st.integers(0, 2), min_size=num_g, max_size=num_g)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        dist = rng.integers(0, 4, size=(num_q, num_g)).astype(np.float64)  # many ties
    else:
        dist = rng.random((num_q, num_g)).astype(draw(st.sampled_from([np.float32, np.float64])))
    max_rank = draw(st.integers(1, 20))
    block = draw(st.integers(1, 9))
    workers = draw(st.sampled_from([1, 2]))
    return dist, q_pids, g_pids, q_cams, g_cams, max_rank, block, workers


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_slow_implementation(problem):
    dist, q_pids, g_pids, q_cams, g_cams, max_rank, block, workers = problem
    want = slow_evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank)
    if want is None:
        with pytest.raises(ValueError):
            evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank, block_size=block, workers=workers)
        return
    got = evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank, block_size=block, workers=workers)
    assert_same(got, want)


def test_medium_random_against_slow():
    # Larger rows than hypothesis draws, several blocks, float32, few ties.
    rng = np.random.default_rng(7)
    num_q, num_g = 40, 300
    q_pids = rng.integers(0, 25, num_q)
    g_pids = rng.integers(-1, 25, num_g)
    q_cams = rng.integers(0, 4, num_q)
    g_cams = rng.integers(0, 4, num_g)
    dist = rng.random((num_q, num_g)).astype(np.float32)
    dist[:, ::7] = 0.5  # a column stripe of ties
    want = slow_evaluate(dist, q_pids, g_pids, q_cams, g_cams, 30)
    got = evaluate(dist, q_pids, g_pids, q_cams, g_cams, 30, block_size=16)
    assert_same(got, want)
