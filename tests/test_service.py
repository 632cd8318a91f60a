"""The HTTP search service, driven over real loopback sockets.

A uvicorn server runs in a background thread on a free 127.0.0.1 port, serving
a tiny workspace (the tiny checkpoint, a 16-image gallery indexed through the
indexer API); httpx talks to it. Results are compared with the engine and the
CLI on the same images; bad inputs must get 4xx JSON and leave it serving.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from reid_search.app.cli._common import main
from reid_search.app.cli.search import query as query_cmd
from reid_search.app.cli.serve import serve
from reid_search.data import parse_name
from reid_search.extract import extract_features
from reid_search.extractors import load_extractor
from reid_search.images import load_image
from reid_search.app.service import create_app, upload_name
from reid_search.app.session import open_engine
from reid_search.app.workspace import Workspace
from tests.helpers import write_crop

if "serve" not in main.commands:
    main.add_command(serve)
if "query" not in main.commands:
    main.add_command(query_cmd)

MAX_UPLOAD = 256 * 1024
MAX_PIXELS = 1_000_000
MAX_FILES = 4
KEY = "s3cret-key"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Workspace:
    """16 gallery crops (4 ids × 2 cameras × 2) indexed with the tiny model, plus 8 query crops."""
    from reid_search.gallery import NewImage
    from indexer.pipeline import sha256_file
    from reid_search.app.session import open_workspace_gallery

    root = tmp_path_factory.mktemp("svc")
    gallery_dir, query_dir = root / "market" / "bounding_box_test", root / "market" / "query"
    paths = [write_crop(gallery_dir / f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg", 100 * pid + 10 * cam + k)
             for pid in range(1, 5) for cam in (1, 2) for k in range(2)]
    for pid in range(1, 5):
        for cam in (1, 3):
            write_crop(query_dir / f"{pid:04d}_c{cam}s1_000100_00.jpg", 1000 + 10 * pid + cam)
    ws = Workspace(root / "ws")
    ws.set_model(tiny_ckpt)
    extractor = load_extractor(tiny_ckpt, device="cpu")
    feats, kept, failures = extract_features(paths, extractor, num_workers=0)
    assert not failures and kept == list(range(len(paths)))
    with open_workspace_gallery(ws) as gallery:
        gallery.add_images([NewImage(p, *sha256_file(p)) for p in paths], feats, extractor.fingerprint)
    return ws


@pytest.fixture(scope="module")
def query_paths(workspace: Workspace) -> list[Path]:
    return sorted((workspace.root.parent / "market" / "query").iterdir())


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop"


def make_app(ws: Workspace) -> Any:
    # A 20 ms window makes batches certain in the burst test without slowing the rest much.
    return create_app(ws, device="cpu", max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS,
                      max_files=MAX_FILES, max_batch=8, max_wait_ms=20)


@pytest.fixture(scope="module")
def server(workspace: Workspace) -> Iterator[tuple[str, Any]]:
    """The server of the module's workspace, for the tests that leave its gallery as they found it."""
    app = make_app(workspace)
    with running(app) as url:
        yield url, app


@dataclass
class Own:
    """A copy of the module's workspace with its own server, for a test that changes the gallery."""

    ws: Workspace
    url: str
    app: Any
    client: httpx.Client


@pytest.fixture()
def own(workspace: Workspace, tmp_path: Path) -> Iterator[Own]:
    ws = Workspace(Path(shutil.copytree(workspace.root, tmp_path / "ws")))
    app = make_app(ws)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield Own(ws, url, app, c)


@pytest.fixture(scope="module")
def client(server: tuple[str, Any]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


def upload(path: Path, name: str | None = None) -> dict[str, Any]:
    return {"file": (name or path.name, path.read_bytes())}


def png_bytes(size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 30, 200)).save(buf, format=fmt)
    return buf.getvalue()


