"""Upstream connections: keep-alive pools per address and the response side of the HTTP/1.1 exchange.

`Pool.acquire()` hands out an idle connection (most recently used first) or None; `Pool.connect()` opens a new
one within the connect timeout and maps every failure to `ConnectFailed`. An `UpstreamProtocol` parses one
response at a time with httptools, filters hop-by-hop headers, and forwards head, body and completion to the
`Exchange` bound to it (see proxy.py), which decides what the client sees.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from gateway.errors import ConnectFailed, UpstreamError, UpstreamProtocolError
from gateway.http1 import MAX_LINE, connection_options, drop_headers, forwardable_trailer, framing_exceeds
from gateway.tls import peer_spiffe_id
from gateway.units import Address


class ClientLimits(Protocol):
    """The client connection's limits and back-pressure, as an upstream connection sees them."""

    max_head: int
    max_headers: int

    def pause_for_peer(self) -> None: ...

    def resume_for_peer(self) -> None: ...


class ResponseSink(Protocol):
    """What an upstream connection delivers its response to: the request's `exchange.Exchange`."""

    @property
    def downstream(self) -> ClientLimits: ...

    @property
    def bytes_out(self) -> int: ...

    def on_response_head(self, upstream: UpstreamProtocol, status: int) -> None: ...

    def on_response_body(self, chunk: bytes) -> None: ...

    def after_upstream_data(self, upstream: UpstreamProtocol) -> None: ...

    def on_response_complete(self, upstream: UpstreamProtocol) -> None: ...

    def start_tunnel(self, upstream: UpstreamProtocol, rest: bytes) -> None: ...

    def upstream_lost(self, upstream: UpstreamProtocol) -> None: ...

    def upstream_failed(self, error: UpstreamError) -> None: ...


MAX_IDLE_PER_ADDRESS = 256
# Response headers the gateway drops or rewrites. Value: what on_header does with them.
_DROP, _CONNECTION, _TRANSFER_ENCODING, _CONTENT_LENGTH = 1, 2, 3, 4
_RESPONSE_SPECIAL = {
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"proxy-authenticate": _DROP,
    b"proxy-authorization": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"upgrade": _DROP,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"content-length": _CONTENT_LENGTH,
    b"x-request-id": _DROP,  # the gateway sets its own, the same one it sent upstream
}


class Multiplexed(Protocol):
    """HTTP/2 connections to the same address (h2client.H2Pool), made when a request first needs them. Their
    streams (h2client.H2Stream) have the surface of `UpstreamProtocol` that an exchange uses, plus `H2Request`."""

    def acquire(self) -> UpstreamProtocol | None: ...

    async def connect(self, timeout: float) -> UpstreamProtocol: ...

    def release(self, conn: UpstreamProtocol, now: float) -> None: ...

    def expire(self, deadline: float) -> None: ...

    def close(self) -> None: ...


class H2Request(Protocol):
    """How an exchange sends a request on an HTTP/2 stream: the head as fields, the body unframed."""

    def send_request(
        self, fields: list[tuple[bytes, bytes]], body: list[bytes], trailers: list[bytes] | None, end: bool
    ) -> None: ...

    def end_request(self, trailers: list[bytes] | None) -> None: ...


class _Dialed(Protocol):
    transport: asyncio.Transport


_Conn = TypeVar("_Conn", bound=_Dialed)


async def open_connection(
    address: Address, peer_id: str | None, timeout: float, dial: Callable[[], Awaitable[_Conn]]
) -> _Conn:
    """`dial()` within `timeout`; with `peer_id`, the peer's certificate must carry that SPIFFE ID. Every failure
    is a `ConnectFailed` naming the address (HTTP/1.1 pools and HTTP/2 ones alike)."""
    try:
        async with asyncio.timeout(timeout):
            conn = await dial()
    except TimeoutError as exc:
        raise ConnectFailed(f"connect to {address} timed out after {timeout:g}s") from exc
    except OSError as exc:  # ssl.SSLError included: a peer whose certificate the mesh CA did not sign
        raise ConnectFailed(f"connect to {address} failed: {exc.strerror or exc}") from exc
    if peer_id is not None:
        found = peer_spiffe_id(conn.transport.get_extra_info("ssl_object"))
        if found != peer_id:
            conn.transport.close()
            raise ConnectFailed(f"{address} presented identity {found}, expected {peer_id}")
    return conn


