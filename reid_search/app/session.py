"""What the CLI and the service share for working on a workspace: opening its gallery.

The store (:mod:`indexer`) knows nothing of workspaces; this is where a
workspace's paths, its DB URL and its recorded store become the plain values
:func:`indexer.store.open_gallery` takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reid_search.app.workspace import Workspace

if TYPE_CHECKING:  # the store's modules load when a gallery is opened, not with the CLI
    from indexer.coordinator import Gallery
    from indexer.protocol import BackendFactory
    from indexer.spec import IndexSpec


def open_workspace_gallery(ws: Workspace, *, spec: IndexSpec | None = None, save_interval: float = 30.0,
                           backend_factory: BackendFactory | None = None) -> Gallery:
    """Open (creating if needed) the gallery of workspace ``ws``.

    The vectors live in the workspace's store (``--store``: FAISS files under
    its index folder by default, or Milvus), recorded in the workspace the first
    time a writable gallery is opened; ``backend_factory`` opens another backend
    instead (and records nothing). A workspace's own Milvus Lite file counts as
    a gallery beside an empty DB, as the FAISS files do.

    Raises:
        GalleryError: a ``--store`` that disagrees with the recorded one, and
            whatever :func:`indexer.store.open_gallery` raises.
    """
    from indexer.store import open_gallery

    location = ws.store() if backend_factory is None else None  # read before anything creates the workspace's files
    gallery = open_gallery(ws.db_url, ws.index_dir, location=location, backend_factory=backend_factory,
                           save_interval=save_interval, workspace_dir=ws.root)
    if location is not None and not gallery.meta.read_only:
        ws.record_store(location)
    if spec is not None and spec != gallery.spec:
        gallery.set_spec(spec)
    return gallery
