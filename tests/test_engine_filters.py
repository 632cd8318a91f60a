"""The engine's filtered search and re-ranking, against brute force over every row (no model needed)."""

from __future__ import annotations

import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from reid_search.gallery import GalleryWriter, SearchFilter
from reid_search.engine import RERANK_CACHE, SearchEngine, load_snapshot, query_filter, refresh_rerank_cache
from reid_search.errors import DataError
from reid_search.timeutil import epoch_micros, format_time
from reid_search.filters import filter_mask, make_remove_filter, make_search_filter, parse_time
from reid_search.online_rerank import GalleryRerank
from tests.helpers import PixelExtractor, brute_ids, labelled_store
from tests.memory_store import MemoryStore

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)


def random_filter(rng: np.random.Generator) -> SearchFilter:
    cams = frozenset(rng.choice(np.arange(1, 7), size=int(rng.integers(1, 4)), replace=False).tolist()) \
        if rng.random() < 0.5 else None
    excl = frozenset(rng.choice(np.arange(1, 7), size=int(rng.integers(0, 3)), replace=False).tolist())
    since = T0 + timedelta(minutes=int(rng.integers(0, 400))) if rng.random() < 0.4 else None
    until = T0 + timedelta(minutes=int(rng.integers(300, 700))) if rng.random() < 0.4 else None
    tracks = frozenset(f"t{t}" for t in rng.choice(8, size=int(rng.integers(0, 4)), replace=False).tolist())
    return SearchFilter(cams, excl, since, until, tracks)


def test_memory_store_is_a_gallery_store() -> None:
    assert isinstance(MemoryStore(), GalleryWriter)


def test_filtered_search_equals_brute_force_and_fills_top_k() -> None:
    store, feats, _ = labelled_store()
    engine = SearchEngine(store, PixelExtractor("fake-model", dim=16))
    rng = np.random.default_rng(1)
    for trial in range(40):
        q = feats[rng.integers(len(feats))] + 0.1 * rng.normal(size=feats.shape[1]).astype(np.float32)
        q /= np.linalg.norm(q)
        where, cam = random_filter(rng), int(rng.integers(1, 7)) if trial % 3 else None
        keep = bool(trial % 2)
        k = int(rng.integers(1, 30))
        hits = engine.search(q[None], top_k=k, camids=[cam], where=where, keep_same_camera=keep)[0]
        flt = query_filter(where, cam, keep)
        want = brute_ids(store, q, k, flt)
        assert [h.id for h in hits] == want
        assert len(hits) == min(k, store.count(flt))  # top_k whenever that many rows match
        for h in hits:
            m = store.metadata([h.id])[0]
            assert (h.camid, h.time, h.track, h.pid) == (m.camid, m.time, m.track, m.pid)
            if not keep and cam is not None:
                assert h.camid != cam


def test_batched_search_takes_one_filter_per_query() -> None:
    store, feats, _ = labelled_store(60)
    engine = SearchEngine(store, PixelExtractor("fake-model", dim=16))
    rng = np.random.default_rng(2)
    wheres = [random_filter(rng) for _ in range(5)]
    cams = [1, None, 3, 4, None]
    got = engine.search(feats[:5], top_k=8, camids=cams, where=wheres)
    for i in range(5):
        assert [h.id for h in got[i]] == brute_ids(store, feats[i], 8, query_filter(wheres[i], cams[i]))
    with pytest.raises(ValueError):
        engine.search(feats[:5], where=wheres[:2])


def test_rerank_applies_the_same_filter(tmp_path: Path) -> None:
    store, feats, _ = labelled_store(80)
    engine = SearchEngine(store, PixelExtractor("fake-model", dim=16), cache_dir=tmp_path)
    rr = GalleryRerank.build(np.stack([store.vectors([i])[0] for i in sorted(store._metas)]))
    ids = np.array(sorted(store._metas))
    metas = store.metadata(ids)
    rng = np.random.default_rng(3)
    for _ in range(15):
        q = feats[rng.integers(len(feats))]
        where, cam = random_filter(rng), int(rng.integers(1, 7))
        hits = engine.search(q[None], top_k=10, camids=[cam], where=where, rerank=True)[0]
        d = rr.distances(q)
        flt = query_filter(where, cam)
        allowed = [j for j, m in enumerate(metas) if flt is None or flt.allows(m.camid, m.time, m.track)]
        want = sorted(allowed, key=lambda j: (d[j], ids[j]))[:10]
        assert [h.id for h in hits] == ids[want].tolist()
        np.testing.assert_allclose([h.distance for h in hits], d[want], rtol=1e-6)


def test_filter_mask_agrees_with_allows_row_by_row() -> None:
    store, _, _ = labelled_store(150, seed=4)
    snap = load_snapshot(store)
    metas = store.metadata(snap.ids)
    rng = np.random.default_rng(5)
    for _ in range(60):
        where = random_filter(rng)
        want = [where.allows(m.camid, m.time, m.track) for m in metas]
        np.testing.assert_array_equal(filter_mask(where, snap.camids, snap.times, snap.tracks), want)
    # the bounds are inclusive to the microsecond
    t = T0 + timedelta(minutes=5, microseconds=1)
    times = epoch_micros([t - timedelta(microseconds=1), t, t + timedelta(microseconds=1), None])
    cams, tracks = np.full(4, 1), np.array([None] * 4, dtype=object)
    np.testing.assert_array_equal(filter_mask(SearchFilter(since=t), cams, times, tracks), [False, True, True, False])
    np.testing.assert_array_equal(filter_mask(SearchFilter(until=t), cams, times, tracks), [True, True, False, False])


