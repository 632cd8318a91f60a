"""Connecting to Milvus (Lite or a server): retries, Lite's process lock, and the noise pymilvus logs."""

from __future__ import annotations

import contextlib
import logging
import time
import os
from pathlib import Path
from typing import Any, Iterator


from reid_search.errors import GalleryError, first_line
from indexer.location import StoreLocation

log = logging.getLogger(__name__)

TOKEN_ENV = "REID_SEARCH_MILVUS_TOKEN"


def milvus_error(exc: BaseException) -> str:
    """A pymilvus error's message on one line."""
    return first_line(exc, with_type=False)


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
                log.warning("connecting to Milvus Lite %s failed (%s); trying again", uri, milvus_error(exc))
                time.sleep(attempt)
    hint = ("check that the server is up and the URL right, and set REID_SEARCH_MILVUS_TOKEN if it needs a token"
            if not location.is_lite else "check the path, or delete a folder that is not a Milvus Lite store")
    raise GalleryError(f"cannot open the Milvus store {uri} ({milvus_error(error)}); {hint}") from None



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
def quiet_pymilvus() -> Iterator[None]:
    """pymilvus's query iterator warns on every Lite call that it uses a client-side timestamp; that is expected."""
    lg = logging.getLogger("pymilvus")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


