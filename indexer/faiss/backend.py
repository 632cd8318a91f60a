"""The FAISS store: a :class:`~indexer.protocol.VectorBackend` that caches the vectors the SQL DB holds,
and :class:`FaissFactory`, which opens one per gallery version.

One gallery version's vectors live in a :class:`~indexer.faiss.index.VectorIndex`
kept in memory and saved to one file in the index folder (``gallery.faiss`` for
version 0, ``gallery.v<N>.faiss`` after re-indexes). Beside the index, a
:class:`FieldTable` keeps each id's camera, capture time and track, so a
:class:`~reid_search.gallery.SearchFilter` becomes the set of allowed ids handed
to FAISS as an ``IDSelector`` (exact masking on ``flat``).

The file's header carries the DB's ``store_id`` and the generation it was
flushed at: a file made against another DB is discarded, one from a later
generation than the DB's too (the coordinator then refills it from SQL).

Saving a big index takes time, so the file is written when the gallery's
``save_interval`` has passed, or 10× the last save's duration if that is
longer (:meth:`FaissBackend.flush_due`): big indexes spend at most ~10 % of
the time saving. Whatever is not saved yet is rebuilt from SQL after a crash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from reid_search.filters import filter_mask
from reid_search.gallery import SearchFilter, group_by_filter, per_query_filters
from reid_search.timeutil import NO_TIME
from indexer.protocol import BackendFactory, RowFields, VectorBackend, VectorSource
from indexer.faiss.index import VectorIndex
from indexer.spec import FAISS_KINDS, PARAMS_BY_KIND, SEARCH_PARAMS, IndexSpec
from indexer.topk import exact_search, fill_short
from reid_search.errors import GalleryError

log = logging.getLogger(__name__)

EXACT_SUBSET = 4096  # a filter passing at most this many crops is answered by exact search over them
_FILE_RE = re.compile(r"^gallery(?:\.v(\d+))?\.faiss$")
# The temporary that reid_search.atomic.atomic_write makes beside an index file while saving it.
_TEMP_RE = re.compile(r"^\.gallery(?:\.v\d+)?\.faiss\..+\.tmp$")


class FieldTable:
    """The scalar fields filters read, per id: camera, capture time (µs, UTC), track."""

    def __init__(self) -> None:
        self.ids = np.zeros(0, np.int64)
        self.camids = np.zeros(0, np.int64)
        self.times = np.zeros(0, np.int64)
        self.tracks = np.zeros(0, np.int32)  # code into vocab, -1: none
        self.vocab: list[str] = []
        self._code: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def _codes(self, tracks: Sequence[str | None]) -> np.ndarray:
        out = np.empty(len(tracks), np.int32)
        for j, t in enumerate(tracks):
            if t is None:
                out[j] = -1
                continue
            c = self._code.get(t)
            if c is None:
                c = self._code[t] = len(self.vocab)
                self.vocab.append(t)
            out[j] = c
        return out

    def add(self, f: RowFields) -> None:
        """Append rows (ids already held are skipped)."""
        keep = ~np.isin(f.ids, self.ids)
        if not keep.any():
            return
        times = np.where(np.isnan(f.times), 0.0, f.times)
        t_us = np.where(np.isnan(f.times), NO_TIME, np.round(times * 1e6).astype(np.int64))
        tracks = f.tracks if f.tracks else [None] * len(f.ids)
        self.ids = np.concatenate([self.ids, f.ids[keep]])
        self.camids = np.concatenate([self.camids, f.camids[keep]])
        self.times = np.concatenate([self.times, t_us[keep]])
        self.tracks = np.concatenate([self.tracks, self._codes([t for t, k in zip(tracks, keep) if k])])

    def remove(self, ids: np.ndarray) -> None:
        """Forget rows (absent ids are ignored)."""
        keep = ~np.isin(self.ids, ids)
        if keep.all():
            return
        self.ids, self.camids, self.times, self.tracks = self.ids[keep], self.camids[keep], self.times[keep], self.tracks[keep]

    def allowed(self, f: SearchFilter) -> np.ndarray:
        """Sorted ids that pass ``f`` (:func:`reid_search.filters.filter_mask`, on the track codes)."""
        return np.sort(self.ids[filter_mask(f, self.camids, self.times, self.tracks, vocab=self._code)])

    def to_bytes(self) -> bytes:
        """Serialised form (stored after the index in the file)."""
        vocab = json.dumps(self.vocab).encode()
        return (struct.pack("<qq", len(self.ids), len(vocab)) + vocab
                + self.ids.astype("<i8").tobytes() + self.camids.astype("<i8").tobytes()
                + self.times.astype("<i8").tobytes() + self.tracks.astype("<i4").tobytes())

    @classmethod
    def from_bytes(cls, raw: bytes) -> "FieldTable":
        """Inverse of :meth:`to_bytes`.

        Raises:
            ValueError: truncated or malformed bytes.
        """
        n, nv = struct.unpack_from("<qq", raw, 0)
        off = 16
        t = cls()
        t.vocab = json.loads(raw[off : off + nv])
        t._code = {s: j for j, s in enumerate(t.vocab)}
        off += nv
        if len(raw) != off + 28 * n:
            raise ValueError("truncated field table")
        t.ids = np.frombuffer(raw, "<i8", n, off).astype(np.int64)
        t.camids = np.frombuffer(raw, "<i8", n, off + 8 * n).astype(np.int64)
        t.times = np.frombuffer(raw, "<i8", n, off + 16 * n).astype(np.int64)
        t.tracks = np.frombuffer(raw, "<i4", n, off + 24 * n).astype(np.int32)
        return t


class FaissBackend(VectorBackend):
    """A gallery version's vectors in FAISS, with the fields filters need (see the module docstring).

    Not thread-safe for mutation; concurrent searches are fine.
    """

    kind = "faiss"
    holds_vectors = False

    def __init__(self, path: Path, spec: IndexSpec, dim: int, store_id: str | None, source: VectorSource) -> None:
        self.path = Path(path)
        self.spec, self.dim, self.store_id = spec, dim, store_id
        self._source = source
        self.index = VectorIndex.empty(spec, dim)
        self.fields = FieldTable()
        self._stamp: int | None = None
        self.dirty = False
        self.last_save = time.monotonic()
        self.save_cost = 0.0
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            vi, header = VectorIndex.load(self.path)
            fields = FieldTable.from_bytes(header.get("trailer", b""))
        except GalleryError as exc:
            log.warning("%s; rebuilding it from the DB", exc)
            return
        except (ValueError, struct.error):
            log.warning("the index file %s has no usable field table (older format?); rebuilding it from the DB", self.path)
            return
        if header.get("store_id") != self.store_id:
            log.warning("the index file %s was made against another DB; rebuilding it from this DB", self.path)
            return
        if vi.dim != self.dim or vi.spec.build_key() != self.spec.build_key():
            log.warning("the index file %s does not match the DB (dimension or index type); rebuilding it", self.path)
            return
        if not np.array_equal(np.sort(fields.ids), vi.ids()):
            log.warning("the index file %s is inconsistent (fields vs vectors); rebuilding it", self.path)
            return
        vi.spec = self.spec  # search-time parameters: the DB's spec wins
        vi._configure()
        self.index, self.fields, self._stamp = vi, fields, int(header.get("generation", -1))

    # ---- VectorBackend ------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        """Vectors held."""
        return self.index.ntotal

    def ids(self) -> np.ndarray:
        """Every id held, sorted."""
        return np.sort(self.fields.ids)

    def add(self, fields: RowFields, feats: np.ndarray) -> None:
        """Insert vectors with their fields (ids held already are skipped: ids are never reused)."""
        keep = ~np.isin(fields.ids, self.fields.ids)
        if not keep.any():
            return
        if not keep.all():
            tracks = fields.tracks or [None] * len(fields.ids)
            fields = RowFields(fields.ids[keep], fields.camids[keep], fields.pids[keep], fields.times[keep],
                               [t for t, k in zip(tracks, keep) if k])
            feats = np.asarray(feats)[keep]
        self.index.add(fields.ids, feats)
        self.fields.add(fields)
        self.dirty = True
        reason = self.index.rebuild_reason()
        if reason:
            self.rebuild(reason)

    def remove(self, ids: np.ndarray) -> None:
        """Delete ids (absent ones are ignored); rebuilds from the DB when the index type cannot remove."""
        ids = np.asarray(ids, np.int64)
        ids = ids[np.isin(ids, self.fields.ids)]
        if not len(ids):
            return
        self.dirty = True
        if self.index.remove(ids):
            self.fields.remove(ids)
        else:
            self.rebuild(f"{len(ids)} removals ({self.spec.kind} cannot remove in place)")

    def search(self, feats: np.ndarray, k: int, filters: Sequence[SearchFilter | None]) -> tuple[np.ndarray, np.ndarray]:
        """k best per query among the ids its filter allows (see :meth:`reid_search.gallery.GalleryReader.search`)."""
        x = np.ascontiguousarray(feats, np.float32)
        q = len(x)
        sims = np.full((q, k), -np.inf, np.float32)
        out = np.full((q, k), -1, np.int64)
        for f, rows in group_by_filter(per_query_filters(filters, q)).items():
            sel = np.asarray(rows)
            if f is None:
                s, i = self.index.search(x[sel], k)
            else:
                s, i = self._search_filtered(x[sel], k, self.fields.allowed(f))
            sims[sel], out[sel] = s, i
        return sims, out

    def _search_filtered(self, x: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not len(allowed):
            return np.full((len(x), k), -np.inf, np.float32), np.full((len(x), k), -1, np.int64)
        exact_kind = self.spec.kind == "flat" or not self.index.trained
        if not exact_kind and len(allowed) <= EXACT_SUBSET:
            return exact_search(x, self._source.vectors(allowed), allowed, k)
        s, i = self.index.search(x, k, allowed)
        if not exact_kind:
            # queries the approximate index left short of the crops that pass: exact, streamed from the DB
            fill_short(x, k, s, i, len(allowed), lambda: self._exact_over(allowed))
        return s, i

    def _exact_over(self, allowed: np.ndarray, block: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, vectors)`` of ``allowed`` from the DB, ``block`` at a time (the exact fallback's source)."""
        for s in range(0, len(allowed), block):
            part = allowed[s : s + block]
            yield part, self._source.vectors(part)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Exact features of ``ids`` (from the DB: FAISS may hold only codes)."""
        return self._source.vectors(np.asarray(ids, np.int64))

    def iter_vectors(self, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every ``(ids, feats)`` from the DB, id order."""
        for f, x in self._source.iter_rows(batch_size):
            yield f.ids, x

    def flush(self, generation: int) -> None:
        """Write the index file (atomically), stamped with ``generation`` and the DB's identity."""
        t0 = time.monotonic()
        self.index.save(self.path, {"generation": int(generation), "store_id": self.store_id}, self.fields.to_bytes())
        self._stamp = int(generation)
        self.dirty = False
        self.last_save = time.monotonic()
        self.save_cost = self.last_save - t0

    def stamp(self) -> int | None:
        """Generation of the last flush (or of the loaded file); ``None`` if never."""
        return self._stamp

    def flush_due(self, now: float, interval: float) -> bool:
        """Unsaved changes, and ``interval`` seconds (or 10× the last save's duration) since the last save."""
        return self.dirty and now - self.last_save >= max(interval, 10 * self.save_cost)

    def refill(self, reason: str) -> bool:
        """Build the index from every vector in the DB in one pass (training included)."""
        self.rebuild(reason)
        return True

    def device(self) -> str:
        """Where searches run, e.g. ``CPU (2 threads)`` or a GPU."""
        return self.index.device

    def describe(self) -> str:
        """``exact until trained`` for an IVF index that has too few vectors to train yet."""
        return "" if self.index.trained else "exact until trained"

    def drop(self) -> None:
        """Forget every vector and delete the file."""
        self.index = VectorIndex.empty(self.spec, self.dim)
        self.fields = FieldTable()
        self._stamp = None
        self.dirty = False
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # ---- FAISS specifics -------------------------------------------------------------

    def rebuild(self, reason: str) -> None:
        """Rebuild index and fields from every vector in the DB."""
        recorded: list[RowFields] = []

        def source() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            recorded.clear()  # the last pass (the adding one) is what the index holds
            for f, x in self._source.iter_rows():
                recorded.append(f)
                yield f.ids, x

        n = self._source.count()
        log.info("rebuilding the %s index of %d vectors: %s", self.spec.kind, n, reason)
        t0 = time.perf_counter()
        self.index = VectorIndex.build(self.spec, self.dim, source, n)
        table = FieldTable()
        for f in recorded:
            table.add(f)
        self.fields = table
        self.dirty = True
        log.info("rebuilt the index in %.1fs", time.perf_counter() - t0)

    def set_spec(self, spec: IndexSpec) -> bool:
        """Switch index type/parameters; True when that needed a rebuild."""
        old = self.spec
        self.spec = spec
        if old.build_key() == spec.build_key() and self.index.spec.build_key() == spec.build_key():
            self.index.set_search_params(**{k: getattr(spec, k) for k in SEARCH_PARAMS if k in PARAMS_BY_KIND[spec.kind]})
            return False
        self.rebuild(f"index type changed from {old.describe()} to {spec.describe()}")
        return True


