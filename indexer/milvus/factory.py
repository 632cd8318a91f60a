"""The Milvus backend factory the coordinator opens gallery versions with."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from indexer.location import LITE_FILE, StoreLocation
from indexer.milvus.backend import MilvusBackend
from indexer.milvus.client import connect, milvus_error
from indexer.milvus.spec import check_milvus_spec
from indexer.protocol import BackendFactory, VectorSource
from reid_search.errors import GalleryError

log = logging.getLogger(__name__)


def collection_name(store_id: str | None, version: int) -> str:
    """The collection of one gallery version: ``reid_<SQL DB id>_v<version>`` (one server holds many galleries)."""
    sid = re.sub(r"[^A-Za-z0-9_]", "", store_id or "")[:32] or "gallery"
    return f"reid_{sid}_v{int(version)}"


class MilvusFactory(BackendFactory):
    """The Milvus store: one collection per gallery version (see :func:`collection_name`).

    One connection is shared by every version's backend; ``holds_vectors`` tells the
    coordinator to keep no vectors in SQL. The collections of replaced versions are
    dropped through their backends, so :meth:`cleanup` has nothing left to do.
    """

    kind = "milvus"
    holds_vectors = True

    def __init__(self, location: StoreLocation) -> None:
        self.location = location
        self._client: Any = None

    def leftovers(self, workspace_dir: str | os.PathLike[str] | None) -> list[Path]:
        """The workspace's own Lite file when it holds reid-search collections (checked when the DB is empty:
        a lost or truncated DB beside them); ``[]`` otherwise. A shared file or a server holds other galleries
        too, so only the workspace's own file is checked.

        Raises:
            GalleryError: the workspace's Lite file cannot be read.
        """
        if workspace_dir is None:
            return []
        own = Path(workspace_dir).resolve() / LITE_FILE
        if not self.location.is_lite or Path(self.location.uri or "") != own or not own.exists():
            return []
        try:
            names = self.client.list_collections()
        except Exception as exc:
            raise GalleryError(f"cannot list the collections of the Milvus Lite file {own} ({milvus_error(exc)}); "
                               "check the file, or delete it to start a new gallery") from None
        return [own] if any(str(n).startswith("reid_") for n in names) else []

    def check_spec(self, spec: Any) -> None:
        """Raise ``GalleryError`` for an index type this store cannot build (IVF_PQ, DISKANN on Lite)."""
        check_milvus_spec(spec, lite=self.location.is_lite)

    @property
    def client(self) -> Any:
        """The shared ``MilvusClient`` (connected at first use)."""
        if self._client is None:
            self._client = connect(self.location)
        return self._client

    def cleanup(self, keep: set[int]) -> None:
        """Nothing: a Milvus store keeps nothing outside its collections."""

    def __call__(self, version: int, dim: int, spec: Any, store_id: str | None, source: VectorSource) -> MilvusBackend:
        """The collection of ``version`` (created at its first add).

        Raises:
            GalleryError: an unreachable Milvus, or a collection of another dimension.
        """
        b = MilvusBackend(self.client, collection_name(store_id, version), spec, lite=self.location.is_lite)
        if b.dim is not None and dim and b.dim != dim:
            raise GalleryError(f"the Milvus collection {b.collection} holds {b.dim}-d vectors but the gallery is {dim}-d; "
                               "re-index with `reid-search index DIR --reindex`")
        return b