def assert_same_hits(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [h["id"] for h in got] == [h["id"] for h in want]
    assert [(h["rank"], h["path"], h["pid"], h["camid"]) for h in got] == \
        [(h["rank"], h["path"], h["pid"], h["camid"]) for h in want]
    # Batched and single forward passes may round differently in the last bits.
    np.testing.assert_allclose([h["distance"] for h in got], [h["distance"] for h in want], atol=1e-5)


def healthy(client: httpx.Client, query_paths: list[Path]) -> None:
    r = client.post("/query", files=upload(query_paths[0]), data={"top_k": "2"})
    assert r.status_code == 200, r.text
    assert len(r.json()["hits"]) == 2


# --------------------------------------------------------------------------- query


def test_query_matches_the_cli(workspace: Workspace, query_paths: list[Path], client: httpx.Client) -> None:
    q = query_paths[0]
    cli = CliRunner().invoke(main, ["-w", str(workspace.root), "query", str(q), "--json", "--top-k", "5",
                                    "--device", "cpu"])
    assert cli.exit_code == 0, cli.output
    want = json.loads(cli.output.strip().splitlines()[-1])
    r = client.post("/query", files=upload(q), data={"top_k": "5"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["query"] == q.name and got["camid"] == want["camid"] == 1 and got["rerank"] is False
    assert len(got["hits"]) == 5
    assert all(h["camid"] != 1 for h in got["hits"])  # own camera dropped, camid read from the Market name
    assert_same_hits(got["hits"], want["hits"])


@pytest.mark.parametrize("rerank", [False, True])
def test_query_matches_the_engine(workspace: Workspace, query_paths: list[Path], client: httpx.Client,
                                  rerank: bool) -> None:
    engine = open_engine(workspace, None, "cpu")
    try:
        for q, cam in ((query_paths[1], None), (query_paths[2], 2)):
            feats = engine.embed_images([load_image(q)])
            want = [h.to_dict() for h in engine.search(feats, top_k=6, camids=[cam], rerank=rerank)[0]]
            form = {"top_k": "6", "rerank": str(rerank).lower()}
            if cam is not None:
                form["camid"] = str(cam)
            # An un-Market name: no camera filter unless camid is given.
            r = client.post("/query", files=upload(q, "person.png"), data=form)
            assert r.status_code == 200, r.text
            assert r.json()["camid"] == cam and r.json()["rerank"] is rerank
            assert_same_hits(r.json()["hits"], want)
    finally:
        engine.gallery.close()


def test_query_params_in_the_query_string(query_paths: list[Path], client: httpx.Client) -> None:
    a = client.post("/query", files=upload(query_paths[3]), data={"top_k": "3", "camid": "2"})
    b = client.post("/query?top_k=3&camid=2", files=upload(query_paths[3]))
    assert a.status_code == b.status_code == 200
    assert a.json() == b.json()
    assert len(a.json()["hits"]) == 3 and all(h["camid"] != 2 for h in a.json()["hits"])
    # Camera 3 (from the name) has no gallery images: top_k beyond the gallery returns all of it.
    big = client.post("/query?top_k=1000", files=upload(query_paths[3]))
    assert big.status_code == 200 and len(big.json()["hits"]) == client.get("/stats").json()["gallery_size"]


def test_concurrent_burst(query_paths: list[Path], client: httpx.Client, server: tuple[str, Any]) -> None:
    url, app = server
    want = {}
    for q in query_paths:
        r = client.post("/query", files=upload(q), data={"top_k": "5"})
        assert r.status_code == 200
        want[q.name] = r.json()
    before = app.state.batcher.stats.largest
    local = threading.local()

    def one(i: int) -> tuple[int, str, dict[str, Any]]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=60)
        q = query_paths[i % len(query_paths)]
        r = local.client.post("/query", files=upload(q), data={"top_k": "5"})
        return r.status_code, q.name, r.json()

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32), timeout=120))
    assert time.monotonic() - t0 < 120
    assert [s for s, _, _ in results] == [200] * 32
    for _, name, body in results:
        assert body["query"] == name and body["camid"] == want[name]["camid"]
        assert_same_hits(body["hits"], want[name]["hits"])
    stats = client.get("/stats").json()["batching"]
    assert stats["largest_batch"] > 1, stats  # concurrent queries were embedded together
    assert app.state.batcher.stats.largest >= before


# --------------------------------------------------------------------------- gallery
# Each test here changes the gallery: it gets its own copy of the workspace and its own server
# (``own``), so no test depends on what another left.


