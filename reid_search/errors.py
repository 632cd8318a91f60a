"""Errors a user can cause and fix.

Every message names the remedy; the CLI prints it as one line and exits 1.
"""

from __future__ import annotations


class ReidSearchError(Exception):
    """Base class of the errors a user can fix; the message says how."""


class DataError(ReidSearchError):
    """A missing, empty or malformed dataset folder or image."""


class ModelError(ReidSearchError):
    """A missing, unreadable or incompatible model file."""


class GalleryError(ReidSearchError):
    """A gallery index that is missing, inconsistent or built with another model."""


def first_line(exc: BaseException, *, with_type: bool = True) -> str:
    """An exception on one line: ``Type: message`` (a DB driver's own error when it is wrapped).

    ``with_type=False`` gives the message alone (a client's ``message`` attribute
    when it has one, as pymilvus's errors do), or the type's name when it is empty.
    """
    inner = getattr(exc, "orig", None) or exc
    if not with_type:
        text = str(getattr(inner, "message", None) or inner).strip()
        return text.splitlines()[0] if text else type(inner).__name__
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else ''}"
