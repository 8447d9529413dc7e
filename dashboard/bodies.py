"""Request bodies: the size limit (`BodyLimit`) and reading a JSON object with known keys (`read_object`).

The limit holds whatever the client claims: a `Content-Length` over it is refused before the app runs, and a
chunked or under-declared body is counted as it arrives, so no handler ever holds more than `limit` bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dashboard.errors import ApiError, error_response

MAX_REASON = 500  # characters in an operator's reason for a change
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BodyTooLarge(ApiError):
    """A request body over the limit: 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large (limit {limit} bytes)")


class BodyLimit:
    """ASGI middleware: request bodies over `limit` bytes get 413 and are never read whole."""

    def __init__(self, app: ASGIApp, limit: int, paths: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.paths = dict(paths or {})  # larger limits for some paths, such as span batches

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope["path"], self.limit)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await error_response(413, str(BodyTooLarge(limit)), {"connection": "close"})(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() and len(value) <= 18 else None
    return None


async def read_object(
    request: Request, allowed: Collection[str] | None, required: Collection[str] = ()
) -> dict[str, object]:
    """The body as a JSON object with every `required` key and only `allowed` ones (None: any), or 400/422."""
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "expected a JSON object body")
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except ValueError as err:  # also bad UTF-8, and integers too long to convert
        raise ApiError(400, f"invalid JSON body: {err}") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(422, f"expected a JSON object body, got {type(body).__name__}")
    unknown = [key for key in body if allowed is not None and key not in allowed]
    if unknown and allowed is not None:
        raise ApiError(422, f"{unknown[0]}: unknown key (expected one of: {', '.join(allowed)})")
    for key in required:
        if key not in body:
            raise ApiError(422, f"{key}: required key is missing")
    return body


def _not_json(constant: str) -> object:
    """Python's json reads NaN and Infinity, which are not JSON and which no answer could carry back."""
    raise ValueError(f"{constant} is not JSON")


def text_field(body: dict[str, object], key: str, max_length: int, default: str = "") -> str:
    """A one-line text field of at most `max_length` characters, or 422."""
    value = body.get(key, default)
    if not isinstance(value, str):
        raise ApiError(422, f"{key}: expected a string, got {value!r}")
    if len(value) > max_length:
        raise ApiError(422, f"{key}: expected at most {max_length} characters, got {len(value)}")
    if _CONTROL.search(value):
        raise ApiError(422, f"{key}: expected one line of text without control characters")
    return value


def reason_of(body: dict[str, object], request: Request | None = None) -> str:
    """The operator's reason for a change: `reason` in the body, else the `reason` query parameter."""
    if "reason" not in body and request is not None and "reason" in request.query_params:
        return text_field({"reason": request.query_params["reason"]}, "reason", MAX_REASON)
    return text_field(body, "reason", MAX_REASON)
