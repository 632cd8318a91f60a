"""What only the Milvus store does: its collection index rebuilt on a type change (and the types
Lite cannot build refused), a reader following a re-index that dropped its collection, no faiss
import, and eval/re-ranking on cuhk03 equal to the FAISS gallery's.

Everything both stores do is tested on both (``store``-parametrised: tests/test_store_*.py,
tests/test_index_crash.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("milvus_lite", reason="milvus-lite cannot run here")
pytest.importorskip("indexer.coordinator", reason="needs the store coordinator (branch i11a)")

from reid_search.app.workspace import Workspace  # noqa: E402
from tests.helpers import feats, new_images, open_ws, shared_path, write_folder  # noqa: E402

FP = "test-model"


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
    serve, cli = open_ws(ws), open_ws(ws)
    imgs, x = new_images(tmp_path / "g", 12), feats(12)
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
    g = open_ws(ws)
    imgs, x = new_images(tmp_path / "g", 300), feats(300)
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
    g = open_ws(Workspace(tmp_path / "ws"))  # recorded: reopened with the same index
    assert g.spec == IndexSpec("ivfsq8", nlist=8) and g.backend.index_type() == "IVF_SQ8"
    assert g.set_spec(IndexSpec("flat")) is True and g.backend.index_type() == "FLAT"
    np.testing.assert_array_equal(g.search(x[:30], 1)[1][:, 0], ids[:30])
    g.close()


def test_index_type_option_on_a_milvus_gallery(tiny_ckpt: Path, tmp_path: Path) -> None:
    """(A Milvus type on a FAISS gallery: tests/test_index_cli.py, test_index_type_option.)"""
    from reid_search.app.cli import main

    folder = tmp_path / "gal"
    write_folder(folder, 6, per_pid=2, cams=2)
    args = ["--model", str(tiny_ckpt), "--workers", "0"]
    mw = ["-w", str(tmp_path / "wm"), "--store", "milvus:"]
    r = CliRunner().invoke(main, [*mw, "index", str(folder), *args])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*mw, "index", str(folder), *args, "--index-type", "hnsw"])  # an existing gallery
    assert r.exit_code == 0 and "unchanged 6" in r.output and "hnsw index in milvus" in r.output.strip().splitlines()[-1], r.output
    r = CliRunner().invoke(main, [*mw, "index", str(folder), *args, "--index-type", "ivfsq8", "--index-param", "nlist=4"])
    assert r.exit_code == 0 and "ivfsq8 (nlist=4)" in r.output, r.output
    g = open_ws(Workspace(tmp_path / "wm"))
    assert g.backend.index_type() == "IVF_SQ8" and g.ntotal == 6
    g.close()
    r = CliRunner().invoke(main, [*mw, "index", str(folder), *args, "--index-type", "diskann"])
    msg = r.output.strip().splitlines()[-1]
    assert r.exit_code == 1 and msg.startswith("Error: Milvus Lite cannot build DISKANN"), r.output


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
