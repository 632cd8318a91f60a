"""What the CLI and the service do with a workspace: open its gallery, its model and a search
engine over both; (re-)index a folder into it. Searching, evaluating and calibrating are in
:mod:`reid_search.app.searching`.

Both front ends call these functions, so a gallery, an extractor or an engine is built one
way only, and every app path opens a gallery through :func:`open_workspace_gallery`. The
functions return results and raise :class:`~reid_search.errors.ReidSearchError`; printing
is the caller's. Heavy modules (torch, faiss, SQLAlchemy) are imported inside the
functions: the CLI imports this module for ``--help`` too.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Mapping, Sequence

from reid_search.app.workspace import Workspace

if TYPE_CHECKING:
    from indexer.pipeline import IndexReport
    from indexer.coordinator import Gallery
    from indexer.protocol import BackendFactory
    from indexer.spec import IndexSpec
    from reid_search.engine import SearchEngine
    from reid_search.extract import Extractor
    from reid_search.gallery import GalleryReader
    from reid_search.transforms import Preprocess

log = logging.getLogger(__name__)


# ---- the gallery: every app path opens it here ----------------------------------------------------------


def open_workspace_gallery(ws: Workspace, *, spec: IndexSpec | None = None, save_interval: float = 30.0,
                           backend_factory: BackendFactory | None = None) -> Gallery:
    """Open (creating if needed) the gallery of workspace ``ws``.

    The vectors live in the workspace's store (``--store``: FAISS files under
    its index folder by default, Milvus, or an installed plug-in's ``NAME:URI``),
    recorded in the workspace the first time a writable gallery is opened;
    ``backend_factory`` opens another backend instead (and records nothing: the
    DB's rows then still tell a later open with the wrong kind of store, which is
    refused). A workspace's own Milvus Lite file counts as a gallery beside an
    empty DB, as the FAISS files do.

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


# ---- the model and the engine ------------------------------------------------------------------------------


def open_extractor(ws: Workspace, model: Path | None = None, *, device: str = "auto", flip: bool = False,
                   precision: str = "auto", for_gallery: bool = True,
                   preprocess: Mapping[str, Any] | None = None) -> tuple[Path, Extractor]:
    """The model file to use (``model``, else the workspace's: see :meth:`Workspace.model_path`,
    ``for_gallery`` is its ``gallery``) and the extractor opened from it.

    ``preprocess``: what an ONNX model expects, in the keys of a ``MODEL.onnx.json`` sidecar
    (:mod:`reid_search.preprocess`; the ``--input-*`` options). With ``for_gallery``, the
    model that built the gallery is fed the preprocessing recorded with it
    (:func:`record_gallery_model`), so a query embeds as the gallery did even where the
    sidecar it was indexed with is not beside the file; ``preprocess`` may repeat that, not
    change it. Without ``for_gallery`` (a re-index) ``preprocess`` replaces the record, and
    without ``preprocess`` the record is used where the model's own declaration agrees.

    Raises:
        ModelError: no model, an unreadable one, a precision it cannot run at, a bad
            ``preprocess`` or one given for a checkpoint, or a ``preprocess`` (or a
            sidecar, or metadata) that contradicts the one recorded with the gallery.
    """
    from reid_search.extractors import load_extractor

    model_file = ws.model_path(model, gallery=for_gallery)
    if for_gallery and not flip and _gallery_flipped(ws, model_file):
        # Flip TTA enters the fingerprint: the gallery's model embeds queries as it embedded the gallery.
        log.info("the gallery was indexed with flip TTA: queries use it too")
        flip = True
    recorded = None if not for_gallery and preprocess else _recorded_preprocess(ws, model_file)
    if recorded is None:
        return model_file, load_extractor(model_file, device=device, flip=flip, precision=precision,
                                          preprocess=preprocess or None)
    if preprocess:
        _check_against_recorded(ws, model_file, recorded, preprocess)
    from reid_search.errors import ModelError

    try:
        extractor = load_extractor(model_file, device=device, flip=flip, precision=precision, preprocess=recorded)
    except ModelError as exc:
        text = str(exc)
        if "declared preprocessing says" not in text:
            raise
        if not for_gallery:  # a re-index follows the model's own (changed) declaration
            return model_file, load_extractor(model_file, device=device, flip=flip, precision=precision)
        # The model's own declaration (sidecar, metadata) changed since the gallery was indexed.
        raise ModelError(f"{text.split('; ')[0]}, where the declared preprocessing is the one the gallery was indexed "
                         f"with (recorded in {ws.model_pointer}); restore the model's declaration, or re-index with "
                         "`reid-search index FOLDER --reindex`") from None
    return model_file, extractor


