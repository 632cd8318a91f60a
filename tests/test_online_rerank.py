from __future__ import annotations

import numpy as np
import pytest

from reid_search.metrics import evaluate
from reid_search.online_rerank import GalleryRerank, RerankParams
from reid_search.rerank import k_reciprocal


def clustered(n: int, dim: int = 32, ids: int = 25, noise: float = 0.6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim))
    labels = rng.integers(0, ids, n)
    x = centres[labels] + noise * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def test_lambda_one_is_the_normalised_original_distance() -> None:
    x, _ = clustered(200)
    gr = GalleryRerank.build(x[20:], RerankParams(lambda_value=1.0))
    for q in x[:5]:
        d = ((x[20:] - q) ** 2).sum(1)
        np.testing.assert_allclose(gr.distances(q), d / d.max(), atol=1e-5)


def online_dense(q: np.ndarray, g: np.ndarray, k1: int = 20, k2: int = 6, lam: float = 0.3) -> np.ndarray:
    """The online definition written plainly with dense matrices (small inputs only)."""
    n = len(g)
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    D = np.maximum(((g64[:, None] - g64[None]) ** 2).sum(-1), 0)
    np.fill_diagonal(D, 0)
    O = D / D.max(1, keepdims=True)
    rank = np.argsort(D, axis=1, kind="stable")
    kh = int(round(k1 / 2))

    def R(i: int, k: int) -> set[int]:
        return {j for j in rank[i, : k + 1] if i in rank[j, : k + 1]}

    V = np.zeros((n, n))
    for i in range(n):
        exp = set(R(i, k1))
        for c in R(i, k1):
            rc = R(c, kh)
            if len(rc & R(i, k1)) > 2 / 3 * len(rc):
                exp |= rc
        idx = sorted(exp)
        V[i, idx] = np.exp(-O[i, idx])
        V[i] /= V[i].sum()
    Vqe = np.stack([V[rank[i, :k2]].mean(0) for i in range(n)])
    d = np.maximum(((g64 - q64) ** 2).sum(-1), 0)
    o = d / d.max()
    rq = np.argsort(d, kind="stable")
    recip = {j for j in rq[:k1] if d[j] <= D[j, rank[j, k1]]}
    exp = set(recip)
    for c in recip:
        rc = R(c, kh)
        if len(rc & recip) > 2 / 3 * len(rc):
            exp |= rc
    vq = np.zeros(n + 1)  # last column: the query itself
    idx = sorted(exp)
    vq[idx] = np.exp(-o[idx])
    vq[n] = 1.0
    vq /= vq.sum()
    if k2 > 1:
        vq[:n] = (vq[:n] + V[rq[: k2 - 1]].sum(0))
        vq[n] = vq[n]
        vq /= k2
    s = np.minimum(vq[None, :n], Vqe).sum(1)
    return lam * o + (1 - lam) * (1 - s / (2 - s))


@pytest.mark.parametrize("seed, k1, k2", [(0, 20, 6), (1, 7, 3), (2, 12, 1)])
def test_online_equals_a_plain_dense_implementation(seed: int, k1: int, k2: int) -> None:
    x, _ = clustered(160, seed=seed)
    q, g = x[:8], x[8:]
    gr = GalleryRerank.build(g, RerankParams(k1, k2, 0.3))
    for qq in q:
        np.testing.assert_allclose(gr.distances(qq), online_dense(qq, g, k1, k2, 0.3), atol=1e-6)


def test_online_is_close_to_batch_with_one_query() -> None:
    """The two forms differ only where the query would enter gallery lists; the top agrees."""
    x, _ = clustered(300, seed=4)
    q, g = x[:10], x[10:]
    gr = GalleryRerank.build(g)
    for qq in q:
        online, batch = gr.distances(qq), k_reciprocal(qq[None], g)[0]
        assert np.median(np.abs(online - batch)) < 5e-3
        assert len(set(np.argsort(online)[:10]) & set(np.argsort(batch)[:10])) >= 7


def test_rerank_improves_map_on_clustered_data_like_batch() -> None:
    x, lab = clustered(700, ids=40, noise=0.9, seed=3)
    q, g, ql, gl = x[:100], x[100:], lab[:100], lab[100:]
    qc, gc = np.zeros(100, int), np.ones(600, int)
    plain = evaluate(((q[:, None] - g[None]) ** 2).sum(-1), ql, gl, qc, gc)["mAP"]
    gr = GalleryRerank.build(g)
    online = evaluate(np.stack([gr.distances(v) for v in q]), ql, gl, qc, gc)["mAP"]
    batch = evaluate(k_reciprocal(q, g), ql, gl, qc, gc)["mAP"]
    assert online > plain + 0.02, (plain, online, batch)
    assert abs(online - batch) < 0.05, (online, batch)


def test_round_trip_through_arrays(tmp_path) -> None:
    x, _ = clustered(150)
    gr = GalleryRerank.build(x[10:], RerankParams(k1=8, k2=3, lambda_value=0.4))
    np.savez(tmp_path / "r.npz", **gr.to_arrays())
    back = GalleryRerank.from_arrays(dict(np.load(tmp_path / "r.npz")))
    assert back.params == gr.params
    for q in x[:5]:
        np.testing.assert_array_equal(back.distances(q), gr.distances(q))


def test_tiny_gallery_and_bad_params() -> None:
    x, _ = clustered(8)
    gr = GalleryRerank.build(x[3:])  # fewer items than k1
    d = gr.distances(x[0])
    assert d.shape == (5,) and np.isfinite(d).all()
    with pytest.raises(ValueError):
        RerankParams(k1=0)
    with pytest.raises(ValueError):
        RerankParams(lambda_value=1.5)
    with pytest.raises(ValueError):
        GalleryRerank.build(np.zeros((0, 4), np.float32))
