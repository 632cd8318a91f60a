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
  :func:`~reid_search.extract.load_image`'s guard, unknown query parameters and
  form fields are refused (422). Requests never name server paths: only
  uploaded bytes are read; the client's file name is echoed, never opened.
- **API key.** When set, every route (``/healthz``, ``/docs`` and
  ``/openapi.json`` included) needs header ``X-API-Key``; otherwise 401.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Callable, Generic, Iterator, Sequence, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, Security, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from torchvision.transforms import Resize

from indexer.protocol import NewImage, RemoveFilter, SearchFilter
from reid_search.engine import SearchEngine
from reid_search.errors import DataError, GalleryError, ReidSearchError
from reid_search.extract import ImageLoadError, load_extractor, load_image
from reid_search.filters import (
    MAX_ID,
    MAX_LABEL,
    MIN_PID,
    filter_dict,
    format_time,
    make_remove_filter,
    make_search_filter,
    parse_time,
)
from reid_search.limits import (
    API_KEY_HEADER,
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_TOP_K,
    MAX_TOP_K,
)
from reid_search.transforms import build_eval_transform
from reid_search.workspace import Workspace

log = logging.getLogger(__name__)

# Multipart boundaries, part headers and the small form fields.
FORM_OVERHEAD_BYTES = 64 * 1024

# Formats kept as uploaded (the extensions `reid-search index` picks up).
_EXT_BY_FORMAT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}
# load_image's reasons → HTTP status.
_STATUS_BY_REASON = {"empty": 400, "corrupt": 400, "not-an-image": 415, "too-large": 413}

T = TypeVar("T")
R = TypeVar("R")


class ApiError(HTTPException):
    """An error answered as ``{"detail": message, "reason": reason}`` with HTTP status ``status``.

    An ``HTTPException`` so that FastAPI passes it through unchanged even when it
    is raised while the request body is being received.
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(status, detail=message)
        self.status, self.reason, self.message = status, reason, message


def as_api_error(exc: BaseException, doing: str) -> ApiError:
    """``exc`` as the error a client sees: ours unchanged, a domain error as 409, anything else as a logged 500.

    Answering unexpected errors here (rather than in an app-wide handler) keeps
    the connection usable: Starlette re-raises exceptions that reach its
    outermost handler, and the server then drops the connection.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ReidSearchError):
        return ApiError(409, type(exc).__name__, str(exc))
    log.error("%s failed", doing, exc_info=exc)
    return ApiError(500, "internal", f"{doing} failed ({type(exc).__name__}); see the server log")


# --------------------------------------------------------------------------- batching


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    arrived: float