def index_file(index_dir: Path, version: int) -> Path:
    """The index file of a gallery version."""
    return index_dir / ("gallery.faiss" if version == 0 else f"gallery.v{version}.faiss")


def file_version(path: Path) -> int | None:
    """The gallery version an index file name belongs to (``None``: not an index file)."""
    m = _FILE_RE.match(path.name)
    return None if m is None else int(m.group(1) or 0)


def check_faiss_spec(spec: IndexSpec) -> None:
    """Refuse an index type only the Milvus store builds.

    Raises:
        GalleryError: ``ivfsq8`` or ``diskann`` on the FAISS store.
    """
    if spec.kind not in FAISS_KINDS:
        raise GalleryError(f"--index-type {spec.kind} is a Milvus index; the FAISS store builds {', '.join(FAISS_KINDS)} "
                           "(ivfpq is its compact one), or keep the gallery in Milvus: --store milvus: or http://HOST:19530")


class FaissFactory(BackendFactory):
    """The FAISS store: one index file per gallery version in ``index_dir`` (see the module docstring)."""

    kind = "faiss"
    holds_vectors = False

    def __init__(self, index_dir: str | os.PathLike[str]) -> None:
        self.index_dir = Path(index_dir)

    def __call__(self, version: int, dim: int, spec: IndexSpec, store_id: str | None,
                 source: VectorSource) -> FaissBackend:
        """The backend of ``version``, loaded from its file when that is usable (else refilled by the coordinator)."""
        return FaissBackend(index_file(self.index_dir, version), spec, dim, store_id, source)

    def check_spec(self, spec: IndexSpec) -> None:
        """See :func:`check_faiss_spec`."""
        check_faiss_spec(spec)

    def leftovers(self, workspace_dir: str | os.PathLike[str] | None = None) -> list[Path]:
        """The non-empty index files in ``index_dir`` (``workspace_dir`` adds nothing: FAISS keeps no other files)."""
        if not self.index_dir.is_dir():
            return []
        return sorted(p for p in self.index_dir.iterdir()
                      if file_version(p) is not None and p.is_file() and p.stat().st_size > 0)

    def cleanup(self, keep: set[int]) -> None:
        """Delete the index files of versions not in ``keep`` and the temporaries of interrupted saves."""
        if not self.index_dir.is_dir():
            return
        for p in self.index_dir.iterdir():
            v = file_version(p)
            if v is not None and v not in keep:
                log.warning("removing %s, the index of a replaced gallery version", p)
                with contextlib.suppress(OSError):
                    p.unlink()
            elif _TEMP_RE.match(p.name):
                log.warning("removing %s, left by an interrupted save", p)
                with contextlib.suppress(OSError):
                    p.unlink()
