"""The Milvus side of a gallery: a :class:`~indexer.protocol.VectorBackend` on ``pymilvus.MilvusClient``.

The same code talks to Milvus Lite (an embedded engine in a local folder whose
name ends in ``.db``) and to a Milvus standalone or cluster server
(``http://HOST:19530``). Unlike FAISS, the collection is the only copy of the
vectors: the SQL DB keeps the record of what is indexed (paths, labels,
hashes) and no vectors.

One collection per gallery (version), fields:

``id`` INT64 primary key
    the ``images.id`` of the SQL row.
``vec`` FLOAT_VECTOR(dim)
    the L2-normalised feature; metric IP, so scores are cosine similarities.
``camid``, ``pid`` INT64
    :data:`~indexer.protocol.UNKNOWN` (-2) where the crop has none.
``ts`` DOUBLE + ``has_ts`` BOOL
    capture time in seconds since the epoch (UTC); ``has_ts`` false (and ``ts`` 0)
    where unknown, so that such crops never pass a time bound.
``track`` VARCHAR + ``has_track`` BOOL
    the tracklet name; ``has_track`` false where none, so that only crops whose
    track is in ``exclude_tracks`` are dropped.

:class:`~reid_search.gallery.SearchFilter` becomes a Milvus boolean expression
(:func:`~indexer.milvus.expr.filter_expr`); queries that share a filter go to Milvus
in one search. The gallery's :class:`~indexer.spec.IndexSpec` is put in Milvus's
words by :mod:`indexer.milvus.spec`.
Every request uses ``Strong`` consistency, so a search sees every insert and
delete acknowledged before it.

``pymilvus`` is imported when a backend is opened, not with this module, so the
CLI can parse ``--store`` without loading it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from typing import Any, Iterator, Sequence

import numpy as np

from reid_search.gallery import SearchFilter, group_by_filter, per_query_filters
from reid_search.limits import MAX_TRACK_CHARS
from indexer.protocol import RowFields, VectorBackend
from reid_search.errors import GalleryError
from indexer.location import StoreLocation
from indexer.milvus.client import connect, milvus_error, quiet_pymilvus
from indexer.milvus.expr import filter_expr
from indexer.milvus.spec import build_params, check_milvus_spec, describe, index_type, search_params
from indexer.spec import IndexSpec
from indexer.topk import fill_short

log = logging.getLogger(__name__)

STAMP_KEY = "reid_search.generation"
MAX_TOPK = 16_384  # Milvus's limit on hits per query (and on queries per request)
_QUERY_BATCH = 1024  # queries per search request
_INSERT_BYTES = 16 << 20  # bytes of vectors per insert request (servers cap a request at 64 MB)
_GET_BATCH = 4096  # ids per get / delete request
_COLLECTION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")

class MilvusBackend(VectorBackend):
    """A gallery's vectors in one Milvus collection (see the module docstring).

    The collection is created at the first :meth:`add` (its dimension comes
    from the vectors); an existing one is loaded and checked against ``spec``.

    Raises (constructor):
        GalleryError: a bad collection name, or a collection of another shape.
    """

    kind = "milvus"
    holds_vectors = True

    def __init__(self, client: Any, collection: str, spec: IndexSpec | None = None, *,
                 lite: bool = False) -> None:
        if not _COLLECTION_RE.match(collection):
            raise GalleryError(f"bad Milvus collection name {collection!r}: letters, digits and _, not starting with a digit")
        self.client = client
        self.collection = collection
        self.spec = spec or IndexSpec()
        self.lite = lite
        check_milvus_spec(self.spec, lite)
        self.dim: int | None = None
        self._exists = False
        self._unflushed = False  # written since the last flush
        self._last_flush = time.monotonic()
        if self._call("has_collection", collection):
            self._exists = True
            self._check_existing()
            self._call("load_collection", collection)

    # ---- plumbing ---------------------------------------------------------------

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except GalleryError:
            raise
        except Exception as exc:
            raise GalleryError(f"Milvus {method} on collection {self.collection} failed ({milvus_error(exc)}); "
                               "check that the Milvus store is reachable and retry") from None

    def _check_existing(self) -> None:
        info = self._call("describe_collection", self.collection)
        fields = {f["name"]: f for f in info.get("fields", [])}
        if "vec" not in fields or "camid" not in fields or "has_ts" not in fields:
            raise GalleryError(f"the Milvus collection {self.collection} is not a reid-search gallery; "
                               "pass another --store or drop it")
        self.dim = int(fields["vec"].get("params", {}).get("dim"))
        # The track field's max_length is not checked: collections made before the 255 limit have 1024.
        built = str(self._built().get("index_type", "")).upper()
        if built and built != index_type(self.spec):  # e.g. a crash between recording a new type and the rebuild
            log.warning("the Milvus collection %s has a %s index, not the recorded %s; run `reid-search index DIR "
                        "--index-type %s` to rebuild it", self.collection, built, index_type(self.spec), self.spec.kind)

    def _built(self) -> dict[str, Any]:
        """``describe_index`` of the vector field (``{}`` when there is none)."""
        try:
            return dict(self.client.describe_index(self.collection, "vec") or {})
        except Exception:  # no index (or no collection): nothing built
            return {}

    def set_spec(self, spec: IndexSpec) -> bool:
        """Switch to ``spec``.

        When the index type or a build parameter changes, the collection's index is
        rebuilt in place: released, its vector index dropped and created anew, loaded
        again (Milvus builds it from the vectors it holds; nothing is re-inserted).
        A change of search parameters only is taken at once. Returns True when rebuilt.

        Raises:
            GalleryError: a type Milvus Lite cannot build (on Lite), or a failing Milvus.
        """
        check_milvus_spec(spec, self.lite)
        old, new = self.spec, spec
        self.spec = new
        if not self._exists:
            return False
        built = self.index_type()
        if built == index_type(new) and old.kind == new.kind and build_params(old) == build_params(new):
            return False
        log.info("rebuilding the index of Milvus collection %s: %s -> %s", self.collection, built or "none", describe(new))
        self._call("release_collection", self.collection)
        try:
            if built is not None:
                self._call("drop_index", self.collection, "vec")
            self._create_index(new)
        except GalleryError:
            self.spec = old  # put the old index back, so the gallery stays searchable
            with contextlib.suppress(GalleryError):
                if self.index_type() is None:
                    self._create_index(old)
            raise
        finally:
            self._call("load_collection", self.collection)
        return True

    def _create_index(self, spec: IndexSpec) -> None:
        index = self.client.prepare_index_params()
        index.add_index("vec", index_type=index_type(spec), metric_type="IP", params=build_params(spec))
        self._call("create_index", self.collection, index)

    def index_type(self) -> str | None:
        """The Milvus index type the collection is built with, e.g. ``HNSW`` (``None`` before the first add)."""
        if not self._exists:
            return None
        return str(self._built().get("index_type", "")).upper() or None

    def _create(self, dim: int) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                            description="reid-search gallery")
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("camid", DataType.INT64)
        schema.add_field("pid", DataType.INT64)
        schema.add_field("ts", DataType.DOUBLE)
        schema.add_field("has_ts", DataType.BOOL)
        schema.add_field("track", DataType.VARCHAR, max_length=MAX_TRACK_CHARS)
        schema.add_field("has_track", DataType.BOOL)
        index = self.client.prepare_index_params()
        index.add_index("vec", index_type=index_type(self.spec), metric_type="IP", params=build_params(self.spec))
        self._call("create_collection", self.collection, schema=schema, index_params=index,
                   consistency_level="Strong")
        self._call("load_collection", self.collection)
        log.info("created Milvus collection %s (%d-d, %s)", self.collection, dim, describe(self.spec))
        self._exists, self.dim = True, dim

    # ---- VectorBackend ------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        """Vectors held (an exact count: deletes included)."""
        return self._count("") if self._exists else 0

    def ids(self) -> np.ndarray:
        """Every id held (int64, sorted)."""
        if not self._exists:
            return np.zeros(0, np.int64)
        out: list[np.ndarray] = []
        with quiet_pymilvus():
            it = self._call("query_iterator", self.collection, batch_size=MAX_TOPK, filter="", output_fields=["id"])
        try:
            with quiet_pymilvus():
                while batch := it.next():
                    out.append(np.fromiter((r["id"] for r in batch), np.int64, len(batch)))
        except GalleryError:
            raise
        except Exception as exc:
            raise GalleryError(f"listing the ids of Milvus collection {self.collection} failed ({milvus_error(exc)}); retry") from None
        finally:
            with contextlib.suppress(Exception):
                it.close()
        return np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)

    def add(self, fields: RowFields, feats: np.ndarray) -> None:
        """Insert (or overwrite: upsert) vectors with their scalar fields.

        Raises:
            GalleryError: wrong shapes, a dimension other than the collection's, a track name
                longer than :data:`~reid_search.limits.MAX_TRACK_CHARS` (255, the SQL column's width),
                or a failing Milvus.
        """
        feats = np.ascontiguousarray(feats, np.float32)
        ids = np.asarray(fields.ids, np.int64)
        if feats.ndim != 2 or len(feats) != len(ids):
            raise GalleryError(f"{len(ids)} ids but features of shape {feats.shape}")
        if not len(ids):
            return
        if not self._exists:
            self._create(int(feats.shape[1]))
        if feats.shape[1] != self.dim:
            raise GalleryError(f"{feats.shape[1]}-d features for a {self.dim}-d Milvus collection {self.collection}; "
                               "re-index with `reid-search index DIR --reindex`")
        tracks = list(fields.tracks) if fields.tracks else [None] * len(ids)
        camids = np.asarray(fields.camids, np.int64)
        pids = np.asarray(fields.pids, np.int64)
        times = np.asarray(fields.times, np.float64)
        rows = []
        for j in range(len(ids)):
            t = float(times[j])
            tr = tracks[j]
            if tr is not None and len(tr) > MAX_TRACK_CHARS:
                raise GalleryError(f"track name of {len(tr)} characters; the Milvus store keeps at most {MAX_TRACK_CHARS}")
            rows.append({"id": int(ids[j]), "vec": feats[j], "camid": int(camids[j]), "pid": int(pids[j]),
                         "ts": 0.0 if math.isnan(t) else t, "has_ts": not math.isnan(t),
                         "track": tr or "", "has_track": tr is not None})
        per = max(1, _INSERT_BYTES // (4 * int(self.dim or 1)))
        for s in range(0, len(rows), per):
            # upsert: re-adding an id (a repair, a retried batch) must not duplicate it
            self._unflushed = True
            self._call("upsert", self.collection, rows[s:s + per])

    def remove(self, ids: np.ndarray) -> None:
        """Delete ids (ids not held are ignored)."""
        ids = np.asarray(ids, np.int64).ravel()
        if not self._exists or not len(ids):
            return
        self._unflushed = True
        for s in range(0, len(ids), _GET_BATCH):
            self._call("delete", self.collection, ids=[int(i) for i in ids[s:s + _GET_BATCH]])

    def delete_where(self, expr: str) -> None:
        """Delete every entity matching a Milvus expression (used by repair and tests)."""
        if self._exists:
            self._call("delete", self.collection, filter=expr)

    def search(self, feats: np.ndarray, k: int,
               filters: Sequence[SearchFilter | None]) -> tuple[np.ndarray, np.ndarray]:
        """``(sims [q, k], ids [q, k])`` per query, its filter evaluated by Milvus; padding id -1, sim -inf.

        Queries sharing a filter are sent together.

        Raises:
            GalleryError: k above Milvus's 16384, features of another dimension, or a failing Milvus.
        """
        feats = np.atleast_2d(np.asarray(feats, np.float32))
        q = len(feats)
        flist = per_query_filters(filters, q)
        if k > MAX_TOPK:
            raise GalleryError(f"Milvus returns at most {MAX_TOPK} hits per query, not {k}; ask for fewer")
        sims = np.full((q, k), -np.inf, np.float32)
        out = np.full((q, k), -1, np.int64)
        if not self._exists or q == 0 or k <= 0:
            return sims, out
        if feats.shape[1] != self.dim:
            raise GalleryError(f"{feats.shape[1]}-d query features for a {self.dim}-d gallery; use the gallery's model")
        params = {"metric_type": "IP", "params": search_params(self.spec, k)}
        for f, rows in group_by_filter(flist).items():
            expr = filter_expr(f)
            if expr is None:  # nothing can pass
                continue
            for s in range(0, len(rows), _QUERY_BATCH):
                part = rows[s:s + _QUERY_BATCH]
                res = self._call("search", self.collection, data=[feats[i] for i in part], limit=k, filter=expr,
                                 anns_field="vec", search_params=params, output_fields=[])
                for i, hits in zip(part, res):
                    n = min(k, len(hits))
                    if n:
                        out[i, :n] = [h["id"] for h in hits[:n]]
                        sims[i, :n] = [h["distance"] for h in hits[:n]]
            if self.spec.kind != "flat":
                self._fill_short(feats, k, expr, rows, sims, out)
        return sims, out

    def _fill_short(self, feats: np.ndarray, k: int, expr: str, rows: list[int], sims: np.ndarray,
                    out: np.ndarray) -> None:
        """Answer exactly the queries an approximate index left short of k although more crops pass ``expr``.

        A selective filter can leave a graph or inverted-list search with fewer than k
        hits (Milvus Lite's HNSW does); as on FAISS (:func:`indexer.topk.fill_short`),
        such queries are re-answered by exact search over the vectors that pass the
        filter, streamed from Milvus (counted only when some query is short).
        """
        sel = np.asarray(rows)
        s, i = sims[sel], out[sel]
        if fill_short(feats[sel], k, s, i, lambda: self._count(expr), lambda: self._iter_where(expr)):
            sims[sel], out[sel] = s, i

    def _count(self, expr: str) -> int:
        rows = self._call("query", self.collection, filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def _iter_where(self, expr: str, batch_size: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, vectors)`` of every entity matching ``expr``, a batch at a time."""
        with quiet_pymilvus():
            it = self._call("query_iterator", self.collection, batch_size=batch_size, filter=expr,
                            output_fields=["id", "vec"])
        try:
            while True:
                try:
                    with quiet_pymilvus():
                        batch = it.next()
                except Exception as exc:
                    raise GalleryError(f"reading the vectors of Milvus collection {self.collection} failed "
                                       f"({milvus_error(exc)}); retry") from None
                if not batch:
                    return
                yield (np.fromiter((r["id"] for r in batch), np.int64, len(batch)),
                       np.asarray([r["vec"] for r in batch], np.float32).reshape(len(batch), -1))
        finally:
            with contextlib.suppress(Exception):
                it.close()

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of ``ids`` (``[n, dim]`` float32, given order).

        Raises:
            GalleryError: an id the collection does not hold.
        """
        wanted = np.asarray(ids, np.int64).ravel()
        dim = self.dim or 0
        if not len(wanted):
            return np.zeros((0, dim), np.float32)
        found: dict[int, Any] = {}
        if self._exists:
            uniq = np.unique(wanted)
            for s in range(0, len(uniq), _GET_BATCH):
                for r in self._call("get", self.collection, ids=[int(i) for i in uniq[s:s + _GET_BATCH]],
                                    output_fields=["vec"]):
                    found[int(r["id"])] = r["vec"]
        missing = [int(i) for i in wanted if int(i) not in found]
        if missing:
            raise GalleryError(f"{len(missing)} id(s) not in the gallery (e.g. {missing[:5]}): the Milvus collection "
                               f"{self.collection} has no vector for them (removed or never added; if the DB still "
                               "lists them, reopening the gallery repairs it)")
        return np.asarray([found[int(i)] for i in wanted], dtype=np.float32).reshape(len(wanted), dim)

    def iter_vectors(self, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every ``(ids, feats)`` in id order, ``batch_size`` at a time."""
        all_ids = self.ids()
        for s in range(0, len(all_ids), batch_size):
            part = all_ids[s:s + batch_size]
            yield part, self.vectors(part)

    def fields(self, ids: np.ndarray) -> RowFields:
        """The scalar fields Milvus holds for ``ids`` (given order; ids not held are left out)."""
        wanted = np.asarray(ids, np.int64).ravel()
        got: dict[int, dict[str, Any]] = {}
        if self._exists:
            for s in range(0, len(wanted), _GET_BATCH):
                for r in self._call("get", self.collection, ids=[int(i) for i in wanted[s:s + _GET_BATCH]],
                                    output_fields=["camid", "pid", "ts", "has_ts", "track", "has_track"]):
                    got[int(r["id"])] = r
        keep = [int(i) for i in wanted if int(i) in got]
        rs = [got[i] for i in keep]
        return RowFields(
            ids=np.asarray(keep, np.int64), camids=np.asarray([r["camid"] for r in rs], np.int64),
            pids=np.asarray([r["pid"] for r in rs], np.int64),
            times=np.asarray([r["ts"] if r["has_ts"] else np.nan for r in rs], np.float64),
            tracks=[r["track"] if r["has_track"] else None for r in rs],
        )

    def flush(self, generation: int) -> None:
        """Seal what was written and stamp the collection with ``generation``."""
        if not self._exists:
            return
        self._call("flush", self.collection)
        self._call("alter_collection_properties", self.collection, properties={STAMP_KEY: str(int(generation))})
        self._unflushed = False
        self._last_flush = time.monotonic()

    def flush_due(self, now: float, interval: float) -> bool:
        """Whether something was written since the last flush and ``interval`` seconds have passed.

        The coordinator flushes a backend that holds the only copy of the vectors
        after every commit, so this is a safety net more than a policy.
        """
        return self._unflushed and now - self._last_flush >= interval

    def stamp(self) -> int | None:
        """The generation of the last :meth:`flush` (``None`` if never, or no collection)."""
        if not self._exists:
            return None
        props = self._call("describe_collection", self.collection).get("properties") or {}
        v = props.get(STAMP_KEY)
        try:
            return int(v) if v is not None else None
        except ValueError:
            return None

    def drop(self) -> None:
        """Drop the collection (every vector)."""
        if self._call("has_collection", self.collection):
            self._call("drop_collection", self.collection)
            log.info("dropped Milvus collection %s", self.collection)
        self._exists, self.dim, self._unflushed = False, None, False

    def device(self) -> str:
        """``CPU``: what this process can say; the searches run in Milvus (Lite's process, or the server)."""
        return "CPU"

    def close(self) -> None:
        """Release the client (a Lite folder stays open in this process until exit)."""
        with contextlib.suppress(Exception):
            self.client.close()



def open_backend(location: StoreLocation, collection: str, spec: IndexSpec | None = None) -> MilvusBackend:
    """Connect to a resolved Milvus location and open (or prepare) ``collection``.

    Raises:
        GalleryError: see :func:`connect` and :class:`MilvusBackend`.
    """
    return MilvusBackend(connect(location), collection, spec, lite=location.is_lite)


