"""The FAISS layer on seeded vectors, checked against exact numpy search (:func:`tests.helpers.exact_topk`)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.faiss import params as V
from indexer.faiss.index import VectorIndex, gpu_count
from indexer.spec import IndexSpec, parse_index_spec
from indexer.topk import exact_search
from tests.helpers import iter_batches
from reid_search.errors import GalleryError
from tests.helpers import exact_topk, unit


def clustered(n: int, d: int, nq: int, seed: int = 0, per: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Identities as cluster centres; crops scattered around them with varying spread."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // per, d)).astype(np.float32)
    spread = rng.uniform(0.3, 0.8, (n, 1)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    q = centres[rng.integers(0, len(centres), nq)] + 0.5 * rng.standard_normal((nq, d)).astype(np.float32)
    return unit(x), unit(q)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def build(spec: IndexSpec, ids: np.ndarray, x: np.ndarray) -> VectorIndex:
    return VectorIndex.build(spec, x.shape[1], lambda: iter_batches(ids, x, 4096), len(ids))


@pytest.fixture(scope="module")
def big() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, q = clustered(20_000, 64, 300)
    ids = np.arange(len(x), dtype=np.int64) * 3 + 11  # ids are DB keys, not positions
    _, truth = exact_topk(q, x, ids, 10)
    return x, q, ids, truth


def test_flat_is_exact() -> None:
    rng = np.random.default_rng(1)
    x, q = unit(rng.standard_normal((3000, 32))), unit(rng.standard_normal((50, 32)))
    ids = rng.permutation(10_000)[:3000].astype(np.int64)
    idx = build(IndexSpec("flat"), ids, x)
    sims, got = idx.search(q, 10)
    want_s, want_i = exact_topk(q, x, ids, 10)
    np.testing.assert_array_equal(got, want_i)
    np.testing.assert_allclose(sims, want_s, atol=1e-5)
    # Euclidean² of unit vectors = 2 - 2·sim, so the order is the L2 order too
    l2 = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(ids[np.argsort(l2, axis=1)[:, :10]], got)


def test_exact_search_streams_blocks() -> None:
    rng = np.random.default_rng(2)
    x, q = unit(rng.standard_normal((5000, 16))), unit(rng.standard_normal((7, 16)))
    ids = np.arange(5000, dtype=np.int64)
    s1, i1 = exact_search(q, x, ids, 25, max_block_floats=7 * 1024)  # 5 blocks
    s2, i2 = exact_topk(q, x, ids, 25)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_approximate_recall_at_defaults(kind: str, big) -> None:
    x, q, ids, truth = big
    idx = build(IndexSpec(kind), ids, x)
    assert idx.trained and idx.ntotal == len(x)
    if kind != "hnsw":
        assert idx.nlist == V.auto_nlist(len(x)) == 128  # really an inverted file, not the flat fallback
    sims, got = idx.search(q, 10)
    assert recall(got, truth) >= 0.95
    assert np.all(np.diff(sims, axis=1) <= 1e-6), "best first"
    true_sims = np.einsum("qd,qkd->qk", q, x[(got - 11) // 3])
    atol = 0.02 if kind == "ivfpq" else 1e-5  # ivfpq scores come from 8-bit scalar codes
    np.testing.assert_allclose(sims, true_sims, atol=atol)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_filtered_ivf_keeps_recall_when_the_filter_is_far_from_the_query(kind: str, big) -> None:
    # A camera filter is unrelated to where a query lies: here the allowed crops are
    # a random 10 % of the gallery, so few of them sit in the lists nearest the query.
    x, q, ids, _ = big
    idx = build(IndexSpec(kind), ids, x)
    allowed = np.sort(np.random.default_rng(5).choice(ids, len(ids) // 10, replace=False))
    mask = np.isin(ids, allowed)
    _, truth = exact_topk(q, x[mask], ids[mask], 10)
    _, got = idx.search(q, 10, allowed=allowed)
    assert np.isin(got, allowed).all()
    assert recall(got, truth) >= 0.9


def test_untrained_ivf_stays_exact_until_threshold() -> None:
    x, q = clustered(2000, 16, 20, seed=3)
    ids = np.arange(2000, dtype=np.int64)
    spec = IndexSpec("ivfpq", min_train=1500)
    idx = VectorIndex.empty(spec, 16)
    idx.add(ids[:1000], x[:1000])
    assert not idx.trained and idx.rebuild_reason() is None
    np.testing.assert_array_equal(idx.search(q, 5)[1], exact_topk(q, x[:1000], ids[:1000], 5)[1])
    idx.add(ids[1000:], x[1000:])
    assert idx.rebuild_reason() and "threshold" in idx.rebuild_reason()
    trained = build(spec, ids, x)
    assert trained.trained and trained.nlist == 32 and trained.rebuild_reason() is None


def test_growth_asks_for_retraining() -> None:
    x, _ = clustered(11_200, 8, 1, seed=4)
    ids = np.arange(len(x), dtype=np.int64)
    idx = build(IndexSpec("ivf", min_train=700), ids[:700], x[:700])
    assert idx.trained and idx.nlist == 16
    idx.add(ids[700:11_199], x[700:11_199])
    assert idx.rebuild_reason() is None
    idx.add(ids[11_199:], x[11_199:])  # 16 × the training size
    assert "grew from 700 to 11200" in (idx.rebuild_reason() or "")
    fixed = build(IndexSpec("ivf", min_train=700, nlist=16), ids[:700], x[:700])
    fixed.add(ids[700:], x[700:])
    assert fixed.rebuild_reason() is None, "a user-chosen nlist is kept"


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw"])
def test_remove_add_and_file_roundtrip(kind: str, tmp_path: Path) -> None:
    x, q = clustered(1500, 16, 30, seed=5)
    ids = np.arange(1500, dtype=np.int64) + 100
    idx = build(IndexSpec(kind, min_train=1000), ids[:1200], x[:1200])
    assert idx.trained
    gone = ids[:1200:5]
    if kind == "hnsw":
        assert idx.remove(gone) is False  # graph indexes cannot remove: the owner rebuilds
        keep = np.setdiff1d(ids[:1200], gone)
        idx = build(IndexSpec(kind), keep, x[keep - 100])
    else:
        assert idx.remove(gone) is True
    idx.add(ids[1200:], x[1200:])
    expect = np.setdiff1d(ids, gone)
    np.testing.assert_array_equal(idx.ids(), expect)
    sims, got = idx.search(q, 8)
    assert not np.isin(got, gone).any()
    idx.save(tmp_path / "g.faiss", {"generation": 7})
    back, header = VectorIndex.load(tmp_path / "g.faiss")
    assert header["generation"] == 7 and back.spec == idx.spec and back.ntotal == len(expect)
    np.testing.assert_array_equal(back.ids(), expect)
    s2, g2 = back.search(q, 8)
    np.testing.assert_array_equal(g2, got)
    np.testing.assert_allclose(s2, sims, atol=1e-6)
    if kind in ("flat", "ivf"):
        want_s, want_i = exact_topk(q, x[expect - 100], expect, 8)
        assert recall(got, want_i) >= (1.0 if kind == "flat" else 0.9)
    if kind == "ivfpq":  # removed images keep dead re-scoring codes until a rebuild
        assert back.remove(ids[1:1200:5]) is False
        assert "removed vectors still hold re-scoring codes" in back.rebuild_reason()
        assert not np.isin(back.search(q, 8)[1], ids[1:1200:5]).any()


def test_k_beyond_size_pads_and_empty_index() -> None:
    x, q = clustered(40, 8, 3, seed=6, per=4)
    idx = VectorIndex.empty(IndexSpec(), 8)
    s, i = idx.search(q, 5)
    assert (i == -1).all() and np.isneginf(s).all()
    idx.add(np.arange(3), x[:3])
    s, i = idx.search(q, 5)
    assert (i[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all() and (i[:, :3] >= 0).all()
    with pytest.raises(GalleryError, match="do not fit this 8-d gallery"):
        idx.search(np.zeros((1, 9), np.float32), 1)


def test_corrupt_file_is_a_gallery_error(tmp_path: Path) -> None:
    (tmp_path / "a.faiss").write_bytes(b"nonsense")
    with pytest.raises(GalleryError, match="not a reid-search index file"):
        VectorIndex.load(tmp_path / "a.faiss")
    idx = VectorIndex.empty(IndexSpec(), 4)
    idx.add(np.arange(10), unit(np.random.default_rng(0).standard_normal((10, 4))))
    idx.save(tmp_path / "b.faiss", {})
    data = (tmp_path / "b.faiss").read_bytes()
    (tmp_path / "b.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(GalleryError, match="cannot read the index file"):
        VectorIndex.load(tmp_path / "b.faiss")


def test_parse_index_spec() -> None:
    spec = parse_index_spec("ivfpq", ["nlist=256", "k-factor=8"])
    assert (spec.kind, spec.nlist, spec.k_factor, spec.nprobe) == ("ivfpq", 256, 8, 0)
    assert parse_index_spec("ivfpq", ["nprobe=64"], base=spec).nlist == 256  # keeps the gallery's other params
    assert parse_index_spec("ivf", [], base=spec).nlist == 0  # another kind starts from its defaults
    assert IndexSpec.from_json(spec.to_json()) == spec
    assert spec.build_key() == parse_index_spec("ivfpq", ["nprobe=99"], base=spec).build_key()
    with pytest.raises(GalleryError, match="hnsw takes KEY=VALUE with KEY one of: hnsw_m"):
        parse_index_spec("hnsw", ["nlist=3"])
    with pytest.raises(GalleryError, match="integer"):
        parse_index_spec("ivf", ["nlist=many"])
    with pytest.raises(GalleryError, match="unknown index type 'lsh'"):
        parse_index_spec("lsh", [])
    with pytest.raises(GalleryError, match="refine_bits=5: choose 2 or 3"):
        V.resolve_build(IndexSpec("ivfpq", refine_bits=5), 64, 10_000)
    with pytest.raises(GalleryError, match="pq_m=5 must divide"):
        V.resolve_build(IndexSpec("ivfpq", pq_m=5), 64, 10_000)


def test_search_params_change_without_rebuild(big) -> None:
    x, q, ids, truth = big
    idx = build(IndexSpec("ivf"), ids, x)
    low = recall(idx.search(q, 10)[1], truth)
    idx.set_search_params(nprobe=1)
    assert faiss.extract_index_ivf(idx.base).nprobe == 1
    assert recall(idx.search(q, 10)[1], truth) < low
    with pytest.raises(GalleryError, match="no search parameter ef_search"):
        idx.set_search_params(ef_search=10)


def test_auto_params() -> None:
    assert V.auto_nlist(100) == 16 and V.auto_nlist(20_000) == 128 and V.auto_nlist(1_000_000) == 1024
    assert all(39 * V.auto_nlist(n) <= n for n in (1000, 5000, 123_456))
    p = V.resolve_build(IndexSpec("ivfpq"), 2048, 1_000_000)
    assert p == {"nlist": 1024, "pq_m": 64, "refine_bits": 2 if V.has_multibit_rabitq() else 4}
    assert V.resolve_build(IndexSpec("ivfpq"), 64, 20_000)["refine_bits"] == 8


def test_auto_refine_without_multibit_rabitq(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(V, "has_multibit_rabitq", lambda: False)
    assert V.resolve_build(IndexSpec("ivfpq"), 2048, 1_000_000)["refine_bits"] == 4
    with pytest.raises(GalleryError, match="needs faiss ≥ 1.13.*refine_bits=4"):
        V.resolve_build(IndexSpec("ivfpq", refine_bits=2), 2048, 1_000_000)


@pytest.mark.skipif(not V.has_multibit_rabitq(), reason="this faiss has no multi-bit RaBitQ")
@pytest.mark.parametrize("bits", [2, 3])
def test_rabitq_rescoring_codes(bits: int, tmp_path: Path) -> None:
    """High-dimensional features take the RaBitQ re-scoring path; check it against brute force."""
    x, q = clustered(12_000, 768, 200, seed=5)
    ids = np.arange(len(x), dtype=np.int64) + 100
    spec = IndexSpec("ivfpq", refine_bits=bits if bits != 2 else 0)  # 2 bits is the automatic choice at 768-d
    idx = build(spec, ids, x)
    codes = faiss.downcast_index(idx.base.refine_index)
    assert isinstance(codes, faiss.IndexRaBitQ) and codes.code_size < 768 * (bits + 1) // 8
    _, truth = exact_topk(q, x, ids, 10)
    sims, got = idx.search(q, 10)
    assert recall(got, truth) >= 0.95
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", q, x[got - 100]), atol=0.05)
    idx.save(tmp_path / "i.faiss", {})
    back, _ = VectorIndex.load(tmp_path / "i.faiss")
    np.testing.assert_array_equal(back.search(q, 10)[1], got)


# ---- where searches run ----------------------------------------------------


def test_cpu_when_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    x, q = clustered(200, 8, 2, seed=7, per=10)
    idx = build(IndexSpec("flat"), np.arange(200), x)
    assert gpu_count() == 0
    idx.search(q, 3)
    assert idx.device.startswith("CPU")


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_path_shards_over_all_gpus(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss-cpu has no GPU classes: stand in for them and check what the code asks of them."""
    calls: list[tuple[bool, int]] = []

    class Options:
        shard = False

    def to_all_gpus(index, co=None, ngpu=-1):
        calls.append((co.shard, ngpu))
        return faiss.clone_index(index)  # behaves like the sharded GPU copy would

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all_gpus, raising=False)
    x, q = clustered(1000, 8, 20, seed=8)
    ids = np.arange(1000, dtype=np.int64) + 5
    idx = build(IndexSpec(kind, min_train=700), ids, x)
    s, i = idx.search(q, 5)
    assert calls == [(True, 2)] and idx.device == "2 GPU(s), sharded"
    idx.search(q, 5)
    assert len(calls) == 1, "the GPU copy is reused until the index changes"
    idx.add(np.array([5000]), x[:1])
    idx.search(q, 5)
    assert len(calls) == 2
    if kind == "flat":
        np.testing.assert_array_equal(i, exact_topk(q, x, ids, 5)[1])


def test_gpu_failure_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(index, co=None, ngpu=-1):
        raise RuntimeError("not implemented for this type of index")

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", type("O", (), {"shard": False}), raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", refuse, raising=False)
    x, q = clustered(1000, 16, 5, seed=9)
    idx = build(IndexSpec("ivf", min_train=700), np.arange(1000), x)
    idx.search(q, 3)
    assert idx.device.startswith("CPU") and "cannot go to the GPU" in idx.device
    pq = build(IndexSpec("ivfpq", min_train=700), np.arange(1000), x)
    pq.search(q, 3)  # not even tried: fast-scan codes have no GPU version
    assert pq.device.startswith("CPU") and "no GPU version" in pq.device


def test_indexer_package_exports_load_lazily() -> None:
    import indexer

    assert sorted(indexer.__all__) == sorted(indexer._HOME)  # every export has a home, and only those
    assert all(getattr(indexer, name) is not None for name in indexer.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        indexer.nope  # noqa: B018
