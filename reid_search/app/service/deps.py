"""The routes' dependencies: what :func:`~reid_search.app.service.app.create_app` keeps on ``app.state``.

Each is an ``Annotated[..., Depends(...)]`` alias a route names as a parameter type
(``core: CoreDep``), reading ``request.app.state``; none takes a request parameter, so
they add nothing to the OpenAPI schema but the API key's security scheme.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at runtime.
import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Callable, TypeVar

from fastapi import Depends, Request, Security, UploadFile
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool

from reid_search.app.service.batching import QueryBatcher
from reid_search.app.service.core import SearchCore
from reid_search.app.service.guard import ApiError, ServiceLimits, as_api_error, key_ok
from reid_search.app.service.uploads import StagedUpload
from reid_search.limits import API_KEY_HEADER

log = logging.getLogger(__name__)

R = TypeVar("R")


class ModelThread:
    """The single worker thread that embeds, searches and writes the gallery, and the lock that
    serialises gallery writes (staging + commit) within this process."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reid-model")
        self.write_lock = asyncio.Lock()

    async def run(self, doing: str, fn: Callable[..., R], *args: Any) -> R:
        """``fn(*args)`` on the model thread; any failure as the :class:`ApiError` a client sees."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except Exception as exc:
            raise as_api_error(exc, doing) from None

    def close(self) -> None:
        """Wait for the work queued, then stop the thread."""
        self.executor.shutdown(wait=True)


def _core(request: Request) -> SearchCore:
    return request.app.state.core


def _batcher(request: Request) -> QueryBatcher:
    return request.app.state.batcher


def _limits(request: Request) -> ServiceLimits:
    return request.app.state.limits


def _model_thread(request: Request) -> ModelThread:
    return request.app.state.model_thread


CoreDep = Annotated[SearchCore, Depends(_core)]
BatcherDep = Annotated[QueryBatcher, Depends(_batcher)]
LimitsDep = Annotated[ServiceLimits, Depends(_limits)]
ModelThreadDep = Annotated[ModelThread, Depends(_model_thread)]

API_KEY_SCHEME = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="Required on every route when the server was started with an API key.")


async def check_api_key(request: Request, given: Annotated[str | None, Security(API_KEY_SCHEME)]) -> None:
    """The app-wide dependency of a server with an API key (``app.state.api_key``).

    The guard middleware already refused bad keys; this documents the scheme in OpenAPI.

    Raises:
        ApiError: 401 without the right key.
    """
    expected = request.app.state.api_key
    if expected is not None and not key_ok(given, expected):
        raise ApiError(401, "unauthorized", f"missing or wrong {API_KEY_HEADER} header")


async def stage(core: SearchCore, limits: ServiceLimits, upload: UploadFile, folder: Path | None,
                keep: bool) -> StagedUpload:
    """Copy, hash and decode one upload on a request thread (see :meth:`SearchCore.stage`).

    Raises:
        ApiError: 413 too large, 400/415 not a usable image, 500 anything unexpected.
    """
    name = upload.filename or "upload"
    if upload.size is not None and upload.size > limits.max_upload_bytes:
        raise ApiError(413, "too-large", f"upload {name!r} exceeds the {limits.max_upload_bytes}-byte limit")
    try:
        return await run_in_threadpool(core.stage, upload.file, name, folder, max_bytes=limits.max_upload_bytes,
                                       max_pixels=limits.max_pixels, keep=keep)
    except Exception as exc:
        raise as_api_error(exc, "reading the upload") from None
