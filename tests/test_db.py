"""Alembic owns the schema: migrations reach exactly the models, both ways."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import BigInteger, DateTime, Engine, Integer, String, inspect, text

from indexer.db import Base
from indexer.migrations import alembic_config, current_revision, head_revision, script_location, upgrade_db
from indexer.db import make_engine
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
    from reid_search.app.cli._common import main
    from reid_search.app.cli.index import db

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


OLD_ROWS = 13  # rows the 0001-era store wrote; the last one is then deleted, so its id is the high-water mark
OLD_T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def old_row(i: int) -> dict:
    """Row ``i`` (1-based) as the 0001-era store inserted it; row 12 has no labels and a non-ASCII name."""
    unlabelled = i == 12
    return {"r": "café_12.jpg" if unlabelled else f"{i:04d}_c{i % 3 + 1}s1_{i:06d}_00.jpg",
            "p": None if unlabelled else i, "c": None if unlabelled else i % 3 + 1,
            "s": None if unlabelled else 1, "f": None if unlabelled else i,
            "h": hashlib.sha256(b"%d" % i).hexdigest(), "b": 10 * i, "t": OLD_T0 + timedelta(seconds=i)}


def make_0001_gallery(url: str, root: Path) -> np.ndarray:
    """A DB at schema revision 0001 holding what that era's store wrote: ids from the DB, 12 images with
    vectors, the highest id (13) deleted, a state row at generation 7. Returns the 12 unit vectors."""
    engine = make_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    x = np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with engine.begin() as conn:
        rid = conn.execute(text("INSERT INTO gallery_roots (path, added_at) VALUES (:p, :t) RETURNING id"),
                           {"p": str(root), "t": OLD_T0}).scalar_one()
        assert rid == 1
        for i in range(1, OLD_ROWS + 1):
            got = conn.execute(text("INSERT INTO images (root_id, rel_path, pid, camid, seq, frame, sha256, "
                                    "size_bytes, model_fingerprint, indexed_at) "
                                    "VALUES (1, :r, :p, :c, :s, :f, :h, :b, 'm', :t) RETURNING id"),
                               old_row(i)).scalar_one()
            assert got == i
            if i <= 12:
                conn.execute(text("INSERT INTO embeddings (image_id, vector) VALUES (:i, :v)"),
                             {"i": i, "v": x[i - 1].astype("<f4").tobytes()})
        conn.execute(text("DELETE FROM images WHERE id = 13"))
        conn.execute(text("INSERT INTO gallery_state (id, model_fingerprint, dim, index_spec, generation, updated_at) "
                          "VALUES (1, 'm', 8, '{\"kind\": \"flat\"}', 7, :t)"), {"t": OLD_T0})
    engine.dispose()
    return x


def table_dump(engine: Engine) -> dict[str, list[tuple]]:
    """Every row of the gallery's tables, ordered by key (to tell that an open changed nothing)."""
    with engine.connect() as conn:
        return {t: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY {k}"))]
                for t, k in (("gallery_roots", "id"), ("images", "id"), ("embeddings", "image_id"),
                             ("gallery_state", "id"), ("alembic_version", "version_num"))}


def assert_0002_schema(engine: Engine) -> None:
    """The columns, indexes and constraints migration 0002 adds, as the DB reports them."""
    insp = inspect(engine)
    cols = {c["name"]: c for c in insp.get_columns("images")}
    assert isinstance(cols["gallery"]["type"], Integer) and not cols["gallery"]["nullable"]
    assert str(cols["gallery"]["default"]).strip("'()") == "0"
    assert isinstance(cols["time"]["type"], DateTime) and cols["time"]["nullable"]
    assert isinstance(cols["track"]["type"], String) and cols["track"]["type"].length == 255
    assert cols["track"]["nullable"]
    if engine.dialect.name == "postgresql":
        assert cols["time"]["type"].timezone  # timestamptz, like the other *_at columns
        assert isinstance(cols["id"]["type"], BigInteger)
    idx = {i["name"]: (i["column_names"], bool(i["unique"])) for i in insp.get_indexes("images")
           if i["name"].startswith("ix_")}
    assert idx == {"ix_images_pid": (["pid"], False), "ix_images_root_id": (["root_id"], False),
                   "ix_images_camid": (["camid"], False), "ix_images_time": (["time"], False),
                   "ix_images_track": (["track"], False)}
    uqs = {u["name"]: u["column_names"] for u in insp.get_unique_constraints("images")}
    assert uqs == {"uq_images_gallery_root_id_rel_path": ["gallery", "root_id", "rel_path"]}
    fks = {f["name"]: (f["referred_table"], f["options"].get("ondelete")) for f in insp.get_foreign_keys("embeddings")}
    assert fks == {"fk_embeddings_image_id_images": ("images", "CASCADE")}
    state = {c["name"]: c for c in insp.get_columns("gallery_state")}
    assert not state["active_gallery"]["nullable"] and str(state["active_gallery"]["default"]).strip("'()") == "0"
    for name, kind, length in (("building_gallery", Integer, None), ("building_fingerprint", String, 64),
                               ("building_dim", Integer, None), ("store_id", String, 32)):
        assert isinstance(state[name]["type"], kind) and state[name]["nullable"], name
        assert length is None or state[name]["type"].length == length, name


