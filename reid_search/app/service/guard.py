"""Errors, limits and the guard middleware of the HTTP service.

:class:`ApiError` is every error the service answers itself (``{"detail": ..., "reason": ...}``);
:func:`as_api_error` maps any exception to one. :class:`ServiceLimits` caps what one
request may send, and :class:`GuardMiddleware` checks the API key and enforces the
body cap while the body is received (before any parsing).
"""

import hmac
import logging
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from reid_search.errors import ReidSearchError
from reid_search.limits import API_KEY_HEADER, DEFAULT_MAX_FILES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES

log = logging.getLogger(__name__)

# Multipart boundaries, part headers and the small form fields.
FORM_OVERHEAD_BYTES = 64 * 1024


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


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may send."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = DEFAULT_MAX_FILES

    def body_limit(self, method: str, path: str) -> int:
        """Largest request body accepted for a route (files + multipart overhead)."""
        if method == "POST" and path in ("/query", "/gallery"):  # /query: several crops with together=true
            return self.max_files * (self.max_upload_bytes + FORM_OVERHEAD_BYTES)
        return FORM_OVERHEAD_BYTES


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON answer with ``status`` (for the middleware, which runs outside FastAPI's handlers)."""
    return JSONResponse(body, status_code=status, headers=headers)


class GuardMiddleware:
    """API key on every request, and a body size cap enforced while the body is received."""

    def __init__(self, app: Any, api_key: str | None, limits: ServiceLimits) -> None:
        self.app, self.api_key, self.limits = app, api_key, limits

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.api_key is not None and not key_ok(headers.get(API_KEY_HEADER.lower()), self.api_key):
            await json_response(401, {"detail": f"missing or wrong {API_KEY_HEADER} header", "reason": "unauthorized"},
                                 {"WWW-Authenticate": API_KEY_HEADER})(scope, receive, send)
            return
        limit = self.limits.body_limit(scope["method"], scope["path"])
        try:
            declared = int(headers.get("content-length", b"0") or 0)
        except ValueError:
            declared = 0
        message = f"request body exceeds the {limit}-byte limit of {scope['method']} {scope['path']}"
        if declared > limit:  # refuse before reading a byte
            await json_response(413, {"detail": message, "reason": "too-large"})(scope, receive, send)
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


def key_ok(given: bytes | str | None, expected: str) -> bool:
    """Whether the API key ``given`` equals ``expected``, compared in constant time."""
    if given is None:
        return False
    if isinstance(given, str):
        given = given.encode("latin-1", "replace")
    return hmac.compare_digest(given, expected.encode())
