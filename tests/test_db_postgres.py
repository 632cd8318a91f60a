"""The gallery on a real PostgreSQL server, started here when its binaries are installed."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

pytest.importorskip("psycopg")

from click.testing import CliRunner  # noqa: E402

from indexer import IndexSpec, open_gallery  # noqa: E402
from indexer.db import make_engine  # noqa: E402
from reid_search.errors import GalleryError  # noqa: E402
from tests.test_db import (  # noqa: E402
    assert_schema_matches_models,
    check_downgrade_to_0001,
    check_upgraded_0001_gallery,
    make_0001_gallery,
)
from tests.helpers import brute_force, feats, new_images  # noqa: E402


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl") + glob.glob("/usr/local/pgsql/bin/pg_ctl"))
    return Path(cands[-1]).parent if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    """A throwaway server on 127.0.0.1 with trust auth; yields its base URL (no database)."""
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    tmp = Path(tempfile.mkdtemp(prefix="reid-pg-"))
    preexec = None
    if os.geteuid() == 0:  # postgres refuses to run as root: drop to an unprivileged user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            user = pwd.getpwnam("nobody")
        os.chown(tmp, user.pw_uid, user.pw_gid)

        def preexec() -> None:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

    data, port = tmp / "data", _free_port()
    env = dict(os.environ, LC_ALL="C", LANG="C")

    def run(*args: str) -> None:
        subprocess.run(args, check=True, cwd=tmp, env=env, preexec_fn=preexec,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "reid", "--no-sync", "-E", "UTF8")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(tmp / "log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        out = getattr(exc, "stdout", b"") or b""
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {exc} {out.decode(errors='replace')[-300:]}")
    try:
        yield f"postgresql+psycopg://reid@127.0.0.1:{port}"
    finally:
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], cwd=tmp, env=env,
                       preexec_fn=preexec, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture()
def pg_url(pg_server: str) -> str:
    """A fresh, empty database on the test server."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    return f"{pg_server}/{name}"


def test_postgres_schema_has_no_drift(pg_url: str) -> None:
    g = open_gallery(pg_url, Path(tempfile.mkdtemp()))
    g.close()
    assert_schema_matches_models(make_engine(pg_url))


def test_postgres_gallery_round_trip(pg_url: str, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    g = open_gallery(pg_url, idx)
    x = feats(50)
    imgs = new_images(tmp_path / "gal", 50, write=True)
    ids = g.add_images(imgs, x, "m")
    assert g.ntotal == 50 and ids.dtype == np.int64
    sims, got = g.search(x[:3], 2)
    np.testing.assert_array_equal(got[:, 0], ids[:3])
    assert g.metadata(ids[:1])[0].path == imgs[0].path.resolve()
    np.testing.assert_array_equal(g.vectors(ids[10:12]), x[10:12])
    with pytest.raises(GalleryError, match="--reindex"):
        g.add_images(new_images(tmp_path / "gal", 1, start=99), feats(1), "other")
    imgs[0].path.unlink()
    assert g.prune() == 1
    removed, _ = g.remove([imgs[1].path])
    assert removed == 1
    new = g.add_images([imgs[2]], feats(1, seed=3), "m")  # same path: replaced
    assert new[0] > ids.max() and g.ntotal == 48
    g.set_spec(IndexSpec("ivf", min_train=40))
    g.close()
    g2 = open_gallery(pg_url, idx)
    assert g2.ntotal == 48 and g2.backend.index.trained and g2.generation == g.generation
    np.testing.assert_array_equal(g2.backend.index.ids(), g2.ids())


def test_postgres_index_command(pg_url: str, tiny_ckpt: Path, market_dir: Path, tmp_path: Path) -> None:
    from reid_search.app.cli._common import main
    from reid_search.app.cli.index import index

    main.add_command(index)
    args = ["-q", "-w", str(tmp_path / "ws"), "--db", pg_url, "index", str(market_dir / "bounding_box_test"),
            "--model", str(tiny_ckpt), "--workers", "0"]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0 and "indexed 8," in r.output, r.output
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert "indexed 0, replaced 0, unchanged 8" in r.output


def test_postgres_filters_retention_reindex_and_odd_names(pg_url: str, tmp_path: Path) -> None:
    """Time bounds on timestamptz, remove_where, the atomic re-index and escaped names, on PostgreSQL."""
    from datetime import datetime, timedelta, timezone

    from reid_search.gallery import NewImage
    from reid_search.gallery import RemoveFilter, SearchFilter

    g = open_gallery(pg_url, tmp_path / "idx")
    imgs = new_images(tmp_path / "gal", 120, labels="random", seed=4)
    odd = NewImage(tmp_path / "gal" / "caf\udce9.jpg", "f" * 64, 1, camid=1)  # a name that is not UTF-8
    x = feats(121, d=8, seed=2)
    ids = g.add_images([*imgs, odd], x, "m")
    assert g.metadata(ids[-1:])[0].path == (tmp_path / "gal").resolve() / "caf\udce9.jpg"
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    f = SearchFilter(cameras=frozenset({1, 2}), since=t0 + timedelta(minutes=100), until=t0 + timedelta(minutes=400),
                     exclude_tracks=frozenset({"a"}))
    np.testing.assert_array_equal(g.search(x[:4], 15, f)[1], brute_force(g, x[:4], 15, f)[1])
    assert g.count(f) == sum(1 for b in g.iter_metadata() for m in b if f.allows(m.camid, m.time, m.track))
    where = RemoveFilter(before=t0 + timedelta(minutes=200))
    want = sorted(m.id for b in g.iter_metadata() for m in b if where.matches(m))
    assert sorted(m.id for m in g.remove_where(where)) == want and g.count(where) == 0
    with g.replacing() as new:
        new_ids = new.add_images(imgs[:5], feats(5, d=4), "m2")
        assert g.ntotal == 121 - len(want)
    assert g.model_fingerprint == "m2" and g.ntotal == 5 and g.meta.versions_present() == [g.version]
    g.close()
    g2 = open_gallery(pg_url, tmp_path / "idx")
    np.testing.assert_array_equal(g2.ids(), new_ids)
    np.testing.assert_array_equal(g2.backend.index.ids(), new_ids)


def test_postgres_gallery_made_by_schema_0001_upgrades_in_place(pg_url: str, tmp_path: Path) -> None:
    """0001 -> head on PostgreSQL (plain ALTERs, no table copy): rows, defaults, indexes, answers, ids."""
    x = make_0001_gallery(pg_url, tmp_path / "gal")
    check_upgraded_0001_gallery(pg_url, tmp_path / "gal", tmp_path / "idx", x)


def test_postgres_downgrade_0002_to_0001_keeps_the_active_gallery(pg_url: str, tmp_path: Path) -> None:
    check_downgrade_to_0001(pg_url, tmp_path)
