"""The search core: the gallery, the model and the search engine behind the routes.

:class:`SearchCore` embeds batches of :class:`QueryJob` and searches them, adds staged
uploads to the gallery and removes images; everything but staging runs on the single
model thread, so the FAISS index and the engine's caches never see a search and a
write at the same time.
"""

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import numpy as np
from PIL import Image
from torchvision.transforms import Resize

from reid_search.gallery import NewImage, RemoveFilter, SearchFilter
from reid_search.atomic import fsync_dir
from reid_search.app import session
from reid_search.app.session import calibrated_threshold, open_extractor, record_gallery_model, search_engine
from reid_search.engine import Hit, SearchEngine, query_filter
from reid_search.errors import GalleryError
from reid_search.timeutil import format_time
from reid_search.multiquery import search_crops
from reid_search.app.service.guard import ApiError, as_api_error
from reid_search.app.service.uploads import (
    EXT_BY_FORMAT,
    StagedUpload,
    copy_limited,
    decode_upload,
    image_format,
    upload_name,
)
from reid_search.transforms import build_eval_transform
from reid_search.app.workspace import Workspace

log = logging.getLogger(__name__)

# Files under uploads/ that no row names are deleted at start once this old (seconds).
ORPHAN_AGE_S = 600.0


@dataclass(frozen=True)
class QueryJob:
    """One /query request, decoded."""

    image: Image.Image
    top_k: int
    camid: int | None
    rerank: bool
    where: SearchFilter | None = None
    keep_same_camera: bool = False
    more: tuple[Image.Image, ...] = ()  # further crops of the same person (together=true)
    more_camids: tuple[int | None, ...] = ()
    fuse: str = "mean"


@dataclass(frozen=True)
class QueryAnswer:
    """The hits of one /query job and the threshold they were judged by (None: uncalibrated)."""

    hits: list[Hit]
    threshold: float | None


class SearchCore:
    """The gallery, the model and the search engine; every method but :meth:`stage` and
    the read-only properties runs on the single model thread.

    ``preprocess``: an ONNX model's declared preprocessing (see
    :func:`reid_search.app.session.open_extractor`); the gallery's model is fed the one
    recorded with the gallery, and uploads into an empty gallery record it.

    Raises:
        ReidSearchError: (constructor) no model, an unreadable model, an unusable DB,
            or a gallery indexed with another model.
    """

    def __init__(self, workspace: Workspace, model: Path | None = None, device: str = "auto", flip: bool = False,
                 refresh_interval_s: float = 1.0, precision: str = "auto",
                 preprocess: Mapping[str, Any] | None = None) -> None:
        self.workspace = workspace
        self.model_file, self.extractor = open_extractor(workspace, model, device=device, flip=flip,
                                                         precision=precision, preprocess=preprocess)
        # Looked up when called, as the CLI commands do: every app path opens its gallery through this one function.
        self.gallery = session.open_workspace_gallery(workspace)
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
        tmp, sha, size = copy_limited(src, folder, max_bytes, filename, fsync=keep)
        try:
            img = decode_upload(tmp, filename, max_pixels)
            ext = ""
            if keep:
                fmt = image_format(tmp)
                ext = EXT_BY_FORMAT.get(fmt or "", "")
                if not ext:
                    raise ApiError(415, "unsupported-format",
                                   f"upload {filename!r}: {fmt} images are not stored in galleries; "
                                   f"send {', '.join(sorted(set(EXT_BY_FORMAT) - {'MPO'}))}")
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
                self._engine = search_engine(self.workspace, self.gallery, self.extractor)
            except GalleryError as exc:
                raise ApiError(409, "gallery-model", str(exc)) from None
        return self._engine

    def _embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if self._engine is not None:
            return self._engine.embed_images(images)
        import torch  # an empty gallery has no engine yet: same steps as SearchEngine.embed_images

        return self.extractor.embed(torch.stack([self._transform(im) for im in images]))

    def search_batch(self, jobs: list[QueryJob]) -> list[Any]:
        """Embed ``jobs`` (all their crops) in one forward pass, then search each: a QueryAnswer or an exception per job."""
        self._refresh()
        try:
            engine = self.engine()
        except ApiError as exc:
            return [exc] * len(jobs)
        images = [im for j in jobs for im in (j.image, *j.more)]
        try:
            feats = engine.embed_images(images)
            rows: list[Any] = list(feats)
        except Exception:
            log.exception("embedding a batch of %d failed; embedding its images one by one", len(images))
            rows = []
            for im in images:
                try:
                    rows.append(engine.embed_images([im])[0])
                except Exception as exc:
                    rows.append(exc)
        # Each job's crops are consecutive in ``rows``; a job is an error, or its features.
        out: list[Any] = []
        feats_of: list[np.ndarray | None] = []
        at = 0
        for j in jobs:
            mine, at = rows[at:at + 1 + len(j.more)], at + 1 + len(j.more)
            bad = next((f for f in mine if isinstance(f, BaseException)), None)
            out.append(None if bad is None else as_api_error(bad, "embedding the query"))
            feats_of.append(None if bad is not None else np.stack(mine))
        thresholds = {rr: calibrated_threshold(self.workspace, self.extractor.fingerprint, rr)
                      for rr in {j.rerank for j in jobs}}
        # Single-crop k-NN queries with one top_k go to the store in one call, each with its own filter.
        groups: dict[int, list[int]] = {}
        for i, j in enumerate(jobs):
            if out[i] is None and not j.rerank and not j.more:
                groups.setdefault(j.top_k, []).append(i)
        for k, idx in groups.items():
            try:
                hits = engine.search(np.concatenate([feats_of[i] for i in idx]), top_k=k,
                                     camids=[jobs[i].camid for i in idx],
                                     where=[query_filter(jobs[i].where, jobs[i].camid, jobs[i].keep_same_camera)
                                            for i in idx], keep_same_camera=True)
                for i, h in zip(idx, hits):
                    out[i] = QueryAnswer(h, thresholds[False])
            except Exception:
                log.exception("a batched search of %d queries failed; searching them one by one", len(idx))
        for i, j in enumerate(jobs):
            if out[i] is not None:
                continue
            try:
                hits = search_crops(engine, feats_of[i], [j.camid, *j.more_camids], j.fuse, top_k=j.top_k,
                                    rerank=j.rerank, where=j.where, keep_same_camera=j.keep_same_camera)
                out[i] = QueryAnswer(hits, thresholds[j.rerank])
            except Exception as exc:
                out[i] = as_api_error(exc, "the search")
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
                fsync_dir(self.uploads)  # the files must be durable before the rows that name them
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
                record_gallery_model(self.workspace, self.model_file, self.extractor)
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
            files = self.workspace.remove_owned_files(m.path for m in metas)
            self.gallery.maybe_save()
        return {"removed": 0 if dry_run else len(metas), "matched": len(metas), "dry_run": dry_run,
                "ids": [m.id for m in metas], "files_deleted": files}

    def sweep_uploads(self) -> int:
        """Delete files under ``uploads/`` that no gallery row names (left by a crash between a
        removal's commit and its file deletion, or by an add that never committed).

        Only files older than :data:`ORPHAN_AGE_S`: a younger one may belong to an add
        in flight in another server on this workspace (e.g. during a rolling restart).
        """
        if not self.uploads.is_dir():
            return 0
        known = {m.path.name for batch in self.gallery.iter_metadata() for m in batch if m.path.parent == self.uploads}
        now, n = time.time(), 0
        for p in self.uploads.iterdir():
            if not p.is_file() or p.name in known or now - p.stat().st_mtime < ORPHAN_AGE_S:
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
