"""The gallery contract: the data types and the two protocols every gallery store satisfies.

This is what the search engine, evaluation, the pipeline, the CLI and the service
need of a gallery, defined in core so that none of them depends on a store's
implementation. :class:`GalleryReader` is what searching needs (the engine,
evaluation, ``show``); :class:`GalleryWriter` adds what indexing and
maintenance need (the pipeline, the CLI, the service). ``indexer`` implements
both (:class:`indexer.coordinator.Gallery`); ``tests/memory_store.py`` is the
brute-force reference. The plain data types (:class:`ImageMeta`,
:class:`NewImage`, :class:`SearchFilter`, :class:`RemoveFilter`) import nothing
heavy, so the CLI can use them without loading faiss or SQLAlchemy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ContextManager, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from reid_search.timeutil import as_utc

UNKNOWN = -2  # pid / camid of a crop whose name or manifest gave none


@dataclass(frozen=True)
class ImageMeta:
    """What the gallery knows about one crop (``id`` is its vector id in the backend)."""

    id: int
    path: Path  # absolute
    rel_path: str  # relative to ``root``, POSIX separators (surrogate-escaped when the name was not UTF-8)
    root: Path
    pid: int | None
    camid: int | None
    seq: int | None
    frame: int | None
    sha256: str
    size_bytes: int
    model_fingerprint: str
    indexed_at: datetime
    time: datetime | None = None  # capture time, UTC
    track: str | None = None


@dataclass(frozen=True)
class NewImage:
    """A crop to add, with its final labels (from the manifest, else parsed from the name)."""

    path: Path
    sha256: str
    size_bytes: int
    pid: int | None = None
    camid: int | None = None
    seq: int | None = None
    frame: int | None = None
    time: datetime | None = None  # UTC
    track: str | None = None


@dataclass(frozen=True)
class SearchFilter:
    """Which gallery crops a search may return; every condition given is ANDed.

    ``since``/``until`` are inclusive bounds on the capture time; a crop without a
    time never passes a time bound. :meth:`allows` is the reference meaning that
    every backend must reproduce (tests compare backends with it, row by row).
    """

    cameras: frozenset[int] | None = None  # only these cameras (None: any)
    exclude_cameras: frozenset[int] = frozenset()
    since: datetime | None = None
    until: datetime | None = None
    exclude_tracks: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            t = getattr(self, name)
            if t is not None:
                object.__setattr__(self, name, as_utc(t))
        if self.cameras is not None:
            object.__setattr__(self, "cameras", frozenset(int(c) for c in self.cameras))
        object.__setattr__(self, "exclude_cameras", frozenset(int(c) for c in self.exclude_cameras))
        object.__setattr__(self, "exclude_tracks", frozenset(str(t) for t in self.exclude_tracks))

    @property
    def is_empty(self) -> bool:
        """True when the filter lets every crop through."""
        return (self.cameras is None and not self.exclude_cameras and self.since is None
                and self.until is None and not self.exclude_tracks)

    def excluding_camera(self, camid: int | None) -> "SearchFilter":
        """This filter that also drops ``camid`` (the query's own camera); unchanged for ``None``."""
        if camid is None:
            return self
        return SearchFilter(self.cameras, self.exclude_cameras | {int(camid)}, self.since, self.until,
                            self.exclude_tracks)

    def excluding_tracks(self, tracks: Iterable[str]) -> "SearchFilter":
        """This filter that also drops ``tracks``."""
        return SearchFilter(self.cameras, self.exclude_cameras, self.since, self.until,
                            self.exclude_tracks | frozenset(tracks))

    def allows(self, camid: int | None, time: datetime | None, track: str | None) -> bool:
        """Whether a crop with these fields passes (the reference semantics)."""
        if self.cameras is not None and (camid is None or camid not in self.cameras):
            return False
        if camid is not None and camid in self.exclude_cameras:
            return False
        if self.since is not None or self.until is not None:
            if time is None:
                return False
            t = as_utc(time)
            if self.since is not None and t < self.since:
                return False
            if self.until is not None and t > self.until:
                return False
        if track is not None and track in self.exclude_tracks:
            return False
        return True


@dataclass(frozen=True)
class RemoveFilter:
    """Which crops a retention or erasure request deletes: every field given is ANDed.

    ``before`` is exclusive (capture time strictly earlier); crops without a time
    never match it. At least one field must be given.
    """

    pid: int | None = None
    camid: int | None = None
    before: datetime | None = None
    track: str | None = None

    def __post_init__(self) -> None:
        if self.before is not None:
            object.__setattr__(self, "before", as_utc(self.before))
        if self.pid is None and self.camid is None and self.before is None and self.track is None:
            raise ValueError("a RemoveFilter needs at least one of pid, camid, before, track")

    def matches(self, meta: ImageMeta) -> bool:
        """Whether ``meta`` is selected (the reference semantics)."""
        if self.pid is not None and meta.pid != self.pid:
            return False
        if self.camid is not None and meta.camid != self.camid:
            return False
        if self.before is not None and (meta.time is None or as_utc(meta.time) >= self.before):
            return False
        if self.track is not None and meta.track != self.track:
            return False
        return True


@dataclass(frozen=True)
class ChangeEvent:
    """What one committed change did; passed to the callbacks a store's ``on_change`` registers."""

    added: np.ndarray  # int64 ids
    removed: np.ndarray  # int64 ids
    generation: int


Filters = SearchFilter | Sequence[SearchFilter | None] | None
"""One filter for every query, one per query, or none."""


class IndexSpecLike(Protocol):
    """What callers read of a store's index spec (:class:`indexer.spec.IndexSpec` is one)."""

    @property
    def kind(self) -> str:
        """The index type, e.g. ``flat`` or ``hnsw``."""

    def describe(self) -> str:
        """The type and its parameters in a few words."""


@runtime_checkable
class GalleryReader(Protocol):
    """A gallery of embedded crops with their metadata, as searching sees it (see the module docstring)."""

    @property
    def kind(self) -> str:
        """The vector backend, e.g. ``faiss`` or ``milvus``."""

    @property
    def ntotal(self) -> int:
        """Crops (= vectors) in the gallery."""

    @property
    def dim(self) -> int | None:
        """Feature dimension, ``None`` while empty."""

    @property
    def model_fingerprint(self) -> str | None:
        """Fingerprint of the model that embedded every vector (``None`` while empty)."""

    @property
    def generation(self) -> int:
        """Change counter of the state this object reflects; grows with every committed change."""

    def describe(self) -> str:
        """One line: size, index, model."""

    def refresh(self) -> bool:
        """Load every change other processes committed; True if there were any."""

    def search(self, feats: np.ndarray, k: int, filters: Filters = None) -> tuple[np.ndarray, np.ndarray]:
        """``(sims [q, k], ids [q, k])`` of the k best crops per query that pass its filter.

        Cosine similarities, best first; padding is id -1 and similarity -inf, and
        there is padding only when fewer than k crops pass the filter (exact
        backends) or the index could not find more (approximate ones). Raises
        ``GalleryError`` for features of another dimension than the gallery's.
        """

    def metadata(self, ids: Iterable[int] | np.ndarray) -> list[ImageMeta]:
        """Metadata of ``ids`` in the same order; ``GalleryError`` for an unknown id."""

    def iter_metadata(self, batch_size: int = 10_000) -> Iterator[list[ImageMeta]]:
        """Every crop's metadata in id order, a batch at a time."""

    def iter_vectors(self, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every ``(ids, feats)`` in id order, a batch at a time (the exact stored features)."""


@runtime_checkable
class GalleryWriter(GalleryReader, Protocol):
    """A gallery as indexing and maintenance see it: a reader that also adds, removes and re-indexes.

    Every write commits atomically and raises ``GalleryError`` when the gallery
    cannot be written (another model's gallery, a read-only workspace).
    """

    @property
    def spec(self) -> IndexSpecLike:
        """The index type and its parameters."""

    def set_spec(self, spec: Any) -> bool:
        """Switch to another :class:`indexer.spec.IndexSpec` (rebuilding the index when the build
        changes); True when rebuilt. ``GalleryError`` for a type this store cannot build."""

    @property
    def search_device(self) -> str:
        """Where searches run, e.g. ``CPU (2 threads)``."""

    def check_model(self, fingerprint: str, dim: int) -> None:
        """Raise ``GalleryError`` unless the gallery is empty or was embedded by this model."""

    def register_root(self, folder: str | os.PathLike[str]) -> Path:
        """Register ``folder`` as a gallery root (no-op inside an existing root); returns the root."""

    def existing(self, folder: str | os.PathLike[str]) -> dict[str, tuple[int, str]]:
        """Crops under ``folder``: path relative to ``folder`` → ``(id, sha256)``."""

    def add_images(self, images: Sequence[NewImage], feats: np.ndarray, model_fingerprint: str,
                   replace_ids: Iterable[int] = ()) -> np.ndarray:
        """Commit crops with their features (and delete ``replace_ids``) atomically; returns the new ids.

        A path already in the gallery is replaced.
        """

    def remove_ids(self, ids: Iterable[int]) -> int:
        """Delete crops by id; returns how many existed."""

    def remove_where(self, where: RemoveFilter, dry_run: bool = False) -> list[ImageMeta]:
        """Delete the crops ``where`` selects (retention, erasure); returns their metadata."""

    def remove(self, paths: Iterable[str | os.PathLike[str]]) -> tuple[int, list[str]]:
        """Delete crops by file or folder path; returns ``(removed, paths that matched nothing)``."""

    def replacing(self) -> ContextManager["GalleryWriter"]:
        """A re-index: writes go to a new gallery beside this one, which replaces it atomically
        when the block exits cleanly; an exception (or a crash) leaves the old gallery whole.
        Afterwards :attr:`replaced_count` says how many images the switch dropped."""

    @property
    def replaced_count(self) -> int:
        """Images the last :meth:`replacing` through this object dropped at its switch, including
        any that other writers added to the old gallery during the build; 0 before any."""

    def save(self) -> None:
        """Make the vectors durable now if they lag the DB (a no-op inside :meth:`replacing`)."""

    def maybe_save(self) -> None:
        """:meth:`save` if the store's save policy says it is due (call it after each commit)."""

    def close(self) -> None:
        """Flush pending state and release connections."""


# ---- filters per query (the engine and every store) --------------------------------


def per_query_filters(filters: Filters, n: int) -> list[SearchFilter | None]:
    """One filter for each of ``n`` queries: a single filter (or ``None``) repeated, a sequence as given.

    Raises:
        ValueError: a sequence of another length than ``n``.
    """
    if filters is None or isinstance(filters, SearchFilter):
        return [filters] * n
    out = list(filters)
    if len(out) != n:
        raise ValueError(f"{n} queries but {len(out)} filters")
    return out


def group_by_filter(filters: Sequence[SearchFilter | None]) -> dict[SearchFilter | None, list[int]]:
    """The query rows of each distinct filter (an empty one counted as ``None``), in first-seen order,
    so that a store searches each filter once."""
    groups: dict[SearchFilter | None, list[int]] = {}
    for i, f in enumerate(filters):
        groups.setdefault(None if f is None or f.is_empty else f, []).append(i)
    return groups