def test_hit_json_carries_time_and_track() -> None:
    store, feats, _ = labelled_store(30)
    engine = SearchEngine(store, PixelExtractor("fake-model", dim=16))
    hits = engine.search(feats[:1], top_k=30, keep_same_camera=True)[0]
    d = {h.id: h.to_dict() for h in hits}
    m = store.metadata([1])[0]  # row 0: no time (0 % 7 == 0), no track
    assert d[1]["time"] is None and d[1]["track"] is None
    timed = next(h for h in hits if h.time is not None)
    assert d[timed.id]["time"] == timed.time.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    assert parse_time(d[timed.id]["time"], "x") == timed.time
    assert m.time is None


@pytest.mark.parametrize("content", [
    b"",  # empty
    b"PK\x03\x04 truncated zip",  # BadZipFile
    b"not a zip at all",
    "npy",  # a plain .npy array, not an npz archive (wrong type)
    "object",  # an npz holding an object array (needs pickle: refused)
    "truncated",  # a real cache cut in half
    "wrong-arrays",  # right keys, wrong shapes
])
def test_unreadable_rerank_cache_is_ignored_and_rebuilt(tmp_path: Path, content) -> None:
    """Defect 5: any unreadable rerank.npz is ignored and rebuilt, never a traceback."""
    store, feats, _ = labelled_store(40)
    cache = tmp_path / RERANK_CACHE
    if content == "npy":
        np.save(tmp_path / "x.npy", np.arange(3))
        (tmp_path / "x.npy").rename(cache)
    elif content == "object":
        np.savez(cache, key=np.array([{"a": 1}], dtype=object))
    elif content in ("truncated", "wrong-arrays"):
        refresh_rerank_cache(store, tmp_path)
        data = cache.read_bytes()
        if content == "truncated":
            cache.write_bytes(data[: len(data) // 2])
        else:
            with np.load(cache) as z:
                arrays = {k: z[k] for k in z.files}
            arrays["knn_idx"] = arrays["knn_idx"][:3]
            arrays["v_indptr"] = arrays["v_indptr"][:2]
            np.savez(cache, **arrays)
    else:
        cache.write_bytes(content)
    engine = SearchEngine(store, PixelExtractor("fake-model", dim=16), cache_dir=tmp_path)
    hits = engine.search(feats[:1], top_k=5, rerank=True)[0]
    ref = GalleryRerank.build(np.stack([store.vectors([i])[0] for i in sorted(store._metas)])).distances(feats[0])
    assert [h.id for h in hits] == (np.argsort(ref, kind="stable")[:5] + 1).tolist()
    with np.load(cache) as z:  # rebuilt
        assert len(z["ids"]) == 40
    cache.write_bytes(b"PK\x03\x04")
    assert refresh_rerank_cache(store, tmp_path) is not None
    with zipfile.ZipFile(cache):
        pass


def test_rerank_cache_is_keyed_by_the_gallery_state(tmp_path: Path) -> None:
    store, feats, imgs = labelled_store(30)
    refresh_rerank_cache(store, tmp_path)
    store.remove_ids([3])
    engine = SearchEngine(store, PixelExtractor("fake-model", dim=16), cache_dir=tmp_path)
    hits = engine.search(feats[:1], top_k=40, rerank=True, keep_same_camera=True)[0]
    assert len(hits) == 29 and 3 not in {h.id for h in hits}


def test_user_filter_parsing() -> None:
    f = make_search_filter("1, 3", "4,5", "2024-05-01T10:00:00", "2024-05-01T12:00:00+02:00", ["a"])
    assert f.cameras == {1, 3} and f.exclude_cameras == {4, 5} and f.exclude_tracks == {"a"}
    assert f.since == datetime(2024, 5, 1, 10, tzinfo=timezone.utc)  # naive = UTC
    assert f.until == datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
    assert parse_time("2024-05-01T10:00:00Z", "--since") == f.since
    assert format_time(f.since) == "2024-05-01T10:00:00Z"
    for args, needle in (((None, None, "yesterday"), "ISO 8601"), (("1,x",), "not a camera id"), ((",",), "list"),
                         (("99999999999",), "out of range"), ((None, "-3"), "out of range"),
                         ((None, None, "2024-05-02", "2024-05-01"), "after")):
        with pytest.raises(DataError, match=needle) as e:
            make_search_filter(*args)
        assert "\n" not in str(e.value)
    r = make_remove_filter(pid=3, before="2024-01-01")
    assert r.pid == 3 and r.before == datetime(2024, 1, 1, tzinfo=timezone.utc)
    for kw, needle in (({}, "--pid"), ({"pid": 2**40}, "out of range"), ({"camid": -1}, "out of range"),
                       ({"before": "soon"}, "ISO 8601")):
        with pytest.raises(DataError, match=needle):
            make_remove_filter(**kw)