@dataclass
class BatchStats:
    """Counters of a :class:`QueryBatcher` (for ``/stats`` and the load test)."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    sizes: collections.Counter = field(default_factory=collections.Counter)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"batches": self.batches, "queries": self.items, "largest_batch": self.largest,
                "mean_batch": round(self.items / self.batches, 3) if self.batches else 0.0}


class QueryBatcher(Generic[T, R]):
    """Groups concurrent submissions into batches run by ``run`` on ``executor``.

    Whatever queued while the previous batch ran goes next (up to ``max_batch``).
    The loop waits for more only while requests are on their way (announced with
    :meth:`coming`: uploaded and being decoded), and at most ``max_wait_s``
    after the oldest waiting item arrived; so a lone client never waits for
    company that is not coming. ``run(items)`` returns one result or exception
    per item, in order; an exception raised by ``run`` itself fails the whole
    batch. Must be started and used on one event loop.
    """

    def __init__(self, run: Callable[[list[T]], Sequence[R | BaseException]], executor: ThreadPoolExecutor, *,
                 max_batch: int = 32, max_wait_s: float = 0.005, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, not {max_wait_s}")
        self.run, self.executor = run, executor
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.stats = BatchStats()
        self._pending: collections.deque[_Pending[T]] = collections.deque()
        self._coming = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="query-batcher")

    async def stop(self) -> None:
        """Stop the loop; waiting submissions fail with 503."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(ApiError(503, "shutting-down", "the server is shutting down"))

    @contextlib.contextmanager
    def coming(self) -> Iterator[None]:
        """Announce an item being prepared inside the block (submit it right after), so a forming batch waits for it."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1
            if self._wake is not None:
                self._wake.set()

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result.

        Raises:
            ApiError: 503 when the queue is full or the batcher is not running;
                whatever ``run`` returned or raised for this item.
        """
        if self._task is None or self._wake is None:
            raise ApiError(503, "not-running", "the query batcher is not running")
        if len(self._pending) >= self.max_queue:
            raise ApiError(503, "busy", f"{self.max_queue} queries already wait; retry later")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append(_Pending(item, fut, loop.time()))
        self._wake.set()
        return await fut

    async def _wait(self, timeout: float | None) -> None:
        assert self._wake is not None
        self._wake.clear()
        if timeout is None:
            await self._wake.wait()
            return
        # Waiting on an Event (not on a queue) so a timeout cannot drop an item.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                await self._wait(None)
            # The window counts from the oldest arrival, so requests that queued
            # while the model was busy do not wait again; and it only holds the
            # batch open while announced requests are still being decoded.
            deadline = self._pending[0].arrived + self.max_wait_s
            while len(self._pending) < self.max_batch and self._coming > 0 and (left := deadline - loop.time()) > 0:
                await self._wait(left)
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            batch = [p for p in batch if not p.future.done()]  # abandoned by their clients
            if not batch:
                continue
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            self.stats.sizes[len(batch)] += 1
            try:
                results = await loop.run_in_executor(self.executor, self.run, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(ApiError(503, "shutting-down", "the server is shutting down"))
                raise
            except Exception as exc:
                results = [as_api_error(exc, f"a query batch of {len(batch)}")] * len(batch)
            for p, res in zip(batch, results):
                if p.future.done():
                    continue
                if isinstance(res, BaseException):
                    p.future.set_exception(res)
                else:
                    p.future.set_result(res)


# --------------------------------------------------------------------------- uploads


@dataclass
class StagedUpload:
    """An upload copied to a temporary file, hashed and decoded (resized to the model's input)."""

    filename: str
    tmp: Path
    sha256: str
    size: int
    ext: str
    image: Image.Image


def upload_name(sha256: str, ext: str, pid: int | None = None, camid: int | None = None) -> str:
    """Content-addressed file name of an uploaded gallery image.

    With labels it is a Market-style name (``0007_c3_u<sha>.jpg``) so the indexer
    parses pid and camid from it as it does for every gallery crop; the ``_u``
    keeps the hash from being read as a frame number (``_f123``).
    """
    if pid is None and camid is None:
        return f"{sha256}{ext}"
    if pid is None or camid is None:
        raise ValueError("pid and camid go together")
    p = f"{pid:04d}" if pid >= 0 else str(pid)
    return f"{p}_c{camid}_u{sha256}{ext}"


def _copy_limited(src: BinaryIO, folder: Path | None, limit: int, filename: str, fsync: bool) -> tuple[Path, str, int]:
    """Copy ``src`` to a hidden temporary file in ``folder`` (None: the system's); 413 past ``limit`` bytes."""
    fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".tmp", dir=folder)
    h, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 16):
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "too-large", f"upload {filename!r} exceeds the {limit}-byte limit")
                h.update(chunk)
                out.write(chunk)
            if fsync:
                out.flush()
                os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(tmp), h.hexdigest(), size


def _decode(path: Path, filename: str, max_pixels: int) -> Image.Image:
    try:
        return load_image(path, max_pixels=max_pixels)
    except ImageLoadError as exc:
        # exc's message names our temporary file; the client only knows its own name.
        status = _STATUS_BY_REASON.get(exc.reason, 500)
        raise ApiError(status, exc.reason, f"upload {filename!r}: {exc.detail}") from None


def _image_format(path: Path) -> str | None:
    with Image.open(path) as im:
        return im.format


