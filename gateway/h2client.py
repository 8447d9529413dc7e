"""Multiplexed HTTP/2 connections upstream: to an app that speaks h2c, or to a peer gateway over mTLS with ALPN h2.

`H2Pool` keeps few connections per address and opens streams on them: a new connection only when every one is at
the peer's stream limit or going away (GOAWAY), and one dial at a time however many requests wait for it. Each
request is one `H2Stream`, which the exchange drives exactly as it drives an HTTP/1.1 `UpstreamProtocol`: it
writes the request, reads head, body and trailers through `ResponseSink`, and is released or closed at the end.
So load balancing stays per request, across every endpoint's connection, however few client connections there are.

Flow control is the back-pressure: a stream whose client is slow stops acknowledging DATA, so the app's window
fills and it stops sending; a request body waits for the app's window and pauses the client when it can't move.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from gateway import http2
from gateway.errors import UpstreamError, UpstreamProtocolError, UpstreamReset
from gateway.http1 import forwardable_trailer
from gateway.units import Address
from gateway.upstream import ResponseSink, open_connection

_DROP = frozenset((b"x-request-id", *http2.CONNECTION_SPECIFIC, b"trailer"))
STREAMS_BEFORE_SETTINGS = 100  # streams opened on a new connection before the peer says its limit


class H2Pool:
    """Multiplexed connections to one upstream address. `acquire()` opens a stream on a connection with room;
    `connect()` dials when none has any."""

    __slots__ = ("address", "tls", "peer_id", "max_header_bytes", "max_headers", "conns", "dialing", "retired")

    def __init__(
        self, address: Address, tls: ssl.SSLContext | None, peer_id: str | None, max_header_bytes: int, max_headers: int
    ) -> None:
        self.address = address
        self.tls = tls  # mTLS with ALPN h2 to a peer gateway; None for an h2c app
        self.peer_id = peer_id
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.conns: list[H2Client] = []
        self.dialing: asyncio.Future[H2Client] | None = None
        self.retired = False

    def acquire(self) -> H2Stream | None:
        for conn in self.conns:
            if conn.has_room():
                return conn.open_stream()
        return None

    async def connect(self, timeout: float) -> H2Stream:
        """A stream on a new connection, or on the one being dialed for another request meanwhile."""
        while True:
            dialing = self.dialing
            if dialing is None:
                dialing = self.dialing = asyncio.ensure_future(self.dial(timeout))
                dialing.add_done_callback(self._dialed)
            conn = await asyncio.shield(dialing)
            if conn.has_room():
                return conn.open_stream()
            stream = self.acquire()
            if stream is not None:
                return stream

    async def dial(self, timeout: float) -> H2Client:
        conn = await open_connection(self.address, self.peer_id, timeout, self._dial)
        if self.tls is not None and conn.transport.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
            conn.close()
            raise UpstreamProtocolError(f"{self.address} did not accept HTTP/2 (ALPN h2)")
        self.conns.append(conn)
        return conn

    async def _dial(self) -> H2Client:
        host, port = self.address
        _, conn = await asyncio.get_running_loop().create_connection(lambda: H2Client(self), host, port, ssl=self.tls)
        return conn

    def _dialed(self, future: asyncio.Future[H2Client]) -> None:
        self.dialing = None
        if not future.cancelled():
            future.exception()  # retrieved: each waiter sees it through its shield

    def release(self, stream: H2Stream, now: float) -> None:
        if not stream.stream_id:
            stream.close()  # handed out for a try that ended before it was sent
        stream.conn.idle_since = now
        if self.retired and not stream.conn.streams:
            stream.conn.close()

    def expire(self, deadline: float) -> None:
        for conn in [conn for conn in self.conns if not conn.streams and conn.idle_since < deadline]:
            conn.close()

    def close(self) -> None:
        """No snapshot names this address any more: say GOAWAY, and close each connection when its streams end."""
        self.retired = True
        for conn in list(self.conns):
            conn.go_away()


class H2Client(asyncio.Protocol):
    """One HTTP/2 connection to an upstream, carrying many `H2Stream`s."""

    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.codec = http2.client(pool.max_header_bytes, pool.max_headers)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.streams: dict[int, H2Stream] = {}
        self.opening = 0  # streams handed out and not sent yet: they count against the peer's limit
        self.closed = False
        self.going_away = False  # GOAWAY either way: no new streams
        self.settled = False  # the peer's SETTINGS have arrived
        self.write_paused = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flush()

    def has_room(self) -> bool:
        if self.closed or self.going_away:
            return False
        limit = self.codec.remote_settings[3] if self.settled else STREAMS_BEFORE_SETTINGS  # MAX_CONCURRENT_STREAMS
        return len(self.streams) + self.opening < limit

    def open_stream(self) -> H2Stream:
        self.opening += 1
        return H2Stream(self)

    def flush(self) -> None:
        data = self.codec.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def go_away(self) -> None:
        self.going_away = True
        if not self.closed:
            with contextlib.suppress(http2.NGH2Error):
                self.codec.send_goaway(http2.NO_ERROR)
            self.flush()
            if not self.streams and not self.opening:
                self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()
        self._forget()

    def _forget(self) -> None:
        if self in self.pool.conns:
            self.pool.conns.remove(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._forget()
        for stream in list(self.streams.values()):
            stream.lost(UpstreamReset("upstream closed the HTTP/2 connection"))
        self.streams.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self.streams.values()):
            stream.check_queued()  # pauses each client, and remembers it did, so resume_writing resumes it

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.check_queued()

    def data_received(self, data: bytes) -> None:
        codec = self.codec
        try:
            codec.receive_data(data)
        except http2.NGH2Error as exc:
            self.flush()
            return self.fail_all(f"invalid HTTP/2 from upstream: {exc}")
        touched: dict[int, H2Stream] = {}
        for event in codec.events():
            stream_id = getattr(event, "stream_id", 0)
            stream = self.streams.get(stream_id) if stream_id else None
            if stream is not None:
                touched[stream_id] = stream
                stream.on_event(event)
            elif isinstance(event, http2.SettingsReceived):
                self.settled = True
            elif isinstance(event, http2.GoAwayReceived):
                self.on_goaway(event.last_stream_id)
        self.flush()  # sends what a WINDOW_UPDATE let out: only now does each stream's queue shrink
        for stream in list(self.streams.values()):
            if stream.paused_peer:
                stream.check_queued()
        for stream in touched.values():
            exchange = stream.exchange
            if exchange is not None:
                exchange.after_upstream_data(stream)  # type: ignore[arg-type]
        if http2.closed(codec):
            self.fail_all("the upstream's HTTP/2 connection ended")
        elif self.going_away and not self.streams and not self.opening:
            self.close()

    def on_goaway(self, last_stream_id: int) -> None:
        self.going_away = True
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last_stream_id:  # never processed: safe to try again elsewhere
                stream.lost(UpstreamReset("upstream refused the stream (GOAWAY)"))

    def fail_all(self, reason: str) -> None:
        for stream in list(self.streams.values()):
            stream.lost(UpstreamProtocolError(reason))
        self.close()

    def forget(self, stream: H2Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        if self.going_away and not self.streams and not self.opening:
            self.close()


class H2Stream:
    """One request on an `H2Client`, with the surface of an HTTP/1.1 `UpstreamProtocol` that the exchange uses:
    its own `transport` (write, pause and resume reading), head, body and trailers."""

    __slots__ = (
        "conn",
        "pool",
        "stream_id",
        "exchange",
        "closed",
        "ended",
        "transport",
        "reason",
        "headers",
        "content_length",
        "chunked",
        "trailers",
        "keep_alive",
        "tunnel",
        "paused_peer",
        "reading",
        "unacked",
    )

    def __init__(self, conn: H2Client) -> None:
        self.conn = conn
        self.pool = conn.pool
        self.stream_id = 0  # given by the codec when the request is sent
        self.exchange: ResponseSink | None = None
        self.closed = False
        self.ended = False  # our side sent END_STREAM
        self.transport = self  # the exchange writes the body and pauses reading through `transport`
        self.reason = b""
        self.headers: list[bytes] = []
        self.content_length = -1
        self.chunked = b""
        self.trailers: list[bytes] | None = None
        self.keep_alive = True
        self.tunnel = None
        self.paused_peer = False  # the client was paused: more body is queued than the upstream's window takes
        self.reading = True
        self.unacked = 0  # bytes received while reading was paused: acknowledged when it resumes

    # the request

    def send_request(
        self, fields: list[tuple[bytes, bytes]], body: list[bytes], trailers: list[bytes] | None, end: bool
    ) -> None:
        """HEADERS, the body kept so far and, when the request is complete, END_STREAM (with its trailers)."""
        conn = self.conn
        conn.opening -= 1
        bare = end and not body and not trailers
        try:
            self.stream_id = conn.codec.send_request(fields, end_stream=bare)
        except http2.NGH2Error as exc:
            self.closed = True
            if self.exchange is not None:
                self.exchange.upstream_failed(UpstreamReset(f"could not open an HTTP/2 stream upstream: {exc}"))
            return
        conn.streams[self.stream_id] = self
        self.ended = bare
        for chunk in body:
            self.write(chunk)
        if end and not bare:
            self.end_request(trailers)
        conn.flush()

    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        self.conn.codec.send_data(self.stream_id, data)
        self.conn.flush()
        self.check_queued()

    def check_queued(self) -> None:
        """Pause the client while more of its body waits for the upstream's window than PENDING_LIMIT; resume
        when it has gone."""
        exchange = self.exchange
        if exchange is None or self.closed:
            return
        queued = self.conn.codec.queued_body_size(self.stream_id) > http2.PENDING_LIMIT or self.conn.write_paused
        if queued != self.paused_peer:
            self.paused_peer = queued
            exchange.downstream.pause_for_peer() if queued else exchange.downstream.resume_for_peer()

    def end_request(self, trailers: list[bytes] | None) -> None:
        """END_STREAM, after the body still queued; `trailers` rendered as the exchange keeps them."""
        if self.closed or self.ended or not self.stream_id:
            return
        self.ended = True
        codec = self.conn.codec
        if trailers:
            fields = [(trailers[i].lower(), trailers[i + 2]) for i in range(0, len(trailers), 4)]
            codec.send_trailers(self.stream_id, fields)
        else:
            codec.end_stream(self.stream_id)
        self.conn.flush()

    # what the exchange calls on its upstream

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True
        if self.unacked and not self.closed:
            self.conn.codec.acknowledge_received_data(self.unacked, self.stream_id)
            self.unacked = 0
            self.conn.flush()

    def is_reading(self) -> bool:
        return self.reading

    def reset_parser(self) -> None:
        pass  # a response to HEAD ends with its stream

    def close(self) -> None:
        """Give the stream up (the exchange is done with it early, or failed): RST_STREAM CANCEL."""
        if self.closed:
            return
        self.closed = True
        self.exchange = None
        conn = self.conn
        if not self.stream_id:
            conn.opening -= 1
        elif not conn.closed:
            with contextlib.suppress(http2.NGH2Error):  # already closed both ways
                conn.codec.reset_stream(self.stream_id, http2.CANCEL)
            conn.flush()
        conn.forget(self)

    def lost(self, error: UpstreamError) -> None:
        self.closed = True
        exchange = self.exchange
        self.exchange = None
        self.conn.streams.pop(self.stream_id, None)
        if exchange is None:
            return
        if isinstance(error, UpstreamProtocolError):
            exchange.upstream_failed(error)
        else:
            exchange.upstream_lost(self)  # type: ignore[arg-type]

    # events from the connection

    def on_event(self, event: object) -> None:
        exchange = self.exchange
        if isinstance(event, http2.DataReceived):
            size = len(event.data)
            if self.reading:
                self.conn.codec.acknowledge_received_data(size, self.stream_id)
            else:
                self.unacked += size
            if exchange is not None and size:
                exchange.on_response_body(event.data)
            if event.end_stream:
                self.complete()
        elif isinstance(event, http2.ResponseReceived):
            status = self.take_head(event.headers)
            if exchange is not None:
                exchange.on_response_head(self, status)  # type: ignore[arg-type]
            if event.end_stream and self.exchange is exchange:
                self.complete()
        elif isinstance(event, http2.InformationalResponseReceived):
            status = self.take_head(event.headers)
            if exchange is not None:
                exchange.on_response_head(self, status)  # type: ignore[arg-type]
        elif isinstance(event, http2.TrailersReceived):
            trailers: list[bytes] = []
            for name, value in event.headers:
                if forwardable_trailer(name):
                    trailers += (name, b": ", value, b"\r\n")
            self.trailers = trailers or None
            self.complete()
        elif isinstance(event, http2.StreamReset):
            self.lost(UpstreamReset(f"upstream reset the stream (HTTP/2 error {event.error_code})"))
        elif isinstance(event, http2.StreamClosed):
            if not self.closed:  # closed by the codec without an end we saw: a stream error
                self.lost(UpstreamReset(f"the upstream stream closed (HTTP/2 error {event.error_code})"))
        elif isinstance(event, http2.WindowUpdated):
            self.check_queued()

    def complete(self) -> None:
        self.closed = True
        self.conn.forget(self)
        exchange = self.exchange
        if exchange is not None:
            exchange.on_response_complete(self)  # type: ignore[arg-type]

    def take_head(self, fields: tuple[tuple[bytes, bytes], ...]) -> int:
        status = 0
        headers: list[bytes] = []
        self.content_length = -1
        for name, value in fields:
            if name[:1] == b":":
                if name == b":status":
                    status = int(value)
            elif name not in _DROP:
                if name == b"content-length":
                    self.content_length = int(value)
                headers += (name, b": ", value, b"\r\n")
        self.headers = headers
        # No length: the body ends with the stream, so an HTTP/1.1 client gets it chunked (with any trailers).
        self.chunked = b"chunked" if self.content_length < 0 else b""
        return status


def request_fields(
    method: bytes,
    url: bytes,
    host: bytes,
    headers: list[bytes],
    forwarded: tuple[bytes, bytes, bytes, bytes],
    trace: bytes,
    scheme: bytes,
) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 request head sent upstream, from the same parts as `http1.request_head`: `headers` are the
    client's, rendered (`name, ": ", value, CRLF` each), hop-by-hop ones already dropped."""
    forwarded_for, proto, forwarded_host, request_id = forwarded
    fields = [(b":method", method), (b":scheme", scheme), (b":path", url), (b":authority", host)]
    for i in range(0, len(headers), 4):
        name = headers[i].lower()
        if name not in http2.CONNECTION_SPECIFIC:
            fields.append((name, headers[i + 2]))
    fields += (
        (b"x-forwarded-for", forwarded_for),
        (b"x-forwarded-proto", proto),
        (b"x-forwarded-host", forwarded_host),
        (b"x-request-id", request_id),
        (b"te", b"trailers"),  # gRPC servers require it; no other value is allowed in HTTP/2
    )
    for line in trace.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b": ")
            fields.append((name, value))
    return fields
