"""HTTP/1.1 message rules both sides of the gateway share: line and framing limits, Connection options, trailers.

The client side (proxy.py) and the upstream side (upstream.py) parse with httptools; what httptools leaves to the
caller is here, so both sides, and the dashboard's own HTTP server (dashboard/guard.py), apply the same limits.
"""

from __future__ import annotations

from gateway.propagation import TRACE_HEADERS

# Framing bytes a chunked body may carry per chunk besides its data: the size line (at most 16 hex digits) and
# CRLFs. Extensions and trailers beyond that share the header limit (`framing_exceeds`).
CHUNK_FRAMING = 24
# What an HTTP/2 client sends first (RFC 9113 §3.4): a connection starting with it is handed to h2server.py.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_LINE = 8 * 1024  # a request target, or a status line, besides the header limit
_PLAIN_CONNECTION = frozenset((b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade"))
# Connection options, and fields a Connection header may not make hop-by-hop: dropping the framing of a message
# that is forwarded with its body would let that body be read as another message.
_NEVER_HOP_BY_HOP = frozenset((b"close", b"keep-alive", b"upgrade", b"content-length", b"transfer-encoding"))

# Fields a trailer never carries onward, either way (RFC 9110 §6.5.1): framing, routing, request modifiers,
# authentication, response control and payload processing; and hop-by-hop fields, the request's ID and its trace
# context, which trailers must not change.
FORBIDDEN_TRAILERS = frozenset(
    (
        *TRACE_HEADERS,
        *(b"age", b"authorization", b"cache-control", b"connection", b"content-encoding", b"content-length"),
        *(b"content-range", b"content-type", b"cookie", b"date", b"expect", b"expires", b"forwarded", b"host"),
        *(b"if-match", b"if-modified-since", b"if-none-match", b"if-range", b"if-unmodified-since"),
        *(b"keep-alive", b"location", b"max-forwards", b"pragma", b"range", b"retry-after", b"set-cookie"),
        *(b"te", b"trailer", b"transfer-encoding", b"upgrade", b"vary", b"warning", b"www-authenticate"),
        *(b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-request-id"),
    )
)

# What a client connection does with a request header (proxy.py for HTTP/1.1, h2server.py for HTTP/2).
(
    REQ_DROP,
    REQ_HOST,
    REQ_CONNECTION,
    REQ_TRANSFER_ENCODING,
    REQ_UPGRADE,
    REQ_CONTENT_LENGTH,
    REQ_REQUEST_ID,
    REQ_XFF,
    REQ_XFP,
    REQ_XFH,
    REQ_TRACE,
) = range(1, 12)
REQUEST_FIELDS = {
    **dict.fromkeys(TRACE_HEADERS, REQ_TRACE),  # read into the trace context, written again by inject()
    b"host": REQ_HOST,
    b"connection": REQ_CONNECTION,
    b"keep-alive": REQ_DROP,
    b"te": REQ_DROP,
    b"trailer": REQ_DROP,
    b"http2-settings": REQ_DROP,  # only meaningful with `Upgrade: h2c`, which is never forwarded
    b"transfer-encoding": REQ_TRANSFER_ENCODING,
    b"upgrade": REQ_UPGRADE,
    b"content-length": REQ_CONTENT_LENGTH,
    b"x-request-id": REQ_REQUEST_ID,
    b"x-forwarded-for": REQ_XFF,
    b"x-forwarded-proto": REQ_XFP,
    b"x-forwarded-host": REQ_XFH,
}


def forwardable_trailer(lname: bytes) -> bool:
    return lname not in FORBIDDEN_TRAILERS and not lname.startswith(b"proxy-")


def framing_exceeds(raw: int, data: int, chunks: int, max_head: int) -> bool:
    """Whether `raw` bytes read of a chunked body holding `data` bytes of data in `chunks` chunks carry more
    besides than chunk framing (CHUNK_FRAMING a chunk) and trailers or chunk extensions within the header limit.
    httptools gathers a trailer field or an extension across reads by concatenation before any callback sees it,
    so only this count can stop one that never ends. The limit is twice the header limit plus a line: the raw count
    also holds the end of the head that arrived in the same reads."""
    return raw - data - CHUNK_FRAMING * chunks > 2 * max_head + MAX_LINE


def connection_options(value: bytes) -> list[bytes]:
    """The header names a Connection header declares hop-by-hop (besides close, keep-alive and upgrade)."""
    if value in _PLAIN_CONNECTION:
        return []
    tokens = (token.strip().lower() for token in value.split(b","))
    return [token for token in tokens if token not in _NEVER_HOP_BY_HOP]


def drop_headers(parts: list[bytes], names: list[bytes]) -> list[bytes]:
    """Drop the headers a Connection header names (hop-by-hop by declaration)."""
    kept: list[bytes] = []
    for i in range(0, len(parts), 4):
        if parts[i].lower() not in names:
            kept += parts[i : i + 4]
    return kept


def request_head(
    method: bytes,
    url: bytes,
    host: bytes,
    headers: list[bytes],
    forwarded: tuple[bytes, bytes, bytes, bytes],
    chunked: bytes,
    upgrade: bytes,
    trace: bytes,
) -> bytes:
    """The head a gateway sends upstream. `headers` are the client's, rendered (`name, ": ", value, CRLF` each),
    hop-by-hop ones already dropped; `forwarded` is (X-Forwarded-For, -Proto, -Host, x-request-id) as decided for
    this request; `trace` the trace context lines (`propagation.inject`). A chunked body is re-framed by the
    gateway, and an upgrade asked for again."""
    forwarded_for, proto, forwarded_host, request_id = forwarded
    parts = [method, b" ", url, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    parts += headers
    parts += (
        b"x-forwarded-for: ",
        forwarded_for,
        b"\r\nx-forwarded-proto: ",
        proto,
        b"\r\nx-forwarded-host: ",
        forwarded_host,
        b"\r\nx-request-id: ",
        request_id,
        b"\r\n",
    )
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if upgrade:
        parts += (b"connection: upgrade\r\nupgrade: ", upgrade, b"\r\n")
    parts += (trace, b"\r\n")
    return b"".join(parts)
