"""The HTTP/2 codec behind one small interface: connections configured with the gateway's limits, and the events.

The codec is ngh2, sans-I/O bindings to libnghttp2 (docs/decisions/0005-http2-codec.md has the measurements: it
costs about a twentieth of the pure-Python h2 per call). Only this module imports it, and only the HTTP/2 modules
(`h2server`, `h2client`) import this one, when a connection or a service first needs HTTP/2: a gateway that speaks
HTTP/1.1 only never loads the codec.

What both sides share is here: the settings each side announces, the windows, and the bounds on what a peer may
make us hold or do. libnghttp2 enforces them: the header list (decoded size and count, so an HPACK bomb stops at
`limits.max_header_bytes`), CONTINUATION frames per header block, concurrent streams (extra ones are refused with
REFUSED_STREAM until the client has acknowledged our SETTINGS; after that libnghttp2 ends the connection with
PROTOCOL_ERROR, stricter than RFC 9113 §5.1.2's stream error), the rate of stream resets (rapid reset,
CVE-2023-44487) and of other suspicious frames, and the SETTINGS and PING acknowledgements it will queue. A peer
past a bound gets GOAWAY; `closed()` then says so. The gateway adds one bound: connection WINDOW_UPDATEs per read.
"""

from __future__ import annotations

from ngh2 import (
    Configuration,
    Connection,
    ConnectionClosed,
    DataReceived,
    DenialOfServiceError,
    GoAwayReceived,
    InformationalResponseReceived,
    NGH2Error,
    RequestReceived,
    ResponseReceived,
    Role,
    Setting,
    SettingsReceived,
    StreamClosed,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)

__all__ = [
    "Codec",
    "ConnectionClosed",
    "DataReceived",
    "DenialOfServiceError",
    "GoAwayReceived",
    "InformationalResponseReceived",
    "NGH2Error",
    "RequestReceived",
    "ResponseReceived",
    "SettingsReceived",
    "StreamClosed",
    "StreamReset",
    "TrailersReceived",
    "WindowUpdated",
    "client",
    "closed",
    "goaway_frame",
    "server",
]

Codec = Connection

MAX_CONCURRENT_STREAMS = 256  # a client's streams at once on one connection (Envoy: 2^31 - 1; nginx: 128)
STREAM_WINDOW = 1 << 20  # what a stream may send before we read it: the most one stream makes us hold
CONNECTION_WINDOW = 16 << 20  # the same for a whole connection
PENDING_LIMIT = 256 * 1024  # bytes queued for one stream beyond the peer's window before its source is paused
MAX_CONTINUATIONS = 8  # CONTINUATION frames after one HEADERS (libnghttp2's default; a CONTINUATION flood stops)
RESETS = (1000, 33)  # stream resets a peer may send: a burst, then a rate per second (libnghttp2's defaults)
MAX_WINDOW_UPDATES = 10_000  # connection WINDOW_UPDATEs in one read past which it is a flood (libnghttp2 has no bound)
# What the codec names by number.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, REFUSED_STREAM, CANCEL = 0x0, 0x1, 0x2, 0x7, 0x8

# Connection-specific fields an HTTP/1.1 message may carry and an HTTP/2 one must not (RFC 9113 §8.2.2).
CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"host")
)


def _connection(role: Role, max_header_bytes: int, max_headers: int) -> Connection:
    config = Configuration(
        auto_window_update=False,  # data is acknowledged when it has been passed on: flow control is back-pressure
        max_inbound_header_list_size=max_header_bytes,
        max_inbound_header_count=max_headers + 8,  # and the pseudo-headers
        max_continuations=MAX_CONTINUATIONS,
        stream_reset_rate_limit=RESETS,
    )
    codec = Connection(role, config)
    settings = {
        Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        Setting.MAX_HEADER_LIST_SIZE: max_header_bytes,
        Setting.ENABLE_PUSH: 0,
    }
    if role is Role.SERVER:
        settings[Setting.MAX_CONCURRENT_STREAMS] = MAX_CONCURRENT_STREAMS
    codec.initiate_connection(settings)
    codec.set_local_window_size(CONNECTION_WINDOW)
    return codec


def server(max_header_bytes: int, max_headers: int) -> Connection:
    """The codec of a client connection that spoke HTTP/2 to us (prior knowledge, or ALPN h2)."""
    return _connection(Role.SERVER, max_header_bytes, max_headers)


def client(max_header_bytes: int, max_headers: int) -> Connection:
    """The codec of a connection we open to an h2c app or a peer gateway."""
    return _connection(Role.CLIENT, max_header_bytes, max_headers)


def goaway_frame(last_stream_id: int, error_code: int) -> bytes:
    """A GOAWAY frame made by hand (RFC 9113 §6.8), for when the codec itself gave up on the connection."""
    return b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + last_stream_id.to_bytes(4) + error_code.to_bytes(4)


def closed(codec: Connection) -> bool:
    """The connection is over (GOAWAY either way and nothing left to do): close the transport once flushed."""
    return not codec.want_read and not codec.want_write
