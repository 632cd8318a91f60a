"""What many test modules build: unit vectors, crops to add, a stand-in model, Market folders,
and the one oracle for stores and engines (brute force through :class:`MemoryStore`).

Fixtures stay in ``conftest.py``; this module holds plain functions and classes, so a
test imports what it uses by name. Calls into the library are kept here where several
tests share them, so that an API change is adapted in one place.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

from reid_search.data import parse_name
from reid_search.gallery import Filters, GalleryReader, NewImage, SearchFilter
from reid_search.transforms import Preprocess
from tests.memory_store import MemoryStore

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Small inputs keep CPU tests fast; the tiny checkpoint carries them, as a real one does.
TINY_PRE = Preprocess(height=64, width=32)

# The start of the capture times that :func:`new_images` draws (``labels="random"``).
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
TRACKS = ("a", "b", "c", None)


# ---- ../shared and CLI results ------------------------------------------------------------------


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when this clone has none."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present (../shared is only beside the development checkout)")
    return p


def one_line_error(result, *needles: str, after: str | None = None) -> str:  # type: ignore[no-untyped-def]
    """Check a CLI result failed with exit 1 and a one-line ``Error: …`` holding every needle.

    ``after``: a prefix that lines before the error may carry (e.g. per-file
    ``skipped `` warnings logged during the run). Returns the error line.
    """
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines, "no output"
    msg = lines[-1]
    assert msg.startswith("Error: "), result.output
    assert all(after is not None and ln.startswith(after) for ln in lines[:-1]), result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in msg, msg
    return msg


# ---- workspaces and their galleries (the library calls many tests make) ---------------------------


def store_workspace(path: Path, store: str):  # type: ignore[no-untyped-def]  # -> Workspace
    """A workspace at ``path`` whose gallery lives in ``store`` (a ``--store`` value, recorded at the first open)."""
    from reid_search.app.workspace import Workspace

    return Workspace(path, store_override=store)


def open_ws(ws, **kw):  # type: ignore[no-untyped-def]  # (Workspace, ...) -> Gallery
    """The gallery of workspace ``ws``; keywords (``spec``, ``save_interval``, ``backend_factory``)
    pass through to :func:`reid_search.app.session.open_workspace_gallery`."""
    from reid_search.app.session import open_workspace_gallery

    return open_workspace_gallery(ws, **kw)


def faiss_index(g):  # type: ignore[no-untyped-def]  # (Gallery) -> indexer.faiss.index.VectorIndex
    """The FAISS index object of a FAISS gallery (its training state, nlist, ids)."""
    return g.backend.index


# ---- vectors ------------------------------------------------------------------------------------


def iter_batches(ids: np.ndarray, x: np.ndarray, batch: int = 65_536):  # type: ignore[no-untyped-def]
    """Split in-memory ``(ids, feats)`` into batches (a ``VectorIndex.build`` source)."""
    for s in range(0, len(ids), batch):
        yield ids[s : s + batch], x[s : s + batch]


def unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit length, as float32 (what every extractor returns)."""
    x = np.asarray(x)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def feats(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    """``n`` seeded random unit vectors of dimension ``d``."""
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


# ---- crops to add ------------------------------------------------------------------------------


def new_images(folder: Path, n: int, start: int = 0, *, labels: str = "market", seed: int = 0,
               write: bool = False) -> list[NewImage]:
    """``n`` crops under ``folder`` for ``add_images``.

    ``labels="market"``: numbered ``i`` from ``start``, Market names ``PPPP_cCs1_IIIIII_00.jpg``
    (pid ``i % 50 + 1``, camera ``i % 3 + 1``), with the labels the name carries; no time or track.
    ``labels="random"``: names ``img{seed}_{i}.jpg`` with labels drawn from ``seed``:
    cameras 0-4 (10% unknown), times over 10 hours from :data:`T0` (15% unknown),
    tracks a/b/c (25% none), pids 0-19.
    ``write``: also write each file (its content is what its sha256 names).
    """
    if labels == "random":
        if start:
            raise ValueError("labels='random' numbers from 0: give another seed instead of a start")
        return _random_images(folder, n, seed)
    if labels != "market":
        raise ValueError(f"labels is 'market' or 'random', not {labels!r}")
    out = []
    for i in range(start, start + n):
        p = folder / f"{i % 50 + 1:04d}_c{i % 3 + 1}s1_{i:06d}_00.jpg"
        content = b"x%d" % i
        if write:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content)
        info = parse_name(p.name)
        assert info is not None
        out.append(NewImage(p, hashlib.sha256(content).hexdigest(), len(content),
                            pid=info.pid, camid=info.camid, seq=info.seq, frame=info.frame))
    return out


