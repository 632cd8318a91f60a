"""The CLI and the HTTP service on stores that are neither FAISS nor Milvus (issue 20, point 2).

The stores:

- ``numpy``: the coordinator over :class:`tests.spi_backend.NumpyFactory`, a backend
  written only against :mod:`indexer.protocol`, holding the only copy of the vectors;
- ``numpy-cache``: the same backend as a cache of the vectors SQL holds (the FAISS role);
- ``memory``: :class:`tests.memory_store.MemoryStore`, the brute-force reference store
  (one per workspace, kept for the test, as a store that outlives the command);
- ``faiss``: the default store, unchanged (the control).

The two numpy stores are a plug-in installed the way pip installs one (a
``*.dist-info`` folder whose ``entry_points.txt`` declares them in the group
``reid_search.backends``, on ``sys.path``) and chosen with ``--store numpy:``
on the first command; nothing of reid-search is patched. ``memory`` (a whole
store, not a backend) and ``faiss`` are opened by a stand-in for
:func:`reid_search.app.session.open_workspace_gallery`, the one function every
app path opens its gallery through, which counts the opens.

The same commands and requests run on each (``index`` twice, ``query --json`` with a
camera filter, ``eval``, ``remove --camid/--pid`` after ``--dry-run``, ``index``
again, ``index --reindex``; ``POST /query``, ``POST /gallery``, ``DELETE /gallery``
dry and real, ``GET /stats``; the service served by uvicorn on loopback, as in
``tests/test_service.py``). Each answer is checked against brute force computed
here (cosine over the features of the same files, the same-camera rule of
``query``, the Market protocol of ``eval``), and against the FAISS store's answers
on the same data: the same hits in the same order, distances within 1e-5.
"""

from __future__ import annotations

import importlib
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner, Result

from reid_search.app import session
from reid_search.app.workspace import Workspace
from reid_search.data import parse_name
from tests.helpers import write_crop
from tests.memory_store import MemoryStore
from indexer.location import StoreLocation, parse_store
from reid_search.errors import GalleryError
from tests import spi_backend
from tests.helpers import one_line_error
from tests.spi_backend import NumpyFactory, store_folder
from tests.test_service import running

STORES = ("faiss", "numpy", "numpy-cache", "memory")
PIDS, CAMS = (1, 2, 3, 4, 5), (1, 2, 3)
ORIGINAL_OPEN = session.open_workspace_gallery
TOL_BRUTE = 1e-4  # the CLI embeds one query image, the oracle a batch: last bits differ
TOL_FAISS = 1e-5