# --------------------------------------------------------------------------- the model thread


@dataclass(frozen=True)
class QueryJob:
    """One /query request, decoded."""

    image: Image.Image
    top_k: int
    camid: int | None
    rerank: bool
    where: SearchFilter | None = None
    keep_same_camera: bool = False


class SearchCore:
    """The gallery, the model and the search engine; every method but :meth:`stage` and
    the read-only properties runs on the single model thread.

    Raises:
        ReidSearchError: (constructor) no model, an unreadable model, an unusable DB,
            or a gallery indexed with another model.
    """

    def __init__(self, workspace: Workspace, model: Path | None = None, device: str = "auto", flip: bool = False,
                 refresh_interval_s: float = 1.0) -> None:
        from indexer import open_gallery

        self.workspace = workspace
        self.model_file = workspace.model_path(model)
        self.extractor = load_extractor(self.model_file, device=device, flip=flip)
        self.gallery = open_gallery(workspace)
        self.gallery.check_model(self.extractor.fingerprint, self.extractor.dim)
        self.uploads = workspace.uploads_dir.resolve()
        self.refresh_interval_s = refresh_interval_s
        self._last_refresh = time.monotonic()
        self._transform = build_eval_transform(self.extractor.preprocess)
        # The eval transform starts with a resize to the input size; doing that
        # step right after decoding shrinks what waits in the queue, and the
        # engine's own resize is then the identity, so features do not change.
        first = self._transform.transforms[0]
        self._resize = first if isinstance(first, Resize) else None
        self._engine: Any = None

    # ---- any thread -----------------------------------------------------------------

    def stage(self, src: BinaryIO, filename: str, folder: Path | None, *, max_bytes: int, max_pixels: int,
              keep: bool) -> StagedUpload:
        """Copy, hash and decode one upload (runs on a request thread).

        With ``keep`` the temporary file stays (for :meth:`add`) and the image must
        be in a format the indexer picks up; otherwise it is deleted.

        Raises:
            ApiError: 413 too many bytes or pixels, 400 empty or corrupt, 415 not an image
                (or, with ``keep``, a format the gallery does not store).
        """
        tmp, sha, size = _copy_limited(src, folder, max_bytes, filename, fsync=keep)
        try:
            img = _decode(tmp, filename, max_pixels)
            ext = ""
            if keep:
                fmt = _image_format(tmp)
                ext = _EXT_BY_FORMAT.get(fmt or "", "")
                if not ext:
                    raise ApiError(415, "unsupported-format",
                                   f"upload {filename!r}: {fmt} images are not stored in galleries; "
                                   f"send {', '.join(sorted(set(_EXT_BY_FORMAT) - {'MPO'}))}")
            if self._resize is not None:
                img = self._resize(img)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if not keep:
            tmp.unlink(missing_ok=True)
        return StagedUpload(filename, tmp, sha, size, ext, img)

    # ---- model thread -----------------------------------------------------------------

    def _refresh(self) -> None:
        """Pick up changes other processes (e.g. ``reid-search index``) committed."""
        now = time.monotonic()
        if now - self._last_refresh >= self.refresh_interval_s:
            self._last_refresh = now
            try:
                self.gallery.refresh()
            except Exception:
                log.exception("could not refresh the gallery from the DB; serving the state already loaded")

    def engine(self) -> SearchEngine:
        """The search engine, made once the gallery has images.

        Raises:
            ApiError: 409 while the gallery is empty or holds another model's vectors.
        """
        if self.gallery.ntotal == 0:
            raise ApiError(409, "empty-gallery", "the gallery is empty: add images with POST /gallery "
                                                 "or `reid-search index FOLDER`")
        if self.gallery.model_fingerprint not in (None, self.extractor.fingerprint):
            # Re-indexed with another model by another process while we serve.
            raise ApiError(409, "gallery-model",
                           f"the gallery is now indexed with model {self.gallery.model_fingerprint}, not this "
                           f"server's {self.extractor.fingerprint}; restart the server with that model")
        if self._engine is None:
            try:
                self._engine = SearchEngine(self.gallery, self.extractor, cache_dir=self.workspace.index_dir)
            except GalleryError as exc:
                raise ApiError(409, "gallery-model", str(exc)) from None
        return self._engine

    def _embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if self._engine is not None:
            return self._engine.embed_images(images)
        import torch  # an empty gallery has no engine yet: same steps as SearchEngine.embed_images

        return self.extractor.embed(torch.stack([self._transform(im) for im in images]))

    def search_batch(self, jobs: list[QueryJob]) -> list[Any]:
        """Embed ``jobs`` in one forward pass, then search each: hits or an exception per job."""
        self._refresh()
        try:
            engine = self.engine()
        except ApiError as exc:
            return [exc] * len(jobs)
        try:
            feats = engine.embed_images([j.image for j in jobs])
            rows: list[Any] = list(feats)
        except Exception:
            log.exception("embedding a batch of %d failed; embedding its images one by one", len(jobs))
            rows = []
            for j in jobs:
                try:
                    rows.append(engine.embed_images([j.image])[0])
                except Exception as exc:
                    rows.append(exc)
        out: list[Any] = []
        for j, f in zip(jobs, rows):
            if isinstance(f, BaseException):
                out.append(as_api_error(f, "embedding the query"))
                continue
            try:
                out.append(engine.search(f[None], top_k=j.top_k, camids=[j.camid], rerank=j.rerank, where=j.where,
                                         keep_same_camera=j.keep_same_camera)[0])
            except Exception as exc:
                out.append(as_api_error(exc, "the search"))
        return out

    def add(self, staged: Sequence[StagedUpload], pid: int | None, camid: int | None,
            capture_time: datetime | None = None, track: str | None = None) -> list[dict[str, Any]]:
        """Move staged uploads into ``uploads/`` under their content names and index the new ones.

        An image already in the gallery under the same name (same bytes, same labels,
        time and track) keeps its id; with another time or track it is replaced.
        Returns one item per upload, in order.

        Raises:
            GalleryError: the indexer refused the images.
        """
        self._refresh()
        was_empty = self.gallery.ntotal == 0
        known = self.gallery.existing(self.uploads) if not was_empty else {}
        items: list[dict[str, Any]] = []
        new: dict[str, tuple[NewImage, Image.Image]] = {}
        placed: list[Path] = []
        try:
            for st in staged:
                name = upload_name(st.sha256, st.ext, pid, camid)
                dest = self.uploads / name
                item = {"filename": st.filename, "path": str(dest), "sha256": st.sha256, "pid": pid, "camid": camid,
                        "time": format_time(capture_time), "track": track}
                items.append(item)
                if (name in known and known[name][1] == st.sha256 and dest.is_file()
                        and self._same_fields(known[name][0], capture_time, track)):
                    item.update(id=known[name][0], new=False)
                    st.tmp.unlink(missing_ok=True)
                    continue
                item["new"] = True
                if name in new:  # the same bytes twice in one request
                    st.tmp.unlink(missing_ok=True)
                    continue
                existed = dest.exists()
                os.replace(st.tmp, dest)
                if not existed:
                    placed.append(dest)
                new[name] = (NewImage(dest, st.sha256, st.size, pid=pid, camid=camid, time=capture_time, track=track),
                             st.image)
            if new:
                _fsync_dir(self.uploads)  # the files must be durable before the rows that name them
                imgs = [im for _, im in new.values()]
                feats = np.concatenate([self._embed(imgs[s:s + 32]) for s in range(0, len(imgs), 32)])
                ids = self.gallery.add_images([n for n, _ in new.values()], feats, self.extractor.fingerprint)
                by_name = {name: int(i) for name, i in zip(new, ids)}
                for item in items:
                    if item["new"]:
                        item["id"] = by_name[Path(item["path"]).name]
        except BaseException:
            for st in staged:
                st.tmp.unlink(missing_ok=True)
            for p in placed:  # not committed: do not leave files the gallery does not know
                p.unlink(missing_ok=True)
            raise
        self.gallery.maybe_save()
        if was_empty and new:
            # The gallery is now this server's model's: `reid-search query` without --model uses it too.
            try:
                self.workspace.set_gallery_model(self.model_file, self.extractor.fingerprint)
            except OSError as exc:
                log.warning("could not record the gallery's model in %s (%s)", self.workspace.model_pointer, exc)
        return items

    def _same_fields(self, image_id: int, capture_time: datetime | None, track: str | None) -> bool:
        try:
            m = self.gallery.metadata([image_id])[0]
        except GalleryError:
            return False
        return m.time == capture_time and m.track == track

    def remove_where(self, where: RemoveFilter, dry_run: bool) -> dict[str, Any]:
        """Remove every image ``where`` matches, and the files this service stored for them."""
        self._refresh()
        metas = self.gallery.remove_where(where, dry_run=dry_run)
        files = 0
        if not dry_run:
            # After the commit: a crash here leaves orphan files (swept at the next start), never a row without its file.
            files = self.workspace.remove_uploads(m.path for m in metas)
            self.gallery.maybe_save()
        return {"removed": 0 if dry_run else len(metas), "matched": len(metas), "dry_run": dry_run,
                "ids": [m.id for m in metas], "files_deleted": files}

    def sweep_uploads(self) -> int:
        """Delete files under ``uploads/`` that no gallery row names (left by a crash between a
        removal's commit and its file deletion, or by an add that never committed)."""
        if not self.uploads.is_dir():
            return 0
        known = {m.path.name for batch in self.gallery.iter_metadata() for m in batch if m.path.parent == self.uploads}
        now, n = time.time(), 0
        for p in self.uploads.iterdir():
            if not p.is_file() or p.name in known:
                continue
            # A staged upload (hidden .tmp) may belong to a request in flight in another process: only old ones.
            if p.name.startswith(".") and now - p.stat().st_mtime < 3600:
                continue
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
        if n:
            log.info("deleted %d file(s) under %s that no gallery row names", n, self.uploads)
        return n

    def remove(self, image_id: int) -> dict[str, Any]:
        """Remove one image; its file goes too when it was uploaded through the API.

        Raises:
            ApiError: 404 when the id is not in the gallery.
        """
        self._refresh()
        try:
            meta = self.gallery.metadata([image_id])[0]
        except GalleryError:
            raise ApiError(404, "unknown-id", f"no image with id {image_id} in the gallery") from None
        if self.gallery.remove_ids([image_id]) == 0:
            raise ApiError(404, "unknown-id", f"no image with id {image_id} in the gallery")
        path = Path(meta.path)
        if path.parent == self.uploads:
            # After the commit: a crash here leaves an orphan file, never a row without its file.
            path.unlink(missing_ok=True)
        self.gallery.maybe_save()
        return {"id": image_id, "path": str(path), "removed": True}

    def close(self) -> None:
        """Write pending index changes and release the DB."""
        self.gallery.close()

    # ---- read-only, any thread ---------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Gallery size, model, index type, search device, generation."""
        g, ex = self.gallery, self.extractor
        pre = ex.preprocess
        return {
            "gallery_size": g.ntotal,
            "generation": g.generation,
            "gallery": g.describe(),
            "index": {"type": g.spec.kind, "description": g.spec.describe()},
            "search_device": g.search_device,
            "model": {"fingerprint": ex.fingerprint, "description": ex.description, "dim": ex.dim,
                      "input_size": [pre.height, pre.width]},
        }


