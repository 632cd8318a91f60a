"""The backend SPI (:class:`indexer.protocol.VectorBackend`): the coordinator drives any backend. One
that holds the only copy of the vectors (as Milvus does) gets none stored in SQL, and repair treats
it as the truth for vectors."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pytest

from indexer.protocol import BackendFactory, RowFields, VectorBackend
from reid_search.app.workspace import Workspace
from reid_search.gallery import SearchFilter
from tests.helpers import T0, brute_force, new_images, open_ws, unit


class DictBackend(VectorBackend):
    """Vectors in a dict, brute-force search filtered row by row with the reference semantics."""

    kind = "dict"
    holds_vectors = True
    stores: dict[tuple[str | None, int], dict[int, tuple[np.ndarray, int, float, str | None]]] = {}
    stamps: dict[tuple[str | None, int], int] = {}

    def __init__(self, version: int, store_id: str | None) -> None:
        self.key = (store_id, version)
        self.rows = self.stores.setdefault(self.key, {})

    @property
    def ntotal(self) -> int:
        return len(self.rows)

    def ids(self) -> np.ndarray:
        return np.array(sorted(self.rows), np.int64)

    def add(self, fields: RowFields, feats: np.ndarray) -> None:
        for j, i in enumerate(fields.ids.tolist()):
            self.rows[i] = (np.asarray(feats[j], np.float32), int(fields.camids[j]), float(fields.times[j]),
                            fields.tracks[j] if fields.tracks else None)

    def remove(self, ids: np.ndarray) -> None:
        for i in np.asarray(ids).tolist():
            self.rows.pop(int(i), None)

    def search(self, feats: np.ndarray, k: int, filters: Sequence[SearchFilter | None]) -> tuple[np.ndarray, np.ndarray]:
        out_s = np.full((len(feats), k), -np.inf, np.float32)
        out_i = np.full((len(feats), k), -1, np.int64)
        for q, f in enumerate(filters):
            cand = []
            for i, (v, cam, t, track) in self.rows.items():
                when = None if np.isnan(t) else datetime.fromtimestamp(t, timezone.utc)
                if f is None or f.allows(None if cam == -2 else cam, when, track):
                    cand.append((-float(v @ feats[q]), i))
            for j, (s, i) in enumerate(sorted(cand)[:k]):
                out_s[q, j], out_i[q, j] = -s, i
        return out_s, out_i

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return np.stack([self.rows[int(i)][0] for i in ids]) if len(ids) else np.zeros((0, 0), np.float32)

    def iter_vectors(self, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ids = self.ids()
        for s in range(0, len(ids), batch_size):
            yield ids[s : s + batch_size], self.vectors(ids[s : s + batch_size])

    def flush(self, generation: int) -> None:
        self.stamps[self.key] = generation

    def stamp(self) -> int | None:
        return self.stamps.get(self.key)

    def drop(self) -> None:
        self.rows.clear()
        self.stamps.pop(self.key, None)


class DictFactory(BackendFactory):
    """Opens a DictBackend per version; the SPI's defaults for the rest (nothing to clean, no leftovers)."""

    kind = "dict"
    holds_vectors = True

    def __call__(self, version, dim, spec, store_id, source):  # type: ignore[no-untyped-def]
        return DictBackend(version, store_id)

    def check_spec(self, spec) -> None:  # type: ignore[no-untyped-def]
        pass


factory = DictFactory()


@pytest.fixture(autouse=True)
def _fresh_stores() -> None:
    DictBackend.stores.clear()
    DictBackend.stamps.clear()


def test_a_vector_holding_backend_plugs_into_the_coordinator(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    g = open_ws(ws, backend_factory=factory)
    assert g.backend is None and g.kind == "dict"  # no dimension yet
    x = unit(np.random.default_rng(0).standard_normal((30, 6)))
    ids = g.add_images(new_images(tmp_path / "g", 30, labels="random"), x, "m")
    assert g.kind == "dict" and isinstance(g.backend, VectorBackend) and g.ntotal == 30
    con = sqlite3.connect(ws.root / "reid.db")
    assert con.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 0  # never in SQL
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 30
    f = SearchFilter(cameras=frozenset({1}), since=T0 + timedelta(hours=5))
    sims, got = g.search(x[:3], 4, f)
    metas = {m.id: m for m in g.metadata(ids)}
    assert all(f.allows(metas[i].camid, metas[i].time, metas[i].track) for i in got[got >= 0])
    np.testing.assert_array_equal(got, brute_force(g, x[:3], 4, f)[1])
    assert (got >= 0).any()
    np.testing.assert_array_equal(g.vectors(ids[[4, 2]]), x[[4, 2]])
    assert g.remove_ids(ids[:3]) == 3 and g.ntotal == 27
    with g.replacing() as new:
        new_ids = new.add_images(new_images(tmp_path / "h", 5, labels="random", seed=100), x[:5], "m")
    assert g.ntotal == 5 and len(DictBackend.stores) == 2 and all(
        not rows for key, rows in DictBackend.stores.items() if key[1] != g.version)
    np.testing.assert_array_equal(g.ids(), new_ids)
    g.close()

    # A crash between the SQL commit and the backend insert leaves rows without vectors;
    # one between a committed removal and the backend delete leaves vectors without rows.
    key = (g.meta.state().store_id, g.version)
    DictBackend.stores[key].pop(int(new_ids[0]))
    DictBackend.stores[key][10**9] = (x[0], 1, float("nan"), None)
    g2 = open_ws(ws, backend_factory=factory)
    np.testing.assert_array_equal(g2.ids(), new_ids[1:])  # the row without a vector is dropped
    np.testing.assert_array_equal(g2.backend.ids(), new_ids[1:])  # the vector without a row too
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 4
    con.close()
