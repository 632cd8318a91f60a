"""The Milvus vector backend against Milvus Lite: hits equal brute force, filters equal
``SearchFilter.allows`` row by row, deletes, re-open, the generation stamp, and the
parsing of ``--store`` and of Milvus index specs."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from reid_search.gallery import UNKNOWN, SearchFilter
from indexer.protocol import RowFields
from reid_search.errors import GalleryError

pytest.importorskip("milvus_lite", reason="milvus-lite cannot run here")
from indexer.milvus.backend import MilvusBackend, open_backend
from indexer.milvus.spec import build_params, check_milvus_spec, index_type, search_params
from indexer.spec import IndexSpec, parse_index_spec
from indexer.location import StoreLocation, parse_store
from indexer.milvus.expr import filter_expr, quote

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)
TRACKS = ['t1', 't2', 'a"b', "back\\slash", "it's", "new\nline", "", "ü,]x"]


def make_rows(n: int, dim: int, seed: int = 0, first_id: int = 1) -> tuple[RowFields, np.ndarray]:
    """Seeded crops with a mix of known and unknown camera, time and track."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(first_id, first_id + n, dtype=np.int64) * 3  # not contiguous
    camids = rng.integers(0, 6, n).astype(np.int64)
    camids[rng.random(n) < 0.1] = UNKNOWN
    pids = rng.integers(0, 20, n).astype(np.int64)
    times = np.array([(T0 + timedelta(minutes=int(m))).timestamp() for m in rng.integers(0, 600, n)], np.float64)
    times[rng.random(n) < 0.15] = np.nan
    tracks = [None if rng.random() < 0.2 else TRACKS[int(rng.integers(len(TRACKS)))] for _ in range(n)]
    return RowFields(ids, camids, pids, times, tracks), x


def allows(f: SearchFilter | None, fields: RowFields, j: int) -> bool:
    if f is None:
        return True
    t = fields.times[j]
    when = None if np.isnan(t) else datetime.fromtimestamp(float(t), timezone.utc)
    cam = None if fields.camids[j] == UNKNOWN else int(fields.camids[j])
    return f.allows(cam, when, fields.tracks[j])


def brute(q: np.ndarray, x: np.ndarray, fields: RowFields, k: int, f: SearchFilter | None
          ) -> tuple[np.ndarray, np.ndarray]:
    keep = np.array([allows(f, fields, j) for j in range(len(x))], bool)
    ids, xs = fields.ids[keep], x[keep]
    s = xs @ q
    order = np.lexsort((ids, -s))[:k]
    return s[order], ids[order]


FILTERS = [
    None,
    SearchFilter(),
    SearchFilter(cameras=frozenset({1, 2})),
    SearchFilter(exclude_cameras=frozenset({3})),
    SearchFilter(cameras=frozenset({1, 2, UNKNOWN}), exclude_cameras=frozenset({2, UNKNOWN})),
    SearchFilter(exclude_cameras=frozenset({UNKNOWN})),
    SearchFilter(since=T0 + timedelta(hours=2)),
    SearchFilter(until=T0 + timedelta(hours=3)),
    SearchFilter(since=T0 + timedelta(hours=1), until=T0 + timedelta(hours=1, minutes=30)),
    SearchFilter(exclude_tracks=frozenset({"t1", 'a"b', "new\nline", ""})),
    SearchFilter(exclude_tracks=frozenset({"back\\slash", "it's", "ü,]x"}), cameras=frozenset({0, 4}),
                 since=T0, until=T0 + timedelta(hours=8)),
    SearchFilter(cameras=frozenset()),
    SearchFilter(since=T0 + timedelta(hours=5), until=T0 + timedelta(hours=1)),
]


@pytest.fixture()
def backend(tmp_path: Path) -> MilvusBackend:
    b = open_backend(parse_store(f"milvus:{tmp_path / 'g.db'}"), "gallery_v1")
    yield b
    b.close()


