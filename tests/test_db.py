"""Alembic owns the schema: migrations reach exactly the models, both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import Engine, inspect, text

from indexer.db import Base
from indexer.migrations import alembic_config, current_revision, head_revision, script_location, upgrade_db
from indexer.store import make_engine
from reid_search.errors import GalleryError


def drift(engine: Engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, Base.metadata)


def assert_schema_matches_models(engine: Engine) -> None:
    assert current_revision(engine) == head_revision()
    assert drift(engine) == []
    names = set(inspect(engine).get_table_names())
    assert {"gallery_roots", "images", "embeddings", "gallery_state", "alembic_version"} <= names


def test_fresh_sqlite_upgrades_to_head_without_drift(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    assert current_revision(engine) is None
    assert drift(engine) != []  # the check can fail: an empty DB differs from the models
    assert upgrade_db(engine) == (None, head_revision())
    assert_schema_matches_models(engine)
    assert upgrade_db(engine) == (head_revision(), head_revision())  # idempotent


def test_downgrade_and_upgrade_again(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    upgrade_db(engine)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade_db(engine)
    assert_schema_matches_models(engine)


def test_unknown_revision_is_refused(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    upgrade_db(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff9999'"))
    with pytest.raises(GalleryError, match="does not know; upgrade reid-search"):
        upgrade_db(engine)


def test_scripts_are_found_from_the_package() -> None:
    loc = script_location()
    assert (loc / "env.py").is_file() and any((loc / "versions").glob("*.py"))
    assert loc == Path(__file__).resolve().parents[1] / "alembic"


def test_alembic_ini_works_for_developers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`alembic -x db=URL upgrade head` from the repo root, as the ini's comment says."""
    from alembic.config import Config

    root = Path(__file__).resolve().parents[1]
    cfg = Config(str(root / "alembic.ini"), cmd_opts=type("O", (), {"x": [f"db=sqlite:///{tmp_path / 'd.db'}"]})())
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, "head")
    assert_schema_matches_models(make_engine(f"sqlite:///{tmp_path / 'd.db'}"))


def test_db_upgrade_command(tmp_path: Path) -> None:
    from reid_search.cli._common import main
    from reid_search.cli.index import db

    main.add_command(db)
    ws = str(tmp_path / "ws")
    r = CliRunner().invoke(main, ["-w", ws, "db", "upgrade"], catch_exceptions=False)
    assert r.exit_code == 0 and f"to revision {head_revision()}" in r.output, r.output
    r = CliRunner().invoke(main, ["-w", ws, "db", "upgrade"], catch_exceptions=False)
    assert r.exit_code == 0 and "up to date" in r.output
    r = CliRunner().invoke(main, ["-w", ws, "--db", "postgresql+psycopg://x@127.0.0.1:1/none", "db", "upgrade"])
    assert r.exit_code == 1 and r.output.startswith("Error: cannot open the metadata DB") and r.output.count("\n") == 1
    for args in (["db", "--help"], ["db", "upgrade", "--help"]):
        assert "Example:" in CliRunner().invoke(main, args).output


def test_a_gallery_made_by_schema_0001_upgrades_in_place(tmp_path: Path) -> None:
    """Rows, vectors, ids and answers survive 0001 -> head; deleted ids are never handed out again."""
    import hashlib
    from datetime import datetime, timezone

    import numpy as np

    from indexer import NewImage, open_gallery
    from indexer.protocol import SearchFilter

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    with engine.begin() as conn:  # what the 0001-era store wrote
        conn.execute(text("INSERT INTO gallery_roots (id, path, added_at) VALUES (1, :p, :t)"),
                     {"p": str(tmp_path / "gal"), "t": now})
        for i in range(1, 14):
            conn.execute(text("INSERT INTO images (id, root_id, rel_path, pid, camid, seq, frame, sha256, size_bytes, "
                              "model_fingerprint, indexed_at) VALUES (:i, 1, :r, :p, :c, 1, :i, :h, 10, 'm', :t)"),
                         {"i": i, "r": f"{i:04d}_c{i % 3 + 1}s1_{i:06d}_00.jpg", "p": i, "c": i % 3 + 1,
                          "h": hashlib.sha256(b"%d" % i).hexdigest(), "t": now})
            if i <= 12:
                conn.execute(text("INSERT INTO embeddings (image_id, vector) VALUES (:i, :v)"),
                             {"i": i, "v": x[i - 1].astype("<f4").tobytes()})
        conn.execute(text("DELETE FROM images WHERE id = 13"))  # the highest id was deleted
        conn.execute(text("INSERT INTO gallery_state (id, model_fingerprint, dim, index_spec, generation, updated_at) "
                          "VALUES (1, 'm', 8, '{\"kind\": \"flat\"}', 7, :t)"), {"t": now})
    engine.dispose()

    g = open_gallery(url, tmp_path / "idx")  # upgrades in place
    assert current_revision(g.engine) == head_revision() and drift(g.engine) == []
    assert g.ntotal == 12 and g.generation == 7 and g.model_fingerprint == "m" and g.dim == 8
    np.testing.assert_array_equal(g.ids(), np.arange(1, 13))
    np.testing.assert_array_equal(g.vectors(np.arange(1, 13)), x)
    want = np.argsort(-(x @ x.T), axis=1, kind="stable")[:, :5] + 1
    np.testing.assert_array_equal(g.search(x, 5)[1], want)
    m = g.metadata([4])[0]
    assert (m.pid, m.camid, m.time, m.track) == (4, 2, None, None) and m.rel_path == "0004_c2s1_000004_00.jpg"
    assert g.count(SearchFilter(cameras=frozenset({2}))) == 4
    new = g.add_images([NewImage(tmp_path / "gal" / "new.jpg", "0" * 64, 1)], x[:1], "m")
    assert new[0] > 13  # AUTOINCREMENT's high-water mark survived the table copy
