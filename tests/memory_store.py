"""A brute-force, in-memory :class:`~reid_search.gallery.GalleryWriter`: the independent reference.

Every search scores every row and filters each with :meth:`SearchFilter.allows`,
one row at a time; nothing is shared with the real stores' code. It implements
the whole writer protocol (roots, incremental indexing, removal, re-index,
saving), so it can stand in for a real store wherever a consumer takes a
``GalleryWriter`` (the pipeline, the CLI, the service); today the engine tests
use it, also as the oracle that the real stores' filtered search must equal.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from reid_search.data import parse_name
from reid_search.errors import GalleryError
from reid_search.gallery import (
    UNKNOWN,
    ChangeEvent,
    Filters,
    GalleryWriter,
    ImageMeta,
    NewImage,
    RemoveFilter,
    SearchFilter,
)


@dataclass(frozen=True)
class MemorySpec:
    """The memory store's index spec: exact search whatever is asked (the kind is only recorded)."""

    kind: str = "flat"

    def describe(self) -> str:
        return self.kind


def _abs(p: str | os.PathLike[str]) -> Path:
    """Absolute, with the parent folder resolved and the last component kept as named."""
    p = Path(os.path.abspath(p))
    return p.resolve() if p.is_dir() or not p.name else p.parent.resolve() / p.name


def _labels(im: NewImage) -> tuple[int | None, int | None, int | None, int | None]:
    """The crop's labels as given; parsed from a Market-style name when it carries none."""
    if any(v is not None for v in (im.pid, im.camid, im.seq, im.frame)):
        return im.pid, im.camid, im.seq, im.frame
    info = parse_name(Path(im.path).name)
    return (info.pid, info.camid, info.seq, info.frame) if info else (None, None, None, None)


