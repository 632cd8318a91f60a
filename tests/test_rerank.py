"""k-reciprocal re-ranking against a dense N² implementation written from the paper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_search import rerank
from reid_search.rerank import k_reciprocal, knn_graph


def dense_rerank(q: np.ndarray, g: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al. 2017 as sets and loops, float64; ties in ranking by lower index."""
    x = np.concatenate([q, g]).astype(np.float64)
    nq, n = q.shape[0], x.shape[0]
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    orig = d / d.max(axis=1, keepdims=True)
    rank = np.argsort(d, axis=1, kind="stable")

    def reciprocal(i: int, k: int) -> set[int]:
        return {int(j) for j in rank[i, : k + 1] if i in rank[j, : k + 1]}

    half = int(np.round(k1 / 2))  # numpy rounds half to even: k1 = 5 -> 2
    v = np.zeros((n, n))
    for i in range(n):
        r_i = reciprocal(i, k1)
        expanded = set(r_i)
        for c in r_i:
            r_c = reciprocal(c, half)
            # Strictly more than 2/3, as in the reference code (the paper writes >=).
            if len(r_c & r_i) > 2 / 3 * len(r_c):
                expanded |= r_c
        idx = sorted(expanded)
        w = np.exp(-orig[i, idx])
        v[i, idx] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    s = np.minimum(v[:nq, None, :], v[None, nq:, :]).sum(axis=2)
    jaccard = 1 - s / (2 - s)
    return (1 - lam) * jaccard + lam * orig[:nq, nq:]


