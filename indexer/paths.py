"""Paths as the metadata DB stores them: a lossless codec for names that are not UTF-8, and the
absolute form every stored path is relative to.

Image paths are stored relative to a registered gallery root, POSIX separators.
A file name that is not valid UTF-8 (surrogate-escaped by Python) is kept
losslessly: that component is percent-escaped behind a marker character, so
every DB can store it and prefix queries on folders keep working.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote_from_bytes, unquote_to_bytes

_MARK = "\ufffe"  # starts a path component stored escaped (a noncharacter: never in a real name)


def _enc_part(part: str) -> str:
    try:
        part.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes of a name that is not UTF-8
        return _MARK + quote_from_bytes(part.encode("utf-8", "surrogateescape"), safe="")
    return _MARK + quote_from_bytes(part.encode("utf-8"), safe="") if part.startswith(_MARK) else part


def _dec_part(part: str) -> str:
    return unquote_to_bytes(part[1:]).decode("utf-8", "surrogateescape") if part.startswith(_MARK) else part


def db_path(path: str) -> str:
    """The form of a POSIX path (str, surrogate-escaped where not UTF-8) that every DB can store.

    Components that are valid UTF-8 are kept as they are, so prefix queries on
    folders keep working; the others are percent-escaped behind a marker.
    :func:`os_path` inverts it exactly.
    """
    return "/".join(_enc_part(p) for p in path.split("/"))


def os_path(stored: str) -> str:
    """Inverse of :func:`db_path`."""
    return "/".join(_dec_part(p) for p in stored.split("/")) if _MARK in stored else stored


def abs_path(p: Path) -> Path:
    """Absolute path: folders fully resolved; for anything else the parent folder is
    resolved and the last component kept as named (a symlinked crop keeps its name)."""
    p = Path(os.path.abspath(p))
    if p.is_dir() or not p.name:
        return p.resolve()
    return p.parent.resolve() / p.name
