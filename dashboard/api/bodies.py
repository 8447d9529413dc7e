"""Request bodies: the size limit (`BodyLimit`) and reading a JSON object with known keys (`read_object`).

The limit holds whatever the client claims: a `Content-Length` over it is refused before the app runs, and a
chunked or under-declared body is counted as it arrives, so no handler ever holds more than `limit` bytes.

A refused body is then read and dropped (`drain`: up to `DRAIN_TIME` and `DRAIN_BYTES`) before the connection
closes, as the gateway's lingering close does (`gateway.proxy.DownstreamProtocol.linger`): a client that sends its
whole body before it reads would otherwise get a RST for the unread bytes, which destroys the 413 before it reads
it. uvicorn gives an app no way to close after the answer and go on reading, so the reading comes first; it also
works over TLS, where a half-close is not possible. A declared body too large to drain, or one behind
`Expect: 100-continue` (not sent until asked for), is answered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Collection, Mapping

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dashboard.errors import ApiError, error_response

MAX_REASON = 500  # characters in an operator's reason for a change
DRAIN_TIME = 2.0  # seconds a refused body is read and dropped before the connection closes (the gateway's LINGER)
DRAIN_BYTES = 64 << 20  # bytes of it, at most; a larger declared body is answered at once
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
            if declared <= DRAIN_BYTES and not _expects_continue(scope):
                await drain(receive)
            await error_response(413, str(BodyTooLarge(limit)), {"connection": "close"})(scope, receive, send)
            return
        seen = 0
        refused = False

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    if message.get("more_body", False):
                        await drain(receive)
                    raise BodyTooLarge(limit)
            return message

        async def closing(message: Message) -> None:
            # After a refused chunked body, close: uvicorn would otherwise read the rest, however long, to keep alive.
            if refused and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counted, closing)


async def drain(receive: Receive) -> None:
    """Read and drop the rest of a request body, for up to DRAIN_TIME seconds and DRAIN_BYTES bytes."""
    dropped = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_TIME):
            while dropped <= DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return
                dropped += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return


def _expects_continue(scope: Scope) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in scope["headers"])


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
