"""The routes: :func:`create_app` builds the FastAPI app of a workspace.

Query parameters and form fields a route does not declare are refused (422), and
the parameters of ``POST /query`` and ``POST /gallery`` are accepted as form fields
or in the query string (:func:`_merge`).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Callable, Sequence, TypeVar

from fastapi import Depends, FastAPI, File, Form, Query, Request, Security, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool

from reid_search.errors import DataError
from reid_search.filters import MAX_ID, filter_dict, make_remove_filter, make_search_filter, parse_time
from reid_search.limits import MAX_LABEL, MIN_PID
from reid_search.limits import (
    API_KEY_HEADER,
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_TOP_K,
    MAX_TOP_K,
)
from reid_search.multiquery import FUSE_MODES
from reid_search.app.service.batching import QueryBatcher
from reid_search.app.service.core import QueryJob, SearchCore
from reid_search.app.service.guard import ApiError, ServiceLimits, GuardMiddleware, json_response, key_ok, as_api_error
from reid_search.app.service.schemas import AddedOut, ErrorOut, QueryOut, RemovedOut, RemovedWhereOut
from reid_search.app.service.uploads import StagedUpload
from reid_search.thresholds import decide
from reid_search.app.workspace import Workspace

log = logging.getLogger(__name__)

R = TypeVar("R")


def _extra_params_error(where: str, names: Sequence[str]) -> RequestValidationError:
    return RequestValidationError([
        {"type": "extra_forbidden", "loc": (where, n), "msg": "Extra inputs are not permitted", "input": None}
        for n in names
    ])


def _only(query: frozenset[str] = frozenset(), form: frozenset[str] | None = None) -> Callable:
    """A dependency refusing (422) query parameters and form fields a route does not declare."""
    async def check(request: Request) -> None:
        extra = sorted(set(request.query_params.keys()) - query)
        if extra:
            raise _extra_params_error("query", extra)
        if form is not None:
            got = await request.form()  # already parsed by FastAPI: cached on the request
            extra = sorted(set(got.keys()) - form)
            if extra:
                raise _extra_params_error("body", extra)

    return check


def _merge(name: str, form_value: Any, query_value: Any, default: Any) -> Any:
    """A parameter accepted as a form field or in the query string (not two different values)."""
    if form_value is not None and query_value is not None and form_value != query_value:
        raise RequestValidationError([{"type": "value_error", "loc": ("body", name), "input": None,
                                       "msg": f"{name} given as a form field and in the query string, differently"}])
    if form_value is not None:
        return form_value
    return query_value if query_value is not None else default


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
) -> FastAPI:
    """The search service of ``workspace`` as a FastAPI app (serve it with uvicorn, one worker).

    The gallery and the model are opened here, so misconfiguration fails before
    serving; they are closed when the app shuts down.

    Raises:
        ReidSearchError: no or unreadable model, unusable DB, a gallery of another model.
        ValueError: a limit below 1 (``max_wait_ms`` below 0).
    """
    for name, v in (("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels), ("max_files", max_files),
                    ("max_batch", max_batch), ("max_queue", max_queue)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, not {v}")
    if max_wait_ms < 0:
        raise ValueError(f"max_wait_ms must be >= 0, not {max_wait_ms}")
    if api_key is not None and not api_key:
        raise ValueError("api_key must not be empty (pass None for no key)")

    limits = ServiceLimits(max_upload_bytes, max_pixels, max_files)
    core = SearchCore(workspace, model, device, flip, refresh_interval_s, precision)
    try:
        core.uploads.mkdir(parents=True, exist_ok=True)
        core.sweep_uploads()
    except OSError as exc:  # a read-only workspace still serves queries
        log.warning("cannot write %s (%s): POST /gallery will fail", core.uploads, exc.strerror)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reid-model")
    batcher: QueryBatcher[QueryJob, Any] = QueryBatcher(core.search_batch, executor, max_batch=max_batch,
                                                        max_wait_s=max_wait_ms / 1000.0, max_queue=max_queue)
    write_lock = asyncio.Lock()
    closed = threading.Event()

    def close() -> None:
        if closed.is_set():
            return
        closed.set()
        executor.shutdown(wait=True)
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

    key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="Required on every route when the server was started with an API key.")

    async def check_key(given: Annotated[str | None, Security(key_scheme)]) -> None:
        # The guard middleware already refused bad keys; this documents the scheme in OpenAPI.
        if api_key is not None and not key_ok(given, api_key):
            raise ApiError(401, "unauthorized", f"missing or wrong {API_KEY_HEADER} header")

    app = FastAPI(
        title="reid-search",
        summary="Person re-identification search over an indexed gallery.",
        version=_version(),
        lifespan=lifespan,
        dependencies=[Depends(check_key)] if api_key is not None else [],
    )
    app.add_middleware(GuardMiddleware, api_key=api_key, limits=limits)
    app.state.core, app.state.batcher, app.state.limits = core, batcher, limits
    app.state.close = close  # for an app that is never served (shutdown calls it otherwise)
    app.state.settings = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_queue": max_queue,
                          "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_files": max_files,
                          "api_key_required": api_key is not None}

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return json_response(exc.status, {"detail": exc.message, "reason": exc.reason}, headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):  # last resort; see as_api_error
        err = as_api_error(exc, "the request")
        return json_response(err.status, {"detail": err.message, "reason": err.reason})

    errors = {s: {"model": ErrorOut} for s in (400, 401, 409, 413, 415, 503)}

    async def staged(upload: UploadFile, folder: Path | None, keep: bool) -> StagedUpload:
        name = upload.filename or "upload"
        if upload.size is not None and upload.size > max_upload_bytes:
            raise ApiError(413, "too-large", f"upload {name!r} exceeds the {max_upload_bytes}-byte limit")
        try:
            return await run_in_threadpool(core.stage, upload.file, name, folder, max_bytes=max_upload_bytes,
                                           max_pixels=max_pixels, keep=keep)
        except Exception as exc:
            raise as_api_error(exc, "reading the upload") from None

    async def in_model_thread(doing: str, fn: Callable[..., R], *args: Any) -> R:
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except Exception as exc:
            raise as_api_error(exc, doing) from None

    query_fields = frozenset({"top_k", "rerank", "camid", "cameras", "exclude_cameras", "since", "until",
                              "exclude_track", "keep_same_camera", "together", "fuse"})

    @app.post("/query", response_model=QueryOut, responses=errors,
              dependencies=[Depends(_only(query_fields, query_fields | {"file"}))])
    async def query(
        request: Request,
        file: Annotated[list[UploadFile], File(description="The query image (any format Pillow reads); several "
                                               "crops of one person with together=true.")],
        top_k: Annotated[int | None, Form(ge=1, le=MAX_TOP_K,
                                          description=f"Hits to return [default {DEFAULT_TOP_K}].")] = None,
        rerank: Annotated[bool | None, Form(description="k-reciprocal re-ranking [default false].")] = None,
        camid: Annotated[int | None, Form(ge=0, le=MAX_LABEL,
                                          description="The query's camera; its gallery matches are dropped "
                                          "[default: from a Market-style upload name, else none].")] = None,
        cameras: Annotated[str | None, Form(description="Only gallery crops from these cameras, e.g. `1,3`.")] = None,
        exclude_cameras: Annotated[str | None, Form(description="No gallery crops from these cameras, e.g. `4,5`.")] = None,
        since: Annotated[str | None, Form(description="Only crops captured at or after this ISO 8601 time "
                                          "(no zone = UTC); crops without a time never pass.")] = None,
        until: Annotated[str | None, Form(description="Only crops captured at or before this ISO 8601 time.")] = None,
        exclude_track: Annotated[list[str] | None, Form(description="No crops of this track (repeatable).")] = None,
        keep_same_camera: Annotated[bool | None, Form(description="Keep crops from the query's own camera "
                                                      "[default false].")] = None,
        top_k_q: Annotated[int | None, Query(alias="top_k", ge=1, le=MAX_TOP_K)] = None,
        rerank_q: Annotated[bool | None, Query(alias="rerank")] = None,
        camid_q: Annotated[int | None, Query(alias="camid", ge=0, le=MAX_LABEL)] = None,
        cameras_q: Annotated[str | None, Query(alias="cameras")] = None,
        exclude_cameras_q: Annotated[str | None, Query(alias="exclude_cameras")] = None,
        since_q: Annotated[str | None, Query(alias="since")] = None,
        until_q: Annotated[str | None, Query(alias="until")] = None,
        exclude_track_q: Annotated[list[str] | None, Query(alias="exclude_track")] = None,
        keep_same_camera_q: Annotated[bool | None, Query(alias="keep_same_camera")] = None,
        together: Annotated[bool | None, Form(description="The files are crops of one person, fused into one "
                                              "query; all their cameras are dropped [default false].")] = None,
        fuse: Annotated[str | None, Form(description="With together: `mean` of the crop features (default) or "
                                         "`max`, each gallery item's best crop.")] = None,
        together_q: Annotated[bool | None, Query(alias="together")] = None,
        fuse_q: Annotated[str | None, Query(alias="fuse")] = None,
    ) -> dict[str, Any]:
        """Find the person in the uploaded image among the gallery (same hits as `reid-search query --json`).

        The filters are ANDed and evaluated inside the gallery's search: `top_k` hits
        come back whenever that many crops pass.
        """
        from reid_search.data import parse_name

        form = await request.form()
        tog = _merge("together", together, together_q, False)
        fz = _merge("fuse", fuse, fuse_q, "mean")
        if fz not in FUSE_MODES:
            raise ApiError(422, "bad-fuse", f"fuse must be one of {', '.join(FUSE_MODES)}, not {fz!r}")
        n_files = len(form.getlist("file"))
        if n_files != 1 and not tog:
            raise ApiError(422, "one-file", "send exactly one image in field 'file', or several crops of one "
                                            "person with together=true")
        if n_files > max_files:
            raise ApiError(413, "too-many-files", f"at most {max_files} files per request")
        k = _merge("top_k", top_k, top_k_q, DEFAULT_TOP_K)
        rr = _merge("rerank", rerank, rerank_q, False)
        cam = _merge("camid", camid, camid_q, None)
        keep = _merge("keep_same_camera", keep_same_camera, keep_same_camera_q, False)
        try:
            where = make_search_filter(
                _merge("cameras", cameras, cameras_q, None), _merge("exclude_cameras", exclude_cameras,
                                                                    exclude_cameras_q, None),
                _merge("since", since, since_q, None), _merge("until", until, until_q, None),
                _merge("exclude_track", exclude_track, exclude_track_q, None) or (), cli=False)
        except DataError as exc:
            raise ApiError(422, "bad-filter", str(exc)) from None
        names = [f.filename or "upload" for f in file]

        def camid_of(name: str) -> int | None:
            info = parse_name(Path(name.replace("\\", "/")).name)
            return info.camid if info is not None and 0 <= info.camid <= MAX_LABEL else None

        cams = [cam if cam is not None else camid_of(n) for n in names]
        with batcher.coming():
            sts = [await staged(f, None, keep=False) for f in file]
        ans = await batcher.submit(QueryJob(sts[0].image, k, cams[0], rr, where, keep,
                                            tuple(st.image for st in sts[1:]), tuple(cams[1:]), fz))
        flags, decision = decide([h.distance for h in ans.hits], ans.threshold)
        out = {"query": names[0] if len(names) == 1 else names,
               "camid": cams[0] if len(names) == 1 else sorted({c for c in cams if c is not None}),
               "rerank": rr, "filter": filter_dict(where, keep), "threshold": ans.threshold, "decision": decision,
               "hits": [{**h.to_dict(), "match": m} for h, m in zip(ans.hits, flags)]}
        if len(names) > 1:
            out["fuse"] = fz
        return out

    gallery_fields = frozenset({"pid", "camid", "time", "track"})

    @app.post("/gallery", response_model=AddedOut, responses=errors,
              dependencies=[Depends(_only(gallery_fields, gallery_fields | {"file"}))])
    async def add_to_gallery(
        file: Annotated[list[UploadFile], File(description=f"One or more images (at most {max_files}).")],
        pid: Annotated[int | None, Form(ge=MIN_PID, le=MAX_LABEL,
                                        description="Identity of every image (-1 junk, 0 distractor).")] = None,
        camid: Annotated[int | None, Form(ge=0, le=MAX_LABEL, description="Camera of every image.")] = None,
        capture_time: Annotated[str | None, Form(alias="time", description="Capture time of every image, ISO 8601 "
                                                 "(no zone = UTC).")] = None,
        track: Annotated[str | None, Form(min_length=1, max_length=256,
                                          description="Track (tracklet) of every image.")] = None,
        pid_q: Annotated[int | None, Query(alias="pid", ge=MIN_PID, le=MAX_LABEL)] = None,
        camid_q: Annotated[int | None, Query(alias="camid", ge=0, le=MAX_LABEL)] = None,
        time_q: Annotated[str | None, Query(alias="time")] = None,
        track_q: Annotated[str | None, Query(alias="track", min_length=1, max_length=256)] = None,
    ) -> dict[str, Any]:
        """Add images to the gallery; returns their ids (an identical upload keeps its id)."""
        p = _merge("pid", pid, pid_q, None)
        c = _merge("camid", camid, camid_q, None)
        t_text = _merge("time", capture_time, time_q, None)
        tr = _merge("track", track, track_q, None)
        try:
            t = parse_time(t_text, "time") if t_text is not None else None
        except DataError as exc:
            raise ApiError(422, "bad-time", str(exc)) from None
        if (p is None) != (c is None):
            # The indexer reads labels from Market-style names, which carry both.
            raise ApiError(422, "labels", "give pid and camid together, or neither")
        if not file:
            raise ApiError(422, "no-file", "send at least one image in field 'file'")
        if len(file) > max_files:
            raise ApiError(413, "too-many-files", f"{len(file)} files; at most {max_files} per request")
        async with write_lock:
            items: list[StagedUpload] = []
            try:
                for f in file:
                    items.append(await staged(f, core.uploads, keep=True))
            except BaseException:
                for st in items:
                    st.tmp.unlink(missing_ok=True)
                raise
            added = await in_model_thread("adding to the gallery", core.add, items, p, c, t, tr)
        return {"ids": [a["id"] for a in added], "items": added, "gallery_size": core.gallery.ntotal,
                "generation": core.gallery.generation}

    @app.delete("/gallery", response_model=RemovedWhereOut, responses=errors,
                dependencies=[Depends(_only(frozenset({"pid", "camid", "before", "track", "dry_run"})))])
    async def remove_where(
        pid: Annotated[int | None, Query(ge=MIN_PID, le=MAX_LABEL, description="Images of this person.")] = None,
        camid: Annotated[int | None, Query(ge=0, le=MAX_LABEL, description="Images from this camera.")] = None,
        before: Annotated[str | None, Query(description="Images captured before this ISO 8601 time "
                                            "(no zone = UTC); images without a time never match.")] = None,
        track: Annotated[str | None, Query(min_length=1, description="Images of this track.")] = None,
        dry_run: Annotated[bool, Query(description="Only count and list what matches.")] = False,
    ) -> dict[str, Any]:
        """Remove every image the filter matches (fields ANDed; at least one): retention and erasure.

        Files this service stored for them under `uploads/` are deleted too.
        """
        try:
            where = make_remove_filter(pid, camid, before, track, cli=False)
        except DataError as exc:
            raise ApiError(422, "bad-filter", str(exc)) from None
        async with write_lock:
            out = await in_model_thread("removing from the gallery", core.remove_where, where, dry_run)
        return {**out, "gallery_size": core.gallery.ntotal, "generation": core.gallery.generation}

    @app.delete("/gallery/{image_id}", response_model=RemovedOut, responses={404: {"model": ErrorOut}, **errors},
                dependencies=[Depends(_only())])
    async def remove_from_gallery(
        image_id: Annotated[int, PathParam(ge=0, le=MAX_ID,
                                           description="Gallery id (from /query hits or POST /gallery).")],
    ) -> dict[str, Any]:
        """Remove one image from the gallery (and its file, if it was uploaded through this API)."""
        async with write_lock:
            out = await in_model_thread("removing from the gallery", core.remove, image_id)
        return {**out, "gallery_size": core.gallery.ntotal, "generation": core.gallery.generation}

    @app.get("/healthz", dependencies=[Depends(_only())])
    async def healthz() -> dict[str, Any]:
        """Liveness: answers while the event loop runs."""
        return {"status": "ok", "gallery_size": core.gallery.ntotal}

    @app.get("/stats", dependencies=[Depends(_only())])
    async def stats() -> dict[str, Any]:
        """Gallery size, model fingerprint and description, index type, search device, generation, batching."""
        out = core.stats()
        out["batching"] = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, **batcher.stats.to_dict()}
        out["settings"] = app.state.settings
        return out

    return app


def _version() -> str:
    from reid_search import __version__

    return __version__
