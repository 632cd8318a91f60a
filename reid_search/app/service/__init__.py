"""``reid-search serve``: the workspace's gallery as an HTTP/JSON search service.

Routes (OpenAPI schema at ``/openapi.json``, interactive docs at ``/docs``):

- ``POST /query``: one uploaded image (multipart field ``file``) and optional
  filters (``cameras``, ``exclude_cameras``, ``since``, ``until``,
  ``exclude_track``, ``keep_same_camera``) → the same hits as
  ``reid-search query --json``, with ``time`` and ``track``;
- ``POST /gallery``: add uploaded images (optional ``pid``/``camid``, ``time``,
  ``track``); their bytes are kept under ``WORKSPACE/uploads/`` with
  content-addressed names;
- ``DELETE /gallery/{id}``: remove one image; ``DELETE /gallery?pid=&camid=&before=&track=``:
  remove every image the filter matches (retention, erasure; ``dry_run=true`` counts);
  files this service stored for removed images are deleted too;
- ``GET /healthz``, ``GET /stats``.

How it holds up:

- **Dynamic batching.** Concurrent queries wait in a :class:`QueryBatcher`
  until ``max_batch`` have arrived or ``max_wait_ms`` passed since the oldest
  one; the batch is embedded in one forward pass on the model thread, then each
  query is searched. The event loop never runs the model, so it keeps accepting.
- **One model thread.** Embedding, searching and gallery writes all run on one
  worker thread, so the FAISS index and the engine's caches never see a search
  and a write at the same time. Writes are also serialised by an asyncio lock
  (staging + commit) and, across processes, by the indexer's writer lock; the
  indexer commits image rows and vectors in one transaction, so a crash loses
  at most the write in flight.
- **Bad input is a 4xx JSON error** (``{"detail": ..., "reason": ...}`` for
  ours, FastAPI's ``{"detail": [...]}`` for validation): request bodies are
  capped while they are received (before any parsing), each upload is capped
  while it is copied, decoded images are capped in pixels by
  :func:`~reid_search.images.load_image`'s guard, unknown query parameters and
  form fields are refused (422). Requests never name server paths: only
  uploaded bytes are read; the client's file name is echoed, never opened.
- **API key.** When set, every route (``/healthz``, ``/docs`` and
  ``/openapi.json`` included) needs header ``X-API-Key``; otherwise 401.

Modules: :mod:`~reid_search.app.service.batching` (the query batcher),
:mod:`~reid_search.app.service.uploads` (upload staging), :mod:`~reid_search.app.service.core`
(the gallery, model and engine on the model thread), :mod:`~reid_search.app.service.schemas`
(response models), :mod:`~reid_search.app.service.guard` (errors, limits, API key and body cap),
:mod:`~reid_search.app.service.params` (each route's parameter model),
:mod:`~reid_search.app.service.deps` (the routes' dependencies on ``app.state``),
:mod:`~reid_search.app.service.routes` (one router per resource: query, gallery, admin),
:mod:`~reid_search.app.service.app` (:func:`create_app`: the state, middleware, handlers, routers).
"""

from reid_search.app.service.app import create_app
from reid_search.app.service.batching import BatchStats, QueryBatcher
from reid_search.app.service.core import ORPHAN_AGE_S, QueryAnswer, QueryJob, SearchCore
from reid_search.app.service.guard import FORM_OVERHEAD_BYTES, ApiError, ServiceLimits, as_api_error
from reid_search.app.service.schemas import (
    AddedItem,
    AddedOut,
    ErrorOut,
    FilterOut,
    HitOut,
    QueryOut,
    RemovedOut,
    RemovedWhereOut,
)
from reid_search.app.service.uploads import StagedUpload, upload_name

__all__ = [
    "FORM_OVERHEAD_BYTES",
    "ORPHAN_AGE_S",
    "AddedItem",
    "AddedOut",
    "ApiError",
    "BatchStats",
    "ErrorOut",
    "FilterOut",
    "HitOut",
    "QueryAnswer",
    "QueryBatcher",
    "QueryJob",
    "QueryOut",
    "RemovedOut",
    "RemovedWhereOut",
    "SearchCore",
    "ServiceLimits",
    "StagedUpload",
    "as_api_error",
    "create_app",
    "upload_name",
]