def test_add_query_remove(own: Own, query_paths: list[Path]) -> None:
    from reid_search.app.session import open_workspace_gallery

    q = query_paths[4]
    size0 = own.client.get("/stats").json()["gallery_size"]
    r = own.client.post("/gallery", files=upload(q, "../../escape.jpg"), data={"pid": "42", "camid": "7"})
    assert r.status_code == 200, r.text
    body = r.json()
    (new_id,) = body["ids"]
    item = body["items"][0]
    assert item["new"] and item["pid"] == 42 and item["camid"] == 7 and body["gallery_size"] == size0 + 1
    stored = Path(item["path"])
    assert stored.parent == (own.ws.root / "uploads").resolve() and stored.read_bytes() == q.read_bytes()
    assert stored.name == upload_name(item["sha256"], ".jpg", 42, 7)
    assert not (own.ws.root.parent / "escape.jpg").exists() and not (own.ws.root / "escape.jpg").exists()
    # Committed through the indexer: another process sees it.
    with open_workspace_gallery(own.ws) as g:
        m = g.metadata([new_id])[0]
        assert (m.pid, m.camid, m.path) == (42, 7, stored)

    # The same bytes and labels again: same id, nothing added.
    again = own.client.post("/gallery", files=upload(q), data={"pid": "42", "camid": "7"}).json()
    assert again["ids"] == [new_id] and not again["items"][0]["new"] and again["gallery_size"] == size0 + 1

    hits = own.client.post("/query", files=upload(q, "x.jpg"), data={"top_k": "3"}).json()["hits"]
    assert hits[0]["id"] == new_id and hits[0]["pid"] == 42 and hits[0]["distance"] < 1e-4
    # Its camera is filtered like any other.
    hits = own.client.post("/query", files=upload(q, "x.jpg"), data={"top_k": "3", "camid": "7"}).json()["hits"]
    assert new_id not in [h["id"] for h in hits]

    r = own.client.delete(f"/gallery/{new_id}")
    assert r.status_code == 200 and r.json()["gallery_size"] == size0
    assert not stored.exists()
    hits = own.client.post("/query", files=upload(q, "x.jpg"), data={"top_k": "3"}).json()["hits"]
    assert new_id not in [h["id"] for h in hits]
    r = own.client.delete(f"/gallery/{new_id}")
    assert r.status_code == 404 and r.json()["reason"] == "unknown-id"


def test_add_several_unlabelled(own: Own) -> None:
    a = write_crop(own.ws.root.parent / "extra" / "a.png", 7001)
    b = write_crop(own.ws.root.parent / "extra" / "b.jpg", 7002)
    files = [("file", ("a.png", a.read_bytes(), "image/png")), ("file", ("b.jpg", b.read_bytes(), "image/jpeg")),
             ("file", ("a-again.png", a.read_bytes(), "image/png"))]
    r = own.client.post("/gallery", files=files)
    assert r.status_code == 200, r.text
    ids = r.json()["ids"]
    assert len(ids) == 3 and ids[0] == ids[2] != ids[1]
    for item in r.json()["items"]:
        assert item["pid"] is None and parse_name(Path(item["path"]).name) is None
    hits = own.client.post("/query", files={"file": ("b.jpg", b.read_bytes())}, data={"top_k": "1"}).json()["hits"]
    assert hits[0]["id"] == ids[1] and hits[0]["pid"] is None
    for i in set(ids):
        assert own.client.delete(f"/gallery/{i}").status_code == 200


def test_concurrent_writes_and_queries(own: Own, query_paths: list[Path]) -> None:
    url = own.url
    crops = [write_crop(own.ws.root.parent / "burst" / f"{i}.jpg", 8000 + i) for i in range(6)]
    size0 = own.client.get("/stats").json()["gallery_size"]

    def add(p: Path) -> tuple[int, Any]:
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/gallery", files=upload(p), data={"pid": "77", "camid": "5"})
            return r.status_code, r.json()

    def ask(q: Path) -> int:
        with httpx.Client(base_url=url, timeout=60) as c:
            return c.post("/query", files=upload(q)).status_code

    with ThreadPoolExecutor(8) as pool:
        adds = [pool.submit(add, p) for p in crops]
        asks = [pool.submit(ask, q) for q in query_paths]
        added = [f.result(timeout=120) for f in adds]
        assert [f.result(timeout=120) for f in asks] == [200] * len(query_paths)
    assert [s for s, _ in added] == [200] * len(crops)
    ids = [b["ids"][0] for _, b in added]
    assert len(set(ids)) == len(crops)
    assert own.client.get("/stats").json()["gallery_size"] == size0 + len(crops)
    for p, i in zip(crops, ids):
        hit = own.client.post("/query", files=upload(p, "x.jpg"), data={"top_k": "1"}).json()["hits"][0]
        assert hit["id"] == i
    for i in ids:
        assert own.client.delete(f"/gallery/{i}").status_code == 200
    assert own.client.get("/stats").json()["gallery_size"] == size0