def check_upgraded_0001_gallery(url: str, root: Path, index_dir: Path, x: np.ndarray) -> None:
    """Open the DB made by :func:`make_0001_gallery` the normal way and check that it was upgraded whole,
    answers like brute force, and that opening it again changes nothing."""
    import logging

    from reid_search.gallery import NewImage
    from indexer import open_gallery
    from reid_search.gallery import SearchFilter

    g = open_gallery(url, index_dir)  # upgrades in place
    assert current_revision(g.engine) == head_revision() and drift(g.engine) == []
    assert_0002_schema(g.engine)
    assert g.ntotal == 12 and g.generation == 7 and g.model_fingerprint == "m" and g.dim == 8
    with g.engine.connect() as conn:  # the defaults the migration gave the old rows
        assert conn.execute(text("SELECT DISTINCT gallery FROM images")).scalars().all() == [0]
        assert conn.execute(text("SELECT count(*) FROM images WHERE time IS NULL AND track IS NULL")).scalar() == 12
        st = conn.execute(text("SELECT active_gallery, building_gallery, building_fingerprint, building_dim, "
                               "index_spec, updated_at FROM gallery_state")
                          .columns(updated_at=DateTime(timezone=True))).one()
        assert tuple(st[:4]) == (0, None, None, None) and st[4] == '{"kind": "flat"}'
        assert st[5].replace(tzinfo=st[5].tzinfo or timezone.utc) == OLD_T0  # SQLite keeps no zone
    np.testing.assert_array_equal(g.ids(), np.arange(1, 13))
    np.testing.assert_array_equal(g.vectors(np.arange(1, 13)), x)
    for m in (b for batch in g.iter_metadata() for b in batch):
        o = old_row(m.id)
        assert (m.rel_path, m.pid, m.camid, m.seq, m.frame, m.sha256, m.size_bytes, m.model_fingerprint) == (
            o["r"], o["p"], o["c"], o["s"], o["f"], o["h"], o["b"], "m"), m
        assert (m.indexed_at, m.time, m.track, m.root, m.path) == (o["t"], None, None, root, root / o["r"])
    want = np.argsort(-(x @ x.T), axis=1, kind="stable")[:, :5] + 1
    np.testing.assert_array_equal(g.search(x, 5)[1], want)
    cams = np.array([old_row(i)["c"] for i in range(1, 13)], dtype=object)
    keep = np.flatnonzero(cams == 2)  # ids 1, 4, 7, 10
    want = keep[np.argsort(-(x @ x[keep].T), axis=1, kind="stable")[:, :3]] + 1
    np.testing.assert_array_equal(g.search(x, 3, SearchFilter(cameras=frozenset({2})))[1], want)
    assert g.count(SearchFilter(cameras=frozenset({2}))) == 4
    g.close()

    engine = make_engine(url)
    before = table_dump(engine)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    mig_log = logging.getLogger("indexer.migrations")
    mig_log.addHandler(handler)
    old_level, mig_log.level = mig_log.level, logging.INFO
    try:
        g = open_gallery(url, index_dir)  # the second open: nothing to migrate, nothing rewritten
    finally:
        mig_log.removeHandler(handler)
        mig_log.setLevel(old_level)
    assert [r.getMessage() for r in records if "migrated" in r.getMessage()] == []
    assert table_dump(engine) == before and upgrade_db(engine) == (head_revision(), head_revision())
    new = g.add_images([NewImage(root / "new.jpg", "0" * 64, 1)], x[:1], "m")
    assert new[0] > OLD_ROWS  # the deleted id is never handed out again
    with g.replacing() as b:  # the same paths in a second version: the unique key now includes the version
        b.add_images([NewImage(root / old_row(i)["r"], old_row(i)["h"], 1) for i in (1, 2)], x[:2], "m")
    assert g.ntotal == 2 and g.meta.versions_present() == [g.version] and g.version != 0
    g.close()
    engine.dispose()