def _gallery_flipped(ws: Workspace, model_file: Path) -> bool:
    """Whether the gallery was embedded by ``model_file`` with flip TTA (its recorded fingerprint says so)."""
    rec = ws.gallery_model()
    return rec is not None and rec[0] == model_file.resolve() and rec[1].endswith("+flip")


def record_gallery_model(ws: Workspace, model_file: Path, extractor: Extractor) -> None:
    """Record in ``ws`` that ``model_file`` built the gallery, with an ONNX model's resolved preprocessing
    (checkpoints carry theirs), which :func:`open_extractor` then feeds it again.

    Raises:
        ModelError: an unreadable ``model.json``.
        OSError: it cannot be written.
    """
    pre = extractor.preprocess.to_dict() if model_file.suffix.lower() == ".onnx" else None
    ws.set_gallery_model(model_file, extractor.fingerprint, pre)


def _recorded_preprocess(ws: Workspace, model_file: Path) -> Preprocess | None:
    from reid_search.errors import ModelError
    from reid_search.transforms import Preprocess

    raw = ws.gallery_preprocess(model_file)
    if raw is None:
        return None
    try:
        return Preprocess.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"the preprocessing recorded in {ws.model_pointer} is unusable ({type(exc).__name__}: {exc}); "
                         "re-index with `reid-search index FOLDER --reindex`") from None


def _check_against_recorded(ws: Workspace, model_file: Path, recorded: Preprocess, declared: Mapping[str, Any]) -> None:
    """Refuse declared values that differ from the preprocessing the gallery was indexed with."""
    from reid_search.errors import ModelError
    from reid_search.preprocess import KEYS, parse_declaration

    values = parse_declaration(declared, f"{model_file.name}: declared preprocessing",
                               f"use the keys {', '.join(KEYS)}", strict=True)
    for key, field in KEYS.items():
        if field in values and not _same(values[field], getattr(recorded, field)):
            raise ModelError(f"{model_file.name}: {key}={_show(values[field])} is not the preprocessing the gallery "
                             f"was indexed with ({key}={_show(getattr(recorded, field))}, recorded in "
                             f"{ws.model_pointer}); drop it, or re-index with `reid-search index FOLDER --reindex`")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return bool(a == b)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    if isinstance(value, float):
        return "1/255" if math.isclose(value, 1 / 255) else f"{value:g}"
    return str(value)


def search_engine(ws: Workspace, gallery: GalleryReader, extractor: Extractor) -> SearchEngine:
    """A search engine over ``gallery`` with ``extractor``, caching re-ranking structures in the workspace.

    Raises:
        GalleryError: the gallery is empty or was indexed with another model.
    """
    from reid_search.engine import SearchEngine

    return SearchEngine(gallery, extractor, cache_dir=ws.index_dir)


def open_engine(ws: Workspace, model: Path | None = None, device: str = "auto", precision: str = "auto",
                preprocess: Mapping[str, Any] | None = None) -> SearchEngine:
    """The workspace's gallery with ``model``, else the model that built the gallery (close ``engine.store``).

    ``preprocess``: see :func:`open_extractor`.

    Raises:
        GalleryError: the gallery is empty (run ``reid-search index``) or of another model.
        ModelError: no usable model.
    """
    gallery = open_workspace_gallery(ws)
    try:
        if gallery.ntotal == 0:
            from reid_search.errors import GalleryError

            raise GalleryError(f"the gallery of workspace {ws.root} is empty: run `reid-search index FOLDER` first")
        _, extractor = open_extractor(ws, model, device=device, precision=precision, preprocess=preprocess)
        return search_engine(ws, gallery, extractor)
    except BaseException:
        gallery.close()
        raise


def default_query_dir(engine: SearchEngine, remedy: str) -> Path:
    """``query/`` beside the indexed gallery folder.

    Raises:
        DataError: there is none (the message ends with ``remedy``).
    """
    from reid_search.data import QUERY_DIR
    from reid_search.errors import DataError

    roots = sorted({m.root for batch in engine.store.iter_metadata() for m in batch})
    candidates = [r.parent / QUERY_DIR for r in roots if (r.parent / QUERY_DIR).is_dir()]
    if not candidates:
        raise DataError(f"no query/ folder beside the indexed gallery; {remedy}")
    return candidates[0]


def calibrated_threshold(ws: Workspace, fingerprint: str, rerank: bool) -> float | None:
    """The threshold ``reid-search calibrate`` saved in ``ws`` for this model and distance kind, or None.

    Raises:
        GalleryError: the thresholds file is unreadable.
    """
    from reid_search.thresholds import load_calibration

    cal = load_calibration(ws.root, fingerprint, rerank)
    return None if cal is None else cal.threshold


# ---- indexing ----------------------------------------------------------------------------------------------

