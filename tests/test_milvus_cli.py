"""Every command on a Milvus workspace, from the CLI: index (with a manifest), query with filters and
re-ranking, eval, eval --rerank, calibrate, remove by filter and by path, db upgrade, and the HTTP
service (POST /query, DELETE /gallery). Each answer must equal the FAISS workspace's on the same crops;
the filtered query is also checked against the manifest's fields."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from reid_search.app.cli import main
from tests.conftest import store_value

pytest.importorskip("milvus_lite", reason="milvus-lite cannot run here")

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)


def run(ws: Path, *args: str) -> Result:
    r = CliRunner().invoke(main, ["-q", "-w", str(ws), *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "NotImplementedError" not in r.output, r.output
    return r


def last_json(r: Result) -> dict:
    return json.loads(r.output.strip().splitlines()[-1])


def session(ws: Path, market: Path, model: Path, manifest: Path) -> dict[str, object]:
    """Run the command set on one workspace; returns what each command answered."""
    from fastapi.testclient import TestClient

    from reid_search.app.service import create_app
    from reid_search.app.workspace import Workspace

    gallery = market / "bounding_box_test"
    q = market / "query" / "0005_c1s1_000000_00.jpg"
    out: dict[str, object] = {}
    r = run(ws, "index", str(gallery), "--model", str(model), "--manifest", str(manifest), "--workers", "0")
    out["index"] = r.output.strip().splitlines()[0].split(" in ")[0]
    flt = ["--cameras", "2", "--since", "2024-05-01T09:00:00Z", "--exclude-track", "trk0"]
    out["query"] = last_json(run(ws, "query", str(q), "--json", "--top-k", "5", *flt))["hits"]
    out["query_rerank"] = last_json(run(ws, "query", str(q), "--json", "--top-k", "4", "--rerank"))["hits"]
    out["eval"] = last_json(run(ws, "eval", "--json"))
    out["eval_rerank"] = last_json(run(ws, "eval", "--json", "--rerank"))
    out["calibrate"] = last_json(run(ws, "calibrate", "--json", "--fpr", "0.2"))
    out["db"] = run(ws, "db", "upgrade").output
    out["remove_dry"] = run(ws, "remove", "--pid", "5", "--dry-run").output.replace(str(ws), "WS").replace(" in milvus", "")
    out["remove_before"] = run(ws, "remove", "--before", "2024-05-01T10:00:00Z").output.replace(str(ws), "WS").replace(" in milvus", "")
    out["remove_path"] = run(ws, "remove", str(gallery / "0007_c2s1_000002_00.jpg")).output.replace(str(ws), "WS").replace(" in milvus", "")
    with TestClient(create_app(Workspace(ws), device="cpu")) as client:
        with q.open("rb") as fh:
            res = client.post("/query", files={"file": (q.name, fh, "image/jpeg")}, data={"top_k": "3"})
        assert res.status_code == 200, res.text
        out["http_query"] = res.json()["hits"]
        res = client.delete("/gallery", params={"track": "trk1"})
        assert res.status_code == 200, res.text
        out["http_delete"] = {k: v for k, v in res.json().items() if k != "generation"}
        out["http_size"] = client.get("/stats").json()["gallery_size"]
    out["after"] = last_json(run(ws, "query", str(q), "--json", "--top-k", "10", "--keep-same-camera"))["hits"]
    out["gallery"] = run(ws, "remove", "--pid", "1").output.strip().splitlines()[-1].replace(" in milvus", "")
    return out


def same(a: object, b: object, path: str = "") -> None:
    """Equal, floats to 1e-5."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 1e-5, (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_every_command_on_a_milvus_workspace_answers_as_on_faiss(
        market_dir: Path, tiny_ckpt: Path, tmp_path: Path, request: pytest.FixtureRequest,
        caplog: pytest.LogCaptureFixture) -> None:
    gallery = market_dir / "bounding_box_test"
    files = sorted(p.name for p in gallery.iterdir())
    times = {name: T0 + timedelta(minutes=30 * i) for i, name in enumerate(files)}
    tracks = {name: f"trk{i % 3}" for i, name in enumerate(files)}
    manifest = tmp_path / "crops.csv"
    manifest.write_text("path,time,track\n" + "".join(
        f"{n},{times[n].isoformat().replace('+00:00', 'Z')},{tracks[n]}\n" for n in files))
    caplog.set_level(logging.WARNING)
    got = {}
    for kind in ("faiss", "milvus"):
        ws = tmp_path / kind
        run(ws, "--store", store_value(kind, request), "remove", "--pid", "1")  # opens the gallery: records the store
        got[kind] = session(ws, market_dir, tiny_ckpt, manifest)  # later commands need no --store
        assert json.loads((ws / "store.json").read_text())["store"] == store_value(kind, request)
    f, m = got["faiss"], got["milvus"]
    same(m, f)
    # the filtered query against the manifest's fields: camera 2, from 09:00, not track trk0
    assert f["query"], "the filter keeps some crops"
    for h in f["query"]:
        name = Path(h["path"]).name
        assert h["camid"] == 2 and times[name] >= T0 + timedelta(hours=1) and tracks[name] != "trk0"
    assert "would remove 2 image(s) matching pid 5" in f["remove_dry"]
    assert f["remove_before"].startswith("removed 4 image(s) matching before")  # 08:00 .. 09:30
    assert f["http_delete"]["removed"] >= 1 and f["http_size"] == len(files) - 4 - 1 - f["http_delete"]["removed"]
    assert len(m["after"]) == m["http_size"]
    assert "in milvus" in run(tmp_path / "milvus", "remove", "--pid", "1").output
    assert not [r for r in caplog.records if r.name.startswith("grpc")]  # Lite's gRPC server logs no tracebacks
