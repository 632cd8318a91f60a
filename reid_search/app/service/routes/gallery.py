"""``POST /gallery``, ``DELETE /gallery`` and ``DELETE /gallery/{image_id}``: add and remove images."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, UploadFile
from fastapi import Path as PathParam

from reid_search.app.service.deps import CoreDep, LimitsDep, ModelThreadDep, stage
from reid_search.app.service.guard import ApiError
from reid_search.app.service.params import GALLERY_PARAMS, GalleryParams, gallery_params, only
from reid_search.app.service.schemas import ERROR_RESPONSES, AddedOut, ErrorOut, RemovedOut, RemovedWhereOut
from reid_search.app.service.uploads import StagedUpload
from reid_search.errors import DataError
from reid_search.filters import MAX_ID, make_remove_filter, parse_time
from reid_search.limits import DEFAULT_MAX_FILES, MAX_LABEL, MIN_PID

router = APIRouter()

_NAMES = [p.name for p in GALLERY_PARAMS]


@router.post("/gallery", response_model=AddedOut, responses=ERROR_RESPONSES,
             dependencies=[Depends(only(_NAMES, [*_NAMES, "file"]))])
async def add_to_gallery(
    file: Annotated[list[UploadFile], File(description="One or more images (at most the server's --max-files, "
                                           f"{DEFAULT_MAX_FILES} by default).")],
    params: Annotated[GalleryParams, Depends(gallery_params)],
    core: CoreDep,
    limits: LimitsDep,
    model_thread: ModelThreadDep,
) -> dict[str, Any]:
    """Add images to the gallery; returns their ids (an identical upload keeps its id)."""
    p = params
    try:
        t = parse_time(p.time, "time") if p.time is not None else None
    except DataError as exc:
        raise ApiError(422, "bad-time", str(exc)) from None
    if (p.pid is None) != (p.camid is None):
        # The indexer reads labels from Market-style names, which carry both.
        raise ApiError(422, "labels", "give pid and camid together, or neither")
    if not file:
        raise ApiError(422, "no-file", "send at least one image in field 'file'")
    if len(file) > limits.max_files:
        raise ApiError(413, "too-many-files", f"{len(file)} files; at most {limits.max_files} per request")
    async with model_thread.write_lock:
        items: list[StagedUpload] = []
        try:
            for f in file:
                items.append(await stage(core, limits, f, core.uploads, keep=True))
        except BaseException:
            for st in items:
                st.tmp.unlink(missing_ok=True)
            raise
        added = await model_thread.run("adding to the gallery", core.add, items, p.pid, p.camid, t, p.track)
    return {"ids": [a["id"] for a in added], "items": added, "gallery_size": core.gallery.ntotal,
            "generation": core.gallery.generation}


@router.delete("/gallery", response_model=RemovedWhereOut, responses=ERROR_RESPONSES,
               dependencies=[Depends(only(["pid", "camid", "before", "track", "dry_run"]))])
async def remove_where(
    core: CoreDep,
    model_thread: ModelThreadDep,
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
    async with model_thread.write_lock:
        out = await model_thread.run("removing from the gallery", core.remove_where, where, dry_run)
    return {**out, "gallery_size": core.gallery.ntotal, "generation": core.gallery.generation}


@router.delete("/gallery/{image_id}", response_model=RemovedOut, responses={404: {"model": ErrorOut}, **ERROR_RESPONSES},
               dependencies=[Depends(only())])
async def remove_from_gallery(
    image_id: Annotated[int, PathParam(ge=0, le=MAX_ID, description="Gallery id (from /query hits or POST /gallery).")],
    core: CoreDep,
    model_thread: ModelThreadDep,
) -> dict[str, Any]:
    """Remove one image from the gallery (and its file, if it was uploaded through this API)."""
    async with model_thread.write_lock:
        out = await model_thread.run("removing from the gallery", core.remove, image_id)
    return {**out, "gallery_size": core.gallery.ntotal, "generation": core.gallery.generation}
