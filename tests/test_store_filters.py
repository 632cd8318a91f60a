"""Filtered search inside the store equals brute force over every row; count; remove_where;
times and tracks round-trip.

Every test runs on both stores (FAISS and Milvus Lite, see ``tests/conftest.py``); the oracle
is :func:`tests.helpers.brute_force` (the store's rows copied into a ``MemoryStore``)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexer import IndexSpec
from reid_search.app.workspace import Workspace
from reid_search.gallery import GalleryWriter, NewImage, RemoveFilter, SearchFilter
from tests.conftest import STORE_KINDS, store_value
from tests.helpers import T0, all_rows, allowed, brute_force, faiss_index, new_images, open_ws, store_workspace, unit

REMOVED = [2, 3, 50]  # ids removed from the module's gallery after its two batches


@pytest.fixture(scope="module", params=STORE_KINDS)
def gallery(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """300 crops with random cameras, times and tracks, added in two batches, 3 of them then removed."""
    tmp = tmp_path_factory.mktemp("filters")
    g = open_ws(store_workspace(tmp / "ws", store_value(request.param, request)))
    imgs = new_images(tmp / "gal", 300, labels="random")
    x = unit(np.random.default_rng(1).standard_normal((300, 12)))
    first = g.add_images(imgs[:200], x[:200], "m")
    second = g.add_images(imgs[200:], x[200:], "m")
    ids = np.concatenate([first, second])
    assert g.remove_ids(ids[REMOVED]) == 3
    assert g.ntotal == g.count() == g.backend.ntotal == 297
    np.testing.assert_array_equal(g.ids(), np.delete(ids, REMOVED))
    np.testing.assert_array_equal(g.vectors(ids[[10, 4]]), x[[10, 4]])  # exact, in the order asked
    all_ids, all_x = g.all_vectors()
    np.testing.assert_array_equal(all_ids, np.delete(ids, REMOVED))
    np.testing.assert_array_equal(all_x, np.delete(x, REMOVED, axis=0))
    yield g
    g.close()


def test_the_gallery_is_a_gallery_store(gallery) -> None:
    assert isinstance(gallery, GalleryWriter)


filters = st.builds(
    SearchFilter,
    cameras=st.one_of(st.none(), st.frozensets(st.integers(0, 5), max_size=3)),
    exclude_cameras=st.frozensets(st.integers(0, 5), max_size=2),
    since=st.one_of(st.none(), st.integers(-30, 620).map(lambda m: T0 + timedelta(minutes=m))),
    until=st.one_of(st.none(), st.integers(-30, 620).map(lambda m: T0 + timedelta(minutes=m))),
    exclude_tracks=st.frozensets(st.sampled_from(["a", "b", "c", "zz"]), max_size=2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(f=filters, k=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_flat_filtered_search_equals_brute_force(gallery, f: SearchFilter, k: int, seed: int) -> None:
    x = unit(np.random.default_rng(seed).standard_normal((3, 12)))
    sims, ids = gallery.search(x, k, f)
    want_s, want_i = brute_force(gallery, x, k, f)
    np.testing.assert_array_equal(ids, want_i)  # same crops, same order, padding only when fewer pass
    np.testing.assert_allclose(sims, want_s, rtol=1e-5, atol=1e-5)
    assert gallery.count(f) == allowed(gallery, f)


def test_one_filter_per_query_and_selective_filters_fill_k(gallery) -> None:
    x = unit(np.random.default_rng(5).standard_normal((12, 12)))
    fs = [None, SearchFilter(cameras=frozenset({1})), SearchFilter(exclude_tracks=frozenset({"a", "b"})),
          SearchFilter(since=T0 + timedelta(minutes=590)),
          SearchFilter(cameras=frozenset({1, 2})), SearchFilter(exclude_cameras=frozenset({3})),
          SearchFilter(since=T0 + timedelta(minutes=20), until=T0 + timedelta(minutes=70)),
          SearchFilter(exclude_tracks=frozenset({"a", "c"})), SearchFilter(cameras=frozenset({9})),  # none pass
          SearchFilter(cameras=frozenset({4}), since=T0), None, SearchFilter()]
    sims, ids = gallery.search(x, 25, fs)
    want_s, want_i = brute_force(gallery, x, 25, fs)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(sims, want_s, rtol=1e-5, atol=1e-5)
    for j, f in enumerate(fs):
        assert (ids[j] >= 0).sum() == min(25, gallery.count(f))
    assert (ids[8] == -1).all()
    for w in (None, SearchFilter(cameras=frozenset({1})), RemoveFilter(camid=2)):
        want = allowed(gallery, w) if not isinstance(w, RemoveFilter) else sum(w.matches(m) for m in all_rows(gallery))
        assert gallery.count(w) == want


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_approximate_indexes_filter_inside_and_still_return_k(kind: str, store: str, tmp_path: Path) -> None:
    if kind == "ivfpq" and store != "faiss":
        pytest.skip("Milvus Lite cannot build IVF_PQ (a Milvus server can)")
    g = open_ws(store_workspace(tmp_path / "ws", store),
                     spec=IndexSpec(kind, min_train=700) if kind != "hnsw" else IndexSpec(kind))
    imgs = new_images(tmp_path / "gal", 1500, labels="random", seed=3)
    x = unit(np.random.default_rng(2).standard_normal((1500, 16)))
    g.add_images(imgs, x, "m")
    if store == "faiss":
        assert faiss_index(g).trained
    else:
        assert g.backend.index_type() == {"hnsw": "HNSW", "ivf": "IVF_FLAT"}[kind]
    q = x[:10]
    metas = {m.id: m for m in all_rows(g)}
    for f in (SearchFilter(cameras=frozenset({2})), SearchFilter(cameras=frozenset({3}), exclude_tracks=frozenset({"a"}),
                                                                 since=T0 + timedelta(minutes=550))):
        n = g.count(f)
        sims, ids = g.search(q, 20, f)
        assert all(f.allows(metas[i].camid, metas[i].time, metas[i].track) for i in ids[ids >= 0])
        assert ((ids >= 0).sum(axis=1) == min(20, n)).all(), "k hits whenever k crops pass"
        want = brute_force(g, q, 20, f)[1]
        recall = np.mean([len(set(a) & set(b)) / max(1, len(set(b) - {-1})) for a, b in zip(ids, want)])
        assert recall > 0.6, recall


def test_count_and_remove_where(store: str, tmp_path: Path) -> None:
    g = open_ws(store_workspace(tmp_path / "ws", store))
    imgs = new_images(tmp_path / "gal", 200, labels="random", seed=7)
    ids = g.add_images(imgs, unit(np.random.default_rng(0).standard_normal((200, 8))), "m")
    by_id = dict(zip(ids.tolist(), imgs))
    assert g.count() == 200
    cut = T0 + timedelta(minutes=300)
    where = RemoveFilter(camid=2, before=cut)
    want = sorted(i for i, im in by_id.items() if im.camid == 2 and im.time is not None and im.time < cut)
    assert 0 < len(want) < 200
    assert g.count(where) == len(want)
    dry = g.remove_where(where, dry_run=True)
    assert sorted(m.id for m in dry) == want and g.ntotal == 200 and g.count() == 200
    gen = g.generation
    gone = g.remove_where(where)
    assert sorted(m.id for m in gone) == want and g.generation == gen + 1
    assert g.ntotal == g.count() == g.backend.ntotal == 200 - len(want)
    assert not np.isin(g.search(unit(np.ones((1, 8))), 200)[1], want).any()
    before = RemoveFilter(before=T0 + timedelta(minutes=30))
    early = sorted(m.id for m in all_rows(g) if before.matches(m))
    assert early and sorted(m.id for m in g.remove_where(before)) == early
    track_b = RemoveFilter(track="b", pid=int(imgs[0].pid))  # type: ignore[arg-type]
    left = all_rows(g)
    assert sorted(m.id for m in g.remove_where(track_b)) == sorted(m.id for m in left if track_b.matches(m))
    np.testing.assert_array_equal(g.backend.ids(), g.ids())
    with pytest.raises(ValueError, match="at least one"):
        RemoveFilter()
    g.close()
    g2 = open_ws(Workspace(tmp_path / "ws"))
    assert g2.ntotal == g.count() and not np.isin(g2.ids(), want).any()


def test_time_and_track_round_trip(store: str, tmp_path: Path) -> None:
    g = open_ws(store_workspace(tmp_path / "ws", store))
    naive = datetime(2024, 5, 1, 13, 45, 0, 123456)
    paris = datetime(2024, 5, 1, 15, 45, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    ids = g.add_images([NewImage(tmp_path / "a.jpg", "0" * 64, 1, camid=1, time=naive, track="t1"),
                        NewImage(tmp_path / "b.jpg", "1" * 64, 1, camid=1, time=paris, track="t2")],
                       unit(np.ones((2, 4)) + np.eye(2, 4)), "m")
    a, b = g.metadata(ids)
    assert a.time == b.time == datetime(2024, 5, 1, 13, 45, 0, 123456, tzinfo=timezone.utc)
    assert (a.track, b.track) == ("t1", "t2") and a.time.tzinfo is not None
    exact = SearchFilter(since=a.time, until=a.time)  # inclusive bounds, to the microsecond
    assert g.count(exact) == 2 and (g.search(unit(np.ones((1, 4))), 5, exact)[1] >= 0).sum() == 2
    later = SearchFilter(since=a.time + timedelta(microseconds=1))
    assert g.count(later) == 0 and (g.search(unit(np.ones((1, 4))), 5, later)[1] == -1).all()
    assert g.count(RemoveFilter(before=a.time)) == 0 and g.count(RemoveFilter(before=a.time + timedelta(microseconds=1))) == 2
