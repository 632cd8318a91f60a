"""The store's service-provider interface: what a vector backend and its factory implement.

The caller-facing contract (data types, filters, the reader and writer
protocols) lives in :mod:`reid_search.gallery`. Here is what a store plugs in
below the coordinator (:class:`indexer.coordinator.Gallery`, which keeps SQL
and the vectors consistent):

- :class:`BackendFactory` opens the vectors of one gallery version and knows
  what the backend leaves outside its vectors (files, a Lite database file);
- :class:`VectorBackend` keeps the vectors of one version and the scalar
  fields that filters need (a FAISS index, a cache of the vectors the SQL DB
  holds; or a Milvus collection, the only copy of the vectors, while SQL keeps
  the record of what is indexed);
- :class:`RowFields` is the batch of scalar fields it is given, and
  :class:`VectorSource` the SQL side a cache backend is filled from.

A third backend (pgvector, Qdrant...) implements these two protocols and
nothing else. Members with a body are optional capabilities: a class that
subclasses the protocol explicitly inherits that body as its default (e.g.
no index rebuild, nothing left outside the vectors); the coordinator calls
every member and never probes for one.

Plugging a store in (no change to reid-search): a package declares an entry
point in the group ``reid_search.backends``, e.g. in its ``pyproject.toml``::

    [project.entry-points."reid_search.backends"]
    qdrant = "reid_qdrant.store:QdrantFactory"

The value is a :class:`BackendFactory` class, or a function, called with one
:class:`indexer.location.StoreLocation` and returning a :class:`BackendFactory`.
``--store qdrant:URI`` (or ``qdrant`` alone) selects it: the location's
``kind`` is the entry point's name (lower case), ``uri`` the text after the
first colon as written (``None`` when empty), and ``home`` the gallery's own
folder (the workspace's index folder), for a store that keeps files there. The
entry points are read when a store is parsed or opened (never at import time)
and the entry point is loaded only when its store is opened; an unknown name,
or a plug-in that fails to load, is a one-line ``GalleryError`` naming the
stores there are. The workspace records the store (``store.json``) like a
built-in one. ``holds_vectors`` must be right from the first commit: it decides
whether SQL keeps the vectors, and a later open with the other kind of store is
refused (:func:`indexer.store.open_gallery`). ``tests/spi_backend.py`` is a
complete example.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from reid_search.gallery import SearchFilter


@dataclass(frozen=True)
class RowFields:
    """The scalar fields of a batch of crops that a vector backend keeps for filtering."""

    ids: np.ndarray  # int64 [n]
    camids: np.ndarray  # int64 [n], reid_search.gallery.UNKNOWN where none
    pids: np.ndarray  # int64 [n], UNKNOWN where none
    times: np.ndarray  # float64 [n], seconds since the epoch (UTC), NaN where none
    tracks: list[str | None] = field(default_factory=list)  # one per id (None: none); [] when no row has one


class VectorSource(Protocol):
    """One gallery version's rows and vectors as the SQL DB stores them (what a cache backend is filled from).

    Empty for a store whose backend holds the only copy of the vectors.
    """

    def iter_rows(self, batch_size: int = 8192) -> Iterator[tuple[RowFields, np.ndarray]]:
        """Every row's fields and feature, id order."""

    def count(self) -> int:
        """Rows in the version."""

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored features of ``ids``, given order."""


@runtime_checkable
class VectorBackend(Protocol):
    """Where a store keeps one gallery version's vectors and the scalar fields its filters read.

    ``holds_vectors`` tells the coordinator how to repair: a backend that is a
    cache (FAISS; the SQL DB holds every vector) is refilled from SQL; one that
    holds the only copy (Milvus) is the truth for vectors, so SQL rows without a
    vector are dropped and backend ids without a SQL row are deleted. It must
    equal its factory's ``holds_vectors`` (the coordinator asks the factory
    before the first backend exists, the backend afterwards).

    ``kind`` names the backend in the gallery's one-line description and in logs.
    Ids are the SQL row ids (int64, never reused by the SQL DB).
    """

    kind: str
    holds_vectors: bool

    @property
    def ntotal(self) -> int:
        """Vectors held."""

    def ids(self) -> np.ndarray:
        """Every id held (int64, sorted)."""

    def add(self, fields: RowFields, feats: np.ndarray) -> None:
        """Insert (or overwrite) vectors with their scalar fields; ``feats[j]`` (float32, L2-normalised)
        is the vector of ``fields.ids[j]``."""

    def remove(self, ids: np.ndarray) -> None:
        """Delete ids (ids not held are ignored)."""

    def search(self, feats: np.ndarray, k: int, filters: Sequence[SearchFilter | None]) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`reid_search.gallery.GalleryReader.search`, with one filter (or ``None``) per query,
        evaluated in the backend.

        ``feats`` is ``[q, dim]`` float32, ``k >= 1``, ``len(filters) == q``. A row passes
        ``f`` when ``f.allows(camid, time, track)`` with its UNKNOWN camera and NaN time
        given as ``None`` (:func:`reid_search.filters.filter_mask` is that test on arrays,
        with times as epoch microseconds).
        """

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of ``ids`` (``[n, dim]`` float32, given order).

        Raises:
            GalleryError: an id not held (the coordinator then checks whether another
                process replaced the gallery, and retries on the new one).
        """

    def iter_vectors(self, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every ``(ids, feats)``, id order."""

    def flush(self, generation: int) -> None:
        """Make everything added or removed durable, stamped with the store's ``generation``.

        A backend that holds the only copy is flushed after every commit; a cache when
        :meth:`flush_due` says so, on close, and by ``GalleryWriter.save``.
        """

    def stamp(self) -> int | None:
        """The generation of the last :meth:`flush` (``None`` if never): tells a lagging or foreign index.

        Durable with what it stamps: a backend opened later on the same version reports the
        stamp of the last flush (one that differs from the DB's generation makes every open
        repair and flush again).
        """

    def drop(self) -> None:
        """Delete every vector and the backend's files or collection.

        The object stays usable, empty: the coordinator may drop a backend it distrusts
        (one stamped later than the DB) and refill the same object.
        """

    def set_spec(self, spec: Any) -> bool:
        """Take a new :class:`indexer.spec.IndexSpec`; returns True when that rebuilt the index.

        Search parameters apply at once; a changed index type or build parameter
        rebuilds the index (from the source, or in the backend). Raises
        ``GalleryError`` for a type it cannot build, keeping the old index.
        """
        return False

    def flush_due(self, now: float, interval: float) -> bool:
        """Whether unsaved changes should be made durable now (the backend's save policy).

        ``now`` is ``time.monotonic()``; ``interval`` the gallery's ``save_interval``
        in seconds. On close the coordinator asks with ``now = math.inf``: any
        unsaved change is due then. The default: never (every write is durable).
        """
        return False

    def refill(self, reason: str) -> bool:
        """Fill an empty backend from its source in one pass (a repair shortcut); False when it has none.

        Asked only of a cache (``holds_vectors = False``): ``reason`` says why, for the log.
        The coordinator then adds the rows SQL has and the backend lacks itself, in batches.
        """
        return False

    def device(self) -> str:
        """Where searches run, e.g. ``CPU (2 threads)``."""
        return "CPU"

    def describe(self) -> str:
        """A note on the index's state for the gallery's one-line description (e.g. ``exact until
        trained``); ``""`` when there is nothing to add to the spec's own description."""
        return ""


