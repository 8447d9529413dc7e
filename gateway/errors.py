"""The gateway's failures and the one place they become HTTP responses.

Upstream failures are raised (or passed) as `UpstreamError` subclasses; each carries the status the client
sees, the retry condition it satisfies (`retry_on`, matched against `retries.on` in the config) and the
`error.type` recorded for telemetry. Requests the gateway refuses itself (bad input, no route, breakers) are
answered by `local_reply`, so every response the gateway makes has the same shape and carries `x-request-id`.
"""

from __future__ import annotations

from http import HTTPStatus


class UpstreamError(Exception):
    status = 502
    retry_on = ""
    error_type = "upstream_error"


class ConnectFailed(UpstreamError):
    status = 503
    retry_on = "connect-failure"
    error_type = "connect_failure"


class UpstreamReset(UpstreamError):
    status = 502
    retry_on = "reset"
    error_type = "reset"


class UpstreamProtocolError(UpstreamError):
    status = 502
    retry_on = ""
    error_type = "protocol_error"


class TryTimeout(UpstreamError):
    status = 504
    retry_on = "gateway-error"
    error_type = "per_try_timeout"


class UpstreamStalled(UpstreamError):
    """An upstream stopped reading the request body, or sending the response body, for `limits.body_timeout`."""

    status = 504
    retry_on = ""
    error_type = "upstream_stalled"


class RequestTimeout(UpstreamError):
    status = 504
    retry_on = ""
    error_type = "request_timeout"


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def local_reply(status: int, reason: str, request_id: bytes, keep_alive: bool, head_only: bool = False) -> bytes:
    """A complete response made by the gateway itself: one line of plain text saying why."""
    body = b"meshgate: " + reason.encode("utf-8", "replace") + b"\n"
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nx-request-id: %s\r\n"
        % (
            status,
            reason_phrase(status),
            len(body),
            request_id,
        )
    )
    head += b"\r\n" if keep_alive else b"connection: close\r\n\r\n"
    return head if head_only else head + body
