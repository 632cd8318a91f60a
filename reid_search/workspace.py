"""The workspace folder: model pointer, gallery index, metadata DB, training runs."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from reid_search.atomic import atomic_write_json
from reid_search.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE = "reid-workspace"
WORKSPACE_ENV = "REID_SEARCH_WORKSPACE"
DB_ENV = "REID_SEARCH_DB"


@dataclass(frozen=True)
class Workspace:
    """Paths inside one workspace; nothing is created until something is written."""

    root: Path
    db_url_override: str | None = None

    @property
    def model_pointer(self) -> Path:
        """JSON file naming the model that index/query/eval use by default."""
        return self.root / "model.json"

    @property
    def index_dir(self) -> Path:
        """Folder of the FAISS index files."""
        return self.root / "index"

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

    def ensure(self) -> "Workspace":
        """Create the workspace folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def set_model(self, path: str | os.PathLike[str]) -> None:
        """Point the workspace at ``path`` (atomically)."""
        self.ensure()
        atomic_write_json(self.model_pointer, {"path": str(Path(path).resolve())})
        log.info("workspace %s now uses model %s", self.root, path)

    def model_path(self, explicit: str | os.PathLike[str] | None = None) -> Path:
        """The model to use: ``explicit`` if given, else the workspace's.

        Raises:
            ModelError: neither exists, with the command that fixes it.
        """
        if explicit is not None:
            p = Path(explicit)
            if not p.is_file():
                raise ModelError(f"no model at {p}: pass an existing checkpoint (.pt) or ONNX file (.onnx)")
            return p
        if not self.model_pointer.is_file():
            raise ModelError(
                f"no model in workspace {self.root}: run `reid-search train` or pass --model CHECKPOINT"
            )
        p = Path(json.loads(self.model_pointer.read_text())["path"])
        if not p.is_file():
            raise ModelError(f"the workspace's model {p} is gone: run `reid-search train` again or pass --model")
        return p
