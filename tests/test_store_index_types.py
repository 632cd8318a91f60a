"""Index types of the FAISS store: flat until trained, rebuilt from the stored vectors on a switch,
search parameters changed in place (the Milvus collection index: tests/test_milvus_store.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer import IndexSpec
from reid_search.app.workspace import Workspace
from tests.helpers import faiss_index, feats, new_images, open_ws

pytestmark = pytest.mark.faiss_only  # FAISS training and rebuilds


@pytest.fixture()
def fws(tmp_path: Path) -> Workspace:
    """A FAISS workspace."""
    return Workspace(tmp_path / "ws")


def test_flat_becomes_ivf_past_the_training_threshold(fws: Workspace, tmp_path: Path) -> None:
    ws = fws
    g = open_ws(ws, spec=IndexSpec("ivf", min_train=700))
    x = feats(1000, d=8, seed=3)
    g.add_images(new_images(tmp_path / "g", 600), x[:600], "m")
    assert not faiss_index(g).trained and "exact until trained" in g.describe()
    g.add_images(new_images(tmp_path / "g", 400, start=600), x[600:], "m")
    assert faiss_index(g).trained and faiss_index(g).nlist == 16 and g.ntotal == 1000
    g.close()
    g2 = open_ws(ws)
    assert faiss_index(g2).trained and g2.spec == IndexSpec("ivf", min_train=700)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq", "flat"])
def test_switching_index_type_rebuilds_from_stored_vectors(kind: str, fws: Workspace, tmp_path: Path) -> None:
    ws = fws
    g = open_ws(ws)
    x = feats(800, d=16, seed=4)
    ids = g.add_images(new_images(tmp_path / "g", 800), x, "m")
    assert g.set_spec(IndexSpec(kind, **({"min_train": 700} if kind == "ivfpq" else {}))) is (kind != "flat")
    assert g.spec.kind == kind and g.ntotal == 800 and faiss_index(g).trained
    np.testing.assert_array_equal(g.search(x[:20], 1)[1][:, 0], ids[:20])
    g.remove_ids(ids[:5])  # hnsw cannot remove in place: rebuilt without them
    assert g.ntotal == 795 and not np.isin(g.search(x[:20], 5)[1], ids[:5]).any()
    g.close()
    assert open_ws(ws).spec.kind == kind


def test_search_parameter_change_needs_no_rebuild(fws: Workspace, tmp_path: Path) -> None:
    ws = fws
    g = open_ws(ws, spec=IndexSpec("ivf", min_train=700))
    g.add_images(new_images(tmp_path / "g", 800), feats(800, d=8), "m")
    before = faiss_index(g)
    assert g.set_spec(IndexSpec("ivf", min_train=700, nprobe=2)) is False
    assert faiss_index(g) is before and faiss_index(g).spec.nprobe == 2