# --------------------------------------------------------------------------- response schemas


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

    query: str
    camid: int | None
    rerank: bool
    filter: FilterOut
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


# --------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may send."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = DEFAULT_MAX_FILES

    def body_limit(self, method: str, path: str) -> int:
        """Largest request body accepted for a route (files + multipart overhead)."""
        if method == "POST" and path == "/query":
            return self.max_upload_bytes + FORM_OVERHEAD_BYTES
        if method == "POST" and path == "/gallery":
            return self.max_files * (self.max_upload_bytes + FORM_OVERHEAD_BYTES)
        return FORM_OVERHEAD_BYTES


def _json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a folder
        pass
    finally:
        os.close(fd)


class _GuardMiddleware:
    """API key on every request, and a body size cap enforced while the body is received."""

    def __init__(self, app: Any, api_key: str | None, limits: ServiceLimits) -> None:
        self.app, self.api_key, self.limits = app, api_key, limits

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.api_key is not None and not _key_ok(headers.get(API_KEY_HEADER.lower()), self.api_key):
            await _json_response(401, {"detail": f"missing or wrong {API_KEY_HEADER} header", "reason": "unauthorized"},
                                 {"WWW-Authenticate": API_KEY_HEADER})(scope, receive, send)
            return
        limit = self.limits.body_limit(scope["method"], scope["path"])
        try:
            declared = int(headers.get("content-length", b"0") or 0)
        except ValueError:
            declared = 0
        message = f"request body exceeds the {limit}-byte limit of {scope['method']} {scope['path']}"
        if declared > limit:  # refuse before reading a byte
            await _json_response(413, {"detail": message, "reason": "too-large"})(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:  # a body without (or lying about) Content-Length
                    raise ApiError(413, "too-large", message)
            return msg

        await self.app(scope, limited_receive, send)


def _key_ok(given: bytes | str | None, expected: str) -> bool:
    if given is None:
        return False
    if isinstance(given, str):
        given = given.encode("latin-1", "replace")
    return hmac.compare_digest(given, expected.encode())


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
    core = SearchCore(workspace, model, device, flip, refresh_interval_s)
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
        if api_key is not None and not _key_ok(given, api_key):
            raise ApiError(401, "unauthorized", f"missing or wrong {API_KEY_HEADER} header")

    app = FastAPI(
        title="reid-search",
        summary="Person re-identification search over an indexed gallery.",
        version=_version(),
        lifespan=lifespan,
        dependencies=[Depends(check_key)] if api_key is not None else [],
    )
    app.add_middleware(_GuardMiddleware, api_key=api_key, limits=limits)
    app.state.core, app.state.batcher, app.state.limits = core, batcher, limits
    app.state.close = close  # for an app that is never served (shutdown calls it otherwise)
    app.state.settings = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_queue": max_queue,
                          "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_files": max_files,
                          "api_key_required": api_key is not None}

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return _json_response(exc.status, {"detail": exc.message, "reason": exc.reason}, headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):  # last resort; see as_api_error
        err = as_api_error(exc, "the request")
        return _json_response(err.status, {"detail": err.message, "reason": err.reason})

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
                              "exclude_track", "keep_same_camera"})

    @app.post("/query", response_model=QueryOut, responses=errors,
              dependencies=[Depends(_only(query_fields, query_fields | {"file"}))])
    async def query(
        request: Request,
        file: Annotated[UploadFile, File(description="The query image (any format Pillow reads).")],
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
    ) -> dict[str, Any]:
        """Find the person in the uploaded image among the gallery (same hits as `reid-search query --json`).

        The filters are ANDed and evaluated inside the gallery's search: `top_k` hits
        come back whenever that many crops pass.
        """
        from reid_search.data import parse_name

        form = await request.form()
        if len(form.getlist("file")) != 1:
            raise ApiError(422, "one-file", "send exactly one image in field 'file'")
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
        name = file.filename or "upload"
        if cam is None:
            info = parse_name(Path(name.replace("\\", "/")).name)
            cam = info.camid if info is not None and 0 <= info.camid <= MAX_LABEL else None
        with batcher.coming():
            st = await staged(file, None, keep=False)
        hits = await batcher.submit(QueryJob(st.image, k, cam, rr, where, keep))
        return {"query": name, "camid": cam, "rerank": rr, "filter": filter_dict(where, keep),
                "hits": [h.to_dict() for h in hits]}

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
