"""Indexing a folder: walk, hash, embed what is new or changed, commit in chunks.

The folder is walked recursively in sorted order and every file hashed
(sha256). Files whose path and hash are in the gallery already are
*unchanged*; new paths are *indexed*; known paths with another hash are
*replaced* (the old row and vector are deleted in the same transaction that
adds the new ones). Only new and changed files go through the model, streamed
by :func:`reid_search.extract.iter_features`.

Results are committed every ``commit_every`` images or ``commit_seconds``
seconds, whichever comes first; each commit is what the report counts, so
an interrupted run loses at most the uncommitted tail and a re-run skips
everything committed (as unchanged).

Labels: a crop's pid/camid/seq/frame come from its Market/Duke-style name;
a *manifest* (CSV or JSON Lines with a ``path`` column relative to the folder
and any of ``camid``, ``time`` (ISO 8601; naive means UTC), ``track``,
``pid``) lists the crops to index and overrides those labels. A bad manifest
row is skipped with its reason (``bad-manifest-row``); the rest is indexed.

A re-index (``reindex=True``) validates the folder, then builds the new
gallery beside the old one (:meth:`GalleryWriter.replacing`) and switches only
when at least one crop was embedded; otherwise the old gallery stays.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import mimetypes
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from reid_search.data import IMAGE_EXTENSIONS, is_image_name, labels_from_name, walk_files
from indexer.spec import IndexSpec
from reid_search.errors import DataError, GalleryError
from reid_search.extract import Extractor, iter_features
from reid_search.gallery import GalleryWriter, NewImage
from reid_search.limits import MAX_LABEL, MAX_TRACK_CHARS, MIN_PID
from reid_search.timeutil import parse_iso

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    """What one :func:`index_folder` run did."""

    folder: Path
    indexed: int = 0
    replaced: int = 0
    unchanged: int = 0
    removed: int = 0
    dropped: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (path, reason, detail)
    seconds: float = 0.0

    @property
    def seen(self) -> int:
        """Image files found under the folder."""
        return self.indexed + self.replaced + self.unchanged + len(self.skipped)

    @property
    def usable(self) -> int:
        """Files that are in the gallery after the run."""
        return self.indexed + self.replaced + self.unchanged

    def skipped_by_reason(self) -> dict[str, int]:
        """Skipped files per reason code (``corrupt``, ``empty``, ``not-an-image`` ...)."""
        return dict(sorted(Counter(r for _, r, _ in self.skipped).items()))

    def summary(self) -> str:
        """One line, e.g. ``indexed 8, replaced 0, unchanged 0, removed 0, skipped 2 (corrupt 1, empty 1)``."""
        skipped = f"skipped {len(self.skipped)}"
        if self.skipped:
            skipped += " (" + ", ".join(f"{r} {n}" for r, n in self.skipped_by_reason().items()) + ")"
        dropped = f"dropped {self.dropped} (re-index), " if self.dropped else ""
        return (f"{dropped}indexed {self.indexed}, replaced {self.replaced}, unchanged {self.unchanged}, "
                f"removed {self.removed}, {skipped}")

    def nothing_indexed(self) -> str:
        """The one-line complaint when :attr:`usable` is 0, naming the first skipped file and why."""
        first = self.skipped[0] if self.skipped else None
        detail = f"; first: {Path(first[0]).name}: {first[2]}" if first else ""
        return f"nothing could be indexed in {self.folder}: {self.summary()}{detail}"


@dataclass(frozen=True)
class Labels:
    """What is known about a crop besides its pixels (manifest values, else its name)."""

    pid: int | None = None
    camid: int | None = None
    seq: int | None = None
    frame: int | None = None
    time: datetime | None = None
    track: str | None = None


@dataclass
class _Todo:
    path: Path
    sha256: str
    size: int
    old_id: int | None
    labels: Labels


MANIFEST_COLUMNS = ("path", "camid", "time", "track", "pid")

parse_time = parse_iso  # the manifest's times: ISO 8601, naive means UTC, a trailing Z read on every Python


def sha256_file(path: str | os.PathLike[str], bufsize: int = 1 << 20) -> tuple[str, int]:
    """Content hash and size of a file.

    Raises:
        OSError: the file cannot be read (missing, broken link, permissions).
    """
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def name_labels(path: Path) -> Labels:
    """Labels a Market/Duke-style file name gives (all ``None`` for other names)."""
    return Labels(*labels_from_name(path.name))


def _int(value: Any, name: str, low: int) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} {value!r} is not an integer")
    try:
        n = int(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not an integer") from None
    if not low <= n <= MAX_LABEL:
        raise ValueError(f"{name} {n} is out of range ({low}..{MAX_LABEL})")
    return n


def _manifest_row(raw: dict[str, Any], folder: Path) -> tuple[str, Labels]:
    """``(path relative to folder, labels)`` of one manifest row; ``ValueError`` says what is wrong."""
    path = raw.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ValueError("no path")
    rel = PurePosixPath(path.strip().replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"path {path!r} must be relative to {folder} and stay inside it")
    t = raw.get("time")
    when = None
    if t is not None and not (isinstance(t, str) and not t.strip()):
        if not isinstance(t, str):
            raise ValueError(f"time {t!r} is not an ISO 8601 string")
        try:
            when = parse_time(t)
        except ValueError:
            raise ValueError(f"time {t!r} is not ISO 8601 (e.g. 2024-05-01T13:45:00Z)") from None
    track = raw.get("track")
    if track is not None and not isinstance(track, (str, int)):
        raise ValueError(f"track {track!r} is not text")
    track = None if track is None or str(track).strip() == "" else str(track).strip()
    if track is not None and len(track) > MAX_TRACK_CHARS:
        raise ValueError(f"track is longer than {MAX_TRACK_CHARS} characters")
    pid = _int(raw.get("pid"), "pid", MIN_PID)
    camid = _int(raw.get("camid"), "camid", 0)
    named = name_labels(Path(rel.name))
    return rel.as_posix(), Labels(named.pid if pid is None else pid, named.camid if camid is None else camid,
                                  named.seq, named.frame, when, track)


def read_manifest(manifest: str | os.PathLike[str], folder: Path) -> tuple[dict[str, Labels], list[tuple[str, str, str]]]:
    """Parse a CSV or JSON Lines manifest: ``(relative path -> labels, skipped rows)``.

    Each skipped row is ``(where, "bad-manifest-row", reason)``.

    Raises:
        DataError: the file is missing, unreadable, or has no ``path`` column.
    """
    manifest = Path(manifest)
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"no such manifest: {manifest}; pass a CSV or JSON Lines file with a path column") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the manifest {manifest} ({exc}); it must be UTF-8 CSV or JSON Lines") from None
    jsonl = manifest.suffix.lower() in (".jsonl", ".ndjson", ".json") or text.lstrip().startswith("{")
    rows: list[tuple[int, dict[str, Any] | str]] = []
    if jsonl:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                rows.append((n, f"not JSON ({exc.msg})"))
                continue
            rows.append((n, obj if isinstance(obj, dict) else "not a JSON object"))
    else:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "path" not in [f.strip() for f in reader.fieldnames]:
            raise DataError(f"the manifest {manifest} has no path column; its first line must name the columns, "
                            f"e.g. {','.join(MANIFEST_COLUMNS)}")
        for rec in reader:
            extra = rec.pop(None, None)  # type: ignore[call-overload]
            rows.append((reader.line_num, "more fields than columns" if extra else {k.strip(): v for k, v in rec.items() if k}))
    if not rows:
        raise DataError(f"the manifest {manifest} lists no crops; give one row per crop with at least a path")
    out: dict[str, Labels] = {}
    skipped: list[tuple[str, str, str]] = []
    for n, rec in rows:
        where = f"{manifest}:{n}"
        if isinstance(rec, str):
            skipped.append((where, "bad-manifest-row", rec))
            continue
        try:
            rel, labels = _manifest_row(rec, folder)
        except ValueError as exc:
            skipped.append((where, "bad-manifest-row", str(exc)))
            continue
        if rel in out:
            skipped.append((where, "bad-manifest-row", f"path {rel} is listed twice; the first row counts"))
            continue
        out[rel] = labels
    return out, skipped


def _unsupported(name: str) -> bool:
    """An image file the indexer does not read (e.g. GIF)."""
    if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
        return False
    kind = mimetypes.guess_type(name)[0]
    return bool(kind and kind.startswith("image/"))


def walk_images(folder: Path) -> tuple[list[Path], list[tuple[str, str, str]]]:
    """Image files under ``folder`` (sorted; hidden files ignored) and the image files it cannot index."""
    paths: list[Path] = []
    skipped: list[tuple[str, str, str]] = []
    for p in walk_files(folder):  # the one listing order and hidden-file rule (reid_search.data)
        if is_image_name(p.name):
            paths.append(p)
        elif _unsupported(p.name):
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            skipped.append((str(p), "unsupported-format",
                            f"{p.suffix or 'this'} images are not indexed; convert to one of {exts}"))
    return paths, skipped


def _hash(path: Path) -> tuple[str, int] | tuple[None, tuple[str, str]]:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        return None, ("missing", "file not found (broken link, or a manifest path that does not exist)")
    except PermissionError as exc:
        return None, ("unreadable", f"permission denied: {exc.strerror}")
    except IsADirectoryError:
        return None, ("not-an-image", "a folder named like an image")
    except OSError as exc:
        return None, ("unreadable", f"cannot read: {exc.strerror}")


def check_folder(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a Path, when it is an existing folder.

    Raises:
        DataError: missing, or a file, with what to pass instead.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"no such folder: {folder}; pass the folder of gallery crops (e.g. bounding_box_test)")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder; pass the folder that holds the gallery crops")
    return folder


def index_folder(
    gallery: GalleryWriter,
    folder: str | os.PathLike[str],
    extractor: Extractor,
    *,
    manifest: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    prune: bool = False,
    reindex: bool = False,
    spec: IndexSpec | None = None,
    commit_every: int = 1024,
    commit_seconds: float = 10.0,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> IndexReport:
    """Bring the gallery up to date with the images under ``folder`` (or those a manifest lists).

    Args:
        manifest: CSV or JSON Lines file listing the crops (``path`` relative to
            ``folder``) with any of ``camid``, ``time``, ``track``, ``pid``.
        prune: also delete gallery images under ``folder`` whose files are gone.
        reindex: replace the whole gallery (e.g. to switch models): built beside
            the old one and switched atomically once something was embedded.
        spec: switch the gallery written (with ``reindex``, the new one) to this index
            type and parameters before adding.
        commit_every / commit_seconds: commit after this many images or seconds.
        progress: called with the number of files handled, as they are.
        on_total: called once with the number of image files found.

    Raises:
        DataError: ``folder`` is missing, not a folder, or holds no image files; a bad
            manifest file; with ``reindex``, no image could be embedded (the old gallery stays).
        GalleryError: the gallery was indexed with another model (and not ``reindex``).
    """
    t0 = time.perf_counter()
    folder = check_folder(folder)
    report = IndexReport(folder)
    if manifest is not None:
        listed, report.skipped = read_manifest(manifest, folder)
        items = [(folder / PurePosixPath(rel), labels) for rel, labels in listed.items()]
    else:
        paths, report.skipped = walk_images(folder)
        items = [(p, name_labels(p)) for p in paths]
    if on_total is not None:
        on_total(len(items) + len(report.skipped))
    if progress is not None and report.skipped:
        progress(len(report.skipped))
    if not items:
        if manifest is not None:
            raise DataError(f"no usable rows in the manifest {manifest} ({len(report.skipped)} bad); "
                            f"first: {report.skipped[0][2] if report.skipped else '-'}")
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no images in {folder} (or its subfolders); expected files ending in {exts}")
    if not reindex:
        gallery.check_model(extractor.fingerprint, extractor.dim)
        if spec is not None:
            gallery.set_spec(spec)
        _index_items(gallery, folder, items, extractor, report, batch_size=batch_size, num_workers=num_workers,
                     prune=prune, commit_every=commit_every, commit_seconds=commit_seconds, progress=progress)
    else:
        with gallery.replacing() as new:
            if spec is not None:
                new.set_spec(spec)
            _index_items(new, folder, items, extractor, report, batch_size=batch_size, num_workers=num_workers,
                         prune=False, commit_every=commit_every, commit_seconds=commit_seconds, progress=progress)
            # usable, not indexed: what the new gallery would hold (the same count for a fresh build, and the
            # rule the CLI applies to incremental runs); switching to an empty gallery would lose the old one.
            if report.usable == 0:
                raise DataError(f"{report.nothing_indexed()}; re-index: no image could be embedded, "
                                "so the gallery is unchanged; check the model and the images")
        report.dropped = gallery.replaced_count
    report.seconds = time.perf_counter() - t0
    log.info("%s: %s in %.1fs", folder, report.summary(), report.seconds)
    return report


def _index_items(gallery: GalleryWriter, folder: Path, items: list[tuple[Path, Labels]], extractor: Extractor,
                 report: IndexReport, *, batch_size: int, num_workers: int | None, prune: bool, commit_every: int,
                 commit_seconds: float, progress: Callable[[int], None] | None) -> None:
    """Hash, compare, embed and commit ``items`` into ``gallery`` (filling ``report``)."""
    root = gallery.register_root(folder)
    known = gallery.existing(folder)
    todo: list[_Todo] = []
    paths = [p for p, _ in items]
    same: list[tuple[Path, Labels, str, int, int]] = []  # known path, same bytes: maybe relabelled by a manifest
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib releases the GIL
        hashes = (h for s in range(0, len(paths), 4096) for h in pool.map(_hash, paths[s : s + 4096]))
        for (path, labels), res in zip(items, hashes):
            rel = path.relative_to(folder).as_posix()
            old = known.get(rel)
            if res[0] is None:
                reason, detail = res[1]  # type: ignore[misc]
                report.skipped.append((str(path), reason, detail))
                if progress is not None:
                    progress(1)
            elif old is not None and old[1] == res[0]:
                same.append((path, labels, res[0], int(res[1]), old[0]))  # type: ignore[arg-type]
            else:
                todo.append(_Todo(path, res[0], int(res[1]), old[0] if old else None, labels))  # type: ignore[arg-type]
    relabel = [x for x in same if x[1] != name_labels(x[0])]
    changed: set[int] = set()
    for s in range(0, len(relabel), 10_000):
        part = relabel[s : s + 10_000]
        for (_, labels, _, _, _), m in zip(part, gallery.metadata([x[4] for x in part])):
            if (m.pid, m.camid, m.time, m.track) != (labels.pid, labels.camid, labels.time, labels.track):
                changed.add(m.id)
    for path, labels, sha, size, old_id in same:
        if old_id in changed:  # same bytes, new labels: re-committed (the vector is recomputed)
            todo.append(_Todo(path, sha, size, old_id, labels))
        else:
            report.unchanged += 1
            if progress is not None:
                progress(1)
    log.info("%s: %d files, %d unchanged, %d to embed (root %s)", folder, len(paths), report.unchanged, len(todo), root)

    pending: list[tuple[_Todo, np.ndarray]] = []
    stale: list[int] = []  # old ids of changed files that no longer load
    last_commit = time.monotonic()

    def commit() -> None:
        nonlocal pending, stale, last_commit
        if not pending and not stale:
            return
        images = [NewImage(t.path, t.sha256, t.size, t.labels.pid, t.labels.camid, t.labels.seq, t.labels.frame,
                           t.labels.time, t.labels.track) for t, _ in pending]
        feats = np.stack([f for _, f in pending]) if pending else np.zeros((0, extractor.dim), np.float32)
        replace = [t.old_id for t, _ in pending if t.old_id is not None] + stale
        gallery.add_images(images, feats, extractor.fingerprint, replace_ids=replace)
        # Counted only now that the rows are committed.
        report.replaced += sum(t.old_id is not None for t, _ in pending)
        report.indexed += sum(t.old_id is None for t, _ in pending)
        report.removed += len(stale)
        pending, stale = [], []
        last_commit = time.monotonic()
        gallery.maybe_save()

    try:
        for batch in iter_features([t.path for t in todo], extractor, batch_size=batch_size,
                                   num_workers=num_workers, progress=progress):
            for j, feat in zip(batch.indices, batch.features):
                pending.append((todo[j], feat))
            for j, reason, detail in batch.failures:
                report.skipped.append((str(todo[j].path), reason, detail))
                if todo[j].old_id is not None:
                    stale.append(todo[j].old_id)  # type: ignore[arg-type]
            if len(pending) >= commit_every or time.monotonic() - last_commit >= commit_seconds:
                commit()
        commit()
        if prune:
            present = {p.relative_to(folder).as_posix() for p in paths}
            gone = [i for rel, (i, _) in known.items() if rel not in present]
            report.removed += gallery.remove_ids(gone)
    finally:
        try:
            gallery.save()
        except GalleryError as exc:  # do not hide the error that got us here
            log.warning("could not save the index: %s", exc)

