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

:class:`~indexer.protocol.SearchFilter` becomes a Milvus boolean expression
(:func:`filter_expr`); queries that share a filter go to Milvus in one search.
Every request uses ``Strong`` consistency, so a search sees every insert and
delete acknowledged before it.

``pymilvus`` is imported when a backend is opened, not with this module, so the
CLI can parse ``--store`` without loading it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from indexer.protocol import UNKNOWN, RowFields, SearchFilter
from reid_search.errors import GalleryError

log = logging.getLogger(__name__)

STORE_ENV = "REID_SEARCH_STORE"
TOKEN_ENV = "REID_SEARCH_MILVUS_TOKEN"
LITE_FILE = "milvus.db"  # default Milvus Lite folder inside a workspace
STAMP_KEY = "reid_search.generation"
MAX_TOPK = 16_384  # Milvus's limit on hits per query (and on queries per request)
MAX_TRACK_CHARS = 1024
_QUERY_BATCH = 1024  # queries per search request
_INSERT_BYTES = 16 << 20  # bytes of vectors per insert request (servers cap a request at 64 MB)
_GET_BATCH = 4096  # ids per get / delete request
_COLLECTION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")

# ---- index types -----------------------------------------------------------

# --index-type name -> Milvus index_type
MILVUS_INDEX_TYPES: dict[str, str] = {
    "flat": "FLAT",
    "ivf": "IVF_FLAT",
    "ivfsq8": "IVF_SQ8",
    "ivfpq": "IVF_PQ",
    "hnsw": "HNSW",
    "diskann": "DISKANN",
}
# What Milvus Lite (milvus-lite 3.x) builds; the rest need a Milvus server.
LITE_INDEX_TYPES = ("flat", "ivf", "ivfsq8", "hnsw")
MILVUS_DEFAULT_NLIST = 128  # what Milvus builds an IVF index with when nlist is not given
# Parameters each type takes at build time and at search time (Milvus names).
BUILD_PARAMS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf": ("nlist",),
    "ivfsq8": ("nlist",),
    "ivfpq": ("nlist", "m", "nbits"),
    "hnsw": ("M", "efConstruction"),
    "diskann": (),
}
SEARCH_PARAMS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf": ("nprobe",),
    "ivfsq8": ("nprobe",),
    "ivfpq": ("nprobe",),
    "hnsw": ("ef",),
    "diskann": ("search_list",),
}
# The FAISS-style names reid-search uses for the same knobs.
PARAM_ALIASES = {"hnsw_m": "M", "m_hnsw": "M", "ef_construction": "efConstruction", "ef_search": "ef",
                 "pq_m": "m", "search_list_size": "search_list"}