def assert_same_hits(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray], k: int) -> None:
    gs, gi = got
    ws, wi = want
    n = len(wi)
    assert (gi[n:] == -1).all() and np.isneginf(gs[n:]).all(), "padding only past the crops that pass"
    np.testing.assert_allclose(gs[:n], ws, atol=1e-5)
    # same ids in the same order, except where scores tie to float precision
    for a in range(n):
        if gi[a] != wi[a]:
            assert abs(float(ws[a]) - float(gs[a])) < 1e-5 and wi[a] in set(gi[max(0, a - 3):a + 4].tolist())


def test_flat_hits_equal_brute_force_with_every_filter(backend: MilvusBackend) -> None:
    fields, x = make_rows(400, 32)
    backend.add(fields, x)
    assert backend.ntotal == 400
    rng = np.random.default_rng(1)
    q = x[rng.choice(400, 6, replace=False)] + 0.2 * rng.standard_normal((6, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    k = 15
    for f in FILTERS:
        sims, ids = backend.search(q, k, [f] * len(q))
        assert sims.shape == ids.shape == (len(q), k)
        for r in range(len(q)):
            assert_same_hits((sims[r], ids[r]), brute(q[r], x, fields, k, f), k)
    # one filter per query, mixed: each query gets its own
    mixed = [FILTERS[i % len(FILTERS)] for i in range(len(q))]
    sims, ids = backend.search(q, k, mixed)
    for r in range(len(q)):
        assert_same_hits((sims[r], ids[r]), brute(q[r], x, fields, k, mixed[r]), k)


def test_filter_expression_selects_exactly_what_allows_selects(backend: MilvusBackend) -> None:
    fields, x = make_rows(300, 8, seed=3)
    backend.add(fields, x)
    for f in FILTERS:
        expr = filter_expr(f)
        want = {int(fields.ids[j]) for j in range(len(x)) if allows(f, fields, j)}
        if expr is None:
            assert not want
            continue
        rows = backend.client.query(backend.collection, filter=expr or "id >= 0", output_fields=["id"])
        assert {int(r["id"]) for r in rows} == want, f


def test_quote_round_trips_awkward_track_names(backend: MilvusBackend) -> None:
    fields, x = make_rows(len(TRACKS), 4)
    fields = RowFields(fields.ids, fields.camids, fields.pids, fields.times, list(TRACKS))
    backend.add(fields, x)
    for j, t in enumerate(TRACKS):
        rows = backend.client.query(backend.collection, filter=f"track == {quote(t)}", output_fields=["id"])
        assert [int(r["id"]) for r in rows] == [int(fields.ids[j])]


def test_remove_vectors_fields_and_iteration(backend: MilvusBackend) -> None:
    fields, x = make_rows(120, 16, seed=5)
    backend.add(fields, x)
    gone = fields.ids[::4]
    backend.remove(np.concatenate([gone, [999_999]]))  # an id not held is ignored
    left = np.setdiff1d(fields.ids, gone)
    assert backend.ntotal == len(left)
    np.testing.assert_array_equal(backend.ids(), left)
    pos = {int(i): j for j, i in enumerate(fields.ids)}
    pick = left[[5, 0, 17]]
    np.testing.assert_array_equal(backend.vectors(pick), x[[pos[int(i)] for i in pick]])  # exact floats
    with pytest.raises(GalleryError, match="no vector"):
        backend.vectors(gone[:1])
    got_ids, got_x = zip(*backend.iter_vectors(batch_size=25))
    np.testing.assert_array_equal(np.concatenate(got_ids), left)
    np.testing.assert_array_equal(np.concatenate(got_x), x[[pos[int(i)] for i in left]])
    f = backend.fields(pick)
    np.testing.assert_array_equal(f.camids, fields.camids[[pos[int(i)] for i in pick]])
    assert f.tracks == [fields.tracks[pos[int(i)]] for i in pick]
    # removed ids never come back from a search
    _, ids = backend.search(x[:3], 50, [None] * 3)
    assert not set(ids.ravel().tolist()) & set(gone.tolist())


def test_add_overwrites_an_id_instead_of_duplicating_it(backend: MilvusBackend) -> None:
    fields, x = make_rows(10, 8)
    backend.add(fields, x)
    backend.add(fields, -x)  # a repair or a retried batch re-adds the same ids
    assert backend.ntotal == 10
    np.testing.assert_array_equal(backend.vectors(fields.ids[:2]), -x[:2])


def test_reopen_keeps_vectors_and_stamp(tmp_path: Path) -> None:
    loc = parse_store(f"milvus:{tmp_path / 'g.db'}")
    b = open_backend(loc, "g_v1")
    assert b.stamp() is None and b.ntotal == 0
    fields, x = make_rows(50, 8)
    b.add(fields, x)
    b.flush(7)
    assert b.stamp() == 7
    b.close()
    b2 = open_backend(loc, "g_v1")
    assert b2.dim == 8 and b2.ntotal == 50 and b2.stamp() == 7
    sims, ids = b2.search(x[:2], 1, [None, None])
    np.testing.assert_array_equal(ids[:, 0], fields.ids[:2])
    b2.drop()
    assert b2.ntotal == 0 and not b2.client.has_collection("g_v1")


def test_reopen_in_a_new_process(tmp_path: Path) -> None:
    """The Lite folder is durable across processes (the first one exits, releasing its lock)."""
    db = tmp_path / "g.db"
    code = (
        "import numpy as np, sys; sys.path.insert(0, '.');"
        "from indexer.milvus.backend import open_backend; from indexer.location import parse_store; from indexer.protocol import RowFields;"
        f"b = open_backend(parse_store('milvus:{db}'), 'g_v1');"
        "x = np.eye(4, dtype=np.float32);"
        "b.add(RowFields(np.arange(1, 5), np.zeros(4, np.int64), np.zeros(4, np.int64), np.full(4, np.nan), [None]*4), x);"
        "b.flush(3)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    b = open_backend(parse_store(f"milvus:{db}"), "g_v1")
    assert b.ntotal == 4 and b.stamp() == 3
    np.testing.assert_array_equal(b.vectors(np.array([3])), np.eye(4, dtype=np.float32)[[2]])


def test_dimension_and_k_errors_are_one_line(backend: MilvusBackend) -> None:
    fields, x = make_rows(5, 8)
    backend.add(fields, x)
    with pytest.raises(GalleryError, match="8-d") as e:
        backend.search(np.ones((1, 4), np.float32), 3, [None])
    assert "\n" not in str(e.value)
    with pytest.raises(GalleryError, match="at most 16384"):
        backend.search(x[:1], 20_000, [None])
    with pytest.raises(GalleryError, match="8-d Milvus collection"):
        f2, x2 = make_rows(2, 4, first_id=100)
        backend.add(f2, x2)


def test_search_on_an_empty_backend_pads(backend: MilvusBackend) -> None:
    sims, ids = backend.search(np.ones((2, 8), np.float32), 3, [None, SearchFilter(cameras=frozenset({1}))])
    assert (ids == -1).all() and np.isneginf(sims).all()
    assert backend.ntotal == 0 and len(backend.ids()) == 0


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfsq8"])
def test_lite_index_types_search_and_find_themselves(tmp_path: Path, kind: str) -> None:
    spec = parse_index_spec(kind, ["nlist=8"] if kind.startswith("ivf") else ["hnsw_m=8", "ef_search=64"])
    check_milvus_spec(spec, lite=True)
    b = open_backend(parse_store(f"milvus:{tmp_path / 'g.db'}"), "g_v1", spec)
    fields, x = make_rows(300, 16)
    b.add(fields, x)
    b.flush(1)  # seals a segment, so the index is built
    _, ids = b.search(x[:20], 1, [None] * 20)
    assert (ids[:, 0] == fields.ids[:20]).mean() >= 0.9


def test_index_spec_parsing() -> None:
    """One parser (``parse_index_spec``) for both stores; Milvus gets its own names for the same spec."""
    s = parse_index_spec("hnsw", ["hnsw_m=16", "ef_construction=200", "ef_search=64"])
    assert index_type(s) == "HNSW" and build_params(s) == {"M": 16, "efConstruction": 200}
    assert search_params(s) == {"ef": 64} and search_params(s, k=100) == {"ef": 100}  # Milvus needs ef >= k
    # automatic search parameters, as for FAISS: nprobe = max(32, nlist/5), ef = max(128, 2k)
    assert search_params(parse_index_spec("ivf")) == {"nprobe": 32}
    assert search_params(parse_index_spec("ivfsq8", ["nlist=4096"])) == {"nprobe": 819}
    assert search_params(parse_index_spec("ivf", ["nlist=16"])) == {"nprobe": 16}
    assert search_params(parse_index_spec("ivf", ["nprobe=3"])) == {"nprobe": 3}
    assert search_params(parse_index_spec("hnsw"), k=10) == {"ef": 128}
    assert search_params(parse_index_spec("hnsw"), k=500) == {"ef": 1000}
    assert IndexSpec.from_json(s.to_json()) == s
    pq = parse_index_spec("ivfpq", ["nlist=1024", "pq_m=64", "nprobe=32"])
    assert index_type(pq) == "IVF_PQ" and build_params(pq) == {"nlist": 1024, "m": 64}
    assert search_params(pq) == {"nprobe": 32}
    assert index_type(parse_index_spec("ivf")) == "IVF_FLAT"
    assert search_params(parse_index_spec("diskann", ["search_list=50"]), k=80) == {"search_list": 80}
    assert search_params(parse_index_spec("diskann"), k=80) == {}  # Milvus's own default
    for kind in ("ivfpq", "diskann"):
        with pytest.raises(GalleryError, match="Milvus Lite cannot build .*--store http"):
            check_milvus_spec(IndexSpec(kind), lite=True)
        check_milvus_spec(IndexSpec(kind), lite=False)  # a server builds them
    with pytest.raises(GalleryError, match="KEY one of: nlist, nprobe"):
        parse_index_spec("ivf", ["M=3"])
    with pytest.raises(GalleryError, match="integer"):
        parse_index_spec("ivf", ["nlist=x"])
    with pytest.raises(GalleryError, match="choose one of"):
        parse_index_spec("annoy")


def test_parse_store(tmp_path: Path) -> None:
    assert parse_store(None) == StoreLocation("faiss") == parse_store("FAISS")
    assert parse_store("milvus:") == StoreLocation("milvus", None)
    lite = parse_store(f"milvus:{tmp_path}/x.db")
    assert lite.is_lite and lite.uri == str(tmp_path / "x.db") and lite.to_str() == f"milvus:{tmp_path}/x.db"
    srv = parse_store("http://10.0.0.5:19530/")
    assert srv == StoreLocation("milvus", "http://10.0.0.5:19530") and not srv.is_lite
    assert srv.to_str() == "http://10.0.0.5:19530"
    assert parse_store("milvus:").resolved(tmp_path).uri == str(tmp_path.resolve() / "milvus.db")
    for bad in ("milvus:gallery", "redis://x", "sqlite"):
        with pytest.raises(GalleryError, match="--store"):
            parse_store(bad)


def test_a_lite_folder_held_by_another_process_is_a_one_line_error(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    code = (
        "import sys, time; sys.path.insert(0, '.');"
        "from indexer.milvus.backend import open_backend; from indexer.location import parse_store;"
        f"b = open_backend(parse_store('milvus:{db}'), 'g_v1'); print('open', flush=True); time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "open"
        with pytest.raises(GalleryError, match="open in another process") as e:
            open_backend(parse_store(f"milvus:{db}"), "g_v1")
        assert "\n" not in str(e.value)
    finally:
        p.kill()
        p.wait()