def _random_images(folder: Path, n: int, seed: int) -> list[NewImage]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cam = None if rng.random() < 0.1 else int(rng.integers(0, 5))
        t = None if rng.random() < 0.15 else T0 + timedelta(minutes=int(rng.integers(0, 600)))
        out.append(NewImage(folder / f"img{seed}_{i:05d}.jpg", hashlib.sha256(b"%d %d" % (seed, i)).hexdigest(), 1,
                            pid=int(rng.integers(0, 20)), camid=cam, time=t, track=TRACKS[int(rng.integers(0, 4))]))
    return out


def write_crop(path: Path, seed: int, size: tuple[int, int] = (64, 128), mode: str = "RGB") -> Path:
    """A random-noise-plus-blocks JPEG/PNG crop; different seeds give different images."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    arr[: size[1] // 2] = rng.integers(0, 255, 3, dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_folder(folder: Path, n: int, *, per_pid: int = 2, cams: int = 3, seed: int = 0,
                 size: tuple[int, int] = (32, 64)) -> list[Path]:
    """``n`` small Market-named crops in ``folder`` (``per_pid`` crops per identity over ``cams`` cameras)."""
    return [write_crop(folder / f"{i // per_pid + 1:04d}_c{i % cams + 1}s1_{i:06d}_00.jpg", seed=seed + i, size=size)
            for i in range(n)]


def write_market(root: Path, train: Sequence[int] = range(1, 5), test: Sequence[int] = range(5, 8), *,
                 per_cam: int = 2, seed: int = 0, distractors: bool = True) -> Path:
    """A Market-1501-layout root of random crops; returns ``root``.

    ``bounding_box_train``: each ``train`` pid on cameras 1 and 2, ``per_cam`` crops each.
    ``query``: each ``test`` pid once on camera 1; ``bounding_box_test``: twice on camera 2.
    ``distractors``: also a junk (pid -1) and a distractor (pid 0) crop in the gallery.
    Crop seeds count up from ``seed + 1`` in that order.
    """
    for pid in train:
        for cam in (1, 2):
            for k in range(per_cam):
                seed += 1
                write_crop(root / "bounding_box_train" / f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg", seed)
    for pid in test:
        seed += 1
        write_crop(root / "query" / f"{pid:04d}_c1s1_000000_00.jpg", seed)
        for k in range(2):
            seed += 1
            write_crop(root / "bounding_box_test" / f"{pid:04d}_c2s1_{k + 1:06d}_00.jpg", seed)
    if distractors:
        write_crop(root / "bounding_box_test" / "-1_c1s1_000009_00.jpg", 999)
        write_crop(root / "bounding_box_test" / "0000_c2s1_000010_00.jpg", 998)
    return root


# ---- a stand-in model --------------------------------------------------------------------------


class PixelExtractor:
    """A deterministic stand-in model: a fixed projection of the pixels to ``dim`` (fails on demand).

    It has what the pipeline and the engine read from an extractor: ``preprocess``,
    ``dim``, ``fingerprint``, ``description`` and ``embed``.
    """

    preprocess = TINY_PRE
    description = "pixels"

    def __init__(self, fingerprint: str = "pix", fail: bool = False, dim: int = 8) -> None:
        self.fingerprint, self.fail, self.dim = fingerprint, fail, dim
        self._w = np.random.default_rng(0).standard_normal((3 * TINY_PRE.height * TINY_PRE.width, dim))
        self._w = self._w.astype(np.float32)

    def embed(self, batch):  # type: ignore[no-untyped-def]
        """Unit features of a (N, 3, H, W) tensor; raises RuntimeError when made with ``fail``."""
        if self.fail:
            raise RuntimeError("this model fails on every image")
        return unit(batch.float().reshape(len(batch), -1).numpy() @ self._w)


# ---- a store of labelled vectors, and the oracle ------------------------------------------------


def labelled_store(n: int = 120, seed: int = 0, dim: int = 16,
                   fingerprint: str = "fake-model") -> tuple[MemoryStore, np.ndarray, list[NewImage]]:
    """A :class:`MemoryStore` of ``n`` seeded unit vectors with cameras 1-6, times and tracks t0-t7
    (some of each unknown); returns the store, the vectors and the crops added."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t0 = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)
    imgs = []
    for i in range(n):
        time = None if i % 7 == 0 else t0 + timedelta(minutes=int(rng.integers(0, 600)), microseconds=int(rng.integers(0, 3)))
        imgs.append(NewImage(Path(f"/g/{i:04d}.jpg"), f"{i:064x}", 10, pid=int(rng.integers(0, 20)),
                             camid=None if i % 11 == 0 else int(rng.integers(1, 7)), time=time,
                             track=None if i % 5 == 0 else f"t{int(rng.integers(0, 8))}"))
    store = MemoryStore()
    store.add_images(imgs, x, fingerprint)
    return store, x, imgs


