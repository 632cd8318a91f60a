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
