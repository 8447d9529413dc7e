"""How the API reports failures: every error is `{"error": "one line"}` with its status code.

Handlers raise `ApiError(status, reason)`; Starlette's own 404 and 405 come through `on_http_exception`; anything
unexpected is caught by `ErrorBoundary`, logged with its traceback and answered with a bare 500, so a traceback
never reaches a client.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("dashboard.api.operator")

MAX_REASON = 300  # characters of an error reason; longer reasons are cut with an ellipsis
HEADERS = {"x-content-type-options": "nosniff", "cache-control": "no-store"}


class ApiError(Exception):
    """A failure the client caused or must handle, answered as `{"error": reason}` with `status`.

    >>> raise ApiError(404, "no service named 'catalog'")
    """

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


def one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 1] + "…"


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": one_line(reason)}, status, headers={**HEADERS, **(headers or {})})


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
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