class TooLarge(Exception):
    """Raised in a parser callback: the response's head or trailers are over the gateway's limits."""


class Pool:
    """Keep-alive connections to one upstream address.

    >>> conn = pool.acquire() or await pool.connect(timeout=1.0)
    >>> ...  # one request/response on conn
    >>> pool.release(conn)
    """

    __slots__ = ("address", "idle", "retired", "tls", "peer_id", "h2")

    def __init__(self, address: Address, tls: ssl.SSLContext | None = None, peer_id: str | None = None) -> None:
        self.address = address
        self.idle: list[UpstreamProtocol] = []
        self.retired = False  # no snapshot names this address any more: close connections as they come back
        self.tls = tls  # mTLS to a peer gateway, whose certificate must carry the SPIFFE ID `peer_id`
        self.peer_id = peer_id
        self.h2: Multiplexed | None = None  # the HTTP/2 connections to the same address, once a request needs them

    def acquire(self) -> UpstreamProtocol | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self, timeout: float) -> UpstreamProtocol:
        return await open_connection(self.address, self.peer_id, timeout, self.dial)

    async def dial(self) -> UpstreamProtocol:
        """Open one connection (TLS to a peer gateway); `connect` bounds it in time and names its failures. The
        socket-free tests replace only this."""
        host, port = self.address
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: UpstreamProtocol(self), host, port, ssl=self.tls)
        return conn

    def release(self, conn: UpstreamProtocol, now: float) -> None:
        if conn.closed or self.retired or len(self.idle) >= MAX_IDLE_PER_ADDRESS:
            conn.close()
            return
        if not conn.transport.is_reading():
            conn.transport.resume_reading()  # paused for a slow client of the exchange that just ended
        conn.idle_since = now
        self.idle.append(conn)

    def expire(self, deadline: float) -> None:
        """Close connections idle since before `deadline` (they sit oldest-first at the front)."""
        if self.h2 is not None:
            self.h2.expire(deadline)
        idle = self.idle
        expired = 0
        while expired < len(idle) and idle[expired].idle_since < deadline:
            idle[expired].close()
            expired += 1
        del idle[:expired]

    def close(self) -> None:
        self.retired = True
        if self.h2 is not None:
            self.h2.close()
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class UpstreamProtocol(asyncio.Protocol):
    """One upstream connection. Parses responses and hands them to the bound exchange."""

    __slots__ = (
        "pool",
        "transport",
        "parser",
        "exchange",
        "closed",
        "idle_since",
        "reason",
        "headers",
        "keep_alive",
        "chunked",
        "content_length",
        "connection_tokens",
        "tunnel",
        "in_head",
        "raw",
        "feeding",
        "chunks",
        "head_fields",
        "trailers",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.parser = HttpResponseParser(self)
        self.exchange: ResponseSink | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reason = b""
        self.headers: list[bytes] = []
        self.keep_alive = True
        self.chunked = b""  # the Transfer-Encoding value when the response is chunked
        self.content_length = -1
        self.connection_tokens: list[bytes] | None = None
        self.tunnel: asyncio.Transport | None = None
        self.in_head = False
        self.raw = 0  # bytes read of the current response (only while in its head or a chunked body)
        self.feeding = 0  # the size of the read being parsed
        self.chunks = 0
        self.head_fields = 0  # the length of `headers` at the end of the head: trailer fields follow
        self.trailers: list[bytes] | None = None  # response trailer fields to relay, rendered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.close()
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.upstream_lost(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.exchange = None
            self.transport.close()

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.downstream.pause_for_peer()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.downstream.resume_for_peer()

    def reset_parser(self) -> None:
        """After a response to HEAD: httptools cannot be told to skip the body, so start a fresh parser."""
        self.parser = HttpResponseParser(self)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        exchange = self.exchange
        if exchange is None:
            self.close()  # nobody asked: a stray byte on an idle connection makes it untrustworthy
            return
        self.feeding = len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            if self.exchange is exchange:  # else the exchange refused the switch and this connection is closed
                exchange.start_tunnel(self, data[upgrade.args[0] :])
        except HttpParserError as exc:
            if self.exchange is exchange:
                cause = exc.__context__
                reason = str(cause) if isinstance(cause, TooLarge) else f"invalid response from upstream: {exc}"
                self.fail(exchange, reason)
            return
        if self.exchange is exchange:
            if self.in_head or self.chunked:
                self.count_raw(exchange, len(data))
            exchange.after_upstream_data(self)

    def count_raw(self, exchange: ResponseSink, size: int) -> None:
        """Bound the parts of a response that httptools gathers across reads by concatenation before any callback
        sees them: a head line, a trailer field, a chunk extension. Each may take the header limit (twice: this
        count also holds body bytes of the same reads that it cannot tell apart)."""
        self.raw += size
        max_head = exchange.downstream.max_head
        if self.in_head:
            if self.raw > 2 * max_head + MAX_LINE:
                self.fail(exchange, f"upstream response head exceeds {max_head} bytes")
        elif framing_exceeds(self.raw, exchange.bytes_out, self.chunks, max_head):
            self.fail(exchange, f"upstream response trailers exceed {max_head} bytes")

    def fail(self, exchange: ResponseSink, reason: str) -> None:
        """The response cannot be relayed: drop this connection; the exchange answers 502 or aborts."""
        self.exchange = None
        self.transport.abort()
        exchange.upstream_failed(UpstreamProtocolError(reason))

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.headers = []
        self.chunked = b""  # the Transfer-Encoding value when the response is chunked
        self.content_length = -1
        self.connection_tokens = None
        self.in_head = True
        self.raw = self.chunks = 0

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # Head and trailer fields alike: trailers are sorted out once, at the end (`take_trailers`), so the head's
        # fields pay nothing for them.
        kind = _RESPONSE_SPECIAL.get(name.lower())
        if kind is None:
            self.headers += (name, b": ", value, b"\r\n")
        elif kind == _CONTENT_LENGTH:
            self.content_length = int(value)
            self.headers += (name, b": ", value, b"\r\n")
        elif kind == _TRANSFER_ENCODING:
            # httptools has already refused a final coding other than chunked; keep inner ones (gzip, ...)
            self.chunked = value
        elif kind == _CONNECTION:
            listed = connection_options(value)
            if listed:
                self.connection_tokens = (self.connection_tokens or []) + listed

    def on_headers_complete(self) -> None:
        self.in_head = False
        exchange = self.exchange
        if exchange is not None:
            # The head is no larger than the reads it came in: count it exactly only when those could exceed.
            downstream, headers = exchange.downstream, self.headers
            if self.raw + self.feeding > downstream.max_head or len(headers) > 4 * downstream.max_headers:
                self.check_fields(headers, downstream.max_head, downstream.max_headers, "head")
        self.raw = 0
        if self.connection_tokens:
            self.headers = drop_headers(self.headers, self.connection_tokens)
        self.head_fields = len(self.headers)
        self.keep_alive = self.parser.should_keep_alive()
        if exchange is not None:
            exchange.on_response_head(self, self.parser.get_status_code())

    def take_trailers(self, max_bytes: int, max_count: int) -> None:
        """The trailer fields on_header gathered after the head: counted with the head against the limits, and
        those that may be forwarded kept for the exchange to relay."""
        headers = self.headers
        self.check_fields(headers, max_bytes, max_count, "head and trailers")
        trailers: list[bytes] = []
        for i in range(self.head_fields, len(headers), 4):
            if forwardable_trailer(headers[i].lower()):
                trailers += headers[i : i + 4]
        self.trailers = trailers or None

    @staticmethod
    def check_fields(fields: list[bytes], max_bytes: int, max_count: int, what: str) -> None:
        """Fields as kept (name, ": ", value, CRLF): hop-by-hop ones are dropped as they come, and bounded by the
        raw count (`count_raw`) instead."""
        if len(fields) > 4 * max_count:
            raise TooLarge(f"upstream response {what} have more than {max_count} fields")
        if sum(map(len, fields)) > max_bytes:
            raise TooLarge(f"upstream response {what} exceed {max_bytes} bytes")

    def on_chunk_header(self) -> None:
        self.chunks += 1

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            if self.chunked:
                self.trailers = None
                if len(self.headers) > self.head_fields:
                    self.take_trailers(exchange.downstream.max_head, exchange.downstream.max_headers)
            exchange.on_response_complete(self)