def test_sees_changes_of_other_processes(own: Own) -> None:
    from reid_search.gallery import NewImage
    from indexer.pipeline import sha256_file
    from reid_search.app.session import open_workspace_gallery

    p = write_crop(own.ws.root.parent / "other" / "0055_c4s1_000001_00.jpg", 9100)
    extractor = load_extractor(own.ws.model_path(), device="cpu")
    with open_workspace_gallery(own.ws) as g:  # as `reid-search index` would, from another process
        feats = extract_features([p], extractor, num_workers=0)[0]
        (new_id,) = g.add_images([NewImage(p, *sha256_file(p))], feats, extractor.fingerprint)
    deadline = time.monotonic() + 10  # the server re-reads the DB generation at most once a second
    while True:
        hits = own.client.post("/query", files=upload(p, "x.jpg"), data={"top_k": "1"}).json()["hits"]
        if hits[0]["id"] == new_id or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert hits[0]["id"] == new_id and hits[0]["pid"] == 55
    # Removing an image indexed from a folder keeps its file: only uploads are the service's to delete.
    assert own.client.delete(f"/gallery/{new_id}").status_code == 200
    assert p.is_file()


def test_upload_names_carry_labels() -> None:
    sha = "f1" + "0" * 62  # must not be read as a frame number
    info = parse_name(upload_name(sha, ".jpg", 42, 7))
    assert (info.pid, info.camid, info.seq, info.frame) == (42, 7, None, None)
    info = parse_name(upload_name(sha, ".png", -1, 0))
    assert (info.pid, info.camid) == (-1, 0)
    assert parse_name(upload_name("12" + sha[2:], ".jpg")) is None
    with pytest.raises(ValueError):
        upload_name(sha, ".jpg", 3, None)


# --------------------------------------------------------------------------- bad input


BAD_QUERIES = [
    # (id, files, data, url suffix, status, reason or None for FastAPI's validation list)
    ("not-an-image", {"file": ("a.jpg", b"hello, not a picture")}, {}, "", 415, "not-an-image"),
    ("zero-bytes", {"file": ("a.jpg", b"")}, {}, "", 400, "empty"),
    ("server-path-as-name", {"file": ("/etc/hostname", b"just bytes")}, {}, "", 415, "not-an-image"),
    ("oversized-file", {"file": ("a.jpg", b"\xff" * (MAX_UPLOAD + 1))}, {}, "", 413, "too-large"),
    ("oversized-body", {"file": ("a.jpg", b"\xff" * (MAX_UPLOAD + 200_000))}, {}, "", 413, "too-large"),
    ("too-many-pixels", {"file": ("big.png", png_bytes((2000, 1000)))}, {}, "", 413, "too-large"),
    ("unknown-query-param", "Q", {}, "?verbose=1", 422, None),
    ("unknown-form-field", "Q", {"path": "/etc/passwd"}, "", 422, None),
    ("top-k-not-int", "Q", {"top_k": "ten"}, "", 422, None),
    ("top-k-zero", "Q", {"top_k": "0"}, "", 422, None),
    ("top-k-too-big", "Q", {}, "?top_k=1001", 422, None),
    ("rerank-not-bool", "Q", {"rerank": "maybe"}, "", 422, None),
    ("camid-not-int", "Q", {}, "?camid=c3", 422, None),
    ("conflicting-top-k", "Q", {"top_k": "3"}, "?top_k=4", 422, None),
    ("missing-file", None, {"top_k": "3"}, "", 422, None),
    ("file-as-text", None, {"file": "not a file"}, "", 422, None),
    ("two-files", "QQ", {}, "", 422, "one-file"),
]


