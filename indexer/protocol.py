"""The store's service-provider interface: what a vector backend implements.

The caller-facing contract (data types, filters, the gallery protocol) lives in
:mod:`reid_search.gallery`. Here is what a store implementation plugs in below
the coordinator: :class:`VectorBackend`, where a store keeps its vectors and the
scalar fields that filters need (a FAISS index, a cache of the vectors the SQL
DB holds, or a Milvus collection, the only copy of the vectors; SQL keeps the
record of what is indexed), and :class:`RowFields`, the batch of scalar fields
it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from reid_search.gallery import SearchFilter


@dataclass(frozen=True)
class RowFields:
    """The scalar fields of a batch of crops that a vector backend keeps for filtering."""

    ids: np.ndarray  # int64 [n]
    camids: np.ndarray  # int64 [n], UNKNOWN where none
    pids: np.ndarray  # int64 [n], UNKNOWN where none
    times: np.ndarray  # float64 [n], seconds since the epoch (UTC), NaN where none
    tracks: list[str | None] = field(default_factory=list)



@runtime_checkable
class VectorBackend(Protocol):
    """Where a store keeps vectors and the scalar fields its filters read.

    ``holds_vectors`` tells the coordinator how to repair: a backend that is a
    cache (FAISS; the SQL DB holds every vector) is refilled from SQL; one that
    holds the only copy (Milvus) is the truth for vectors, so SQL rows without a
    vector are dropped and backend ids without a SQL row are deleted.
    """

    kind: str
    holds_vectors: bool

    @property
    def ntotal(self) -> int:
        """Vectors held."""

    def ids(self) -> np.ndarray:
        """Every id held (int64, sorted)."""

    def add(self, fields: RowFields, feats: np.ndarray) -> None:
        """Insert (or overwrite) vectors with their scalar fields."""

    def remove(self, ids: np.ndarray) -> None:
        """Delete ids (ids not held are ignored)."""

    def search(self, feats: np.ndarray, k: int, filters: Sequence[SearchFilter | None]) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`GalleryStore.search`, with one filter (or ``None``) per query, evaluated in the backend."""

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of ``ids`` (``[n, dim]`` float32, given order)."""

    def iter_vectors(self, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every ``(ids, feats)``, id order."""

    def flush(self, generation: int) -> None:
        """Make everything added or removed durable, stamped with the store's ``generation``."""

    def stamp(self) -> int | None:
        """The generation of the last :meth:`flush` (``None`` if never): tells a lagging or foreign index."""

    def drop(self) -> None:
        """Delete every vector and the backend's files or collection."""
