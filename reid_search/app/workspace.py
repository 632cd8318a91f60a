"""The workspace folder: model pointer, gallery index, metadata DB, training runs."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from reid_search.atomic import atomic_write_json
from reid_search.errors import GalleryError, ModelError

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE = "reid-workspace"
WORKSPACE_ENV = "REID_SEARCH_WORKSPACE"
DB_ENV = "REID_SEARCH_DB"
STORE_ENV = "REID_SEARCH_STORE"


@dataclass(frozen=True)
class Workspace:
    """Paths inside one workspace; nothing is created until something is written."""

    root: Path
    db_url_override: str | None = None
    store_override: str | None = None  # --store (the CLI also reads $REID_SEARCH_STORE into it)

    @property
    def model_pointer(self) -> Path:
        """JSON file naming the models that index/query/eval use by default (see :meth:`model_path`)."""
        return self.root / "model.json"

    @property
    def index_dir(self) -> Path:
        """Folder of the FAISS index files."""
        return self.root / "index"

    @property
    def uploads_dir(self) -> Path:
        """Folder where the HTTP service keeps the images uploaded to the gallery."""
        return self.root / "uploads"

    @property
    def crops_dir(self) -> Path:
        """Folder of the crops that footage runs keep (one gallery root, ``cam{N}/{source}/``)."""
        return self.root / "crops"

    @property
    def detector_pointer(self) -> Path:
        """JSON file naming the person detector footage runs use by default (:meth:`detector`)."""
        return self.root / "detector.json"

    def set_detector(self, settings: dict[str, Any]) -> None:
        """Record the detector a footage run used (its absolute path and settings), atomically."""
        self.ensure()
        data = dict(settings)
        data["path"] = str(Path(data["path"]).resolve())
        try:
            if json.loads(self.detector_pointer.read_text()) == data:
                return
        except (OSError, ValueError):
            pass
        atomic_write_json(self.detector_pointer, data)
        log.info("workspace %s now detects people with %s", self.root, data["path"])

    def detector(self) -> dict[str, Any] | None:
        """The recorded detector settings, or None when no footage run recorded one.

        Raises:
            ModelError: the record is unreadable.
        """
        try:
            data = json.loads(self.detector_pointer.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ModelError(f"the workspace's detector record {self.detector_pointer} is unreadable ({exc}); "
                             "delete it and pass --detector FILE.onnx") from None
        if not isinstance(data, dict) or not data.get("path"):
            raise ModelError(f"the workspace's detector record {self.detector_pointer} names no detector; "
                             "delete it and pass --detector FILE.onnx")
        return data

    def remove_owned_files(self, paths: Iterable[str | os.PathLike[str]]) -> int:
        """Delete those of ``paths`` the workspace itself stored (uploads and footage crops); the user's
        own files stay. Call after the rows are committed gone. Returns how many were deleted."""
        paths = list(paths)
        n = self.remove_uploads(paths)
        crops = self.crops_dir.resolve()
        for p in paths:
            p = Path(p)
            if not p.resolve().is_relative_to(crops):
                continue
            try:
                p.unlink()
                n += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not delete the crop %s (%s)", p, exc.strerror)
        return n

    def remove_uploads(self, paths: Iterable[str | os.PathLike[str]]) -> int:
        """Delete those of ``paths`` that the service stored under :attr:`uploads_dir` (others are the
        user's own files and stay); call after the rows are committed gone. Returns how many were deleted."""
        uploads = self.uploads_dir.resolve()
        n = 0
        for p in paths:
            p = Path(p)
            if p.parent.resolve() != uploads:
                continue
            try:
                p.unlink()
                n += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not delete the uploaded file %s (%s)", p, exc.strerror)
        return n

    @property
    def runs_dir(self) -> Path:
        """Default parent of training output folders."""
        return self.root / "runs"

    @property
    def db_url(self) -> str:
        """SQLAlchemy URL of the metadata DB: --db, else $REID_SEARCH_DB, else SQLite in the workspace."""
        if self.db_url_override:
            return self.db_url_override
        env = os.environ.get(DB_ENV)
        if env:
            return env
        return f"sqlite:///{(self.root / 'reid.db').resolve()}"

    @property
    def store_pointer(self) -> Path:
        """JSON file naming the store the gallery lives in (written when the gallery is first opened)."""
        return self.root / "store.json"

    def recorded_store(self) -> str | None:
        """The ``--store`` value recorded in ``store.json`` (``None`` if none is recorded).

        Raises:
            GalleryError: an unreadable ``store.json``.
        """
        try:
            data = json.loads(self.store_pointer.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise GalleryError(f"the workspace's store record {self.store_pointer} is unreadable ({exc}); "
                               "restore it, or delete it and pass --store") from None
        v = data.get("store") if isinstance(data, dict) else None
        return str(v) if v else None

    def _has_faiss_gallery(self) -> bool:
        """A workspace from before stores were recorded: its gallery is FAISS."""
        return self.index_dir.is_dir() or (self.db_url_override is None and not os.environ.get(DB_ENV)
                                           and (self.root / "reid.db").is_file())

    def store(self) -> Any:
        """Where the gallery lives, as an :class:`indexer.location.StoreLocation` (workspace default resolved).

        The recorded store wins; ``--store``/``$REID_SEARCH_STORE`` picks one for a new
        gallery and must otherwise agree with the record. A plug-in store (``NAME:URI``) is
        recorded like a built-in one, so a record naming a plug-in that is not installed
        is refused, never opened as another store.

        Raises:
            GalleryError: a ``--store`` that is not where this workspace's gallery lives, a bad value,
                or a record naming a store that is not here.
        """
        from indexer.location import parse_store

        asked = self.store_override if self.store_override is not None else os.environ.get(STORE_ENV)
        recorded = self.recorded_store()
        if recorded is None and self._has_faiss_gallery():
            recorded = "faiss"
        want = parse_store(asked).resolved(self.root) if asked else None
        if recorded is not None:
            try:
                have = parse_store(recorded).resolved(self.root)
            except GalleryError as exc:
                raise GalleryError(f"the gallery of workspace {self.root} is recorded in {self.store_pointer} as "
                                   f"living in a store that is not here: {exc}") from None
            if want is not None and want != have:
                raise GalleryError(
                    f"the gallery of workspace {self.root} lives in --store {have.to_str()}, not {want.to_str()}; "
                    "drop --store (and $REID_SEARCH_STORE), or use another --workspace for another store"
                )
            return have
        return want if want is not None else parse_store("faiss")

    def record_store(self, location: Any) -> None:
        """Write ``store.json`` (atomically) naming ``location`` (any kind, plug-ins too); no-op when it says so already."""
        value = location.to_str()
        if location.kind == "milvus" and location.uri == str(self.root.resolve() / "milvus.db"):
            value = "milvus:"  # the workspace's own Lite file: stays right if the workspace moves
        if self.recorded_store() == value:
            return
        self.ensure()
        atomic_write_json(self.store_pointer, {"store": value})
        log.info("workspace %s: the gallery lives in %s", self.root, value)

    def ensure(self) -> "Workspace":
        """Create the workspace folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def _pointer(self) -> dict[str, Any]:
        """``model.json``: ``{"path": trained model, "gallery": {"path", "fingerprint"[, "preprocess"]}}``
        (either may be absent; ``preprocess`` only for ONNX models, written since it could be declared)."""
        try:
            data = json.loads(self.model_pointer.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ModelError(f"the workspace's model pointer {self.model_pointer} is unreadable ({exc}); "
                             "delete it and pass --model") from None
        return data if isinstance(data, dict) else {}

    def set_model(self, path: str | os.PathLike[str]) -> None:
        """Point the workspace at ``path``, e.g. a freshly trained model (atomically).

        The record of the model that built the gallery is kept: queries keep using
        it until the gallery is re-indexed.
        """
        self.ensure()
        data = self._pointer()
        data["path"] = str(Path(path).resolve())
        atomic_write_json(self.model_pointer, data)
        log.info("workspace %s now uses model %s", self.root, path)

    def set_gallery_model(self, path: str | os.PathLike[str], fingerprint: str,
                          preprocess: dict[str, Any] | None = None) -> None:
        """Record that the model at ``path`` (with ``fingerprint``) built the gallery (atomically).

        ``preprocess``: the ONNX model's resolved preprocessing (``Preprocess.to_dict()``),
        so that later commands feed it the same (:meth:`gallery_preprocess`).
        """
        self.ensure()
        data = self._pointer()
        entry: dict[str, Any] = {"path": str(Path(path).resolve()), "fingerprint": fingerprint}
        if preprocess is not None:
            entry["preprocess"] = dict(preprocess)
        if data.get("gallery") == entry:
            return
        data["gallery"] = entry
        atomic_write_json(self.model_pointer, data)
        log.info("workspace %s: the gallery is embedded with model %s (%s)", self.root, path, fingerprint)

    def gallery_model(self) -> tuple[Path, str] | None:
        """``(path, fingerprint)`` of the model recorded as having built the gallery, if any."""
        g = self._pointer().get("gallery")
        if not isinstance(g, dict) or "path" not in g:
            return None
        return Path(g["path"]), str(g.get("fingerprint", ""))

    def gallery_preprocess(self, path: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The preprocessing recorded with the gallery for the model file at ``path`` (a symlink counts
        as its target), as ``Preprocess.to_dict()`` wrote it; None when the gallery is another model's,
        or its record has none (a checkpoint, or a workspace from before it was recorded).

        Raises:
            ModelError: an unreadable ``model.json``, or a recorded preprocessing that is not an object.
        """
        g = self._pointer().get("gallery")
        if not isinstance(g, dict) or "preprocess" not in g or not g.get("path"):
            return None
        if Path(g["path"]) != Path(path).resolve():
            return None
        pre = g["preprocess"]
        if not isinstance(pre, dict):
            raise ModelError(f"the workspace's model record {self.model_pointer} holds a preprocess that is not an "
                             "object; re-index with `reid-search index FOLDER --reindex` (or delete the record)")
        return pre

    def model_path(self, explicit: str | os.PathLike[str] | None = None, *, gallery: bool = True) -> Path:
        """The model to use: ``explicit`` if given, else the workspace's.

        The workspace knows two: the model that built the gallery (recorded by
        ``index``) and the one ``train`` last made. ``gallery=True`` (query, eval,
        embed, serve, incremental index) prefers the first, so features stay
        comparable with the gallery's; ``gallery=False`` (``index --reindex``,
        export) prefers the trained one. Either falls back to the other.

        Raises:
            ModelError: none exists, with the command that fixes it.
        """
        if explicit is not None:
            p = Path(explicit)
            if not p.is_file():
                raise ModelError(f"no model at {p}: pass an existing checkpoint (.pt) or ONNX file (.onnx)")
            return p
        data = self._pointer()
        g = data.get("gallery") if isinstance(data.get("gallery"), dict) else {}
        candidates = [g.get("path"), data.get("path")] if gallery else [data.get("path"), g.get("path")]
        known = [Path(c) for c in candidates if c]
        if not known:
            raise ModelError(
                f"no model in workspace {self.root}: run `reid-search train` or pass --model CHECKPOINT"
            )
        for p in known:
            if p.is_file():
                return p
        raise ModelError(f"the workspace's model {known[0]} is gone: run `reid-search train` again or pass --model")