Progress = Callable[[int, str], ContextManager[Callable[[int], None]]]
"""Opens a progress display for ``(total, what)``; yields the ``advance(n)`` callback."""

# Above this size the cached re-ranking structures are built on the first
# `query --rerank` instead of at the end of every index run.
RERANK_PRECOMPUTE_LIMIT = 200_000


@dataclass
class IndexResult:
    """What :func:`index_workspace` did: the pipeline's report and the gallery afterwards."""

    report: IndexReport
    gallery: str  # the gallery's one-line description
    compile_seconds: float | None = None  # torch.compile's share of the run, when it compiled


def check_index_args(folder: Path, manifest: Path | None = None) -> None:
    """Refuse a bad FOLDER or manifest before anything slow (the model, the gallery) is opened.

    Raises:
        DataError: a missing folder, a file given as the folder, or a missing manifest.
    """
    from indexer.pipeline import check_folder
    from reid_search.errors import DataError

    check_folder(folder)
    if manifest is not None and not manifest.is_file():
        raise DataError(f"no manifest at {manifest}: pass a CSV or JSON Lines file with a `path` column")


def index_workspace(
    ws: Workspace,
    folder: Path,
    *,
    model: Path | None = None,
    manifest: Path | None = None,
    index_type: str | None = None,
    index_params: Sequence[str] = (),
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    flip: bool = False,
    precision: str = "auto",
    prune: bool = False,
    reindex: bool = False,
    commit_every: int = 1024,
    progress: Progress | None = None,
    on_done: Callable[[IndexResult], None] | None = None,
    preprocess: Mapping[str, Any] | None = None,
) -> IndexResult:
    """Add the images under ``folder`` to the workspace's gallery (see ``reid-search index``), or with
    ``reindex`` build a new gallery of it beside the old one and switch to it.

    The model that indexed is recorded in the workspace, with an ONNX model's preprocessing
    (``preprocess``, the model's sidecar or metadata: see :func:`open_extractor`). ``on_done`` is called once the change
    is committed, before the re-ranking cache is brought up to date (which never fails the run).

    Raises:
        DataError: a bad folder or manifest, a bad index parameter, nothing could be indexed
            (with ``reindex`` the old gallery stays whole).
        GalleryError: the gallery was indexed with another model (and not ``reindex``).
        ModelError: no usable model.
    """
    from indexer.spec import parse_index_spec
    from indexer.pipeline import index_folder
    from reid_search.data import iter_image_paths
    from reid_search.errors import GalleryError

    check_index_args(folder, manifest)
    model_file, extractor = open_extractor(ws, model, device=device, flip=flip, precision=precision,
                                           for_gallery=not reindex, preprocess=preprocess)
    ws.ensure()
    store = open_workspace_gallery(ws)
    try:
        spec = None
        if index_type is not None or index_params:
            spec = parse_index_spec(index_type or store.spec.kind, tuple(index_params), base=store.spec)
        extra = {"manifest": manifest} if manifest is not None else {}
        with (progress or no_progress)(sum(1 for _ in iter_image_paths(folder)), "index") as advance:
            report = index_folder(store, folder, extractor, batch_size=batch_size, num_workers=workers,
                                  prune=prune, reindex=reindex, spec=spec,
                                  commit_every=commit_every, progress=advance, **extra)
        if report.usable == 0:  # an incremental run (a re-index refuses this itself, keeping the old gallery)
            raise GalleryError(report.nothing_indexed())
        record_gallery_model(ws, model_file, extractor)
        result = IndexResult(report, store.describe(), getattr(extractor, "compile_seconds", None))
        if on_done is not None:
            on_done(result)
        refresh_rerank(ws, store)
        return result
    finally:
        store.close()


@contextlib.contextmanager
def no_progress(_total: int, _what: str):
    """A :data:`Progress` that shows nothing."""
    yield lambda _n: None


def refresh_rerank(ws: Workspace, store: GalleryReader) -> None:
    """Keep the gallery's k-reciprocal structures (used by `query --rerank`) in step with the gallery.

    Runs after the change is committed, so it never fails the command: a cache
    that cannot be rebuilt now is rebuilt by the next `query --rerank`.
    """
    from reid_search.engine import RERANK_CACHE, refresh_rerank_cache

    cache = ws.index_dir / RERANK_CACHE
    try:
        if store.ntotal > RERANK_PRECOMPUTE_LIMIT:
            cache.unlink(missing_ok=True)
            return
        refresh_rerank_cache(store, ws.index_dir)
    except Exception as exc:  # noqa: BLE001 - the gallery change is committed; the cache is optional
        log.warning("could not rebuild the re-ranking cache %s (%s: %s); `query --rerank` will rebuild it",
                    cache, type(exc).__name__, exc)
        with contextlib.suppress(OSError):
            cache.unlink(missing_ok=True)
