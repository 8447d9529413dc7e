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
from dataclasses import dataclass
from time import monotonic

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser

from gateway.admin import requests_handler
from gateway.config import IPNetwork, Limits
from gateway.errors import UpstreamStalled, local_reply
from gateway.exchange import PAUSE_PEER, PAUSE_QUEUE, PAUSE_UPGRADE, Exchange
from gateway.http1 import (
    MAX_LINE,
    PREFACE,
    REQ_CONNECTION,
    REQ_CONTENT_LENGTH,
    REQ_HOST,
    REQ_TRANSFER_ENCODING,
    REQ_UPGRADE,
    REQUEST_FIELDS,
    connection_options,
    forwardable_trailer,
    framing_exceeds,
)
from gateway.propagation import new_request_id
from gateway.runtime import LocalHandler, Runtime
from gateway.tls import group_of, peer_spiffe_id
from gateway.units import parse_ip

log = logging.getLogger("meshgate.proxy")

MAX_QUEUED = 16  # pipelined requests held while an earlier one is answered
# A refused client may go on sending this long after our answer and FIN (nginx: lingering_timeout 5 s).
LINGER = 2.0


class Closed(Exception):
    """Raised inside a parser callback to stop parsing a connection that was closed (or is lingering)."""


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
    trusted: bool = False  # its clients' X-Forwarded-*, trace sampling and request IDs are believed
    local: LocalHandler | None = None  # admin and metrics listeners answer locally
    reporter: str | None = None  # the `reporter` label of what this listener records: "source" or "destination"
    h2c: bool = False  # HTTP/2 with prior knowledge is taken too, told apart by its preface


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
        "keep_request_id",
        "exchange",
        "parsing",
        "queue",
        "in_head",
        "head_start",
        "head_bytes",
        "partial_head",
        "body_bytes",
        "chunks",
        "header_count",
        "idle_since",
        "paused",
        "write_paused",
        "progress",
        "progress_at",
        "closing",
        "closed",
        "tunnel",
        "max_head",
        "max_headers",
        "local",
        "sniff",
    )

    def __init__(self, listener: Listener, loop: asyncio.AbstractEventLoop) -> None:
        self.listener = listener
        self.runtime = listener.runtime
        self.loop = loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.parser = HttpRequestParser(self)
        self.peer_ip = b""
        self.source = listener.source
        self.trusted = listener.trusted
        self.keep_request_id = listener.trusted
        self.exchange: Exchange | None = None  # the request being answered
        self.parsing: Exchange | None = None  # the request being parsed (later than `exchange` when pipelined)
        self.queue: deque[Exchange] = deque()
        self.in_head = True
        self.head_start = loop.time()
        self.head_bytes = 0
        self.partial_head = 0
        self.body_bytes = 0  # bytes read since the head, while a chunked body arrives: data plus framing
        self.chunks = 0
        self.header_count = 0
        self.idle_since = self.head_start
        self.paused = 0
        self.write_paused = False  # the client is not keeping up: upstream reads wait
        self.progress: tuple[int, int, int] = (0, 0, 0)  # what the sweep last saw move (see check_progress)
        self.progress_at = self.head_start
        self.closing = False
        self.closed = False
        self.tunnel: asyncio.Transport | None = None
        limits = self.runtime.limits
        self.max_head = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.local = listener.local  # answers without forwarding: admin listeners, and the dashboard's lookups
        self.sniff = b"" if listener.h2c else None  # the first bytes, until they show HTTP/2's preface or not

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
                self.trusted = self.keep_request_id = True
            elif spiffe_id is not None and spiffe_id == self.runtime.peers.dashboard_id:
                # The dashboard asks for hop records over mTLS (docs/design.md: never plaintext beyond loopback).
                self.local = requests_handler(self.runtime.mesh_lookup)
        gateway = self.runtime.config.gateway
        if not self.trusted and gateway.trusted_proxies:
            self.trusted = self.keep_request_id = from_trusted_proxy(self.peer_ip, gateway.trusted_proxies)
        if self.listener.kind == "edge" and not self.trusted:
            self.keep_request_id = gateway.preserve_request_id
        self.runtime.connections.add(self)
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            self.become_h2(b"")

    def become_h2(self, data: bytes) -> None:
        """Hand the connection to h2server.py (loaded now: HTTP/1.1-only gateways never load the codec)."""
        from gateway.h2server import H2Downstream

        self.runtime.connections.discard(self)
        self.closed = True  # this protocol object is done; the transport is H2Downstream's
        identity = (self.peer_ip, self.source, self.trusted, self.keep_request_id, self.local)
        H2Downstream(self.listener, self.runtime, self.transport, identity).take_over(data)

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
        if self.sniff is not None:
            data = self.sniff + data
            if PREFACE.startswith(data):  # not yet telling: wait for more
                self.sniff = data
                return
            self.sniff = None
            if data.startswith(PREFACE):
                return self.become_h2(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            if self.parsing is not None and not self.closed:
                self.parsing.tunnel_data = data[upgrade.args[0] :]
                self.pause(PAUSE_UPGRADE)
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if self.closed:
                pass  # refused or answered mid-read (Closed stops the parser): the rest of the read is void
            elif isinstance(cause, Reject):
                self.refuse(cause.status, cause.reason)
            else:
                log.error("internal error handling a request", exc_info=cause or exc)
                self.refuse(500, "internal error")
        except HttpParserError as exc:
            parsing = self.parsing
            if self.closed:
                return
            if parsing is not None and parsing.request_done and not parsing.keep_alive:
                # Bytes after a request that said `Connection: close`: answer that one, ignore the rest.
                self.transport.pause_reading()
                return
            self.refuse(400, f"malformed request: {parser_reason(exc)}")
        else:
            parsing = self.parsing
            if parsing is None or self.closed:
                return
            if self.in_head:
                if not parsing.method:
                    # Still inside a head: httptools accumulates a header across reads before calling on_header,
                    # so count raw bytes too, to bound one enormous header.
                    self.partial_head += len(data)
                    if self.partial_head > self.max_head + MAX_LINE:
                        self.refuse(431, f"request header block exceeds {self.max_head} bytes")
            elif parsing.chunked:
                self.on_body_bytes(parsing, len(data))

    def on_body_bytes(self, exchange: Exchange, size: int) -> None:
        """Bound what a chunked body carries besides its data. httptools gathers one trailer field (or chunk
        extension) across reads by concatenation before any callback sees it, so only raw byte counts can stop
        one that never ends (`framing_exceeds`)."""
        self.body_bytes += size
        if framing_exceeds(self.body_bytes, exchange.bytes_in, self.chunks, self.max_head):
            self.refuse(400, f"request trailers or chunk extensions exceed {self.max_head} bytes")

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

    @property
    def kind(self) -> str:
        return self.listener.kind

    def sweep(self, now: float, limits: Limits) -> None:
        """From `Runtime.sweep`, twice a second: the header, body, send and idle timeouts of this connection."""
        if self.tunnel is not None:
            return  # an upgraded connection lives until either side closes it
        if self.exchange is not None or self.write_paused:
            self.check_progress(now, limits)
        if self.closed:
            return
        parsing = self.parsing
        if self.in_head and parsing is not None and not parsing.method and not parsing.done:
            if now - self.head_start > limits.header_timeout:
                self.refuse(408, f"request headers not complete within {limits.header_timeout:g}s")
        elif self.exchange is None:
            limit = limits.idle_timeout if self.parsing is not None else limits.header_timeout
            if now - self.idle_since > limit:
                self.close()

    def drain(self) -> None:
        self.closing = True
        if self.exchange is None:
            self.close()

    def abort(self) -> None:
        self.transport.abort()

    def check_progress(self, now: float, limits: Limits) -> None:
        """From the sweep: end an exchange whose bytes stopped moving. Timers per read would cost the hot path,
        so the sweep compares byte counts between passes: request body in, response body out, and what the
        client has yet to read."""
        exchange = self.exchange
        mark = (
            id(exchange),
            exchange.bytes_in + exchange.bytes_out if exchange is not None else 0,
            self.transport.get_write_buffer_size(),
        )
        if mark != self.progress:
            self.progress, self.progress_at = mark, now
            return
        still = now - self.progress_at
        if self.write_paused:
            if still > limits.send_timeout:  # the client stopped reading what it asked for
                if exchange is None or exchange.done:
                    self.transport.abort()
                else:
                    exchange.error = "send_timeout"
                    exchange.abort()
        elif exchange is None or exchange.done or still <= limits.body_timeout:
            return
        elif exchange.has_body and not exchange.request_done:
            if self.paused & PAUSE_PEER:
                exchange.upstream_failed(UpstreamStalled(f"upstream read none of the request body for {still:.0f}s"))
            else:
                self.refuse(408, f"request body stalled for over {limits.body_timeout:g}s")
        elif exchange.status and not exchange.resp_done:
            exchange.upstream_failed(UpstreamStalled(f"upstream sent none of the response body for {still:.0f}s"))

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
        if self.closed:
            return
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
        elif not exchange.done:
            # The response has begun, so no refusal can be sent; the upstream request is void too.
            exchange.error = "bad_request"
            exchange.abort()
            return
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
        if self.closed:
            # Closed while httptools was still inside this read: what follows is never a request.
            raise Closed
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
        if len(exchange.url) > MAX_LINE:
            raise Reject(414, f"request target exceeds {MAX_LINE} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        self.head_bytes += len(name) + len(value)
        if not self.in_head:
            return self.on_trailer(name, value)
        if self.header_count > self.max_headers:
            raise Reject(431, f"more than {self.max_headers} request headers")
        exchange = self.parsing
        assert exchange is not None
        lname = name.lower()
        kind = REQUEST_FIELDS.get(lname)
        if kind is None:
            if not lname.startswith(b"proxy-"):
                exchange.headers += (name, b": ", value, b"\r\n")
        elif kind == REQ_HOST:
            if exchange.host_seen:
                raise Reject(400, "more than one Host header")
            exchange.host_seen = True
            exchange.host = value
        elif kind == REQ_CONTENT_LENGTH:
            exchange.has_body = value != b"0"
            exchange.headers += (name, b": ", value, b"\r\n")
        elif kind == REQ_TRANSFER_ENCODING:
            exchange.chunked = value if not exchange.chunked else exchange.chunked + b", " + value
            exchange.has_body = True
        elif kind == REQ_CONNECTION:
            listed = connection_options(value)
            if listed:
                exchange.connection_tokens = (exchange.connection_tokens or []) + listed
        elif kind == REQ_UPGRADE:
            exchange.upgrade = value
        else:
            exchange.remember(kind, lname, value)

    def on_trailer(self, name: bytes, value: bytes) -> None:
        """A trailer field: counted against the same limits as the head, never a change to the request's
        identity or routing. Fields RFC 9110 §6.5.1 forbids in trailers, and request IDs and trace context, are
        dropped; the rest go upstream after the last chunk."""
        if self.header_count > self.max_headers:
            raise Reject(400, f"more than {self.max_headers} request header and trailer fields")
        if self.head_bytes > self.max_head:
            raise Reject(400, f"request header block and trailers exceed {self.max_head} bytes")
        exchange = self.parsing
        assert exchange is not None
        lname = name.lower()
        if forwardable_trailer(lname) and lname not in REQUEST_FIELDS:
            exchange.add_trailer(name, value)

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
        if exchange.version not in ("1.1", "1.0"):
            # httptools reads a request line without a version as HTTP/0.9, yet lets headers follow it.
            raise Reject(505, f"HTTP/{exchange.version} is not supported (HTTP/1.0 and 1.1 are)")
        if exchange.has_body and parser.should_upgrade():
            # httptools hands everything after an upgrade request's head over as tunnel bytes, body included.
            raise Reject(400, "an upgrade request cannot carry a body")
        if exchange.chunked:
            self.check_transfer_encoding(exchange)
        if exchange.upgrade and not (parser.should_upgrade() and upgrade_allowed(exchange.upgrade)):
            # An Upgrade header without `Connection: upgrade` is not an upgrade request; h2c is never tunnelled
            # (the HTTP/2 that follows would bypass routing), so such a request is forwarded as plain HTTP/1.1.
            exchange.upgrade = b""
        exchange.decide_request_id()
        if exchange is self.exchange:
            exchange.start()

    def check_transfer_encoding(self, exchange: Exchange) -> None:
        """Only `Transfer-Encoding: chunked`, once, from HTTP/1.1 is forwarded, as nginx does: any other coding
        could be read differently by the upstream (RFC 9112 §6.1)."""
        if exchange.version == "1.0":
            raise Reject(400, "an HTTP/1.0 request cannot carry Transfer-Encoding")
        if exchange.chunked.lower() != b"chunked":
            coding = exchange.chunked.decode("latin-1")[:100]
            raise Reject(501, f"transfer coding {coding!r} is not supported (only a single 'chunked')")
        self.body_bytes = self.chunks = 0

    def on_chunk_header(self) -> None:
        self.chunks += 1

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
                self.loop.call_soon(self.replay, exchange.tunnel_data)

    def replay(self, data: bytes) -> None:
        """Parse again what came after a declined upgrade's head, unless the connection has gone meanwhile."""
        if not self.closed:
            self.data_received(data)


def from_trusted_proxy(peer_ip: bytes, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether a client connects from one of `gateway.trusted_proxies` (front load balancers)."""
    address = parse_ip(peer_ip.decode("ascii", "replace"))
    return address is not None and any(address in network for network in networks)


def upgrade_allowed(protocols: bytes) -> bool:
    return b"h2c" not in (token.strip().lower() for token in protocols.split(b","))


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