def clustered(seed: int, n: int, num_ids: int, dim: int, spread: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_ids, dim)) * 3
    labels = rng.integers(0, num_ids, n)
    return (centers[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32)


CASES = [
    # seed, n, num_query, ids, dim, k1, k2, lambda
    (0, 120, 30, 8, 16, 20, 6, 0.3),
    (1, 150, 50, 12, 32, 10, 3, 0.5),
    (2, 90, 10, 5, 8, 5, 2, 0.1),
    (3, 160, 60, 20, 64, 7, 1, 0.3),
    (4, 60, 40, 4, 4, 3, 4, 0.9),
    (5, 200, 20, 10, 24, 20, 6, 0.0),
]


@pytest.mark.parametrize(("seed", "n", "nq", "ids", "dim", "k1", "k2", "lam"), CASES)
def test_matches_dense_implementation(seed, n, nq, ids, dim, k1, k2, lam):
    x = clustered(seed, n, ids, dim)
    want = dense_rerank(x[:nq], x[nq:], k1, k2, lam)
    got = k_reciprocal(x[:nq], x[nq:], k1, k2, lam, block_size=2048, device="cpu")
    assert got.dtype == np.float32 and got.shape == (nq, n - nq)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # Streaming in many small blocks gives the same answer.
    small = k_reciprocal(x[:nq], x[nq:], k1, k2, lam, block_size=17, device="cpu")
    np.testing.assert_allclose(small, got, rtol=0, atol=1e-6)


def test_chunking_does_not_change_the_result(monkeypatch):
    # Tiny chunks for every streamed step: many chunk boundaries, several threads' worth.
    x = clustered(8, 150, 9, 16)
    want = dense_rerank(x[:40], x[40:], 30, 5, 0.3)
    monkeypatch.setattr(rerank, "_ELEMENTS_PER_CHUNK", 3000)
    monkeypatch.setattr(rerank, "_PAIRS_PER_CHUNK", 200)
    monkeypatch.setattr(rerank, "_DENSE_CHUNK_BYTES", 8 * 110 * 3)
    got = k_reciprocal(x[:40], x[40:], 30, 5, 0.3, block_size=23, device="cpu")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_single_thread_gives_the_same_result():
    x = clustered(4, 120, 8, 16)
    threaded = k_reciprocal(x[:30], x[30:], block_size=32, device="cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # also the number of numpy worker threads
    try:
        single = k_reciprocal(x[:30], x[30:], block_size=32, device="cpu")
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(single, threaded, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_ties_break_by_lower_index(seed):
    # Small integer features: many exactly equal distances, duplicates included.
    rng = np.random.default_rng(100 + seed)
    x = rng.integers(0, 3, size=(70, 2)).astype(np.float32)
    nq = 25
    for k1, k2 in ((6, 3), (13, 5), (1, 2)):
        want = dense_rerank(x[:nq], x[nq:], k1, k2, 0.3)
        for block in (2048, 8):
            got = k_reciprocal(x[:nq], x[nq:], k1, k2, 0.3, block_size=block, device="cpu")
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("k1", "k2"), [(50, 6), (12, 40), (200, 200)])
def test_k_larger_than_set_is_truncated(k1, k2):
    # N = 12: k1 + 1, round(k1/2) + 1 and k2 all cover the whole set, as slicing does.
    x = clustered(9, 12, 3, 5)
    want = dense_rerank(x[:4], x[4:], k1, k2, 0.3)
    got = k_reciprocal(x[:4], x[4:], k1, k2, 0.3, device="cpu")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_lambda_one_is_normalised_original_distance():
    x = clustered(3, 50, 5, 6).astype(np.float64)
    d = ((x[:, None] - x[None]) ** 2).sum(axis=2)
    want = (d / d.max(axis=1, keepdims=True))[:10, 10:]
    got = k_reciprocal(x[:10], x[10:], lambda_value=1.0, device="cpu")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_reranking_separates_clusters():
    # Sanity on the direction: same-cluster pairs end up closer than other pairs.
    rng = np.random.default_rng(5)
    centers = rng.normal(size=(6, 10)) * 4
    labels = np.repeat(np.arange(6), 15)
    x = (centers[labels] + rng.normal(size=(90, 10))).astype(np.float32)
    perm = rng.permutation(90)
    x, labels = x[perm], labels[perm]
    dist = k_reciprocal(x[:20], x[20:], device="cpu")
    same = labels[:20, None] == labels[None, 20:]
    assert dist[same].max() < dist[~same].min()


def test_accepts_tensors_and_float64():
    x = clustered(1, 40, 4, 8)
    base = k_reciprocal(x[:10], x[10:], 6, 3, device="cpu")
    via_torch = k_reciprocal(torch.from_numpy(x[:10]), torch.from_numpy(x[10:]), 6, 3, device="cpu")
    via_f64 = k_reciprocal(x[:10].astype(np.float64), x[10:].astype(np.float64), 6, 3, device="cpu")
    np.testing.assert_array_equal(via_torch, base)
    np.testing.assert_array_equal(via_f64, base)


@pytest.mark.parametrize(
    ("q", "g", "kwargs", "message"),
    [
        (np.zeros(4), np.zeros((3, 4)), {}, "q_feats must be 2-D"),
        (np.zeros((2, 4)), np.zeros((3, 5)), {}, "differ in dimension"),
        (np.zeros((0, 4)), np.zeros((3, 4)), {}, "at least one query"),
        (np.zeros((2, 4)), np.zeros((3, 4)), {"k1": 0}, "k1 must be"),
        (np.zeros((2, 4)), np.zeros((3, 4)), {"k2": 0}, "k2 must be"),
        (np.zeros((2, 4)), np.zeros((3, 4)), {"k1": 2.5}, "k1 must be"),
        (np.zeros((2, 4)), np.zeros((3, 4)), {"lambda_value": -0.1}, "lambda_value"),
        (np.zeros((2, 4)), np.zeros((3, 4)), {"lambda_value": 1.5}, "lambda_value"),
        (np.full((2, 4), np.nan), np.zeros((3, 4)), {}, "NaN or infinite"),
        (np.zeros((2, 4)), np.zeros((3, 4)), {"block_size": 0}, "block_size"),
    ],
)
def test_validation(q, g, kwargs, message):
    with pytest.raises(ValueError, match=message):
        k_reciprocal(q, g, **kwargs)


def test_identical_features_do_not_divide_by_zero():
    x = np.ones((6, 3), dtype=np.float32)
    got = k_reciprocal(x[:2], x[2:], 3, 2, device="cpu")
    assert np.isfinite(got).all()


def brute_knn(x: np.ndarray, k: int):
    d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(axis=2)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, 1), d.max(axis=1)


@pytest.mark.parametrize("block", [4096, 7, 32])
def test_knn_graph_matches_brute_force(block):
    x = clustered(2, 130, 6, 12)
    order, dist, row_max = brute_knn(x, 9)
    graph = knn_graph(x, 9, block_size=block, device="cpu")
    np.testing.assert_array_equal(graph.indices, order)
    np.testing.assert_allclose(graph.distances, dist, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(graph.row_max, row_max, rtol=1e-5)
    assert knn_graph(x[:5], 50, device="cpu").indices.shape == (5, 5)


@pytest.mark.parametrize("block", [4096, 7, 32])
def test_knn_graph_ties_and_duplicates(block):
    # Small integers make float32 arithmetic exact: ties are real ties, duplicates
    # (several here) sit at exactly 0 and come in index order, before or after self.
    rng = np.random.default_rng(11)
    x = rng.integers(0, 2, size=(120, 5)).astype(np.float32) * 3
    order, dist, row_max = brute_knn(x, 12)
    assert (dist[:, 1] == 0).any()  # the case under test occurs
    graph = knn_graph(x, 12, block_size=block, device="cpu")
    np.testing.assert_array_equal(graph.indices, order)
    np.testing.assert_array_equal(graph.distances, dist)
    np.testing.assert_array_equal(graph.row_max, row_max)


def test_knn_graph_near_duplicates_tie_at_zero():
    # Large norms: |x|² + |y|² - 2 x·y leaves rounding noise (either sign) for x == y;
    # it must not decide the order, so of two duplicates the lower index comes first.
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(60, 256)) + 30).astype(np.float32)
    pairs = [(2 * i, 2 * i + 31) for i in range(12)]
    for a, b in pairs:
        x[b] = x[a]
    for block in (4096, 9):
        graph = knn_graph(x, 3, block_size=block, device="cpu")
        for a, b in pairs:
            assert list(graph.indices[a, :2]) == [a, b]
            assert list(graph.indices[b, :2]) == [a, b]
            assert graph.distances[b, 0] == 0.0 and graph.distances[b, 1] == 0.0