@pytest.mark.parametrize("case", BAD_QUERIES, ids=[c[0] for c in BAD_QUERIES])
def test_bad_query_inputs(case: tuple, query_paths: list[Path], client: httpx.Client) -> None:
    _, files, data, suffix, status, reason = case
    q = query_paths[0]
    if files == "Q":
        files = upload(q)
    elif files == "QQ":
        files = [("file", (q.name, q.read_bytes())), ("file", (q.name, q.read_bytes()))]
    r = client.post("/query" + suffix, files=files, data=data)
    assert r.status_code == status, r.text
    body = r.json()
    if reason is None:
        assert isinstance(body["detail"], list) and body["detail"]
    else:
        assert body["reason"] == reason and isinstance(body["detail"], str)
        assert "/tmp" not in body["detail"]  # no server paths in errors
    healthy(client, query_paths)


def test_truncated_image(query_paths: list[Path], client: httpx.Client) -> None:
    data = query_paths[0].read_bytes()
    for cut in (len(data) // 3, len(data) - 100):
        r = client.post("/query", files={"file": ("cut.jpg", data[:cut])})
        assert r.status_code == 400, (cut, r.text)
        assert r.json()["reason"] == "corrupt"
    healthy(client, query_paths)


def test_chunked_body_is_capped_while_received(query_paths: list[Path], client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
        for _ in range(64):  # 4 MiB, no Content-Length
            yield b"\0" * 65536

    r = client.post("/query", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and r.json()["reason"] == "too-large"
    healthy(client, query_paths)


def test_other_bad_requests(workspace: Workspace, query_paths: list[Path], client: httpx.Client) -> None:
    q = query_paths[0]
    cases = [
        (client.post("/query", json={"file": "/etc/passwd"}), 422),
        (client.delete("/gallery/abc"), 422),
        (client.delete("/gallery/987654"), 404),
        (client.delete("/gallery/1?force=1"), 422),
        (client.get("/healthz?x=1"), 422),
        (client.get("/nowhere"), 404),
        (client.put("/query"), 405),
        (client.post("/gallery", files=upload(q), data={"pid": "3"}), 422),
        (client.post("/gallery", files=upload(q), data={"pid": "-2", "camid": "1"}), 422),
        (client.post("/gallery", files=upload(q), data={"pid": "3", "camid": "1", "seq": "2"}), 422),
        (client.post("/gallery", files=[("file", (f"{i}.jpg", q.read_bytes())) for i in range(MAX_FILES + 1)]), 413),
        (client.post("/gallery", files={"file": ("a.gif", png_bytes((20, 40), "GIF"))}), 415),
        (client.post("/gallery", files={"file": ("a.jpg", b"GIF89a nope")}), 415),
        (client.post("/gallery", data={"pid": "3", "camid": "1"}), 422),
    ]
    for i, (r, status) in enumerate(cases):
        assert r.status_code == status, (i, r.text)
        assert "detail" in r.json()
    # A failed add leaves nothing behind.
    assert client.get("/stats").json()["gallery_size"] == 16
    assert list((workspace.root / "uploads").iterdir()) == []
    # GIF is fine as a query (only gallery storage is restricted to indexable formats).
    r = client.post("/query", files={"file": ("a.gif", png_bytes((20, 40), "GIF"))})
    assert r.status_code == 200, r.text
    healthy(client, query_paths)


def test_filters_time_track_and_retention(own: Own, query_paths: list[Path]) -> None:
    """POST /gallery takes time/track, POST /query filters exactly as brute force over the full ranking,
    DELETE /gallery?... removes by filter and deletes the uploaded files."""
    from datetime import datetime, timezone

    from reid_search.gallery import SearchFilter

    crops = [write_crop(own.ws.root.parent / "timed" / f"{i}.jpg", 9300 + i) for i in range(6)]
    added = []
    for i, p in enumerate(crops):
        data = {"pid": str(60 + i % 2), "camid": str(5 + i % 3), "time": f"2024-05-0{1 + i}T10:00:00", "track": f"tr{i % 2}"}
        r = own.client.post("/gallery", files=upload(p), data=data)
        assert r.status_code == 200, r.text
        item = r.json()["items"][0]
        assert item["time"] == f"2024-05-0{1 + i}T10:00:00Z" and item["track"] == f"tr{i % 2}"
        added.append(item)
    # The same bytes with another time are re-indexed with it (an identical upload keeps its id).
    again = own.client.post("/gallery", files=upload(crops[0]), data={"pid": "60", "camid": "5", "time": "2024-05-01T10:00:00Z",
                                                                 "track": "tr0"}).json()
    assert again["ids"] == [added[0]["id"]] and not again["items"][0]["new"]
    uploads = [Path(a["path"]) for a in added]
    assert all(p.is_file() for p in uploads)

    q = crops[2]
    full = own.client.post("/query", files=upload(q, "x.jpg"), data={"top_k": "100", "keep_same_camera": "true"}).json()
    assert len(full["hits"]) == 16 + 6 and full["filter"]["keep_same_camera"]
    by_id = {h["id"]: h for h in full["hits"]}
    assert by_id[added[2]["id"]]["time"] == "2024-05-03T10:00:00Z" and by_id[added[2]["id"]]["track"] == "tr0"
    assert by_id[added[2]["id"]]["distance"] < 1e-4

    def t(h: dict[str, Any]) -> datetime | None:
        return None if h["time"] is None else datetime.fromisoformat(h["time"].replace("Z", "+00:00"))

    cases = [
        ({"cameras": "5,6"}, SearchFilter(cameras={5, 6})),
        ({"exclude_cameras": "1,7"}, SearchFilter(exclude_cameras={1, 7})),
        ({"since": "2024-05-02T10:00:00Z", "until": "2024-05-05"}, SearchFilter(
            since=datetime(2024, 5, 2, 10, tzinfo=timezone.utc), until=datetime(2024, 5, 5, tzinfo=timezone.utc))),
        ({"exclude_track": ["tr1"], "cameras": "1,5,6,7"}, SearchFilter(cameras={1, 5, 6, 7}, exclude_tracks={"tr1"})),
    ]
    for data, flt in cases:
        for k in (2, 100):
            r = own.client.post("/query", files=upload(q, "x.jpg"), data={**data, "top_k": str(k), "keep_same_camera": "true"})
            assert r.status_code == 200, r.text
            want = [h["id"] for h in full["hits"] if flt.allows(h["camid"], t(h), h["track"])][:k]
            assert [h["id"] for h in r.json()["hits"]] == want, data
    # the query's own camera is dropped unless keep_same_camera
    r = own.client.post("/query", files=upload(q, "x.jpg"), data={"top_k": "100", "camid": "7", "since": "2024-05-01"})
    assert [h["id"] for h in r.json()["hits"]] == [h["id"] for h in full["hits"] if h["time"] and h["camid"] != 7]
    # in the query string too
    r = own.client.post("/query?cameras=6&exclude_track=tr1", files=upload(q, "x.jpg"))
    assert {h["id"] for h in r.json()["hits"]} == {a["id"] for a in added if a["camid"] == 6 and a["track"] != "tr1"}

    # retention: dry run counts, then removes rows and the uploaded files
    r = own.client.delete("/gallery", params={"before": "2024-05-03T00:00:00Z", "dry_run": "true"})
    assert r.status_code == 200, r.text
    assert r.json()["matched"] == 2 and r.json()["removed"] == 0 and all(p.is_file() for p in uploads)
    r = own.client.delete("/gallery", params={"before": "2024-05-03T00:00:00Z"})
    assert r.json()["removed"] == 2 and r.json()["files_deleted"] == 2
    assert sorted(r.json()["ids"]) == sorted(a["id"] for a in added[:2])
    assert not uploads[0].exists() and not uploads[1].exists() and uploads[2].is_file()
    # erasure by pid and track, ANDed
    r = own.client.delete("/gallery", params={"pid": "60", "track": "tr0"})
    assert sorted(r.json()["ids"]) == sorted(a["id"] for a in added[2:] if a["pid"] == 60)
    r = own.client.delete("/gallery", params={"camid": "6"})
    assert sorted(r.json()["ids"]) == sorted(a["id"] for a in added[2:] if a["camid"] == 6 and a["pid"] != 60)
    left = [a for a in added[2:] if a["pid"] != 60 and a["camid"] != 6]
    for a in left:
        assert own.client.delete(f"/gallery/{a['id']}").status_code == 200
    assert all(not p.exists() for p in uploads)
    hits = own.client.post("/query", files=upload(q, "x.jpg"), data={"top_k": "100"}).json()["hits"]
    assert not {a["id"] for a in added} & {h["id"] for h in hits}
    assert own.client.get("/stats").json()["gallery_size"] == 16


def test_bad_filters_and_huge_ints_are_422(query_paths: list[Path], client: httpx.Client) -> None:
    """Defect 6: a huge camid or id is a 422, not a 500 OverflowError; bad filters are 422 with a one-line detail."""
    q = query_paths[0]
    huge = str(2**70)
    cases = [
        client.post("/query", files=upload(q), data={"camid": huge}),
        client.post(f"/query?camid={huge}", files=upload(q)),
        client.post("/query", files=upload(q), data={"cameras": f"1,{huge}"}),
        client.post("/query", files=upload(q), data={"since": "yesterday"}),
        client.post("/query", files=upload(q), data={"since": "2024-05-02", "until": "2024-05-01"}),
        client.post("/query", files=upload(q), data={"cameras": "one"}),
        client.post("/gallery", files=upload(q), data={"pid": huge, "camid": "1"}),
        client.post("/gallery", files=upload(q), data={"pid": "1", "camid": str(2**31)}),
        client.post("/gallery", files=upload(q), data={"time": "noon"}),
        client.delete(f"/gallery/{huge}"),
        client.delete("/gallery/-1"),
        client.delete("/gallery", params={"camid": huge}),
        client.delete("/gallery", params={"before": "soon"}),
        client.delete("/gallery"),
        client.delete("/gallery", params={"colour": "red"}),
    ]
    for i, r in enumerate(cases):
        assert r.status_code == 422, (i, r.text)
        detail = r.json()["detail"]
        if isinstance(detail, str):
            assert "\n" not in detail
    assert cases[3].json()["reason"] == "bad-filter" and "since" in cases[3].json()["detail"]
    assert "--" not in cases[3].json()["detail"]  # HTTP field names, not CLI options
    assert client.get("/stats").json()["gallery_size"] == 16
    healthy(client, query_paths)


def test_track_length_is_the_db_column_s(own: Own, query_paths: list[Path]) -> None:
    """POST /gallery takes a track of MAX_TRACK_CHARS (255, the DB column) and refuses a longer one like
    any other bad value (422, FastAPI's list), as a form field and in the query string."""
    from reid_search.limits import MAX_TRACK_CHARS

    client = own.client
    q = query_paths[5]
    longest, too_long = "t" * MAX_TRACK_CHARS, "t" * (MAX_TRACK_CHARS + 1)
    assert MAX_TRACK_CHARS == 255
    for r in (client.post("/gallery", files=upload(q), data={"track": too_long}),
              client.post("/gallery", files=upload(q), params={"track": too_long})):
        assert r.status_code == 422, r.text
        assert isinstance(r.json()["detail"], list) and r.json()["detail"][0]["type"] == "string_too_long"
    assert client.get("/stats").json()["gallery_size"] == 16
    r = client.post("/gallery", files=upload(q), data={"track": longest})
    assert r.status_code == 200, r.text
    item = r.json()["items"][0]
    assert item["track"] == longest
    hits = client.post("/query", files=upload(q, "x.jpg"), data={"top_k": "1"}).json()["hits"]
    assert hits[0]["id"] == item["id"] and hits[0]["track"] == longest
    assert client.delete(f"/gallery/{item['id']}").status_code == 200
    assert client.get("/stats").json()["gallery_size"] == 16


def test_orphan_upload_files_are_swept_at_start(own: Own) -> None:
    """A kill between a removal's commit and its file deletion leaves a file no row names; the next start deletes it."""
    import os

    uploads = own.ws.root / "uploads"
    kept = own.client.post("/gallery", files={"file": ("k.jpg", write_crop(own.ws.root.parent / "k.jpg", 9501).read_bytes())})
    kept_path, kept_id = Path(kept.json()["items"][0]["path"]), kept.json()["ids"][0]
    orphan, young = uploads / ("ab" * 32 + ".jpg"), uploads / ("cd" * 32 + ".jpg")
    old_tmp, new_tmp = uploads / ".upload-old.tmp", uploads / ".upload-new.tmp"
    for p in (orphan, young, old_tmp, new_tmp):
        p.write_bytes(b"left by a crash")
    for p in (orphan, old_tmp, kept_path):
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    app = create_app(own.ws, device="cpu")
    app.state.close()
    assert not orphan.exists() and not old_tmp.exists()
    # young files may belong to an add in flight in another server; a row's file stays however old
    assert young.exists() and new_tmp.exists() and kept_path.is_file()
    young.unlink()
    new_tmp.unlink()
    assert own.client.delete(f"/gallery/{kept_id}").status_code == 200


# --------------------------------------------------------------------------- API key, schema, CLI


def test_api_key_required_everywhere(workspace: Workspace, query_paths: list[Path]) -> None:
    app = create_app(workspace, device="cpu", api_key=KEY)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        q = query_paths[0]
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
            for r in (c.get("/healthz", headers=headers), c.get("/stats", headers=headers),
                      c.get("/openapi.json", headers=headers), c.get("/docs", headers=headers),
                      c.post("/query", files=upload(q), headers=headers),
                      c.post("/gallery", files=upload(q), headers=headers),
                      c.delete("/gallery/1", headers=headers)):
                assert r.status_code == 401, r.request.url
                assert r.json()["reason"] == "unauthorized"
        ok = {"X-API-Key": KEY}
        assert c.get("/healthz", headers=ok).json()["status"] == "ok"
        r = c.post("/query", files=upload(q), data={"top_k": "2"}, headers=ok)
        assert r.status_code == 200 and len(r.json()["hits"]) == 2
        schema = c.get("/openapi.json", headers=ok).json()
        assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
        assert c.get("/stats", headers=ok).json()["settings"]["api_key_required"] is True


def test_openapi_schema_and_stats(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/query", "/gallery", "/gallery/{image_id}", "/healthz", "/stats"} <= set(schema["paths"])
    assert "post" in schema["paths"]["/query"] and "delete" in schema["paths"]["/gallery/{image_id}"]
    assert "securitySchemes" not in schema.get("components", {})
    stats = client.get("/stats").json()
    assert stats["gallery_size"] == 16 and stats["index"]["type"] == "flat"
    assert stats["model"]["dim"] == 512 and stats["model"]["input_size"] == [64, 32]
    assert stats["model"]["fingerprint"] in stats["gallery"] and stats["search_device"]
    assert stats["generation"] >= 1 and stats["settings"]["api_key_required"] is False


def test_serve_help_and_errors(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["serve", "--help"])
    assert r.exit_code == 0 and "Example:" in r.output and "REID_SEARCH_API_KEY" in r.output
    r = CliRunner().invoke(main, ["-w", str(tmp_path / "nothing"), "serve"])
    assert r.exit_code == 1 and "no model" in r.output


def test_serve_wiring(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    # The CLI package binds the name `serve` to the command, shadowing the module.
    serve_mod = importlib.import_module("reid_search.app.cli.serve")

    seen: dict[str, Any] = {}

    def fake_run(app: Any, host: str, port: int, access_log: bool, log_level: str) -> None:
        seen.update(app=app, host=host, port=port)
        app.state.close()

    monkeypatch.setattr(serve_mod, "run_server", fake_run)
    monkeypatch.setenv("REID_SEARCH_API_KEY", KEY)
    r = CliRunner().invoke(main, ["-w", str(workspace.root), "serve", "--device", "cpu", "--port", "8123",
                                  "--max-batch", "1", "--max-wait-ms", "0"])
    assert r.exit_code == 0, r.output
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    assert seen["app"].state.settings["api_key_required"] is True
    assert seen["app"].state.settings["max_batch"] == 1
    monkeypatch.delenv("REID_SEARCH_API_KEY")
    r = CliRunner().invoke(main, ["-w", str(workspace.root), "serve", "--device", "cpu", "--host", "0.0.0.0"])
    assert r.exit_code == 0 and "without --api-key" in r.output
    assert seen["app"].state.settings["api_key_required"] is False
