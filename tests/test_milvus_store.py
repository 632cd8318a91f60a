"""The gallery store on Milvus Lite: same answers as the FAISS store, no vectors in SQL,
repair of disagreements on open, SIGKILL during `index` then a re-run converges, and
eval/re-ranking on cuhk03 equal to the FAISS gallery's."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("milvus_lite", reason="milvus-lite cannot run here")
pytest.importorskip("indexer.coordinator", reason="needs the store coordinator (branch i11a)")

from reid_search.app.session import open_workspace_gallery  # noqa: E402
from reid_search.gallery import NewImage, RemoveFilter, SearchFilter  # noqa: E402
from reid_search.app.workspace import Workspace  # noqa: E402
from tests.conftest import shared_path, write_crop  # noqa: E402
from tests.crash_harness import committed_rows, index_then_kill  # noqa: E402

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)
FP = "test-model"


def images(tmp_path: Path, n: int, seed: int = 0) -> tuple[list[NewImage], np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out = []
    for i in range(n):
        p = tmp_path / "g" / f"{i // 3 + 1:04d}_c{i % 4 + 1}s1_{i:06d}_00.jpg"
        t = None if i % 7 == 0 else T0 + timedelta(minutes=i)
        tr = None if i % 5 == 0 else f"trk{i % 9}"
        out.append(NewImage(p, f"{i:064x}", 100 + i, pid=i // 3 + 1, camid=i % 4 + 1, time=t, track=tr))
    return out, x


def both(tmp_path: Path) -> tuple[object, object]:
    f = open_workspace_gallery(Workspace(tmp_path / "wf", store_override="faiss"))
    m = open_workspace_gallery(Workspace(tmp_path / "wm", store_override="milvus:"))
    return f, m


def test_milvus_store_answers_as_the_faiss_store(tmp_path: Path) -> None:
    f, m = both(tmp_path)
    imgs, x = images(tmp_path, 90)
    for g in (f, m):
        g.add_images(imgs[:60], x[:60], FP)
        g.add_images(imgs[60:], x[60:], FP)
        g.remove_ids([2, 3, 50])
    assert m.kind == "milvus" and f.kind == "faiss"
    assert m.ntotal == f.ntotal == 87
    np.testing.assert_array_equal(m.ids(), f.ids())
    q = x[:8] + 0.1
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    filters = [None, SearchFilter(cameras=frozenset({1, 2})), SearchFilter(exclude_cameras=frozenset({3})),
               SearchFilter(since=T0 + timedelta(minutes=20), until=T0 + timedelta(minutes=70)),
               SearchFilter(exclude_tracks=frozenset({"trk1", "trk2"})), SearchFilter(cameras=frozenset({9})),
               SearchFilter(cameras=frozenset({4}), since=T0), None]
    fs, fi = f.search(q, 10, filters)
    ms, mi = m.search(q, 10, filters)
    np.testing.assert_array_equal(mi, fi)
    np.testing.assert_allclose(ms, fs, atol=1e-5)
    for w in (None, SearchFilter(cameras=frozenset({1})), RemoveFilter(camid=2)):
        assert m.count(w) == f.count(w)
    np.testing.assert_array_equal(m.vectors([10, 4]), f.vectors([10, 4]))
    mids, mx = m.all_vectors()
    fids, fx = f.all_vectors()
    np.testing.assert_array_equal(mids, fids)
    np.testing.assert_array_equal(mx, fx)
    gone = m.remove_where(RemoveFilter(before=T0 + timedelta(minutes=30)))
    assert [g.id for g in gone] == [g.id for g in f.remove_where(RemoveFilter(before=T0 + timedelta(minutes=30)))]
    assert m.ntotal == f.ntotal and m.backend.ntotal == m.ntotal
    f.close()
    m.close()
    # SQL holds no vectors for the Milvus gallery
    con = sqlite3.connect(tmp_path / "wm" / "reid.db")
    assert con.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == m.ntotal
    con.close()
    assert json.loads((tmp_path / "wm" / "store.json").read_text()) == {"store": "milvus:"}


def test_open_repairs_sql_and_milvus_disagreements(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", store_override="milvus:")
    g = open_workspace_gallery(ws)
    imgs, x = images(tmp_path, 30)
    ids = g.add_images(imgs, x, FP)
    b = g.backend
    # a vector lost from Milvus (a crash between the SQL commit and the insert) and an orphan vector
    b.remove(ids[:2])
    from indexer.protocol import RowFields

    b.add(RowFields(np.array([10_000]), np.array([1]), np.array([1]), np.array([np.nan]), [None]), x[:1])
    g.close()
    g = open_workspace_gallery(Workspace(tmp_path / "ws"))
    assert g.ntotal == 28 and g.backend.ntotal == 28
    np.testing.assert_array_equal(g.ids(), ids[2:])
    np.testing.assert_array_equal(g.backend.ids(), ids[2:])
    g.close()


def test_a_different_store_for_an_existing_gallery_is_a_one_line_cli_error(tmp_path: Path) -> None:
    from reid_search.app.cli import main

    g = open_workspace_gallery(Workspace(tmp_path / "ws", store_override="milvus:"))
    imgs, x = images(tmp_path, 3)
    g.add_images(imgs, x, FP)
    g.close()
    r = CliRunner().invoke(main, ["-w", str(tmp_path / "ws"), "--store", "faiss", "remove", "--pid", "1"])
    assert r.exit_code == 1 and "lives in --store milvus:" in r.output and r.output.count("\n") == 1


@pytest.mark.slow
def test_sigkill_during_index_into_milvus_then_rerun_converges(tiny_ckpt: Path, tmp_path: Path) -> None:
    n_images = 120
    folder = tmp_path / "gallery"
    for i in range(n_images):
        write_crop(folder / f"{i // 4 + 1:04d}_c{i % 2 + 1}s1_{i:06d}_00.jpg", seed=i, size=(32, 64))
    ws = tmp_path / "ws"
    args = ["-q", "-w", str(ws), "--store", "milvus:", "index", str(folder), "--model", str(tiny_ckpt),
            "--workers", "0", "--batch-size", "4", "--commit-every", "8"]
    db = ws / "reid.db"
    index_then_kill(args, db, min_rows=16)
    seen = committed_rows(db)
    assert 0 < seen < n_images, "killed mid-run"

    g = open_workspace_gallery(Workspace(ws))  # repairs: SQL rows == Milvus entities
    np.testing.assert_array_equal(g.backend.ids(), g.ids())
    n = g.ntotal
    ids, x = g.all_vectors()
    np.testing.assert_array_equal(g.search(x, 1)[1][:, 0], ids)
    g.close()

    from reid_search.app.cli._common import main
    from reid_search.app.cli.index import index

    main.add_command(index)
    r = CliRunner().invoke(main, [*args[:-6], "--workers", "0", "--batch-size", "64"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"indexed {n_images - n}, replaced 0, unchanged {n}"), r.output
    g = open_workspace_gallery(Workspace(ws))
    assert g.ntotal == n_images == g.backend.ntotal
    np.testing.assert_array_equal(g.backend.ids(), g.ids())
    paths = {m.rel_path for b in g.iter_metadata() for m in b}
    assert paths == {p.name for p in folder.iterdir()}  # SQL rows == Milvus entities == files
    g.close()


@pytest.mark.slow
def test_cuhk03_eval_and_rerank_equal_on_both_stores(tmp_path: Path) -> None:
    data = shared_path("data", "cuhk03-labeled")
    model = shared_path("models", "osnet_x0_25_market1501.onnx")
    from reid_search.app.cli import main

    out = {}
    for store in ("faiss", "milvus:"):
        ws = str(tmp_path / store.strip(":"))
        base = ["-q", "-w", ws, "--store", store]
        r = CliRunner().invoke(main, [*base, "index", str(data / "bounding_box_test"), "--model", str(model)])
        assert r.exit_code == 0, r.output
        res = []
        for extra in ([], ["--rerank"]):
            r = CliRunner().invoke(main, [*base, "eval", "--json", *extra])
            assert r.exit_code == 0, r.output
            res.append(json.loads(r.output.strip().splitlines()[-1]))
        out[store] = res
    for a, b in zip(out["faiss"], out["milvus:"]):
        assert a["num_gallery"] == b["num_gallery"] == 738
        for key in ("rank1", "mAP"):
            assert abs(a[key] - b[key]) <= 1e-4, (key, a, b)


def test_a_reader_of_a_replaced_gallery_reads_the_new_one(tmp_path: Path) -> None:
    """The re-index dropped the collection a long-running reader (serve) was reading: it follows the switch."""
    ws = Workspace(tmp_path / "ws", store_override="milvus:")
    serve, cli = open_workspace_gallery(ws), open_workspace_gallery(ws)
    imgs, x = images(tmp_path, 12)
    serve.add_images(imgs[:6], x[:6], FP)
    cli.refresh()
    with cli.replacing() as new:
        new_ids = new.add_images(imgs[6:], x[6:], FP)
    assert not serve.backend.client.has_collection(serve.backend.collection)  # the old version is gone
    np.testing.assert_array_equal(serve.search(x[6:], 1)[1][:, 0], new_ids)  # no refresh in between
    assert serve.ntotal == 6 and serve.version == cli.version
    np.testing.assert_array_equal(serve.vectors(new_ids[:2]), x[6:8])
    serve.close()
    cli.close()


def test_index_type_change_rebuilds_the_collection_index(tmp_path: Path) -> None:
    from indexer import IndexSpec
    from indexer.milvus.spec import search_params
    from reid_search.errors import GalleryError

    ws = Workspace(tmp_path / "ws", store_override="milvus:")
    g = open_workspace_gallery(ws)
    imgs, x = images(tmp_path, 300)
    ids = g.add_images(imgs, x, FP)
    assert g.backend.index_type() == "FLAT"
    assert g.set_spec(IndexSpec("hnsw", hnsw_m=8)) is True
    assert g.backend.index_type() == "HNSW" and g.spec.kind == "hnsw" and g.ntotal == 300
    np.testing.assert_array_equal(g.search(x[:30], 1)[1][:, 0], ids[:30])
    assert g.set_spec(IndexSpec("hnsw", hnsw_m=8, ef_search=64)) is False  # a search parameter: no rebuild
    assert search_params(g.backend.spec, 10) == {"ef": 64}
    assert g.set_spec(IndexSpec("ivfsq8", nlist=8)) is True  # a Milvus-only type
    assert g.backend.index_type() == "IVF_SQ8"
    assert (g.search(x[:30], 1)[1][:, 0] == ids[:30]).mean() >= 0.9  # 8-bit codes: near ties may swap
    for kind in ("diskann", "ivfpq"):  # server-only: refused before anything changes
        with pytest.raises(GalleryError, match="Milvus Lite cannot build .*--store http") as e:
            g.set_spec(IndexSpec(kind))
        assert "\n" not in str(e.value)
        assert g.spec == IndexSpec("ivfsq8", nlist=8) and g.backend.index_type() == "IVF_SQ8"
    g.close()
    g = open_workspace_gallery(Workspace(tmp_path / "ws"))  # recorded: reopened with the same index
    assert g.spec == IndexSpec("ivfsq8", nlist=8) and g.backend.index_type() == "IVF_SQ8"
    assert g.set_spec(IndexSpec("flat")) is True and g.backend.index_type() == "FLAT"
    np.testing.assert_array_equal(g.search(x[:30], 1)[1][:, 0], ids[:30])
    g.close()


def test_index_type_option_on_a_milvus_and_a_faiss_gallery(tiny_ckpt: Path, tmp_path: Path) -> None:
    from reid_search.app.cli import main

    folder = tmp_path / "gal"
    for i in range(6):
        write_crop(folder / f"{i // 2 + 1:04d}_c{i % 2 + 1}s1_{i:06d}_00.jpg", seed=i, size=(32, 64))
    args = ["--model", str(tiny_ckpt), "--workers", "0"]
    mw, fw = ["-w", str(tmp_path / "wm"), "--store", "milvus:"], ["-w", str(tmp_path / "wf")]
    r = CliRunner().invoke(main, [*mw, "index", str(folder), *args])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*mw, "index", str(folder), *args, "--index-type", "hnsw"])  # an existing gallery
    assert r.exit_code == 0 and "unchanged 6" in r.output and "hnsw index in milvus" in r.output.strip().splitlines()[-1], r.output
    r = CliRunner().invoke(main, [*mw, "index", str(folder), *args, "--index-type", "ivfsq8", "--index-param", "nlist=4"])
    assert r.exit_code == 0 and "ivfsq8 (nlist=4)" in r.output, r.output
    g = open_workspace_gallery(Workspace(tmp_path / "wm"))
    assert g.backend.index_type() == "IVF_SQ8" and g.ntotal == 6
    g.close()
    r = CliRunner().invoke(main, [*mw, "index", str(folder), *args, "--index-type", "diskann"])
    msg = r.output.strip().splitlines()[-1]
    assert r.exit_code == 1 and msg.startswith("Error: Milvus Lite cannot build DISKANN"), r.output
    r = CliRunner().invoke(main, [*fw, "index", str(folder), *args])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*fw, "index", str(folder), *args, "--index-type", "ivfsq8"])
    msg = r.output.strip().splitlines()[-1]
    assert r.exit_code == 1 and msg.startswith("Error: --index-type ivfsq8 is a Milvus index; the FAISS store"), r.output
    assert open_workspace_gallery(Workspace(tmp_path / "wf")).spec.kind == "flat"


def test_a_milvus_gallery_does_not_load_faiss() -> None:
    """The SQL side, the coordinator and the index spec are plain: a Milvus server deployment needs no faiss."""
    code = ("import sys, indexer, indexer.metadata, indexer.milvus.factory, indexer.milvus.backend, indexer.coordinator, indexer.store; "
            "indexer.IndexSpec('ivfsq8'); indexer.parse_index_spec('hnsw', ['ef_search=64']); "
            "print(sorted(m for m in ('faiss', 'pymilvus') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    # Nor does a filtered search that the index leaves short (the exact fallback), on a stand-in client:
    # the HNSW search finds 1 hit where 3 crops pass, so the 3 are searched exactly.
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from indexer.milvus.backend import MilvusBackend
        from indexer.spec import IndexSpec
        from reid_search.gallery import SearchFilter

        class Batches:
            def __init__(self, rows): self.rows = rows
            def next(self): rows, self.rows = self.rows, []; return rows
            def close(self): pass

        class Client:
            def has_collection(self, name): return True
            def describe_collection(self, name):
                return {"fields": [{"name": "vec", "params": {"dim": 4}}, {"name": "camid"}, {"name": "has_ts"}]}
            def describe_index(self, name, field): return {"index_type": "HNSW"}
            def load_collection(self, name): pass
            def search(self, name, data, **kw): return [[{"id": 1, "distance": 0.0}] for _ in data]
            def query(self, name, filter, output_fields): return [{"count(*)": 3}]
            def query_iterator(self, name, batch_size, filter, output_fields):
                return Batches([{"id": i, "vec": np.eye(4)[i].tolist()} for i in (1, 2, 3)])

        b = MilvusBackend(Client(), "g_v1", IndexSpec("hnsw"))
        _, ids = b.search(np.eye(4, dtype=np.float32)[[2]], 3, [SearchFilter(cameras=frozenset({1}))])
        assert ids[0, 0] == 2 and sorted(ids[0].tolist()) == [1, 2, 3], ids
        print(sorted(m for m in ("faiss", "pymilvus") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