@dataclass(frozen=True)
class MilvusIndexSpec:
    """How a Milvus collection's vector index is built and searched.

    ``kind`` is a key of :data:`MILVUS_INDEX_TYPES`; ``params`` are Milvus
    parameter names with integer values (``nlist``, ``M``, ``ef``, ...); a
    parameter not given takes Milvus's default.
    """

    kind: str = "flat"
    params: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in MILVUS_INDEX_TYPES:
            raise GalleryError(f"unknown Milvus index type {self.kind!r}; choose one of {', '.join(MILVUS_INDEX_TYPES)}")
        object.__setattr__(self, "params", tuple(sorted((str(k), int(v)) for k, v in self.params)))

    @property
    def index_type(self) -> str:
        """The Milvus ``index_type``, e.g. ``IVF_SQ8``."""
        return MILVUS_INDEX_TYPES[self.kind]

    def build_params(self) -> dict[str, int]:
        """Parameters for ``create_index``."""
        return {k: v for k, v in self.params if k in BUILD_PARAMS[self.kind]}

    def search_params(self, k: int | None = None) -> dict[str, int]:
        """Parameters for a ``search`` of ``k`` hits; those not given are automatic, as for FAISS.

        ``nprobe`` = max(32, nlist/5) (Milvus's own default, 8 of 128 lists, misses
        much under a filter); HNSW ``ef`` = max(128, 2k); ``ef`` and DiskANN's
        ``search_list`` are raised to k where smaller (Milvus refuses less).
        """
        out = {name: v for name, v in self.params if name in SEARCH_PARAMS[self.kind]}
        if "nprobe" in SEARCH_PARAMS[self.kind] and "nprobe" not in out:
            nlist = dict(self.params).get("nlist", MILVUS_DEFAULT_NLIST)
            out["nprobe"] = min(nlist, max(32, nlist // 5))
        if self.kind == "hnsw":
            out["ef"] = max(out.get("ef", max(128, 2 * (k or 0))), k or 0)
        if self.kind == "diskann" and "search_list" in out:
            out["search_list"] = max(out["search_list"], k or 0)
        return out

    def to_json(self) -> str:
        """Compact form (stored beside the gallery)."""
        return json.dumps({"kind": self.kind, **dict(self.params)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MilvusIndexSpec":
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        kind = d.pop("kind", "flat")
        return cls(kind, tuple(d.items()))

    def describe(self) -> str:
        """E.g. ``milvus HNSW (M=16)``."""
        p = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"milvus {self.index_type}" + (f" ({p})" if p else "")


def parse_milvus_spec(kind: str, params: Iterable[str] = (), lite: bool = False) -> MilvusIndexSpec:
    """A spec from ``--index-type`` and ``--index-param KEY=VALUE`` strings.

    Raises:
        GalleryError: unknown type or key, a non-integer value, or a type Milvus Lite cannot build.
    """
    kind = kind.lower().replace("_", "")
    kind = {"ivfflat": "ivf"}.get(kind, kind)
    if kind not in MILVUS_INDEX_TYPES:
        raise GalleryError(f"unknown Milvus index type {kind!r}; choose one of {', '.join(MILVUS_INDEX_TYPES)}")
    if lite and kind not in LITE_INDEX_TYPES:
        raise GalleryError(
            f"Milvus Lite cannot build {MILVUS_INDEX_TYPES[kind]} (it builds {', '.join(LITE_INDEX_TYPES)}); "
            "choose one of those, or use a Milvus server: --store http://HOST:19530"
        )
    allowed = BUILD_PARAMS[kind] + SEARCH_PARAMS[kind]
    values: dict[str, int] = {}
    for item in params:
        key, sep, value = item.partition("=")
        key = key.strip()
        key = PARAM_ALIASES.get(key, key)
        if not sep or key not in allowed:
            raise GalleryError(f"--index-param {item!r}: Milvus {MILVUS_INDEX_TYPES[kind]} takes KEY=VALUE with KEY one of: "
                               f"{', '.join(allowed) or 'none'}")
        try:
            values[key] = int(value)
        except ValueError:
            raise GalleryError(f"--index-param {item!r}: the value must be an integer") from None
        if values[key] <= 0:
            raise GalleryError(f"--index-param {item!r}: the value must be positive")
    return MilvusIndexSpec(kind, tuple(values.items()))


# ---- where the store lives ---------------------------------------------------


@dataclass(frozen=True)
class StoreLocation:
    """Which store a gallery lives in (parsed ``--store``).

    ``kind`` is ``faiss`` or ``milvus``. For Milvus, ``uri`` is a server URL or the
    absolute path of a Milvus Lite folder (ending in ``.db``); ``None`` means the
    workspace's own Lite file (``<workspace>/milvus.db``), resolved with :meth:`resolved`.
    """

    kind: str = "faiss"
    uri: str | None = None

    @property
    def is_lite(self) -> bool:
        """True for Milvus Lite (a local folder)."""
        return self.kind == "milvus" and not is_server_uri(self.uri or "")

    def resolved(self, workspace_dir: str | os.PathLike[str]) -> "StoreLocation":
        """The location with the workspace default filled in."""
        if self.kind == "milvus" and self.uri is None:
            return StoreLocation("milvus", str(Path(workspace_dir).resolve() / LITE_FILE))
        return self

    def to_str(self) -> str:
        """The ``--store`` value that names this location."""
        if self.kind == "faiss":
            return "faiss"
        if self.uri is not None and is_server_uri(self.uri):
            return self.uri
        return "milvus:" + (self.uri or "")


def is_server_uri(uri: str) -> bool:
    """Whether ``uri`` names a Milvus server rather than a Lite file."""
    return uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:"))


def parse_store(value: str | None) -> StoreLocation:
    """Parse ``--store`` (or ``$REID_SEARCH_STORE``): ``faiss``, ``milvus:``, ``milvus:PATH.db``, ``http://HOST:19530``.

    Raises:
        GalleryError: anything else.
    """
    v = (value or "faiss").strip()
    if v.lower() == "faiss":
        return StoreLocation("faiss")
    if is_server_uri(v):
        return StoreLocation("milvus", v.rstrip("/"))
    if v.lower().startswith("milvus:"):
        rest = v[len("milvus:"):]
        if rest.startswith("//"):  # milvus://HOST:PORT
            return StoreLocation("milvus", "http:" + rest)
        if not rest:
            return StoreLocation("milvus", None)
        if not rest.endswith(".db"):
            raise GalleryError(f"--store {value!r}: a Milvus Lite file must end in .db (e.g. milvus:gallery.db)")
        return StoreLocation("milvus", str(Path(rest).expanduser().resolve()))
    raise GalleryError(f"--store {value!r}: use faiss, milvus: (Milvus Lite in the workspace), milvus:PATH.db, "
                       "or http://HOST:19530 (a Milvus server)")


# ---- filters -------------------------------------------------------------------


def quote(s: str) -> str:
    """A Milvus expression string literal for ``s``."""
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{out}"'


def _num(x: float) -> str:
    return repr(float(x))


def filter_expr(f: SearchFilter | None) -> str | None:
    """The Milvus boolean expression for ``f``: ``""`` lets everything through, ``None`` nothing.

    Mirrors :meth:`SearchFilter.allows` exactly: crops without a camera never pass a
    camera list nor match an excluded camera; crops without a time never pass a
    time bound; crops without a track are never dropped by ``exclude_tracks``.
    """
    if f is None or f.is_empty:
        return ""
    parts: list[str] = []
    if f.cameras is not None:
        cams = sorted(c for c in f.cameras if c != UNKNOWN and c not in f.exclude_cameras)
        if not cams:
            return None
        parts.append(f"camid in [{', '.join(str(c) for c in cams)}]")
    else:
        excl = sorted(c for c in f.exclude_cameras if c != UNKNOWN)
        if excl:
            parts.append(f"camid not in [{', '.join(str(c) for c in excl)}]")
    if f.since is not None or f.until is not None:
        lo = f.since.timestamp() if f.since is not None else None
        hi = f.until.timestamp() if f.until is not None else None
        if lo is not None and hi is not None and lo > hi:
            return None
        parts.append("has_ts == true")
        if lo is not None:
            parts.append(f"ts >= {_num(lo)}")
        if hi is not None:
            parts.append(f"ts <= {_num(hi)}")
    if f.exclude_tracks:
        names = ", ".join(quote(t) for t in sorted(f.exclude_tracks))
        parts.append(f"(has_track == false or track not in [{names}])")
    return " and ".join(parts)


# ---- the backend ----------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(msg).strip().splitlines()[0] if str(msg).strip() else type(exc).__name__


def _lite_locked(path: Path) -> bool:
    """Whether another process holds the Milvus Lite folder (it allows one process at a time)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return False
    lock = path / "LOCK"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _lite_open_in_process(path: Path) -> bool:
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:  # pragma: no cover
        return False
    return str(path) in getattr(server_manager_instance, "_servers", {})


def connect(location: StoreLocation, token: str | None = None) -> Any:
    """A ``MilvusClient`` for a resolved Milvus location (token from ``$REID_SEARCH_MILVUS_TOKEN``).

    Raises:
        GalleryError: pymilvus or milvus-lite missing, a Lite folder open in another process,
            or a server that cannot be reached.
    """
    if location.kind != "milvus" or location.uri is None:
        raise GalleryError(f"not a resolved Milvus location: {location!r}")
    # gRPC's core logs at INFO on every fork (image-decoding workers) while its threads run; keep warnings
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise GalleryError("the Milvus store needs pymilvus: pip install 'pymilvus[milvus_lite]'") from None
    uri = location.uri
    if location.is_lite:
        try:
            import milvus_lite  # noqa: F401
        except ImportError:
            raise GalleryError("--store milvus: needs milvus-lite (pip install milvus-lite; Linux and macOS), "
                               "or use a server: --store http://HOST:19530") from None
        path = Path(uri)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GalleryError(f"cannot create the folder of the Milvus Lite file {path} ({exc.strerror}); "
                               "pass another --store milvus:PATH.db") from None
        if not _lite_open_in_process(path) and _lite_locked(path):
            raise GalleryError(f"the Milvus Lite file {path} is open in another process (Lite allows one at a time, "
                               "e.g. a running `reid-search serve`); stop it first, or use a Milvus server (--store http://HOST:19530)")
        # Lite first starts a local server process, which on a busy machine can outlast
        # pymilvus's default connect timeout (seen once in CI): wait longer, and retry
        kwargs: dict[str, Any] = {"timeout": 60}
        _hide_lite_timestamp_errors()
    else:
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        kwargs = {"token": token} if token else {}
        kwargs["timeout"] = 30
    attempts = 3 if location.is_lite else 1
    for attempt in range(1, attempts + 1):
        try:
            return MilvusClient(uri=uri, **kwargs)
        except Exception as exc:
            error = exc
            if attempt < attempts:
                log.warning("connecting to Milvus Lite %s failed (%s); trying again", uri, _first_line(exc))
                time.sleep(attempt)
    hint = ("check that the server is up and the URL right, and set REID_SEARCH_MILVUS_TOKEN if it needs a token"
            if not location.is_lite else "check the path, or delete a folder that is not a Milvus Lite store")
    raise GalleryError(f"cannot open the Milvus store {uri} ({_first_line(error)}); {hint}") from None


class MilvusBackend:
    """A gallery's vectors in one Milvus collection (see the module docstring).

    The collection is created at the first :meth:`add` (its dimension comes
    from the vectors); an existing one is loaded and checked against ``spec``.

    Raises (constructor):
        GalleryError: a bad collection name, or a collection of another shape.
    """

    kind = "milvus"
    holds_vectors = True

    def __init__(self, client: Any, collection: str, spec: MilvusIndexSpec | None = None, *,
                 lite: bool = False) -> None:
        if not _COLLECTION_RE.match(collection):
            raise GalleryError(f"bad Milvus collection name {collection!r}: letters, digits and _, not starting with a digit")
        self.client = client
        self.collection = collection
        self.spec = spec or MilvusIndexSpec()
        self.lite = lite
        if lite and self.spec.kind not in LITE_INDEX_TYPES:
            parse_milvus_spec(self.spec.kind, lite=True)  # raises the one-line error
        self.dim: int | None = None
        self._exists = False
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
            raise GalleryError(f"Milvus {method} on collection {self.collection} failed ({_first_line(exc)}); "
                               "check that the Milvus store is reachable and retry") from None

    def _check_existing(self) -> None:
        info = self._call("describe_collection", self.collection)
        fields = {f["name"]: f for f in info.get("fields", [])}
        if "vec" not in fields or "camid" not in fields or "has_ts" not in fields:
            raise GalleryError(f"the Milvus collection {self.collection} is not a reid-search gallery; "
                               "pass another --store or drop it")
        self.dim = int(fields["vec"].get("params", {}).get("dim"))
        built = str(self._built().get("index_type", "")).upper()
        if built and built != self.spec.index_type:  # e.g. a crash between recording a new type and the rebuild
            log.warning("the Milvus collection %s has a %s index, not the recorded %s; run `reid-search index DIR "
                        "--index-type %s` to rebuild it", self.collection, built, self.spec.index_type, self.spec.kind)

    def _built(self) -> dict[str, Any]:
        """``describe_index`` of the vector field (``{}`` when there is none)."""
        try:
            return dict(self.client.describe_index(self.collection, "vec") or {})
        except Exception:  # no index (or no collection): nothing built
            return {}

    def set_spec(self, spec: Any) -> bool:
        """Switch to ``spec`` (an :class:`indexer.spec.IndexSpec` or a :class:`MilvusIndexSpec`).

        When the index type or a build parameter changes, the collection's index is
        rebuilt in place: released, its vector index dropped and created anew, loaded
        again (Milvus builds it from the vectors it holds; nothing is re-inserted).
        A change of search parameters only is taken at once. Returns True when rebuilt.

        Raises:
            GalleryError: a type Milvus Lite cannot build (on Lite), or a failing Milvus.
        """
        new = spec if isinstance(spec, MilvusIndexSpec) else spec_from_index_spec(spec, lite=self.lite)
        old, self.spec = self.spec, new
        if not self._exists:
            return False
        built = self.index_type()
        if built == new.index_type and old.kind == new.kind and old.build_params() == new.build_params():
            return False
        log.info("rebuilding the index of Milvus collection %s: %s -> %s", self.collection, built or "none", new.describe())
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

    def _create_index(self, spec: MilvusIndexSpec) -> None:
        index = self.client.prepare_index_params()
        index.add_index("vec", index_type=spec.index_type, metric_type="IP", params=spec.build_params())
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
        index.add_index("vec", index_type=self.spec.index_type, metric_type="IP", params=self.spec.build_params())
        self._call("create_collection", self.collection, schema=schema, index_params=index,
                   consistency_level="Strong")
        self._call("load_collection", self.collection)
        log.info("created Milvus collection %s (%d-d, %s)", self.collection, dim, self.spec.describe())
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
        with _quiet_pymilvus():
            it = self._call("query_iterator", self.collection, batch_size=MAX_TOPK, filter="", output_fields=["id"])
        try:
            with _quiet_pymilvus():
                while batch := it.next():
                    out.append(np.fromiter((r["id"] for r in batch), np.int64, len(batch)))
        except GalleryError:
            raise
        except Exception as exc:
            raise GalleryError(f"listing the ids of Milvus collection {self.collection} failed ({_first_line(exc)}); retry") from None
        finally:
            with contextlib.suppress(Exception):
                it.close()
        return np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)

    def add(self, fields: RowFields, feats: np.ndarray) -> None:
        """Insert (or overwrite: upsert) vectors with their scalar fields.

        Raises:
            GalleryError: wrong shapes, a dimension other than the collection's, a track name
                longer than 1024 characters, or a failing Milvus.
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
            self._call("upsert", self.collection, rows[s:s + per])

    def remove(self, ids: np.ndarray) -> None:
        """Delete ids (ids not held are ignored)."""
        ids = np.asarray(ids, np.int64).ravel()
        if not self._exists or not len(ids):
            return
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
        if len(filters) != q:
            raise GalleryError(f"{q} queries but {len(filters)} filters")
        if k > MAX_TOPK:
            raise GalleryError(f"Milvus returns at most {MAX_TOPK} hits per query, not {k}; ask for fewer")
        sims = np.full((q, k), -np.inf, np.float32)
        out = np.full((q, k), -1, np.int64)
        if not self._exists or q == 0 or k <= 0:
            return sims, out
        if feats.shape[1] != self.dim:
            raise GalleryError(f"{feats.shape[1]}-d query features for a {self.dim}-d gallery; use the gallery's model")
        groups: dict[str | None, list[int]] = {}
        for i, f in enumerate(filters):
            groups.setdefault(filter_expr(f), []).append(i)
        params = {"metric_type": "IP", "params": self.spec.search_params(k)}
        for expr, rows in groups.items():
            if expr is None:
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
        hits (Milvus Lite's HNSW does); as with FAISS, such queries are re-answered by
        exact search over the vectors that pass the filter, streamed from Milvus.
        """
        short = [i for i in rows if (out[i] >= 0).sum() < k]
        if not short:
            return
        passing = self._count(expr)
        short = [i for i in short if (out[i] >= 0).sum() < min(k, passing)]
        if not short:
            return
        from indexer.vectors import exact_search, merge_topk

        log.debug("%d filtered queries fell back to exact search over %d crops", len(short), passing)
        q = feats[short]
        best_s = np.full((len(short), k), -np.inf, np.float32)
        best_i = np.full((len(short), k), -1, np.int64)
        for ids, xb in self._iter_where(expr):
            best_s, best_i = merge_topk(best_s, best_i, *exact_search(q, xb, ids, k), k)
        best_i[~np.isfinite(best_s)] = -1
        sims[short], out[short] = best_s, best_i

    def _count(self, expr: str) -> int:
        rows = self._call("query", self.collection, filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def _iter_where(self, expr: str, batch_size: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, vectors)`` of every entity matching ``expr``, a batch at a time."""
        with _quiet_pymilvus():
            it = self._call("query_iterator", self.collection, batch_size=batch_size, filter=expr,
                            output_fields=["id", "vec"])
        try:
            while True:
                try:
                    with _quiet_pymilvus():
                        batch = it.next()
                except Exception as exc:
                    raise GalleryError(f"reading the vectors of Milvus collection {self.collection} failed "
                                       f"({_first_line(exc)}); retry") from None
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
        self._exists, self.dim = False, None

    def close(self) -> None:
        """Release the client (a Lite folder stays open in this process until exit)."""
        with contextlib.suppress(Exception):
            self.client.close()


class _LiteTimestampFilter(logging.Filter):
    """Drops the traceback Lite's in-process gRPC server logs when pymilvus's query iterator asks it for a
    timestamp (``AllocTimestamp``, which Lite does not implement; pymilvus then uses a client-side one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NotImplementedError) and "AllocTimestamp" in _traceback_names(record))


def _traceback_names(record: logging.LogRecord) -> str:
    tb = record.exc_info[2] if record.exc_info else None
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return " ".join(names)


def _hide_lite_timestamp_errors() -> None:
    lg = logging.getLogger("grpc._server")
    if not any(isinstance(f, _LiteTimestampFilter) for f in lg.filters):
        lg.addFilter(_LiteTimestampFilter())


@contextlib.contextmanager
def _quiet_pymilvus() -> Iterator[None]:
    """pymilvus's query iterator warns on every Lite call that it uses a client-side timestamp; that is expected."""
    lg = logging.getLogger("pymilvus")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def open_backend(location: StoreLocation, collection: str, spec: MilvusIndexSpec | None = None) -> MilvusBackend:
    """Connect to a resolved Milvus location and open (or prepare) ``collection``.

    Raises:
        GalleryError: see :func:`connect` and :class:`MilvusBackend`.
    """
    return MilvusBackend(connect(location), collection, spec, lite=location.is_lite)


# ---- plugging into the coordinator ----------------------------------------------

# FAISS-style index kinds (what the SQL state records) -> Milvus kinds; parameters renamed alike.
_FROM_FAISS_KIND = {"flat": "flat", "ivf": "ivf", "ivfpq": "ivfpq", "hnsw": "hnsw", "ivfsq8": "ivfsq8",
                    "diskann": "diskann"}
_FROM_FAISS_PARAM = {"nlist": "nlist", "nprobe": "nprobe", "pq_m": "m", "hnsw_m": "M",
                     "ef_construction": "efConstruction", "ef_search": "ef", "search_list": "search_list"}


def spec_from_index_spec(spec: Any, lite: bool = False) -> MilvusIndexSpec:
    """The Milvus index for a gallery's recorded :class:`indexer.spec.IndexSpec`.

    ``flat``/``ivf``/``ivfpq``/``hnsw``/``ivfsq8``/``diskann`` become
    FLAT/IVF_FLAT/IVF_PQ/HNSW/IVF_SQ8/DISKANN with the parameters that have a
    Milvus counterpart (0 = automatic: see :meth:`MilvusIndexSpec.search_params`).

    Raises:
        GalleryError: an unknown type, or one Milvus Lite cannot build, on Lite.
    """
    if spec is None:
        return MilvusIndexSpec()
    kind = getattr(spec, "kind", "flat")
    if kind not in _FROM_FAISS_KIND:
        raise GalleryError(f"unknown index type {kind!r} for the Milvus store; choose one of {', '.join(_FROM_FAISS_KIND)}")
    kind = _FROM_FAISS_KIND[kind]
    params = []
    for name, milvus_name in _FROM_FAISS_PARAM.items():
        v = int(getattr(spec, name, 0) or 0)
        if v > 0 and milvus_name in BUILD_PARAMS[kind] + SEARCH_PARAMS[kind]:
            params.append(f"{milvus_name}={v}")
    return parse_milvus_spec(kind, params, lite=lite)


def collection_name(store_id: str | None, version: int) -> str:
    """The collection of one gallery version: ``reid_<SQL DB id>_v<version>`` (one server holds many galleries)."""
    sid = re.sub(r"[^A-Za-z0-9_]", "", store_id or "")[:32] or "gallery"
    return f"reid_{sid}_v{int(version)}"


class MilvusFactory:
    """A coordinator backend factory, ``(version, dim, spec, store_id, source) -> MilvusBackend``.

    One connection is shared by every version's backend; ``holds_vectors`` tells the
    coordinator to keep no vectors in SQL.
    """

    kind = "milvus"
    holds_vectors = True

    def __init__(self, location: StoreLocation) -> None:
        self.location = location
        self._client: Any = None

    def leftovers(self, workspace_dir: str | os.PathLike[str]) -> list[Path]:
        """The workspace's own Lite file when it holds reid-search collections (checked when the DB is empty:
        a lost or truncated DB beside them); ``[]`` otherwise. A shared file or a server holds other galleries
        too, so only the workspace's own file is checked."""
        own = Path(workspace_dir).resolve() / LITE_FILE
        if not self.location.is_lite or Path(self.location.uri or "") != own or not own.exists():
            return []
        try:
            names = self.client.list_collections()
        except Exception as exc:
            raise GalleryError(f"cannot list the collections of the Milvus Lite file {own} ({_first_line(exc)}); "
                               "check the file, or delete it to start a new gallery") from None
        return [own] if any(str(n).startswith("reid_") for n in names) else []

    def check_spec(self, spec: Any) -> None:
        """Raise ``GalleryError`` for an index type this store cannot build (IVF_PQ, DISKANN on Lite)."""
        spec_from_index_spec(spec, lite=self.location.is_lite)

    @property
    def client(self) -> Any:
        """The shared ``MilvusClient`` (connected at first use)."""
        if self._client is None:
            self._client = connect(self.location)
        return self._client

    def __call__(self, version: int, dim: int, spec: Any, store_id: str | None, source: Any) -> MilvusBackend:
        b = MilvusBackend(self.client, collection_name(store_id, version),
                          spec_from_index_spec(spec, lite=self.location.is_lite), lite=self.location.is_lite)
        if b.dim is not None and dim and b.dim != dim:
            raise GalleryError(f"the Milvus collection {b.collection} holds {b.dim}-d vectors but the gallery is {dim}-d; "
                               "re-index with `reid-search index DIR --reindex`")
        return b


def factory_for(location: StoreLocation) -> MilvusFactory | None:
    """The coordinator's backend factory for a resolved store: ``None`` (FAISS, the default) or Milvus."""
    return MilvusFactory(location) if location.kind == "milvus" else None
