"""``POST /query``: find the person of an uploaded image (or crops of one person) in the gallery."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Request, UploadFile

from reid_search.app.service.core import QueryJob
from reid_search.app.service.deps import BatcherDep, CoreDep, LimitsDep, stage
from reid_search.app.service.guard import ApiError
from reid_search.app.service.params import QUERY_PARAMS, QueryParams, only, query_params
from reid_search.app.service.schemas import QueryOut
from reid_search.app.service.schemas import ERROR_RESPONSES
from reid_search.app.searching import answer_json
from reid_search.errors import DataError
from reid_search.filters import make_search_filter
from reid_search.limits import MAX_LABEL
from reid_search.multiquery import FUSE_MODES
from reid_search.thresholds import decide

router = APIRouter()

_NAMES = [p.name for p in QUERY_PARAMS]


def _camid_of(name: str) -> int | None:
    """The camera in a Market-style upload name, if any (and storable)."""
    from reid_search.data import parse_name

    info = parse_name(Path(name.replace("\\", "/")).name)
    return info.camid if info is not None and 0 <= info.camid <= MAX_LABEL else None


@router.post("/query", response_model=QueryOut, responses=ERROR_RESPONSES,
             dependencies=[Depends(only(_NAMES, [*_NAMES, "file"]))])
async def query(
    request: Request,
    file: Annotated[list[UploadFile], File(description="The query image (any format Pillow reads); several "
                                           "crops of one person with together=true.")],
    params: Annotated[QueryParams, Depends(query_params)],
    core: CoreDep,
    batcher: BatcherDep,
    limits: LimitsDep,
) -> dict[str, Any]:
    """Find the person in the uploaded image among the gallery (same hits as `reid-search query --json`).

    The filters are ANDed and evaluated inside the gallery's search: `top_k` hits
    come back whenever that many crops pass.
    """
    p = params
    if p.fuse not in FUSE_MODES:
        raise ApiError(422, "bad-fuse", f"fuse must be one of {', '.join(FUSE_MODES)}, not {p.fuse!r}")
    n_files = len((await request.form()).getlist("file"))
    if n_files != 1 and not p.together:
        raise ApiError(422, "one-file", "send exactly one image in field 'file', or several crops of one "
                                        "person with together=true")
    if n_files > limits.max_files:
        raise ApiError(413, "too-many-files", f"at most {limits.max_files} files per request")
    try:
        where = make_search_filter(p.cameras, p.exclude_cameras, p.since, p.until, p.exclude_track or (), cli=False)
    except DataError as exc:
        raise ApiError(422, "bad-filter", str(exc)) from None
    names = [f.filename or "upload" for f in file]
    cams = [p.camid if p.camid is not None else _camid_of(n) for n in names]
    with batcher.coming():
        sts = [await stage(core, limits, f, None, keep=False) for f in file]
    ans = await batcher.submit(QueryJob(sts[0].image, p.top_k, cams[0], p.rerank, where, p.keep_same_camera,
                                        tuple(st.image for st in sts[1:]), tuple(cams[1:]), p.fuse))
    flags, decision = decide([h.distance for h in ans.hits], ans.threshold)
    return answer_json(names, cams, p.rerank, where, p.keep_same_camera, ans.threshold, decision, ans.hits, flags,
                       p.fuse)
