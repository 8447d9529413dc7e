"""How the dashboard reports failures: every error is `{"error": "one line"}` with its status code.

Every failure the dashboard expects is a `DashboardError`: each subclass carries the `status` a client sees, the
`headers` that go with it (`Retry-After`, `WWW-Authenticate`) and a one-line `reason`. `on_dashboard_error` is
the one place they become responses (registered in `dashboard.app`), as `gateway.errors` does for upstream
failures. The roots below it live with what fails: `StoreError` (503), `VersionConflict` (409), `SignalsError`
(503), `JaegerError` (502), `IdentityError` and `TokenError` (422), `LoginError` (401 or 429); handlers raise
`ApiError(status, reason)` for the rest. Starlette's own 404 and 405 come through `on_http_exception`; anything
unexpected is caught by `ErrorBoundary`, logged with its traceback and answered with a bare 500, so a traceback
never reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("meshgate.dashboard")

MAX_ERROR_TEXT = 300  # characters of an error's one-line reason in an answer; longer ones are cut with an ellipsis
HEADERS = {"x-content-type-options": "nosniff", "cache-control": "no-store"}
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class DashboardError(Exception):
    """A failure the dashboard expects, answered as `{"error": reason}` with `status` and `headers`.

    Subclasses set `status` (and `headers`) for their kind; `str(err)` stays the bare message, for logs and the
    command line, and `reason` is what a client reads.

    >>> class StoreError(DashboardError):
    ...     status = 503
    """

    status: int = 500
    headers: Mapping[str, str] = _NO_HEADERS

    @property
    def reason(self) -> str:
        return str(self)


class ApiError(DashboardError):
    """A failure the client caused or must handle, with its status given where it is raised.

    >>> raise ApiError(404, "no service named 'catalog'")
    """

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.headers = dict(headers or {})


def one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_ERROR_TEXT else line[: MAX_ERROR_TEXT - 1] + "…"


def error_response(status: int, reason: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": one_line(reason)}, status, headers={**HEADERS, **(headers or {})})


async def on_dashboard_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DashboardError)
    if exc.status >= 500 and not isinstance(exc, ApiError):  # a dependency (store, Prometheus, Jaeger) failed
        log.error("%s during %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
    return error_response(exc.status, exc.reason, exc.headers)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    reason = {404: "not found", 405: f"method {request.method} not allowed"}.get(exc.status_code, exc.detail)
    if exc.status_code in (204, 304):  # no body allowed
        return Response(status_code=exc.status_code, headers=exc.headers)
    return error_response(exc.status_code, reason, dict(exc.headers or {}))


class ErrorBoundary:
    """Outermost middleware: an unexpected exception becomes a logged traceback and a one-line JSON 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if started:  # too late for a status line: let the server drop the connection
                raise
            await error_response(500, "internal error (logged on the dashboard)")(scope, receive, send)