def test_a_gallery_made_by_schema_0001_upgrades_in_place(tmp_path: Path) -> None:
    """Rows, vectors, ids and answers survive 0001 -> head; deleted ids are never handed out again."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    x = make_0001_gallery(url, tmp_path / "gal")
    check_upgraded_0001_gallery(url, tmp_path / "gal", tmp_path / "idx", x)


def check_downgrade_to_0001(url: str, tmp_path: Path) -> None:
    """A gallery re-indexed at head (so its active version is not 0), downgraded to 0001: the active
    rows and their vectors stay, the schema is 0001's, no id is handed out twice, and it upgrades again."""
    from reid_search.gallery import NewImage
    from indexer import open_gallery

    root = tmp_path / "gal"
    g = open_gallery(url, tmp_path / "idx")
    first = [NewImage(root / f"{i:04d}_c{i % 3 + 1}s1_{i:06d}_00.jpg", hashlib.sha256(b"a%d" % i).hexdigest(), i,
                      pid=i, camid=i % 3 + 1, seq=1, frame=i) for i in range(1, 9)]
    g.add_images(first, np.eye(8, dtype=np.float32), "m")
    x = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with g.replacing() as b:
        ids = b.add_images(first[:6], x, "m2")
    assert g.version != 0
    removed, _ = g.remove([first[5].path])  # the highest id: it must never come back
    assert removed == 1
    kept = {m.id: m for batch in g.iter_metadata() for m in batch}
    vecs, gen, high = g.vectors(ids[:5]), g.generation, int(ids.max())
    g.close()
    engine = make_engine(url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0001")
    assert current_revision(engine) == "0001"
    insp = inspect(engine)
    assert {c["name"] for c in insp.get_columns("images")} == {
        "id", "root_id", "rel_path", "pid", "camid", "seq", "frame", "sha256", "size_bytes", "model_fingerprint",
        "indexed_at"}
    assert {c["name"] for c in insp.get_columns("gallery_state")} == {
        "id", "model_fingerprint", "dim", "index_spec", "generation", "updated_at"}
    assert {u["name"]: u["column_names"] for u in insp.get_unique_constraints("images")} == {
        "uq_images_root_id_rel_path": ["root_id", "rel_path"]}
    assert {i["name"] for i in insp.get_indexes("images") if i["name"].startswith("ix_")} == {
        "ix_images_pid", "ix_images_root_id"}
    with engine.begin() as conn:
        rows = conn.execute(text("SELECT id, rel_path, pid, camid, seq, frame, sha256, size_bytes, model_fingerprint "
                                 "FROM images ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [
            (m.id, m.rel_path, m.pid, m.camid, m.seq, m.frame, m.sha256, m.size_bytes, m.model_fingerprint)
            for m in sorted(kept.values(), key=lambda m: m.id)]
        stored = conn.execute(text("SELECT image_id, vector FROM embeddings ORDER BY image_id")).all()
        assert [r[0] for r in stored] == sorted(kept)
        np.testing.assert_array_equal(np.stack([np.frombuffer(r[1], "<f4") for r in stored]), vecs)
        state = conn.execute(text("SELECT model_fingerprint, dim, generation FROM gallery_state")).one()
        assert tuple(state) == ("m2", 8, gen)
        new = conn.execute(text("INSERT INTO images (root_id, rel_path, sha256, size_bytes, model_fingerprint, "
                                "indexed_at) SELECT root_id, 'new.jpg', :h, 1, 'm2', indexed_at FROM images "
                                "WHERE id = :i RETURNING id"), {"h": "0" * 64, "i": int(ids[0])}).scalar_one()
        assert new > high  # what the 0001-era store would insert next gets a fresh id
        conn.execute(text("DELETE FROM images WHERE id = :i"), {"i": new})
    engine.dispose()
    g = open_gallery(url, tmp_path / "idx")  # and up again
    assert sorted(g.ids().tolist()) == sorted(kept) and g.model_fingerprint == "m2"
    np.testing.assert_array_equal(g.search(vecs, 1)[1][:, 0], ids[:5])
    g.close()


def test_downgrade_0002_to_0001_keeps_the_active_gallery(tmp_path: Path) -> None:
    check_downgrade_to_0001(f"sqlite:///{tmp_path / 'down.db'}", tmp_path)
