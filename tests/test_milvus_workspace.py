"""The workspace remembers which store its gallery lives in; a different --store is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from indexer.location import StoreLocation
from reid_search.app.cli import main
from reid_search.errors import GalleryError
from reid_search.app.workspace import Workspace


def test_store_defaults_to_faiss_and_follows_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REID_SEARCH_STORE", raising=False)
    assert Workspace(tmp_path / "a").store() == StoreLocation("faiss")
    ws = Workspace(tmp_path / "b", store_override="milvus:")
    assert ws.store() == StoreLocation("milvus", str((tmp_path / "b").resolve() / "milvus.db"))
    monkeypatch.setenv("REID_SEARCH_STORE", "http://milvus.local:19530")
    assert Workspace(tmp_path / "c").store() == StoreLocation("milvus", "http://milvus.local:19530")


def test_recorded_store_wins_and_a_different_one_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REID_SEARCH_STORE", raising=False)
    ws = Workspace(tmp_path / "ws", store_override="milvus:")
    ws.record_store(ws.store())
    assert '"milvus:"' in ws.store_pointer.read_text()  # relative: survives moving the workspace
    plain = Workspace(tmp_path / "ws")
    assert plain.store().kind == "milvus"  # no --store needed afterwards
    for other in ("faiss", "http://h:19530", f"milvus:{tmp_path}/other.db"):
        with pytest.raises(GalleryError, match="lives in --store milvus:") as e:
            Workspace(tmp_path / "ws", store_override=other).store()
        assert "\n" not in str(e.value)
    # and through the CLI: one line, exit 1
    r = CliRunner().invoke(main, ["-w", str(tmp_path / "ws"), "--store", "faiss", "remove", "--pid", "1"])
    assert r.exit_code == 1 and "lives in --store milvus:" in r.output and r.output.count("\n") == 1, r.output
    monkeypatch.setenv("REID_SEARCH_STORE", "faiss")
    with pytest.raises(GalleryError, match="REID_SEARCH_STORE"):
        Workspace(tmp_path / "ws").store()


def test_a_workspace_with_a_faiss_gallery_but_no_record_is_faiss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REID_SEARCH_STORE", raising=False)
    ws = Workspace(tmp_path / "ws")
    ws.index_dir.mkdir(parents=True)
    with pytest.raises(GalleryError, match="lives in --store faiss"):
        Workspace(tmp_path / "ws", store_override="milvus:").store()


def test_bad_store_values(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws", store_override="mysql://x")
    with pytest.raises(GalleryError, match="--store 'mysql://x'"):
        ws.store()
    ws.ensure()
    ws.store_pointer.write_text("{not json")
    with pytest.raises(GalleryError, match="unreadable"):
        Workspace(tmp_path / "ws").store()


def test_store_option_is_in_the_help() -> None:
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "--store" in r.output and "REID_SEARCH_STORE" in r.output