# ---- data and the oracle -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Market-layout root: 5 ids × 3 cameras × 2 gallery crops, a junk and a distractor; 10 queries."""
    root = tmp_path_factory.mktemp("spi") / "market"
    for pid in PIDS:
        for cam in CAMS:
            for k in range(2):
                write_crop(root / "bounding_box_test" / f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg", 100 * pid + 10 * cam + k)
        for cam in (1, 2):
            write_crop(root / "query" / f"{pid:04d}_c{cam}s1_000100_00.jpg", 5000 + 10 * pid + cam)
    write_crop(root / "bounding_box_test" / "-1_c1s1_000009_00.jpg", 999)
    write_crop(root / "bounding_box_test" / "0000_c2s1_000010_00.jpg", 998)
    return root


@dataclass
class Oracle:
    """Features of every file (embedded here, outside any store) and their Market labels."""

    feats: dict[Path, np.ndarray]
    gallery: list[Path]
    queries: list[Path]

    labels: dict[Path, tuple[int, int]] = field(default_factory=dict)  # files without a Market name

    def label(self, p: Path) -> tuple[int, int]:
        if p in self.labels:
            return self.labels[p]
        info = parse_name(p.name)
        assert info is not None
        return info.pid, info.camid

    def distances(self, q: Path | np.ndarray, among: list[Path]) -> np.ndarray:
        f = self.feats[q] if isinstance(q, Path) else q
        sims = np.array([float(np.dot(self.feats[g].astype(np.float64), f.astype(np.float64))) for g in among])
        return np.maximum(2.0 - 2.0 * sims, 0.0)

    def check_hits(self, hits: list[dict[str, Any]], q: Path | np.ndarray, allowed: list[Path], k: int) -> None:
        """``hits`` are the k nearest of ``allowed`` (near-ties at the boundary may swap), best first."""
        assert len(hits) == min(k, len(allowed)), (len(hits), k, len(allowed))
        want = dict(zip(allowed, self.distances(q, allowed)))
        got = [Path(h["path"]) for h in hits]
        assert set(got) <= set(want), set(got) - set(want)
        for h, p in zip(hits, got):
            assert abs(h["distance"] - want[p]) <= TOL_BRUTE, (p, h["distance"], want[p])
            assert (h["pid"], h["camid"]) == self.label(p)
        d = [h["distance"] for h in hits]
        assert all(a <= b + 1e-7 for a, b in zip(d, d[1:])), d
        rest = [want[p] for p in allowed if p not in set(got)]
        if rest and d:
            assert d[-1] <= min(rest) + TOL_BRUTE

    def market_metrics(self, gallery: list[Path]) -> tuple[float, float]:
        """(rank-1, mAP) of the cam-1 and cam-2 queries against ``gallery``, Market protocol, by brute force."""
        r1, aps = [], []
        for q in self.queries:
            qp, qc = self.label(q)
            keep = [g for g in gallery if self.label(g)[0] != -1 and self.label(g) != (qp, qc)]
            order = np.argsort(self.distances(q, keep), kind="stable")
            good = np.array([self.label(keep[j])[0] == qp for j in order])
            if not good.any():
                continue
            r1.append(float(good[0]))
            hit_at = np.flatnonzero(good)
            aps.append(float(np.mean((np.arange(len(hit_at)) + 1) / (hit_at + 1))))
        return float(np.mean(r1)), float(np.mean(aps))


@pytest.fixture(scope="module")
def oracle(market: Path, tiny_ckpt: Path) -> Oracle:
    from reid_search.extract import extract_features
    from reid_search.extractors import load_extractor

    gallery = sorted((market / "bounding_box_test").iterdir())
    queries = sorted((market / "query").iterdir())
    extractor = load_extractor(tiny_ckpt, device="cpu")
    feats, kept, failures = extract_features(gallery + queries, extractor, num_workers=0)
    assert not failures and len(kept) == len(gallery) + len(queries)
    return Oracle({p.resolve(): f for p, f in zip(gallery + queries, feats)},
                  [p.resolve() for p in gallery], [p.resolve() for p in queries])


# ---- the stores: the numpy plug-in installed, the others opened by a stand-in ----------------------------


def install_plugin(mp: pytest.MonkeyPatch, site: Path, entry_points: dict[str, str],
                   dist: str = "reid_search_numpy") -> None:
    """Install a store plug-in as pip would: ``site/DIST-0.1.dist-info/{METADATA,entry_points.txt}``
    with ``entry_points`` (name: ``module:attr``) in the group ``reid_search.backends``, ``site`` on
    ``sys.path`` (until ``mp`` is undone)."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 0.1\n")
    lines = [f"{name} = {value}" for name, value in entry_points.items()]
    (info / "entry_points.txt").write_text("[reid_search.backends]\n" + "\n".join(lines) + "\n")
    mp.syspath_prepend(str(site))
    importlib.invalidate_caches()  # importlib.metadata's cached folder listings


def install_numpy(mp: pytest.MonkeyPatch, site: Path) -> None:
    """Install :mod:`tests.spi_backend` as the plug-ins ``numpy`` and ``numpy-cache``."""
    install_plugin(mp, site, {"numpy": "tests.spi_backend:open_store",
                              "numpy-cache": "tests.spi_backend:open_cache_store"})


@dataclass
class Stores:
    """How the app opens store ``kind`` in this test; counts the opens (every app path must open its gallery so)."""

    kind: str
    injected: int = 0
    plugin_opens_before: int = 0
    memory: dict[Path, MemoryStore] = field(default_factory=dict)

    @property
    def plugin(self) -> bool:
        return self.kind.startswith("numpy")

    @property
    def opens(self) -> int:
        """Gallery opens so far: the plug-in's entry point calls, or the stand-in's."""
        return len(spi_backend.OPENED) - self.plugin_opens_before if self.plugin else self.injected

    @property
    def store_option(self) -> tuple[str, ...]:
        """The global options of the first command (the workspace records the store then)."""
        return ("--store", f"{self.kind}:") if self.plugin else ()

    def open(self, ws: Workspace, *, spec: Any = None, save_interval: float = 30.0,
             backend_factory: Any = None) -> Any:
        """The stand-in for ``open_workspace_gallery`` (memory and faiss)."""
        self.injected += 1
        if self.kind == "memory":
            store = self.memory.setdefault(ws.root.resolve(), MemoryStore())
            if spec is not None and spec != store.spec:
                store.set_spec(spec)
            return store
        return ORIGINAL_OPEN(ws, spec=spec, save_interval=save_interval, backend_factory=backend_factory)


def opening(kind: str, mp: pytest.MonkeyPatch, site: Path) -> Stores:
    st = Stores(kind, plugin_opens_before=len(spi_backend.OPENED))
    if st.plugin:
        install_numpy(mp, site)  # the real plug-in path: nothing of reid-search is patched
    else:
        mp.setattr(session, "open_workspace_gallery", st.open)
    return st


def numpy_files(ws: Path) -> list[tuple[Path, str, int]]:
    """The version files of the numpy store of workspace ``ws`` (``--store numpy:``: in its index folder)."""
    return NumpyFactory(store_folder(StoreLocation("numpy", None, str(ws / "index")))).files()


def store_name(kind: str) -> str:
    """What the gallery's one-line description says of the store."""
    return {"faiss": "flat index, dim", "numpy": "in numpy", "numpy-cache": "in numpy",
            "memory": "memory store"}[kind]


def sql_vectors(ws: Path) -> int:
    con = sqlite3.connect(ws / "reid.db")
    try:
        return con.execute("SELECT count(*) FROM embeddings").fetchone()[0]
    finally:
        con.close()


# ---- the CLI ------------------------------------------------------------------------------------------


def cli(ws: Path, *args: str) -> Result:
    from reid_search.app.cli import main

    r = CliRunner().invoke(main, ["-q", "-w", str(ws), *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def summary(r: Result) -> str:
    (line,) = [ln for ln in r.output.splitlines() if ln.startswith(("indexed ", "dropped "))]
    return line.split(" in ")[0]


def gallery_line(r: Result) -> str:
    (line,) = [ln for ln in r.output.splitlines() if ln.startswith("gallery: ")]
    return line


def query_json(ws: Path, q: Path, *extra: str) -> dict[str, Any]:
    r = cli(ws, "query", str(q), "--json", "--device", "cpu", *extra)
    return json.loads(r.output.strip().splitlines()[-1])


def run_cli(kind: str, root: Path, market: Path, ckpt: Path, oracle: Oracle) -> dict[str, Any]:
    """The CLI scenario on store ``kind``, checked against the oracle at each step; returns what it printed."""
    ws = root / kind
    folder = market / "bounding_box_test"
    out: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as mp:
        inj = opening(kind, mp, root / "site")
        index = ("index", str(folder), "--model", str(ckpt), "--workers", "0", "--device", "cpu")
        n = len(oracle.gallery)
        r = cli(ws, *inj.store_option, *index)
        out["index1"] = summary(r)
        if inj.plugin:  # recorded: the later commands need no --store
            assert json.loads((ws / "store.json").read_text()) == {"store": f"{kind}:"}
        assert out["index1"] == f"indexed {n}, replaced 0, unchanged 0, removed 0, skipped 0"
        assert store_name(kind) in gallery_line(r) and f"gallery: {n} images" in gallery_line(r)
        r = cli(ws, *index)  # incremental: nothing new
        out["index2"] = summary(r)
        assert out["index2"] == f"indexed 0, replaced 0, unchanged {n}, removed 0, skipped 0"
        assert f"gallery: {n} images" in gallery_line(r)

        def queries(tag: str, present: list[Path]) -> None:
            for q in (oracle.queries[0], oracle.queries[-1]):  # one of camera 1, one of camera 2
                _, qc = oracle.label(q)
                ans = query_json(ws, q, "--top-k", "5")
                assert ans["camid"] == qc
                oracle.check_hits(ans["hits"], q, [g for g in present if oracle.label(g)[1] != qc], 5)
                flt = query_json(ws, q, "--top-k", "4", "--cameras", "1,3")
                assert flt["filter"]["cameras"] == [1, 3]
                oracle.check_hits(flt["hits"], q, [g for g in present if oracle.label(g)[1] in {1, 3} - {qc}], 4)
                out[f"hits:{tag}:{q.name}"] = [ans["hits"], flt["hits"]]

        queries("q1", oracle.gallery)

        r = cli(ws, "eval", "--json", "--device", "cpu")
        ev = json.loads(r.output.strip().splitlines()[-1])
        r1, m_ap = oracle.market_metrics(oracle.gallery)
        assert ev["num_gallery"] == n and ev["num_query"] == len(oracle.queries)
        assert ev["rank1"] == pytest.approx(r1, abs=1e-6) and ev["mAP"] == pytest.approx(m_ap, abs=1e-6)
        out["eval"] = ev

        cam3 = [g for g in oracle.gallery if oracle.label(g)[1] == 3]
        r = cli(ws, "remove", "--camid", "3", "--dry-run")
        assert r.output.startswith(f"would remove {len(cam3)} image(s) matching camid 3 (dry run: nothing removed)")
        assert sorted(Path(ln.strip()) for ln in r.output.splitlines()[1:]) == sorted(cam3)
        assert query_json(ws, oracle.queries[0], "--top-k", "5")["hits"] == out[f"hits:q1:{oracle.queries[0].name}"][0]
        r = cli(ws, "remove", "--camid", "3")
        assert r.output.startswith(f"removed {len(cam3)} image(s) matching camid 3")
        assert f"gallery: {n - len(cam3)} images" in gallery_line(r)
        left = [g for g in oracle.gallery if g not in cam3]
        pid2 = [g for g in left if oracle.label(g)[0] == 2]
        r = cli(ws, "remove", "--pid", "2", "--dry-run")
        assert r.output.startswith(f"would remove {len(pid2)} image(s) matching pid 2 (dry run")
        r = cli(ws, "remove", "--pid", "2")
        assert r.output.startswith(f"removed {len(pid2)} image(s) matching pid 2")
        left = [g for g in left if g not in pid2]
        assert f"gallery: {len(left)} images" in gallery_line(r)
        queries("q2", left)

        r = cli(ws, *index)  # the removed files are still there: they come back
        out["index3"] = summary(r)
        assert out["index3"] == f"indexed {len(cam3) + len(pid2)}, replaced 0, unchanged {len(left)}, removed 0, skipped 0"

        r = cli(ws, *index, "--reindex")
        out["reindex"] = summary(r)
        assert out["reindex"] == f"dropped {n} (re-index), indexed {n}, replaced 0, unchanged 0, removed 0, skipped 0"
        assert f"gallery: {n} images" in gallery_line(r)
        queries("q3", oracle.gallery)
        r = cli(ws, "eval", "--json", "--device", "cpu")
        assert json.loads(r.output.strip().splitlines()[-1]) == ev

        assert inj.opens >= 14  # every command opened its gallery through the plug-in (or the stand-in)
        if inj.plugin:
            assert sql_vectors(ws) == (0 if kind == "numpy" else n)
            files = numpy_files(ws)
            assert len(files) == 1 and files[0][2] != 0  # the re-index's version; the old one cleaned up
    return out


def same_hits(got: list[dict[str, Any]], want: list[dict[str, Any]], ids: bool) -> None:
    """The same hits in the same order (ids too when both stores number rows alike), distances within 1e-5."""
    key = ("rank", "path", "pid", "camid", "time", "track") + (("id",) if ids else ())
    assert [[h[k] for k in key] for h in got] == [[h[k] for k in key] for h in want]
    np.testing.assert_allclose([h["distance"] for h in got], [h["distance"] for h in want], atol=TOL_FAISS, rtol=0)


def compare(got: dict[str, Any], want: dict[str, Any], kind: str) -> None:
    assert got.keys() == want.keys()
    for key in got:
        if key.startswith("hits:"):
            for g, w in zip(got[key], want[key]):
                same_hits(g, w, ids=kind != "memory")
        elif key == "eval":
            assert got[key].keys() == want[key].keys()
            for m, v in want[key].items():
                assert got[key][m] == (pytest.approx(v, abs=1e-6) if isinstance(v, float) else v), m
        else:
            assert got[key] == want[key], key


@pytest.fixture(scope="module")
def faiss_cli(tmp_path_factory: pytest.TempPathFactory, market: Path, tiny_ckpt: Path, oracle: Oracle) -> dict[str, Any]:
    return run_cli("faiss", tmp_path_factory.mktemp("cli"), market, tiny_ckpt, oracle)


@pytest.mark.slow  # ~20 s a store: some 20 CLI runs, each loading the model
@pytest.mark.parametrize("kind", STORES)
def test_cli_on_store(kind: str, tmp_path: Path, market: Path, tiny_ckpt: Path, oracle: Oracle,
                      faiss_cli: dict[str, Any]) -> None:
    got = faiss_cli if kind == "faiss" else run_cli(kind, tmp_path, market, tiny_ckpt, oracle)
    compare(got, faiss_cli, kind)


# ---- the service --------------------------------------------------------------------------------------


def rel(p: str, ws: Path) -> str:
    """A hit's path with the workspace's own folder taken out (uploads differ per workspace)."""
    return p.replace(str(ws.resolve()), "<ws>")


def run_service(kind: str, root: Path, market: Path, ckpt: Path, oracle: Oracle) -> dict[str, Any]:
    """The service scenario on store ``kind`` (gallery indexed by the CLI first), checked against the oracle."""
    from reid_search.app.service import create_app
    from reid_search.extract import extract_features
    from reid_search.extractors import load_extractor

    ws = root / kind
    folder = market / "bounding_box_test"
    n = len(oracle.gallery)
    out: dict[str, Any] = {}
    new = write_crop(root / "new" / "person.jpg", 4242)
    (new_feat,), _, _ = extract_features([new], load_extractor(ckpt, device="cpu"), num_workers=0)
    with pytest.MonkeyPatch.context() as mp:
        inj = opening(kind, mp, root / "site")
        cli(ws, *inj.store_option, "index", str(folder), "--model", str(ckpt), "--workers", "0", "--device", "cpu")
        opens = inj.opens
        app = create_app(Workspace(ws), device="cpu", max_batch=4, max_wait_ms=0)  # the recorded store
        assert inj.opens == opens + 1, "the service did not open its gallery through open_workspace_gallery"
        with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
            st = c.get("/stats").json()
            assert st["gallery_size"] == n and store_name(kind) in st["gallery"] and st["index"]["type"] == "flat"
            gen0 = st["generation"]
            for q in oracle.queries:
                _, qc = oracle.label(q)
                r = c.post("/query", files={"file": (q.name, q.read_bytes())}, data={"top_k": "6", "cameras": "2,3"})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["camid"] == qc and body["filter"]["cameras"] == [2, 3]
                oracle.check_hits(body["hits"], q, [g for g in oracle.gallery if oracle.label(g)[1] in {2, 3} - {qc}], 6)
                out[f"hits:q1:{q.name}"] = [body["hits"]]

            r = c.post("/gallery", files={"file": ("person.jpg", new.read_bytes())}, data={"pid": "42", "camid": "7"})
            assert r.status_code == 200, r.text
            (new_id,) = r.json()["ids"]
            assert r.json()["gallery_size"] == n + 1 and r.json()["generation"] > gen0
            r = c.post("/query", files={"file": ("x.jpg", new.read_bytes())}, data={"top_k": "3"})
            hits = r.json()["hits"]
            assert hits[0]["id"] == new_id and hits[0]["pid"] == 42 and hits[0]["camid"] == 7
            assert hits[0]["distance"] < 1e-4 and len(hits) == 3
            uploaded = Path(hits[0]["path"])
            assert uploaded.parent == (ws / "uploads").resolve() and uploaded.read_bytes() == new.read_bytes()
            with_new = Oracle({**oracle.feats, uploaded: new_feat}, oracle.gallery + [uploaded], oracle.queries,
                              {uploaded: (42, 7)})
            with_new.check_hits(hits, new_feat, with_new.gallery, 3)
            out["hits:added"] = [[{**h, "path": rel(h["path"], ws)} for h in hits]]

            cam2 = [g for g in oracle.gallery if oracle.label(g)[1] == 2]
            r = c.delete("/gallery", params={"camid": "2", "dry_run": "true"})
            assert r.status_code == 200, r.text
            dry = r.json()
            assert (dry["matched"], dry["removed"], dry["dry_run"], dry["gallery_size"]) == (len(cam2), 0, True, n + 1)
            r = c.delete("/gallery", params={"camid": "2"})
            done = r.json()
            assert (done["matched"], done["removed"], done["gallery_size"]) == (len(cam2), len(cam2), n + 1 - len(cam2))
            assert sorted(done["ids"]) == sorted(dry["ids"])
            out["removed"] = (dry["matched"], done["removed"], done["files_deleted"])
            st = c.get("/stats").json()
            assert st["gallery_size"] == n + 1 - len(cam2) and st["generation"] > gen0
            left = [g for g in with_new.gallery if g not in cam2]
            for q in oracle.queries:
                _, qc = oracle.label(q)
                r = c.post("/query", files={"file": (q.name, q.read_bytes())}, data={"top_k": "5"})
                hits = r.json()["hits"]
                assert all(h["camid"] != 2 for h in hits)
                with_new.check_hits(hits, q, [g for g in left if with_new.label(g)[1] != qc], 5)
                out[f"hits:q2:{q.name}"] = [[{**h, "path": rel(h["path"], ws)} for h in hits]]
        if inj.plugin:
            assert sql_vectors(ws) == (0 if kind == "numpy" else n + 1 - len(cam2))
    return out


@pytest.fixture(scope="module")
def faiss_service(tmp_path_factory: pytest.TempPathFactory, market: Path, tiny_ckpt: Path, oracle: Oracle
                  ) -> dict[str, Any]:
    return run_service("faiss", tmp_path_factory.mktemp("svc"), market, tiny_ckpt, oracle)


@pytest.mark.parametrize("kind", STORES)
def test_service_on_store(kind: str, tmp_path: Path, market: Path, tiny_ckpt: Path, oracle: Oracle,
                          faiss_service: dict[str, Any]) -> None:
    got = faiss_service if kind == "faiss" else run_service(kind, tmp_path, market, tiny_ckpt, oracle)
    compare(got, faiss_service, kind)


# ---- what the SPI backend relies on the coordinator for -------------------------------------------------


def unit_rows(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def new_images(folder: Path, ids: range) -> list[Any]:
    import hashlib

    from reid_search.gallery import NewImage

    return [NewImage(folder / f"{i:04d}_c{1 + i % 3}s1_000000_00.jpg", hashlib.sha256(b"%d" % i).hexdigest(), 1)
            for i in ids]


@pytest.mark.parametrize("kind", ["numpy", "numpy-cache"], ids=["only-copy", "cache"])
def test_a_crash_that_loses_the_backends_last_writes_is_repaired_on_open(kind: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The vector file is put back to its state before the last commit (a crash between the SQL
    commit and the backend's write): a cache is refilled from SQL, the only copy's rows without a
    vector are dropped, and a vector whose row was removed goes in both; searches then equal brute
    force over what the gallery holds."""
    import shutil

    install_numpy(monkeypatch, tmp_path / "site")
    holds = kind == "numpy"
    ws = Workspace(tmp_path / "ws", store_override=f"{kind}:")
    ws.ensure()
    x = unit_rows(12)

    with ORIGINAL_OPEN(ws) as g:
        g.add_images(new_images(tmp_path, range(8)), x[:8], "m")
    (path, _, _), = numpy_files(ws.root)
    shutil.copy(path, tmp_path / "before.npz")
    with ORIGINAL_OPEN(ws) as g:
        late = g.add_images(new_images(tmp_path, range(8, 12)), x[8:], "m")
        g.remove_ids([1])
    shutil.copy(tmp_path / "before.npz", path)  # the backend lost the last commits; SQL has them

    with ORIGINAL_OPEN(Workspace(ws.root)) as g:  # the recorded store
        # Both drop the removed id 1; the only copy is the truth for vectors: the late rows had none.
        want_ids = np.arange(2, 9) if holds else np.arange(2, 13)
        np.testing.assert_array_equal(g.ids(), want_ids)
        np.testing.assert_array_equal(g.backend.ids(), want_ids)
        sims, got = g.search(x, 3)
        xs = x[want_ids - 1]
        for q in range(len(x)):
            order = want_ids[np.argsort(-(xs @ x[q]), kind="stable")][:3]
            np.testing.assert_array_equal(got[q], order)
        assert set(late.tolist()) & set(g.ids().tolist()) == (set() if holds else set(late.tolist()))
    assert sql_vectors(ws.root) == (0 if holds else len(want_ids))


def test_an_index_type_the_backend_cannot_build_is_refused_by_the_cli(tmp_path: Path, market: Path,
                                                                    tiny_ckpt: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from reid_search.app.cli import main

    install_numpy(monkeypatch, tmp_path / "site")
    ws = tmp_path / "ws"
    index = ("index", str(market / "query"), "--model", str(tiny_ckpt), "--workers", "0", "--device", "cpu")
    cli(ws, "--store", "numpy:", *index)
    r = CliRunner().invoke(main, ["-q", "-w", str(ws), *index, "--index-type", "hnsw"])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == \
        "Error: the numpy store builds only flat indexes, not hnsw", r.output
    assert "flat index in numpy" in gallery_line(cli(ws, *index))  # nothing recorded


# ---- the store is recorded: never opened with the wrong kind of store ------------------------------------


def images_in_db(ws: Path) -> int:
    con = sqlite3.connect(ws / "reid.db")
    try:
        return con.execute("SELECT count(*) FROM images").fetchone()[0]
    finally:
        con.close()


def test_a_gallery_held_by_another_backend_is_not_opened_as_an_empty_faiss_one(tmp_path: Path) -> None:
    """A gallery that a vector-holding backend injected through ``open_workspace_gallery(backend_factory=...)``
    keeps (nothing recorded: a workspace with a DB and no ``store.json`` is FAISS), opened later without it,
    is refused in one line: its rows have no vector in SQL, and the FAISS store has none either. Nothing is
    changed: the right backend opens it whole."""
    from indexer.faiss.backend import FaissFactory

    ws = Workspace(tmp_path / "ws")
    ws.ensure()
    with ORIGINAL_OPEN(ws, backend_factory=NumpyFactory(ws.root / "numpy-vectors")) as g:
        g.add_images(new_images(tmp_path, range(5)), unit_rows(5), "m")
    assert not ws.store_pointer.exists()
    with pytest.raises(GalleryError) as e:
        ORIGINAL_OPEN(ws)
    msg = str(e.value)
    assert "\n" not in msg and "records 5 images whose vectors live in a store that holds them" in msg, msg
    assert "the faiss store holds none of them" in msg and "--store" in msg, msg
    assert FaissFactory(ws.index_dir).leftovers(None) == [] and not ws.store_pointer.exists()
    with ORIGINAL_OPEN(ws, backend_factory=NumpyFactory(ws.root / "numpy-vectors")) as g:
        assert g.ntotal == g.count() == 5


def test_a_plugin_gallery_whose_record_is_lost_is_refused_by_the_cli(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``--store numpy:`` records the plug-in; with ``store.json`` deleted the workspace looks like a FAISS
    one, and the DB's rows (no vector in SQL) make the open a one-line error, not an empty gallery."""
    from reid_search.app.cli import main

    install_numpy(monkeypatch, tmp_path / "site")
    ws = Workspace(tmp_path / "ws", store_override="numpy:")
    with ORIGINAL_OPEN(ws) as g:
        g.add_images(new_images(tmp_path, range(5)), unit_rows(5), "m")
    assert json.loads(ws.store_pointer.read_text()) == {"store": "numpy:"}
    with ORIGINAL_OPEN(Workspace(ws.root)) as g:  # the record is enough
        assert g.kind == "numpy" and g.ntotal == g.count() == 5
    ws.store_pointer.unlink()
    r = CliRunner().invoke(main, ["-w", str(ws.root), "remove", "--pid", "1"])
    one_line_error(r, "records 5 images whose vectors live in a store that holds them", "faiss store holds none")
    assert images_in_db(ws.root) == 5 and len(numpy_files(ws.root)) == 1


def test_a_faiss_gallery_is_not_opened_by_a_store_that_holds_the_vectors(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A FAISS gallery's DB (vectors in SQL) shared with ``--db`` and opened from another workspace with
    ``--store numpy:`` is refused in one line; the only copy's repair would otherwise delete every row."""
    from reid_search.app.cli import main

    install_numpy(monkeypatch, tmp_path / "site")
    ws = Workspace(tmp_path / "ws")
    with ORIGINAL_OPEN(ws) as g:
        g.add_images(new_images(tmp_path, range(5)), unit_rows(5), "m")
    r = CliRunner().invoke(main, ["-w", str(tmp_path / "other"), "--db", ws.db_url, "--store", "numpy:",
                                  "remove", "--pid", "1"])
    one_line_error(r, "keeps the vectors of its 5 images itself", "the numpy store holds none of them")
    assert images_in_db(ws.root) == 5 and sql_vectors(ws.root) == 5
    assert not (tmp_path / "other" / "store.json").exists()


def test_a_recorded_plugin_that_is_not_installed_is_refused(tmp_path: Path) -> None:
    from reid_search.app.cli import main

    ws = Workspace(tmp_path / "ws", store_override="numpy:")
    with pytest.MonkeyPatch.context() as mp:
        install_numpy(mp, tmp_path / "site")
        with ORIGINAL_OPEN(ws) as g:
            g.add_images(new_images(tmp_path, range(3)), unit_rows(3), "m")
    r = CliRunner().invoke(main, ["-w", str(ws.root), "remove", "--pid", "1"])  # the plug-in is gone
    one_line_error(r, "store.json", "not here", "'numpy:'", "the stores here are faiss, milvus (")
    assert images_in_db(ws.root) == 3


# ---- plug-in names: listed, loaded when opened, failures in one line -------------------------------------


def test_an_unknown_store_name_is_one_line_listing_the_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reid_search.app.cli import main

    with pytest.raises(GalleryError, match="the stores here are faiss, milvus \\(") as e:
        parse_store("numpy:")  # not installed yet
    assert "\n" not in str(e.value) and "reid_search.backends" in str(e.value)
    install_numpy(monkeypatch, tmp_path / "site")
    assert parse_store("numpy:") == StoreLocation("numpy")  # read when parsed, not at import
    r = CliRunner().invoke(main, ["-w", str(tmp_path / "ws"), "--store", "qdrant:http://q:6333",
                                  "remove", "--pid", "1"])
    one_line_error(r, "--store 'qdrant:http://q:6333'", "the stores here are faiss, milvus, numpy, numpy-cache (")
    for bad in ("faiss:/x", "redis://x", "sqlite"):
        with pytest.raises(GalleryError, match="--store") as e:
            parse_store(bad)
        assert "\n" not in str(e.value)


def test_a_plugin_that_fails_to_load_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reid_search.app.cli import main

    site = tmp_path / "site"
    site.mkdir()
    (site / "boom_plugin.py").write_text("raise RuntimeError('no client library\\nsecond line')\n")
    install_plugin(monkeypatch, site, {"missing": "reid_search_no_such_module.store:Factory",
                                       "boom": "boom_plugin:Factory",
                                       "notafactory": "tests.spi_backend:store_folder"}, dist="reid_search_broken")
    assert parse_store("missing:").kind == "missing"  # parsing loads nothing
    for name, needles in {"missing": ["'missing'", "reid_search_no_such_module.store:Factory", "ModuleNotFoundError"],
                          "boom": ["'boom'", "boom_plugin:Factory", "RuntimeError: no client library second line"],
                          "notafactory": ["'notafactory'", "returned a", "not an indexer.protocol.BackendFactory"]
                          }.items():
        r = CliRunner().invoke(main, ["-w", str(tmp_path / name), "--store", f"{name}:", "remove", "--pid", "1"])
        one_line_error(r, *needles)
        assert not (tmp_path / name / "store.json").exists()
    r = CliRunner().invoke(main, ["-w", str(tmp_path / "m"), "--store", "missing:", "remove", "--pid", "1"])
    one_line_error(r, "failed to load", "from reid-search-broken", "reinstall it, or choose another --store")


# ---- today's values and records parse as before ----------------------------------------------------------


@pytest.mark.parametrize("value, want, back", [
    (None, StoreLocation("faiss"), "faiss"),
    ("faiss", StoreLocation("faiss"), "faiss"),
    ("FAISS", StoreLocation("faiss"), "faiss"),
    ("milvus:", StoreLocation("milvus", None), "milvus:"),
    ("milvus://h:19530", StoreLocation("milvus", "http://h:19530"), "http://h:19530"),
    ("http://h:19530/", StoreLocation("milvus", "http://h:19530"), "http://h:19530"),
    ("https://milvus.example:443", StoreLocation("milvus", "https://milvus.example:443"), "https://milvus.example:443"),
])
def test_todays_store_values_parse_as_before(value: str | None, want: StoreLocation, back: str) -> None:
    got = parse_store(value)
    assert got == want and (got.kind, got.uri, got.home) == (want.kind, want.uri, None)
    assert got.to_str() == back and parse_store(back) == got


def test_lite_paths_and_plugin_values_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lite = parse_store(f"milvus:{tmp_path}/g.db")
    assert lite == StoreLocation("milvus", str(tmp_path / "g.db")) and lite.is_lite
    assert parse_store(lite.to_str()) == lite
    install_numpy(monkeypatch, tmp_path / "site")
    for value, want in {"numpy:": StoreLocation("numpy"), "numpy": StoreLocation("numpy"),
                        "NUMPY:/data/vec": StoreLocation("numpy", "/data/vec"),
                        "numpy-cache:s3://b/k": StoreLocation("numpy-cache", "s3://b/k")}.items():
        got = parse_store(value)
        assert got == want and not got.is_lite and parse_store(got.to_str()) == got
        assert got.resolved(tmp_path) == got  # a plug-in resolves its own URI
    assert StoreLocation("numpy", None, "/a") == StoreLocation("numpy", None, "/b")  # home is not identity


@pytest.mark.parametrize("record", ["faiss", "milvus:", "http://h:19530", "LITE", "numpy:"])
def test_store_json_files_already_written_still_read_the_same(record: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REID_SEARCH_STORE", raising=False)
    install_numpy(monkeypatch, tmp_path / "site")
    root = tmp_path / "ws"
    record = f"milvus:{tmp_path / 'shared.db'}" if record == "LITE" else record
    want = {"faiss": StoreLocation("faiss"), "milvus:": StoreLocation("milvus", str(root.resolve() / "milvus.db")),
            "http://h:19530": StoreLocation("milvus", "http://h:19530"), "numpy:": StoreLocation("numpy")
            }.get(record, StoreLocation("milvus", str(tmp_path / "shared.db")))
    root.mkdir()
    (root / "store.json").write_text(json.dumps({"store": record}))  # as earlier versions wrote it
    before = (root / "store.json").read_bytes()
    ws = Workspace(root)
    assert ws.store() == want
    ws.record_store(ws.store())
    assert (root / "store.json").read_bytes() == before  # nothing to rewrite