class MemoryStore:
    """Rows and vectors in dicts; exact cosine search over every row."""

    kind = "memory"

    def __init__(self) -> None:
        self._metas: dict[int, ImageMeta] = {}
        self._vecs: dict[int, np.ndarray] = {}
        self._roots: list[Path] = []
        self._fp: str | None = None
        self._dim: int | None = None
        self._gen = 0
        self._next = 1
        self._spec = MemorySpec()
        self._listeners: dict[str, Callable[[ChangeEvent], None]] = {}
        self._building = False
        self.replaced_count = 0
        self.saves = 0  # how many times save() was called (the pipeline saves at the end of a run)

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

    @property
    def spec(self) -> MemorySpec:
        return self._spec

    def set_spec(self, spec: Any) -> bool:
        self._spec = MemorySpec(str(spec.kind))
        return False  # nothing to rebuild: search is exact whatever the kind

    @property
    def search_device(self) -> str:
        return "CPU"

    def describe(self) -> str:
        return f"{self.ntotal} images, memory store, dim {self._dim or '-'}, model {self._fp or 'none yet'}"

    def refresh(self) -> bool:
        return False  # one process: nothing else commits

    def check_model(self, fingerprint: str, dim: int) -> None:
        if self._metas and (fingerprint != self._fp or dim != self._dim):
            raise GalleryError(f"the gallery was indexed with model {self._fp}; re-index with --reindex")

    # ---- reading
    def search(self, feats: np.ndarray, k: int, filters: Filters = None) -> tuple[np.ndarray, np.ndarray]:
        feats = np.atleast_2d(np.asarray(feats, np.float32))
        if self._dim is not None and self._metas and feats.shape[1] != self._dim:
            raise GalleryError(f"features of shape {feats.shape} do not fit this {self._dim}-d gallery")
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
        missing = [i for i in ids if i not in self._vecs]
        if missing:
            raise GalleryError(f"{len(missing)} id(s) not in the gallery (e.g. {missing[:5]})")
        return np.stack([self._vecs[i] for i in ids])

    def iter_vectors(self, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ids = sorted(self._vecs)
        for s in range(0, len(ids), batch_size):
            part = ids[s:s + batch_size]
            yield np.array(part, np.int64), self.vectors(part)

    # ---- roots
    def register_root(self, folder: str | os.PathLike[str]) -> Path:
        folder = _abs(folder)
        for r in self._roots:
            if folder.is_relative_to(r):
                return r
        # a root inside the new one is absorbed: its crops now lie under the new root
        inner = [r for r in self._roots if r.is_relative_to(folder)]
        self._roots = [r for r in self._roots if r not in inner] + [folder]
        for i, m in list(self._metas.items()):
            if m.root in inner:
                self._metas[i] = self._with_root(m, folder)
        return folder

    @staticmethod
    def _with_root(m: ImageMeta, root: Path) -> ImageMeta:
        return ImageMeta(m.id, m.path, m.path.relative_to(root).as_posix(), root, m.pid, m.camid, m.seq, m.frame,
                         m.sha256, m.size_bytes, m.model_fingerprint, m.indexed_at, m.time, m.track)

    def existing(self, folder: str | os.PathLike[str]) -> dict[str, tuple[int, str]]:
        folder = _abs(folder)
        return {m.path.relative_to(folder).as_posix(): (i, m.sha256)
                for i, m in sorted(self._metas.items()) if m.path.is_relative_to(folder)}

    # ---- writing
    def add_images(self, images: Sequence[NewImage], feats: np.ndarray, model_fingerprint: str,
                   replace_ids: Iterable[int] = ()) -> np.ndarray:
        feats = np.asarray(feats, np.float32)
        if feats.ndim != 2 or len(feats) != len(images):
            raise GalleryError(f"{len(images)} images but features of shape {feats.shape}")
        self.check_model(model_fingerprint, int(feats.shape[1]))
        removed = [i for i in dict.fromkeys(int(i) for i in replace_ids) if i in self._metas]
        for i in removed:
            del self._metas[i], self._vecs[i]
        by_path = {m.path: i for i, m in self._metas.items()}
        new = []
        now = datetime.now(timezone.utc)
        for im, f in zip(images, feats):
            p = _abs(im.path)
            if p in by_path:  # a path already in the gallery is replaced
                old = by_path.pop(p)
                del self._metas[old], self._vecs[old]
                removed.append(old)
            root = self.register_root(p.parent)
            pid, camid, seq, frame = _labels(im)
            i = self._next
            self._next += 1
            self._metas[i] = ImageMeta(i, p, p.relative_to(root).as_posix(), root, pid, camid, seq, frame, im.sha256,
                                       im.size_bytes, model_fingerprint, now, im.time, im.track)
            self._vecs[i] = f.copy()
            new.append(i)
        if new:
            self._fp, self._dim = model_fingerprint, int(feats.shape[1])
        if new or removed:
            self._changed(new, removed)
        return np.array(new, np.int64)

    def remove_ids(self, ids: Iterable[int]) -> int:
        gone = sorted(int(i) for i in set(int(i) for i in ids) if int(i) in self._metas)
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

    def remove(self, paths: Iterable[str | os.PathLike[str]]) -> tuple[int, list[str]]:
        ids: list[int] = []
        unmatched: list[str] = []
        whole: list[Path] = []
        for raw in paths:
            p = _abs(raw)
            found = [i for i, m in self._metas.items() if m.path == p or m.path.is_relative_to(p)]
            selected = [r for r in self._roots if r == p or r.is_relative_to(p)]
            whole += selected
            ids += found
            if not found and not selected:
                unmatched.append(str(raw))
        removed = self.remove_ids(ids)
        held = {m.root for m in self._metas.values()}
        self._roots = [r for r in self._roots if r not in whole or r in held]  # a removed root is unregistered
        return removed, unmatched

    @contextlib.contextmanager
    def replacing(self) -> Iterator[GalleryWriter]:
        if self._building:
            raise GalleryError("a re-index cannot start inside another re-index")
        new = MemoryStore()
        new._next, new._gen, new._spec, new._building = self._next, self._gen, self._spec, True
        yield new  # an exception here leaves this gallery as it was
        removed = sorted(self._metas)
        self.replaced_count = len(removed)
        held = {m.root for m in new._metas.values()}
        self._roots = [r for r in new._roots if r in held]
        self._metas, self._vecs, self._fp, self._dim, self._next = new._metas, new._vecs, new._fp, new._dim, new._next
        self._changed(sorted(self._metas), removed)

    def save(self) -> None:
        self.saves += 1  # nothing to write: every change is in memory already

    def maybe_save(self) -> None:
        pass  # no save policy: nothing is ever pending

    def on_change(self, name: str, callback: Callable[[ChangeEvent], None]) -> None:
        self._listeners[name] = callback

    def close(self) -> None:
        pass

    def __enter__(self) -> "MemoryStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _changed(self, added: list[int], removed: list[int]) -> None:
        self._gen += 1
        ev = ChangeEvent(np.array(added, np.int64), np.array(removed, np.int64), self._gen)
        for cb in self._listeners.values():
            cb(ev)
