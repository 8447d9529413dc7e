"""The client side of the hot path: `DownstreamProtocol` parses requests on one client connection.

httptools calls `on_header` once per header; each is sorted with one dict lookup (hop-by-hop ones are dropped,
identity and forwarding headers are remembered) and counted against the header limits. When the head is
complete, the request's `Exchange` (exchange.py) takes over. One exchange runs at a time per connection;
pipelined requests wait in a queue and are answered in order. Bytes that cannot be trusted (bad framing,
oversized or slow headers) are refused with a 4xx and the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser

from gateway.errors import local_reply
from gateway.exchange import PAUSE_PEER, PAUSE_QUEUE, PAUSE_UPGRADE, Exchange, new_request_id
from gateway.tls import group_of, peer_spiffe_id
from gateway.tracing import TRACE_HEADERS
from gateway.upstream import connection_options

if TYPE_CHECKING:
    from gateway.server import Runtime

log = logging.getLogger("meshgate.proxy")

MAX_URL_BYTES = 8 * 1024
MAX_QUEUED = 16  # pipelined requests held while an earlier one is answered
# A refused client may go on sending this long after our answer and FIN (nginx: lingering_timeout 5 s).
LINGER = 2.0

# What on_header does with a request header.
_DROP, _HOST, _CONNECTION, _TRANSFER_ENCODING, _UPGRADE, _CONTENT_LENGTH, _REQUEST_ID, _XFF, _XFP, _XFH, _TRACE = range(
    1, 12
)
_REQUEST_SPECIAL = {
    **dict.fromkeys(TRACE_HEADERS, _TRACE),  # read into the trace context, written again by inject()
    b"host": _HOST,
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"upgrade": _UPGRADE,
    b"content-length": _CONTENT_LENGTH,
    b"x-request-id": _REQUEST_ID,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFP,
    b"x-forwarded-host": _XFH,
}

LocalAnswer = tuple[int, str, bytes]
# (method, target, peer, headers by lower-case name): headers for content negotiation (OpenMetrics on /metrics)
LocalHandler = Callable[[bytes, bytes, bytes, dict[bytes, bytes]], LocalAnswer | Awaitable[LocalAnswer]]


class Reject(Exception):
    """Raised inside parser callbacks to refuse a request with a 4xx; the connection is closed after."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class Listener:
    """What a listening socket is for; decided once when the gateway starts, read by every request."""

    kind: str  # inbound | edge | outbound | admin | metrics
    runtime: Runtime
    source: str  # the `source` of requests that carry no mesh identity
    scheme: bytes = b"http"
    trust_request_id: bool = False
    local: LocalHandler | None = None  # admin and metrics listeners answer locally
    reporter: str | None = None  # the `reporter` label of what this listener records: "source" or "destination"


