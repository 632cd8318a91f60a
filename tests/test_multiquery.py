"""Multi-crop fusion, Market's multiple-query grouping, and sightings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from reid_search.metrics import evaluate
from reid_search.multiquery import fuse_distances, fuse_features, group_queries, merge_ranked
from reid_search.sightings import group_hits
from tests.helpers import unit


def test_fuse_features_by_hand():
    f = np.array([[3.0, 0.0], [0.0, 0.5]])  # unit rows (1,0) and (0,1): mean (.5,.5) → (1,1)/√2
    np.testing.assert_allclose(fuse_features(f), [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    np.testing.assert_allclose(fuse_features(f[:1]), [1.0, 0.0])
    with pytest.raises(ValueError):
        fuse_features(np.zeros((0, 2)))
    np.testing.assert_array_equal(fuse_distances(np.array([[0.3, 0.9], [0.5, 0.1]])), [0.3, 0.1])


def test_group_queries():
    groups, p, c = group_queries(np.array([5, 3, 5, 3, 5]), np.array([1, 2, 1, 1, 2]))
    assert [g.tolist() for g in groups] == [[3], [1], [0, 2], [4]]
    assert p.tolist() == [3, 3, 5, 5] and c.tolist() == [1, 2, 1, 2]


def test_merge_ranked_equals_brute_force_max_fusion():
    rng = np.random.default_rng(1)
    d = np.round(rng.random((4, 50)), 2)
    k = 7
    lists = []
    for row in d:
        order = sorted(range(50), key=lambda j: (row[j], j))[:k]
        lists.append([(j, row[j], None) for j in order])
    fused = fuse_distances(d)
    want = sorted(range(50), key=lambda j: (fused[j], j))[:k]
    assert [x[0] for x in merge_ranked(lists, k)] == want


def test_fused_tracks_beat_single_crops():
    """Tracks of noisy crops: one fused query per track beats each of its crops alone."""
    rng = np.random.default_rng(0)
    dim, n_ids, crops = 64, 60, 6
    centres = unit(rng.standard_normal((n_ids, dim)))
    gallery = unit(centres.repeat(3, 0) + 0.12 * rng.standard_normal((n_ids * 3, dim)))
    g_pids, g_cams = np.arange(n_ids).repeat(3), np.ones(n_ids * 3, int)
    # Query crops: heavily degraded, each in its own way (occlusion-like noise).
    q = unit(centres.repeat(crops, 0) + 0.22 * rng.standard_normal((n_ids * crops, dim)))
    q_pids, q_cams = np.arange(n_ids).repeat(crops), np.zeros(n_ids * crops, int)

    single = evaluate(np.maximum(2 - 2 * q @ gallery.T, 0), q_pids, g_pids, q_cams, g_cams)
    groups, gp, gc = group_queries(q_pids, q_cams)
    mean_q = np.stack([fuse_features(q[g]) for g in groups])
    mean = evaluate(np.maximum(2 - 2 * mean_q @ gallery.T, 0), gp, g_pids, gc, g_cams)
    dist = np.maximum(2 - 2 * q @ gallery.T, 0)
    mx = evaluate(np.stack([fuse_distances(dist[g]) for g in groups]), gp, g_pids, gc, g_cams)
    assert mean["cmc"][0] >= single["cmc"][0] + 0.15
    assert mean["mAP"] >= single["mAP"] + 0.15
    assert mx["cmc"][0] >= single["cmc"][0] + 0.05
    assert mx["mAP"] >= single["mAP"] + 0.05


@dataclass(frozen=True)
class _Hit:
    rank: int
    distance: float
    camid: int | None
    track: str | None = None
    time: float | None = None

    def to_dict(self):
        return {"rank": self.rank, "distance": self.distance}


def test_group_hits_by_camera_and_track():
    hits = [_Hit(1, 0.1, 2, "a", 30.0), _Hit(2, 0.2, 1, "b", 5.0), _Hit(3, 0.3, 2, "a", 10.0),
            _Hit(4, 0.6, 1, "c", None), _Hit(5, 0.7, None, None, None)]
    cams = group_hits(hits, "camera", threshold=0.25)
    assert [s.key for s in cams] == [2, 1, None]
    assert [(s.best.rank, s.hits, s.matches) for s in cams] == [(1, 2, 1), (2, 2, 1), (5, 1, 0)]
    assert (cams[0].first_time, cams[0].last_time) == (10.0, 30.0)
    assert (cams[1].first_time, cams[1].last_time) == (5.0, 5.0)
    assert cams[2].first_time is None
    tracks = group_hits(hits, "track")
    assert [s.key for s in tracks] == ["a", "b", "c", None] and tracks[0].matches is None
    assert cams[0].to_dict()["best"] == {"rank": 1, "distance": 0.1}
    with pytest.raises(ValueError, match="camera, track"):
        group_hits(hits, "pid")


def test_search_crops_against_brute_force_on_a_memory_store(tmp_path) -> None:
    """Fused multi-crop search through the engine equals brute force: all crop cameras dropped,
    mean = fused feature, max = each item's best crop; sightings group the same hits."""
    from reid_search.engine import SearchEngine
    from reid_search.multiquery import search_crops
    from tests.helpers import PixelExtractor, labelled_store

    store, feats, _ = labelled_store(90, seed=4)
    engine = SearchEngine(store, PixelExtractor("fake-model", dim=16), cache_dir=tmp_path)
    ids = np.array(sorted(store._metas))
    metas = store.metadata(ids)
    g = np.stack([store.vectors([i])[0] for i in ids]).astype(np.float64)
    rng = np.random.default_rng(0)
    crops = unit(feats[3] + 0.3 * rng.standard_normal((3, feats.shape[1]))).astype(np.float32)
    cams = [1, 2, None]
    allowed = np.array([m.camid not in (1, 2) for m in metas])
    for fuse, d in (("mean", 2 - 2 * g @ fuse_features(crops).astype(np.float64)),
                    ("max", (2 - 2 * g @ crops.T.astype(np.float64)).min(axis=1))):
        hits = search_crops(engine, crops, cams, fuse, top_k=12)
        want = sorted(np.flatnonzero(allowed), key=lambda j: (d[j], ids[j]))[:12]
        assert [h.id for h in hits] == ids[want].tolist(), fuse
        np.testing.assert_allclose([h.distance for h in hits], np.maximum(d[want], 0), atol=1e-5)
        assert [h.rank for h in hits] == list(range(1, 13))
        by_cam = group_hits(hits, "camera", threshold=hits[5].distance)
        assert sum(s.hits for s in by_cam) == 12 and sum(s.matches for s in by_cam) == 6
        assert by_cam[0].best.id == hits[0].id
    with pytest.raises(ValueError, match="fuse"):
        search_crops(engine, crops, cams, "median", top_k=3)
