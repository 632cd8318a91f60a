"""Where a gallery's vectors live: the parsed ``--store`` value (pure, no pymilvus, no plug-in loaded).

A store is named ``NAME:URI``: the built-ins ``faiss`` and ``milvus`` (with
today's short forms: ``milvus:``, ``milvus:PATH.db``, ``http(s)://HOST:19530``)
and the plug-ins installed as entry points in :data:`PLUGIN_GROUP` (see
:mod:`indexer.protocol`). Parsing only reads the plug-ins' names; a plug-in
is loaded when its store is opened (:func:`indexer.store.factory_for`).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from reid_search.errors import GalleryError

log = logging.getLogger(__name__)

LITE_FILE = "milvus.db"  # default Milvus Lite folder inside a workspace
PLUGIN_GROUP = "reid_search.backends"  # entry-point group of third-party store plug-ins
BUILTIN_STORES = ("faiss", "milvus")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_.+-]*$")

# ---- where the store lives ---------------------------------------------------


@dataclass(frozen=True)
class StoreLocation:
    """Which store a gallery lives in (parsed ``--store``).

    ``kind`` is the store's name: ``faiss``, ``milvus`` or an installed plug-in's.
    For Milvus, ``uri`` is a server URL or the absolute path of a Milvus Lite folder
    (ending in ``.db``); ``None`` means the workspace's own Lite file
    (``<workspace>/milvus.db``), resolved with :meth:`resolved`. For a plug-in,
    ``uri`` is what followed ``NAME:``, as written (``None`` when nothing did).
    ``home`` is the gallery's own folder (the workspace's index folder), filled in
    when the store is opened, for a store that keeps files there; it is not part
    of the location's identity (equality, :meth:`to_str`).
    """

    kind: str = "faiss"
    uri: str | None = None
    home: str | None = field(default=None, compare=False)

    @property
    def is_lite(self) -> bool:
        """True for Milvus Lite (a local folder)."""
        return self.kind == "milvus" and not is_server_uri(self.uri or "")

    def resolved(self, workspace_dir: str | os.PathLike[str]) -> "StoreLocation":
        """The location with the workspace default filled in (Milvus Lite; a plug-in resolves its own)."""
        if self.kind == "milvus" and self.uri is None:
            return StoreLocation("milvus", str(Path(workspace_dir).resolve() / LITE_FILE), self.home)
        return self

    def to_str(self) -> str:
        """The ``--store`` value that names this location."""
        if self.kind == "faiss":
            return "faiss"
        if self.kind == "milvus" and self.uri is not None and is_server_uri(self.uri):
            return self.uri
        return f"{self.kind}:{self.uri or ''}"


def is_server_uri(uri: str) -> bool:
    """Whether ``uri`` names a Milvus server rather than a Lite file."""
    return uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:"))


def plugin_entry_points() -> dict[str, metadata.EntryPoint]:
    """The installed store plug-ins by name (lower case), read now from :data:`PLUGIN_GROUP`.

    A plug-in named like a built-in store, or a second one of a name, is ignored (logged).
    Nothing is imported: :meth:`importlib.metadata.EntryPoint.load` is the opener's.
    """
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        name = ep.name.strip().lower()
        if name in BUILTIN_STORES or name in found or not _NAME_RE.match(name):
            log.warning("ignoring the store plug-in %r (%s): the name is %s", ep.name, ep.value,
                        "taken" if name in BUILTIN_STORES or name in found else "not a store name")
            continue
        found[name] = ep
    return found


def store_names() -> list[str]:
    """Every store ``--store`` can name: the built-ins, then the installed plug-ins (sorted)."""
    return [*BUILTIN_STORES, *sorted(plugin_entry_points())]


def unknown_store(value: str | None, names: list[str]) -> GalleryError:
    """The one-line error for a ``--store`` value that names no store, listing the names there are."""
    return GalleryError(f"--store {value!r}: use faiss, milvus: (Milvus Lite in the workspace), milvus:PATH.db, "
                        f"http://HOST:19530 (a Milvus server), or NAME:URI for a plug-in store; the stores "
                        f"here are {', '.join(names)} (plug-ins: entry points in group {PLUGIN_GROUP})")


def parse_store(value: str | None) -> StoreLocation:
    """Parse ``--store`` (or ``$REID_SEARCH_STORE``): ``faiss``, ``milvus:``, ``milvus:PATH.db``, ``http://HOST:19530``,
    or ``NAME:URI`` (``NAME`` alone: no URI) of an installed plug-in.

    Raises:
        GalleryError: anything else, listing the store names (built-ins and installed plug-ins).
    """
    v = (value or "faiss").strip()
    if v.lower() in ("faiss", "faiss:"):
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
    name, _, uri = v.partition(":")
    name = name.strip().lower()
    if name == "faiss":
        raise GalleryError(f"--store {value!r}: the faiss store takes no URI (its files live in the index folder)")
    plugins = plugin_entry_points()
    if name not in plugins:
        raise unknown_store(value, [*BUILTIN_STORES, *sorted(plugins)])
    return StoreLocation(name, uri or None)