class DownstreamProtocol(asyncio.Protocol):
    """One client connection: parses requests, runs one exchange at a time, answers in order."""

    __slots__ = (
        "listener",
        "runtime",
        "loop",
        "transport",
        "parser",
        "peer_ip",
        "source",
        "trusted",
        "exchange",
        "parsing",
        "queue",
        "in_head",
        "head_start",
        "head_bytes",
        "partial_head",
        "header_count",
        "idle_since",
        "paused",
        "write_paused",
        "closing",
        "closed",
        "tunnel",
        "max_head",
        "max_headers",
        "local",
    )

    def __init__(self, listener: Listener, loop: asyncio.AbstractEventLoop) -> None:
        self.listener = listener
        self.runtime = listener.runtime
        self.loop = loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.parser = HttpRequestParser(self)
        self.peer_ip = b""
        self.source = listener.source
        self.trusted = listener.trust_request_id
        self.exchange: Exchange | None = None  # the request being answered
        self.parsing: Exchange | None = None  # the request being parsed (later than `exchange` when pipelined)
        self.queue: deque[Exchange] = deque()
        self.in_head = True
        self.head_start = loop.time()
        self.head_bytes = 0
        self.partial_head = 0
        self.header_count = 0
        self.idle_since = self.head_start
        self.paused = 0
        self.write_paused = False  # the client is not keeping up: upstream reads wait
        self.closing = False
        self.closed = False
        self.tunnel: asyncio.Transport | None = None
        limits = self.runtime.limits
        self.max_head = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.local = listener.local  # answers without forwarding: admin listeners, and the dashboard's lookups

    # connection events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0].encode() if peer else b"127.0.0.1"
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            spiffe_id = peer_spiffe_id(ssl_object)
            group = group_of(spiffe_id, self.runtime.peers.trust_domain)
            if group is not None:
                self.source = group
                self.trusted = True
            elif spiffe_id is not None and spiffe_id == self.runtime.peers.dashboard_id:
                # The dashboard asks for hop records over mTLS (DESIGN.md: never plaintext beyond loopback).
                self.local = self.runtime.dashboard_handler
        if self.listener.kind == "edge":
            self.trusted = self.runtime.config.gateway.preserve_request_id
        self.runtime.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.runtime.connections.discard(self)
        if self.tunnel is not None:
            self.tunnel.close()
        exchange = self.exchange
        if exchange is not None:
            exchange.downstream_lost()
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            if self.parsing is not None:
                self.parsing.tunnel_data = data[upgrade.args[0] :]
                self.pause(PAUSE_UPGRADE)
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, Reject):
                self.refuse(cause.status, cause.reason)
            else:
                log.error("internal error handling a request", exc_info=cause or exc)
                self.refuse(500, "internal error")
        except HttpParserError as exc:
            parsing = self.parsing
            if parsing is not None and parsing.request_done and not parsing.keep_alive:
                # Bytes after a request that said `Connection: close`: answer that one, ignore the rest.
                self.transport.pause_reading()
                return
            self.refuse(400, f"malformed request: {parser_reason(exc)}")
        else:
            if self.in_head and self.parsing is not None and not self.parsing.method:
                # Still inside a head: httptools accumulates a header across reads before calling on_header,
                # so count raw bytes too, to bound one enormous header.
                self.partial_head += len(data)
                if self.partial_head > self.max_head + MAX_URL_BYTES:
                    self.refuse(431, f"request header block exceeds {self.max_head} bytes")

    def pause_writing(self) -> None:
        self.write_paused = True
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None and not exchange.upstream.closed:
            exchange.upstream.transport.resume_reading()

    def pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    def pause_for_peer(self) -> None:
        self.pause(PAUSE_PEER)

    def resume_for_peer(self) -> None:
        self.resume(PAUSE_PEER)

    def refuse(self, status: int, reason: str) -> None:
        """Refuse a request the gateway will not forward, then close: the byte stream is no longer trusted."""
        exchange = self.parsing
        if exchange is None or (exchange.done and self.exchange is None):
            self.transport.write(local_reply(status, reason, new_request_id(), keep_alive=False))
        elif exchange is not self.exchange:
            # Queued behind a request still being answered: let that one finish in order, then close.
            self.queue.clear()
            self.closing = True
            self.pause(PAUSE_QUEUE)
            return
        elif exchange.status == 0:
            if not exchange.method:
                exchange.decide_request_id()  # refused before its head was complete
            exchange.fail_local(status, reason, close=True)
        self.linger()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def linger(self) -> None:
        """Close while the client may still be sending, as nginx's lingering close does: FIN after the answer,
        then read and drop its input until it closes or LINGER passes. Closing a socket with unread input makes
        the kernel send a RST, which can destroy the answer before the client has read it. TLS closes plainly."""
        if self.closed:
            return
        if not self.transport.can_write_eof():
            self.close()
            return
        self.closed = True
        self.transport.write_eof()  # after what is already written
        self.transport.set_protocol(_Lingering(self))
        if self.paused:
            self.transport.resume_reading()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.head_start = self.loop.time()
        exchange = Exchange(self, monotonic())
        self.parsing = exchange
        self.in_head = True
        self.head_bytes = 0
        self.header_count = 0
        if self.exchange is None:
            self.exchange = exchange
        else:
            if len(self.queue) >= MAX_QUEUED:
                raise Reject(503, "too many pipelined requests")
            self.queue.append(exchange)
            self.pause(PAUSE_QUEUE)

    def on_url(self, url: bytes) -> None:
        exchange = self.parsing
        assert exchange is not None
        exchange.url += url
        if len(exchange.url) > MAX_URL_BYTES:
            raise Reject(414, f"request target exceeds {MAX_URL_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        self.head_bytes += len(name) + len(value)
        if self.header_count > self.max_headers:
            raise Reject(431, f"more than {self.max_headers} request headers")
        exchange = self.parsing
        assert exchange is not None
        lname = name.lower()
        kind = _REQUEST_SPECIAL.get(lname)
        if kind is None:
            if not lname.startswith(b"proxy-"):
                exchange.headers += (name, b": ", value, b"\r\n")
        elif kind == _HOST:
            if exchange.host_seen:
                raise Reject(400, "more than one Host header")
            exchange.host_seen = True
            exchange.host = value
        elif kind == _CONTENT_LENGTH:
            exchange.has_body = value != b"0"
            exchange.headers += (name, b": ", value, b"\r\n")
        elif kind == _TRANSFER_ENCODING:
            exchange.chunked = value if not exchange.chunked else exchange.chunked + b", " + value
            exchange.has_body = True
        elif kind == _CONNECTION:
            listed = connection_options(value)
            if listed:
                exchange.connection_tokens = (exchange.connection_tokens or []) + listed
        elif kind == _UPGRADE:
            exchange.upgrade = value
        elif kind == _REQUEST_ID:
            exchange.request_id = value
        elif kind == _XFF:
            exchange.forwarded_for = exchange.forwarded_for + b", " + value if exchange.forwarded_for else value
        elif kind == _XFP:
            exchange.forwarded_proto = value
        elif kind == _XFH:
            exchange.forwarded_host = value
        elif kind == _TRACE:
            if exchange.trace_headers is None:
                exchange.trace_headers = {}
            exchange.trace_headers[lname] = value

    def on_headers_complete(self) -> None:
        if self.head_bytes > self.max_head:
            raise Reject(431, f"request header block exceeds {self.max_head} bytes")
        self.in_head = False
        self.partial_head = 0
        parser = self.parser
        exchange = self.parsing
        assert exchange is not None
        exchange.method = parser.get_method()
        exchange.keep_alive = parser.should_keep_alive()
        exchange.version = parser.get_http_version()
        if exchange.upgrade and not parser.should_upgrade():
            exchange.upgrade = b""  # an Upgrade header without `Connection: upgrade` is not an upgrade request
        exchange.decide_request_id()
        if exchange is self.exchange:
            exchange.start()

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange is not None:
            exchange.on_request_body(body)

    def on_message_complete(self) -> None:
        exchange = self.parsing
        if exchange is not None:
            exchange.on_request_complete()
        self.in_head = True
        self.head_start = self.idle_since = self.loop.time()
        self.head_bytes = 0

    # exchange lifecycle

    def exchange_done(self, exchange: Exchange) -> None:
        """Called once the response is fully written: start the next pipelined request or go idle."""
        if self.exchange is not exchange:
            return
        if self.closing or not exchange.keep_alive or not exchange.request_done:
            self.exchange = None
            if exchange.request_done:
                self.close()
            else:
                self.linger()  # answered before the request's body was all read: the client may still send it
            return
        if self.queue:
            following = self.queue.popleft()
            self.exchange = following
            if not self.queue:
                self.resume(PAUSE_QUEUE)
            if following.method:  # its head is complete; start it outside the upstream's parser callback
                self.loop.call_soon(following.start)
            return
        self.exchange = None
        self.idle_since = self.loop.time()
        if self.paused & PAUSE_UPGRADE:
            # The upstream declined the upgrade (no 101): the connection carries on as HTTP/1.1.
            self.parser = HttpRequestParser(self)
            self.resume(PAUSE_UPGRADE)
            if exchange.tunnel_data:
                self.loop.call_soon(self.data_received, exchange.tunnel_data)


class _Lingering(asyncio.Protocol):
    """A connection after `DownstreamProtocol.linger()`: input is dropped until the client closes or LINGER
    passes; then the connection's own bookkeeping runs as for any closed connection."""

    def __init__(self, conn: DownstreamProtocol) -> None:
        self.conn = conn
        self.timer = conn.loop.call_later(LINGER, conn.transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> None:
        pass  # returning None: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.conn.connection_lost(exc)


def parser_reason(exc: HttpParserError) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
