"""The parameter model of each route: one dataclass built by one FastAPI dependency.

``POST /query`` and ``POST /gallery`` take their parameters as form fields or in the query
string. Each parameter is declared once, as a :class:`Param`; :func:`form_or_query` turns
a list of them into a dependency whose signature declares every parameter twice (the
form field, and its query-string twin named ``<name>_q`` with ``alias=<name>``), so
FastAPI validates both and documents both in OpenAPI, and whose body reconciles each
pair (the same value may come both ways; two different values are a 422).

:func:`only` refuses (422) query parameters and form fields a route does not declare.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at runtime.
import inspect
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Awaitable, Callable, Sequence, TypeVar

from fastapi import Form, Query, Request
from fastapi.exceptions import RequestValidationError

from reid_search.limits import DEFAULT_TOP_K, MAX_LABEL, MAX_TOP_K, MAX_TRACK_CHARS, MIN_PID

T = TypeVar("T")


@dataclass(frozen=True)
class Param:
    """One parameter accepted as a form field or in the query string."""

    name: str  # over HTTP
    type: Any  # int, bool, str, list[str]
    default: Any = None  # when neither gives it
    description: str | None = None  # documented on the form field
    limits: dict[str, Any] = field(default_factory=dict)  # ge, le, min_length, max_length: on both
    python_name: str | None = None  # the form parameter's name when ``name`` cannot be one (``time``)


def _extra_params_error(where: str, names: Sequence[str]) -> RequestValidationError:
    return RequestValidationError([
        {"type": "extra_forbidden", "loc": (where, n), "msg": "Extra inputs are not permitted", "input": None}
        for n in names
    ])


def _merge(name: str, form_value: Any, query_value: Any, default: Any) -> Any:
    """A parameter accepted as a form field or in the query string (not two different values)."""
    if form_value is not None and query_value is not None and form_value != query_value:
        raise RequestValidationError([{"type": "value_error", "loc": ("body", name), "input": None,
                                       "msg": f"{name} given as a form field and in the query string, differently"}])
    if form_value is not None:
        return form_value
    return query_value if query_value is not None else default


def form_or_query(params: Sequence[Param], build: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    """A FastAPI dependency taking each of ``params`` as a form field or in the query string,
    returning ``build(**{name: value})`` (a parameter given neither way gets its default).

    Raises (when the request is served):
        RequestValidationError: one parameter given both ways with different values.
    """
    def form_name(p: Param) -> str:
        return p.python_name or p.name

    signature = [inspect.Parameter(form_name(p), inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        p.type | None, Form(**({"alias": p.name} if p.python_name else {}), description=p.description, **p.limits)])
        for p in params]
    signature += [inspect.Parameter(f"{p.name}_q", inspect.Parameter.KEYWORD_ONLY, default=None,
                                    annotation=Annotated[p.type | None, Query(alias=p.name, **p.limits)])
                  for p in params]

    async def dependency(**given: Any) -> T:
        return build(**{p.name: _merge(p.name, given[form_name(p)], given[f"{p.name}_q"], p.default) for p in params})

    dependency.__signature__ = inspect.Signature(signature)  # type: ignore[attr-defined]  # what FastAPI reads
    return dependency


def only(query: Sequence[str] = (), form: Sequence[str] | None = None) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing (422) query parameters and form fields a route does not declare."""
    allowed_query, allowed_form = frozenset(query), None if form is None else frozenset(form)

    async def check(request: Request) -> None:
        extra = sorted(set(request.query_params.keys()) - allowed_query)
        if extra:
            raise _extra_params_error("query", extra)
        if allowed_form is not None:
            got = await request.form()  # already parsed by FastAPI: cached on the request
            extra = sorted(set(got.keys()) - allowed_form)
            if extra:
                raise _extra_params_error("body", extra)

    return check


# ---- POST /query ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryParams:
    """The parameters of ``POST /query`` (beside the files)."""

    top_k: int = DEFAULT_TOP_K
    rerank: bool = False
    camid: int | None = None
    cameras: str | None = None
    exclude_cameras: str | None = None
    since: str | None = None
    until: str | None = None
    exclude_track: list[str] | None = None
    keep_same_camera: bool = False
    together: bool = False
    fuse: str = "mean"


QUERY_PARAMS = (
    Param("top_k", int, DEFAULT_TOP_K, f"Hits to return [default {DEFAULT_TOP_K}].", {"ge": 1, "le": MAX_TOP_K}),
    Param("rerank", bool, False, "k-reciprocal re-ranking [default false]."),
    Param("camid", int, None, "The query's camera; its gallery matches are dropped [default: from a Market-style "
                              "upload name, else none].", {"ge": 0, "le": MAX_LABEL}),
    Param("cameras", str, None, "Only gallery crops from these cameras, e.g. `1,3`."),
    Param("exclude_cameras", str, None, "No gallery crops from these cameras, e.g. `4,5`."),
    Param("since", str, None, "Only crops captured at or after this ISO 8601 time (no zone = UTC); crops without "
                              "a time never pass."),
    Param("until", str, None, "Only crops captured at or before this ISO 8601 time."),
    Param("exclude_track", list[str], None, "No crops of this track (repeatable)."),
    Param("keep_same_camera", bool, False, "Keep crops from the query's own camera [default false]."),
    Param("together", bool, False, "The files are crops of one person, fused into one query; all their cameras "
                                   "are dropped [default false]."),
    Param("fuse", str, "mean", "With together: `mean` of the crop features (default) or `max`, each gallery "
                               "item's best crop."),
)
assert [p.name for p in QUERY_PARAMS] == [f.name for f in fields(QueryParams)]

query_params = form_or_query(QUERY_PARAMS, QueryParams)
"""The dependency giving a route its :class:`QueryParams`."""


# ---- POST /gallery ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GalleryParams:
    """The labels of every image of one ``POST /gallery``."""

    pid: int | None = None
    camid: int | None = None
    time: str | None = None
    track: str | None = None


GALLERY_PARAMS = (
    Param("pid", int, None, "Identity of every image (-1 junk, 0 distractor).", {"ge": MIN_PID, "le": MAX_LABEL}),
    Param("camid", int, None, "Camera of every image.", {"ge": 0, "le": MAX_LABEL}),
    Param("time", str, None, "Capture time of every image, ISO 8601 (no zone = UTC).", python_name="capture_time"),
    Param("track", str, None, "Track (tracklet) of every image.", {"min_length": 1, "max_length": MAX_TRACK_CHARS}),
)
assert [p.name for p in GALLERY_PARAMS] == [f.name for f in fields(GalleryParams)]

gallery_params = form_or_query(GALLERY_PARAMS, GalleryParams)
"""The dependency giving a route its :class:`GalleryParams`."""
