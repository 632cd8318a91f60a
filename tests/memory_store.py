"""A brute-force, in-memory :class:`~indexer.protocol.GalleryStore`: the independent reference.

Every search scores every row and filters each with :meth:`SearchFilter.allows`,
one row at a time; nothing is shared with the real stores' code. Tests use it
to exercise consumers (engine, CLI, service) and as the oracle that the real
stores' filtered search must equal.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from reid_search.gallery import (
    UNKNOWN,
    ChangeEvent,
    Filters,
    GalleryStore,
    ImageMeta,
    NewImage,
    RemoveFilter,
    SearchFilter,
)
from reid_search.errors import GalleryError


class MemoryStore:
    """Rows and vectors in dicts; exact cosine search over every row."""

    kind = "memory"

    def __init__(self) -> None:
        self._metas: dict[int, ImageMeta] = {}
        self._vecs: dict[int, np.ndarray] = {}
        self._fp: str | None = None
        self._dim: int | None = None
        self._gen = 0
        self._next = 1
        self._listeners: dict[str, Callable[[ChangeEvent], None]] = {}
        self.replaced_count = 0

    # ---- state
    @property
    def ntotal(self) -> int:
        return len(self._metas)

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def model_fingerprint(self) -> str | None:
        return self._fp if self._metas else None

    @property
    def generation(self) -> int:
        return self._gen

    def describe(self) -> str:
        return f"{self.ntotal} images, memory store, dim {self._dim or '-'}, model {self._fp or 'none yet'}"

    def refresh(self) -> bool:
        return False

    def check_model(self, fingerprint: str, dim: int) -> None:
        if self._metas and (fingerprint != self._fp or dim != self._dim):
            raise GalleryError(f"the gallery was indexed with model {self._fp}; re-index with --reindex")

    # ---- reading
    def search(self, feats: np.ndarray, k: int, filters: Filters = None) -> tuple[np.ndarray, np.ndarray]:
        feats = np.atleast_2d(np.asarray(feats, np.float32))
        if filters is None or isinstance(filters, SearchFilter):
            per: list[SearchFilter | None] = [filters] * len(feats)
        else:
            per = list(filters)
        sims = np.full((len(feats), k), -np.inf, np.float32)
        ids = np.full((len(feats), k), -1, np.int64)
        for qi, (f, flt) in enumerate(zip(feats, per)):
            scored = []
            for i, m in self._metas.items():
                if flt is None or flt.allows(m.camid, m.time, m.track):
                    scored.append((-float(np.dot(self._vecs[i].astype(np.float64), f.astype(np.float64))), i))
            scored.sort()
            for r, (s, i) in enumerate(scored[:k]):
                sims[qi, r], ids[qi, r] = -s, i
        return sims, ids

    def count(self, where: SearchFilter | RemoveFilter | None = None) -> int:
        if where is None:
            return self.ntotal
        if isinstance(where, RemoveFilter):
            return sum(where.matches(m) for m in self._metas.values())
        return sum(where.allows(m.camid, m.time, m.track) for m in self._metas.values())

    def metadata(self, ids: Iterable[int] | np.ndarray) -> list[ImageMeta]:
        out = []
        for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64).tolist():
            if i not in self._metas:
                raise GalleryError(f"no image with id {i}")
            out.append(self._metas[i])
        return out

    def iter_metadata(self, batch_size: int = 10_000) -> Iterator[list[ImageMeta]]:
        ids = sorted(self._metas)
        for s in range(0, len(ids), batch_size):
            yield [self._metas[i] for i in ids[s:s + batch_size]]

    def labels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = sorted(self._metas)
        ms = [self._metas[i] for i in ids]
        return (np.array(ids, np.int64), np.array([UNKNOWN if m.pid is None else m.pid for m in ms], np.int64),
                np.array([UNKNOWN if m.camid is None else m.camid for m in ms], np.int64))

    def vectors(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        ids = [int(i) for i in ids]
        if not ids:
            return np.zeros((0, self._dim or 0), np.float32)
        return np.stack([self._vecs[i] for i in ids])

    def iter_vectors(self, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ids = sorted(self._vecs)
        for s in range(0, len(ids), batch_size):
            part = ids[s:s + batch_size]
            yield np.array(part, np.int64), self.vectors(part)

    # ---- writing
    def add_images(self, images: Sequence[NewImage], feats: np.ndarray, model_fingerprint: str,
                   replace_ids: Iterable[int] = ()) -> np.ndarray:
        feats = np.asarray(feats, np.float32)
        self.check_model(model_fingerprint, int(feats.shape[1]))
        removed = [i for i in replace_ids if i in self._metas]
        for i in removed:
            del self._metas[i], self._vecs[i]
        by_path = {m.path: i for i, m in self._metas.items()}
        new = []
        for im, f in zip(images, feats):
            if Path(im.path) in by_path:  # a path already in the gallery is replaced
                old = by_path.pop(Path(im.path))
                del self._metas[old], self._vecs[old]
                removed.append(old)
            i = self._next
            self._next += 1
            p = Path(im.path)
            self._metas[i] = ImageMeta(i, p, p.name, p.parent, im.pid, im.camid, im.seq, im.frame, im.sha256,
                                       im.size_bytes, model_fingerprint, datetime.now(timezone.utc), im.time, im.track)
            self._vecs[i] = f.copy()
            new.append(i)
        self._fp, self._dim = model_fingerprint, int(feats.shape[1])
        self._changed(new, removed)
        return np.array(new, np.int64)

    def remove_ids(self, ids: Iterable[int]) -> int:
        gone = [int(i) for i in set(ids) if int(i) in self._metas]
        for i in gone:
            del self._metas[i], self._vecs[i]
        if gone:
            self._changed([], gone)
        return len(gone)

    def remove_where(self, where: RemoveFilter, dry_run: bool = False) -> list[ImageMeta]:
        hit = [m for _, m in sorted(self._metas.items()) if where.matches(m)]
        if not dry_run:
            self.remove_ids(m.id for m in hit)
        return hit

    def remove(self, paths: Iterable[str]) -> tuple[int, list[str]]:
        ids, unmatched = [], []
        for p in paths:
            found = [i for i, m in self._metas.items() if m.path == Path(p) or Path(p) in m.path.parents]
            ids += found
            if not found:
                unmatched.append(str(p))
        return self.remove_ids(ids), unmatched

    @contextlib.contextmanager
    def replacing(self) -> Iterator[GalleryStore]:
        new = MemoryStore()
        new._next, new._gen = self._next, self._gen
        yield new
        removed = list(self._metas)
        self.replaced_count = len(removed)
        self._metas, self._vecs, self._fp, self._dim, self._next = new._metas, new._vecs, new._fp, new._dim, new._next
        self._changed(list(self._metas), removed)

    def on_change(self, name: str, callback: Callable[[ChangeEvent], None]) -> None:
        self._listeners[name] = callback

    def close(self) -> None:
        pass

    def _changed(self, added: list[int], removed: list[int]) -> None:
        self._gen += 1
        ev = ChangeEvent(np.array(added, np.int64), np.array(removed, np.int64), self._gen)
        for cb in self._listeners.values():
            cb(ev)