def all_rows(g: GalleryReader) -> list:
    """Every row's :class:`ImageMeta`, in id order."""
    return sorted((m for b in g.iter_metadata() for m in b), key=lambda m: m.id)


def brute_force(g: GalleryReader, q: np.ndarray, k: int, filters: Filters = None) -> tuple[np.ndarray, np.ndarray]:
    """What ``g.search(q, k, filters)`` must return: ``g``'s rows and vectors copied into a
    :class:`MemoryStore` (every row scored, each filtered with :meth:`SearchFilter.allows`).

    Ids are ``g``'s; rows past the matches are padded with ``-inf`` / ``-1``.
    """
    rows = all_rows(g)
    ids = np.array([m.id for m in rows], np.int64)
    q = np.atleast_2d(np.asarray(q, np.float32))
    if not len(ids):
        return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    mem = MemoryStore()
    mem_ids = mem.add_images([NewImage(m.path, m.sha256, m.size_bytes, m.pid, m.camid, m.seq, m.frame, m.time, m.track)
                              for m in rows], g.vectors(ids), "oracle")
    back = dict(zip(mem_ids.tolist(), ids.tolist()))
    back[-1] = -1
    sims, got = mem.search(q, k, filters)
    return sims, np.vectorize(back.__getitem__, otypes=[np.int64])(got)


def brute_ids(g: GalleryReader, q: np.ndarray, k: int, f: SearchFilter | None = None) -> list[int]:
    """The ids one query ``q`` must get from ``g`` (:func:`brute_force`, without the padding)."""
    ids = brute_force(g, q, k, f)[1][0]
    return ids[ids >= 0].tolist()


def allowed(g: GalleryReader, f: SearchFilter | None) -> int:
    """How many of ``g``'s rows ``f`` lets through (what ``g.count(f)`` must say)."""
    return sum(1 for m in all_rows(g) if f is None or f.allows(m.camid, m.time, m.track))


def exact_topk(q: np.ndarray, x: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` of ``q`` among the rows ``x`` (named ``ids``), in numpy.

    For the bare FAISS index layer, which has vectors but no rows, on up to 20 000 ×
    300 vectors (the per-row :class:`MemoryStore` would take seconds there).
    """
    s = q @ x.T
    order = np.argsort(-s, axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), ids[order]
