"""The service's app: :func:`create_app` opens the workspace and assembles the routers.

The routes live in :mod:`reid_search.app.service.routes` (one router per resource) and
get what they need through the dependencies of :mod:`reid_search.app.service.deps`, which
read ``app.state``; each route's parameters are one model of
:mod:`reid_search.app.service.params`. Query parameters and form fields a route does not
declare are refused (422).
"""

# No `from __future__ import annotations`: FastAPI reads the signatures at runtime.
import asyncio
import contextlib
import logging
import threading
from pathlib import Path
from typing import Any, Mapping

from fastapi import Depends, FastAPI, Request

from reid_search.app.service.batching import QueryBatcher
from reid_search.app.service.core import QueryJob, SearchCore
from reid_search.app.service.deps import ModelThread, check_api_key
from reid_search.app.service.guard import ApiError, GuardMiddleware, ServiceLimits, as_api_error, json_response
from reid_search.app.service.routes import ROUTERS
from reid_search.app.workspace import Workspace
from reid_search.limits import (
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_UPLOAD_BYTES,
)

log = logging.getLogger(__name__)


def create_app(
    workspace: Workspace,
    *,
    model: Path | None = None,
    device: str = "auto",
    flip: bool = False,
    api_key: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_files: int = DEFAULT_MAX_FILES,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    max_queue: int = DEFAULT_MAX_QUEUE,
    refresh_interval_s: float = 1.0,
    precision: str = "auto",
    preprocess: Mapping[str, Any] | None = None,
) -> FastAPI:
    """The search service of ``workspace`` as a FastAPI app (serve it with uvicorn, one worker).

    The gallery and the model are opened here, so misconfiguration fails before
    serving; they are closed when the app shuts down.
    ``preprocess``: an ONNX model's declared preprocessing (the ``--input-*`` options; see
    :func:`reid_search.app.session.open_extractor`).

    Raises:
        ReidSearchError: no or unreadable model, unusable DB, a gallery of another model.
        ValueError: a limit below 1 (``max_wait_ms`` below 0).
    """
    settings = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_queue": max_queue,
                "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_files": max_files,
                "api_key_required": api_key is not None}
    _check_settings(settings, api_key)
    limits = ServiceLimits(max_upload_bytes, max_pixels, max_files)
    core = SearchCore(workspace, model, device, flip, refresh_interval_s, precision, preprocess)
    try:
        core.uploads.mkdir(parents=True, exist_ok=True)
        core.sweep_uploads()
    except OSError as exc:  # a read-only workspace still serves queries
        log.warning("cannot write %s (%s): POST /gallery will fail", core.uploads, exc.strerror)
    model_thread = ModelThread()
    batcher: QueryBatcher[QueryJob, Any] = QueryBatcher(core.search_batch, model_thread.executor, max_batch=max_batch,
                                                        max_wait_s=max_wait_ms / 1000.0, max_queue=max_queue)
    closed = threading.Event()

    def close() -> None:
        if closed.is_set():
            return
        closed.set()
        model_thread.close()
        core.close()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        log.info("serving %s", core.gallery.describe())
        try:
            yield
        finally:
            await batcher.stop()
            await asyncio.get_running_loop().run_in_executor(None, close)

    app = FastAPI(
        title="reid-search",
        summary="Person re-identification search over an indexed gallery.",
        version=_version(),
        lifespan=lifespan,
        dependencies=[Depends(check_api_key)] if api_key is not None else [],
    )
    app.add_middleware(GuardMiddleware, api_key=api_key, limits=limits)
    app.state.core, app.state.batcher, app.state.limits = core, batcher, limits
    app.state.model_thread, app.state.api_key = model_thread, api_key
    app.state.close = close  # for an app that is never served (shutdown calls it otherwise)
    app.state.settings = settings
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(Exception, _unexpected)
    for router in ROUTERS:
        app.include_router(router)
    return app


def _check_settings(settings: dict[str, Any], api_key: str | None) -> None:
    """Raises ValueError for a limit below 1, a negative batching window or an empty API key."""
    for name in ("max_upload_bytes", "max_pixels", "max_files", "max_batch", "max_queue"):
        if settings[name] < 1:
            raise ValueError(f"{name} must be >= 1, not {settings[name]}")
    if settings["max_wait_ms"] < 0:
        raise ValueError(f"max_wait_ms must be >= 0, not {settings['max_wait_ms']}")
    if api_key is not None and not api_key:
        raise ValueError("api_key must not be empty (pass None for no key)")


async def _api_error(_request: Request, exc: Exception):
    assert isinstance(exc, ApiError)
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return json_response(exc.status, {"detail": exc.message, "reason": exc.reason}, headers)


async def _unexpected(_request: Request, exc: Exception):  # last resort; see as_api_error
    err = as_api_error(exc, "the request")
    return json_response(err.status, {"detail": err.message, "reason": err.reason})


def _version() -> str:
    from reid_search import __version__

    return __version__
