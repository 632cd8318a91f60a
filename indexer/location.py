"""Where a gallery's vectors live: the parsed ``--store`` value (pure, no pymilvus)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path


from reid_search.errors import GalleryError

log = logging.getLogger(__name__)

LITE_FILE = "milvus.db"  # default Milvus Lite folder inside a workspace

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