@runtime_checkable
class BackendFactory(Protocol):
    """Opens the vectors of the gallery versions of one store (a folder of FAISS files, a Milvus store).

    ``kind`` names the backend while the gallery is still empty; ``holds_vectors``
    says whether its backends hold the only copy of the vectors, so that the
    first commit, before any backend exists, already keeps vectors out of SQL.
    """

    kind: str
    holds_vectors: bool

    def __call__(self, version: int, dim: int, spec: Any, store_id: str | None,
                 source: VectorSource) -> VectorBackend:
        """Open (or prepare) the vectors of gallery ``version``.

        ``spec`` is the gallery's :class:`indexer.spec.IndexSpec`; ``store_id``
        identifies the SQL DB, so that a backend can tell its own data from
        another DB's (``None`` for a read-only DB made before DBs had ids);
        ``source`` reads the version's rows and vectors from SQL (empty for a
        store whose backends hold the only copy). Opening must be cheap and must
        not fail when nothing is stored yet: the coordinator also opens a version
        only to :meth:`VectorBackend.drop` it (a replaced or abandoned one). Every
        open of a gallery (each CLI command) opens its backend anew, so what must
        outlive the object (another command, another process) is the backend's to
        keep, durably from :meth:`VectorBackend.flush` on.

        Raises:
            GalleryError: the backend cannot be opened (unreachable, another shape).
        """

    def check_spec(self, spec: Any) -> None:
        """Raise ``GalleryError`` for an index type this store cannot build, before the gallery records it
        (``spec.kind`` is the type: :data:`reid_search.limits.INDEX_KINDS`)."""

    def leftovers(self, workspace_dir: str | os.PathLike[str] | None) -> list[Path]:
        """Files of this store that hold a gallery (asked when the metadata DB is empty: a lost
        or truncated DB beside them must not be taken for a new gallery). ``workspace_dir``:
        the workspace whose own files to look at too (``None``: none)."""
        return []

    def cleanup(self, keep: set[int]) -> None:
        """Delete what the store keeps outside the versions in ``keep`` that no backend of those
        versions reaches (FAISS: the files of replaced versions, temporary files of interrupted
        saves). Called with the gallery's writer lock held."""
