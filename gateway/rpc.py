"""gRPC's rules as the gateway applies them: status codes, the gateway's own errors, and `grpc-timeout`.

A gRPC call is an HTTP/2 request whose content-type starts with `application/grpc`. Its outcome is the
`grpc-status` field, in the trailers or, for an answer with no messages, in the headers (Trailers-Only); the HTTP
status is 200 either way. The gateway reads it for every signal, and answers with it when it fails a call itself.
"""

from __future__ import annotations

import math
from urllib.parse import quote

# The codes (grpc/doc/statuscodes.md); the metric label and the access log carry the number.
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 1, 2, 3, 4, 5
PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 7, 8, 12, 13, 14
DATA_LOSS, UNAUTHENTICATED = 15, 16
NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
# What counts as a failure unless a service says otherwise (Linkerd's default set).
DEFAULT_FAILURE_CODES = frozenset((UNKNOWN, DEADLINE_EXCEEDED, PERMISSION_DENIED, INTERNAL, UNAVAILABLE, DATA_LOSS))

# The gateway's own HTTP errors as gRPC codes; anything else is UNKNOWN (gRPC's HTTP-to-gRPC mapping, plus
# what a proxy means by each).
_FROM_HTTP = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    408: DEADLINE_EXCEEDED,
    429: RESOURCE_EXHAUSTED,
    431: RESOURCE_EXHAUSTED,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}

# `retries.on` conditions a Trailers-Only answer satisfies, by code. Unlike the HTTP ones they apply to gRPC's POST:
# a call that failed with one of them is retried when its request body is still held.
RETRY_CONDITIONS = {
    CANCELLED: "cancelled",
    DEADLINE_EXCEEDED: "deadline-exceeded",
    RESOURCE_EXHAUSTED: "resource-exhausted",
    UNAVAILABLE: "unavailable",
}
GRPC_RETRY_ON = tuple(RETRY_CONDITIONS.values())

_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def is_grpc(content_type: bytes) -> bool:
    return content_type.startswith(b"application/grpc")


def from_http(status: int) -> int:
    return _FROM_HTTP.get(status, UNKNOWN)


def parse_status(value: bytes) -> int:
    """A `grpc-status` value; anything but a code in range is UNKNOWN, as clients read it."""
    if value.isdigit() and len(value) <= 2:
        code = int(value)
        if code < len(NAMES):
            return code
    return UNKNOWN


def parse_timeout(value: bytes) -> float | None:
    """`grpc-timeout` (1 to 8 digits and a unit) in seconds; None when malformed, which gRPC servers ignore."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _UNITS:
        return None
    return int(digits) * _UNITS[unit]


def format_timeout(seconds: float) -> bytes:
    """The time left, for the next hop: the coarsest unit that keeps it within 8 digits, rounded up."""
    micros = max(1, math.ceil(seconds * 1e6))
    if micros < 100_000_000:
        return b"%du" % micros
    millis = math.ceil(micros / 1000)
    if millis < 100_000_000:
        return b"%dm" % millis
    return b"%dS" % min(99_999_999, math.ceil(millis / 1000))


def encode_message(message: str) -> bytes:
    """`grpc-message` is percent-encoded UTF-8 (grpc/doc/PROTOCOL-HTTP2.md)."""
    return quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")