def test_knn_graph_validation():
    with pytest.raises(ValueError, match="k must be"):
        knn_graph(np.zeros((4, 2)), 0)
    with pytest.raises(ValueError, match="2-D"):
        knn_graph(np.zeros(4), 2)
    with pytest.raises(ValueError, match="empty"):
        knn_graph(np.zeros((0, 3)), 2)


def test_knn_graph_of_near_identical_rows_stays_in_bounded_memory():
    # An untrained model embeds every crop alike (cos > 0.999): then every pair is in refine()'s
    # near-zero range. Recomputing them all at once took pairs x dim x 8 bytes (16 GB for 1,000
    # crops; here 150² x 2048 x 8 = 369 MB); in chunks it is a few tens of MB.
    import tracemalloc

    rng = np.random.default_rng(5)
    base = rng.standard_normal(2048).astype(np.float32)
    x = base + 1e-3 * rng.standard_normal((150, 2048)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[7] = x[3]  # and one exact duplicate
    tracemalloc.start()
    try:
        graph = knn_graph(x, 10, device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 << 20, f"peak {peak >> 20} MB"
    order, dist, _ = brute_knn(x, 10)
    np.testing.assert_array_equal(graph.indices, order)
    np.testing.assert_allclose(graph.distances, dist, rtol=1e-5)
    assert list(graph.indices[7, :2]) == [3, 7] and graph.distances[7, 1] == 0.0
