"""The response models of the HTTP service (they make its OpenAPI schema)."""

from pydantic import BaseModel


class HitOut(BaseModel):
    """One gallery match (:class:`reid_search.engine.Hit`); ``time`` is ISO 8601 UTC."""

    rank: int
    id: int
    path: str
    pid: int | None
    camid: int | None
    distance: float
    time: str | None
    track: str | None
    match: bool | None = None  # distance <= the calibrated threshold; None when uncalibrated


class FilterOut(BaseModel):
    """The filter a query ran with (the query's own camera is dropped unless ``keep_same_camera``)."""

    cameras: list[int] | None
    exclude_cameras: list[int]
    since: str | None
    until: str | None
    exclude_tracks: list[str]
    keep_same_camera: bool


class QueryOut(BaseModel):
    """The answer to ``POST /query``: ``reid-search query --json``'s object."""

    query: str | list[str]
    camid: int | None | list[int]
    rerank: bool
    filter: FilterOut
    threshold: float | None = None
    decision: str = "uncalibrated"  # match, no-match or uncalibrated
    fuse: str | None = None  # how several crops (together=true) were fused
    hits: list[HitOut]


class AddedItem(BaseModel):
    """One image of a ``POST /gallery``; ``new`` is false when the same upload was already there."""

    id: int
    filename: str
    path: str
    sha256: str
    pid: int | None
    camid: int | None
    time: str | None
    track: str | None
    new: bool


class AddedOut(BaseModel):
    """The answer to ``POST /gallery``."""

    ids: list[int]
    items: list[AddedItem]
    gallery_size: int
    generation: int


class RemovedOut(BaseModel):
    """The answer to ``DELETE /gallery/{id}``."""

    id: int
    path: str
    removed: bool
    gallery_size: int
    generation: int


class RemovedWhereOut(BaseModel):
    """The answer to ``DELETE /gallery?pid=&camid=&before=&track=``."""

    removed: int
    matched: int
    dry_run: bool
    ids: list[int]
    files_deleted: int
    gallery_size: int
    generation: int


class ErrorOut(BaseModel):
    """Every error this service raises itself (validation errors are FastAPI's list form)."""

    detail: str
    reason: str


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {s: {"model": ErrorOut} for s in (400, 401, 409, 413, 415, 503)}
"""The error answers every route documents (``POST``/``DELETE`` routes; each adds its own, e.g. 404)."""
