"""HTTP/2 from clients: one `H2Downstream` per connection, one `StreamExchange` per stream.

A client connection becomes HTTP/2 when it starts with the connection preface (h2c with prior knowledge, what a
gRPC client sends to a local proxy) or negotiates ALPN `h2` on the mTLS listener; proxy.py decides and hands the
connection over. Each stream is an `exchange.Exchange` whose downstream is its `Stream`: routing, tries, retries,
deadlines and recording are the HTTP/1.1 path's own, and only the response is written as frames.

gRPC calls (content-type application/grpc) get gRPC's semantics: `grpc-timeout` is the call's deadline and is
passed on reduced by the time spent here; `grpc-status` is read from the trailers (or a Trailers-Only answer)
for every signal; a call the gateway fails itself is answered Trailers-Only with the matching gRPC code and a
message, never a bare HTTP error that a client would report as INTERNAL.

Bounds: the header list is bounded by the decoder (an HPACK bomb stops at `limits.max_header_bytes`), streams by
SETTINGS_MAX_CONCURRENT_STREAMS, buffered data by the flow-control windows (a slow reader pauses the upstream;
a stalled upstream stops the client's window), and resets and control frames per second by http2's limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from time import monotonic
from typing import TYPE_CHECKING

from gateway import http2, rpc
from gateway.config import Limits
from gateway.exchange import PAUSE_PEER, Exchange, ListenerInfo
from gateway.http1 import (
    REQ_CONTENT_LENGTH,
    REQ_HOST,
    REQUEST_FIELDS,
    forwardable_trailer,
)
from gateway.runtime import LocalHandler, Runtime
from gateway.upstream import UpstreamProtocol

if TYPE_CHECKING:
    from gateway.errors import UpstreamError
    from gateway.telemetry import Code

_ERROR_CODES = {
    "request_timeout": rpc.DEADLINE_EXCEEDED,
    "per_try_timeout": rpc.DEADLINE_EXCEEDED,
    "stream_idle_timeout": rpc.DEADLINE_EXCEEDED,
}


class H2Downstream(asyncio.Protocol):
    """One client connection speaking HTTP/2 (a `runtime.Connection`)."""

    def __init__(
        self,
        listener: ListenerInfo,
        runtime: Runtime,
        transport: asyncio.Transport,
        identity: tuple[bytes, str, bool, bool, LocalHandler | None],
    ) -> None:
        self.listener = listener
        self.runtime = runtime
        self.loop = asyncio.get_running_loop()
        self.transport = transport
        self.peer_ip, self.source, self.trusted, self.keep_request_id, self.local = identity
        limits = runtime.limits
        self.max_head = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.codec = http2.server(self.max_head, self.max_headers)
        self.streams: dict[int, Stream] = {}
        self.closing = False
        self.closed = False
        self.write_paused = False
        self.idle_since = self.loop.time()

    @property
    def kind(self) -> str:
        return self.listener.kind

    def take_over(self, data: bytes) -> None:
        """Become the transport's protocol, after proxy.py saw the preface (in `data`) or ALPN h2."""
        self.runtime.connections.add(self)
        self.transport.set_protocol(self)
        self.flush()
        if data:
            self.data_received(data)

    # connection events

    def data_received(self, data: bytes) -> None:
        codec = self.codec
        try:
            codec.receive_data(data)
        except http2.NGH2Error as exc:
            # Past a bound (header list, CONTINUATION frames, queued acknowledgements) the codec is unusable: say
            # GOAWAY ourselves, then close.
            calm = isinstance(exc, http2.DenialOfServiceError)
            self.transport.write(http2.goaway_frame(max(self.streams, default=0), 0xB if calm else 0x1))
            return self.close()
        events = codec.events()
        # Streams the client reset in this same read are recorded but never sent: rapid reset costs no upstream work.
        reset = {event.stream_id for event in events if isinstance(event, http2.StreamReset)}
        windows = 0
        opened: dict[int, Stream] = {}  # streams whose window grew: checked once the codec has sent what it could
        for event in events:
            if self.closed:
                return
            if isinstance(event, http2.RequestReceived):
                self.on_request(event.stream_id, event.headers, event.end_stream, event.stream_id in reset)
            elif isinstance(event, http2.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.on_data(event.data, event.end_stream)
                else:  # a stream we are done with: give the window back
                    codec.acknowledge_received_data(len(event.data), event.stream_id)
            elif isinstance(event, http2.TrailersReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.on_trailers(event.headers)
            elif isinstance(event, http2.StreamReset | http2.StreamClosed):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.on_closed()
            elif isinstance(event, http2.WindowUpdated):
                if event.stream_id:
                    stream = self.streams.get(event.stream_id)
                    if stream is not None:
                        opened[event.stream_id] = stream
                else:
                    windows += 1
            elif isinstance(event, http2.GoAwayReceived | http2.ConnectionClosed):
                self.closing = True
        if windows > http2.MAX_WINDOW_UPDATES:
            return self.go_away(0xB)  # ENHANCE_YOUR_CALM: a WINDOW_UPDATE flood
        self.flush()  # sends what a WINDOW_UPDATE let out: only now does each stream's queue shrink
        for stream in list(self.streams.values()) if windows else list(opened.values()):
            stream.check_queued()  # the connection's window grew: every stream may have room again
        if http2.closed(codec) or (self.closing and not self.streams):
            self.close()

    def on_request(
        self, stream_id: int, fields: tuple[tuple[bytes, bytes], ...], ended: bool, reset: bool = False
    ) -> None:
        if self.closing:
            with contextlib.suppress(http2.NGH2Error):
                self.codec.reset_stream(stream_id, http2.REFUSED_STREAM)
            return
        stream = self.streams[stream_id] = Stream(self, stream_id)
        exchange = StreamExchange(stream, monotonic())
        stream.exchange = exchange
        exchange.take_fields(fields)
        exchange.has_body = not ended
        exchange.decide_request_id()
        if reset:
            return exchange.cancelled_at_once()
        exchange.start()
        if ended and not exchange.request_done:
            exchange.on_request_complete()

    def flush(self) -> None:
        if self.closed:
            return
        data = self.codec.data_to_send()
        if data:
            self.transport.write(data)

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self.streams.values()):
            stream.check_queued()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.check_queued()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.runtime.connections.discard(self)
        for stream in list(self.streams.values()):
            stream.on_closed()
        self.streams.clear()

    # runtime.Connection

    def sweep(self, now: float, limits: Limits) -> None:
        """From `Runtime.sweep`: the idle timeout of a connection without streams, and each stream's send timeout
        (a client that stopped taking what it asked for: no window, or no reading)."""
        if not self.streams:
            if now - self.idle_since > limits.idle_timeout:
                self.go_away(http2.NO_ERROR)
            return
        for stream in list(self.streams.values()):
            stream.sweep(now, limits)

    def drain(self) -> None:
        """Shutdown or reload: GOAWAY, finish the streams already open, then close."""
        self.go_away(http2.NO_ERROR)

    def abort(self) -> None:
        self.transport.abort()

    def go_away(self, code: int) -> None:
        if self.closed:
            return
        self.closing = True
        with contextlib.suppress(http2.NGH2Error):
            self.codec.send_goaway(code)
        self.flush()
        if not self.streams:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def forget(self, stream: Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        if not self.streams:
            self.idle_since = self.loop.time()
            if self.closing:
                self.close()


class Stream:
    """One stream of an `H2Downstream`: the `exchange.Downstream` its exchange answers."""

    __slots__ = (
        "conn",
        "stream_id",
        "runtime",
        "loop",
        "transport",
        "peer_ip",
        "source",
        "trusted",
        "keep_request_id",
        "local",
        "listener",
        "max_head",
        "max_headers",
        "exchange",
        "tunnel",
        "paused",
        "closed",
        "unacked",
        "ended",
        "finished",
        "upstream_paused",
        "progress",
        "progress_at",
    )

    def __init__(self, conn: H2Downstream, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.runtime = conn.runtime
        self.loop = conn.loop
        self.transport = conn.transport
        self.peer_ip, self.source, self.trusted = conn.peer_ip, conn.source, conn.trusted
        self.keep_request_id, self.local, self.listener = conn.keep_request_id, conn.local, conn.listener
        self.max_head, self.max_headers = conn.max_head, conn.max_headers
        self.exchange: StreamExchange | None = None
        self.tunnel = None
        self.paused = 0
        self.closed = False
        self.unacked = 0  # request bytes read while paused: their window is given back on resume
        self.ended = False  # END_STREAM queued
        self.finished = False  # the exchange is done with this stream
        self.upstream_paused = False  # too much of the response waits for the client's window
        self.progress = 0  # response bytes the client had taken at the last sweep, and when that changed
        self.progress_at = conn.loop.time()

    @property
    def write_paused(self) -> bool:
        return self.upstream_paused

    @property
    def closing(self) -> bool:
        return self.conn.closing

    # the request

    def on_data(self, data: bytes, end: bool) -> None:
        if self.paused:
            self.unacked += len(data)
        elif data:
            self.conn.codec.acknowledge_received_data(len(data), self.stream_id)
        exchange = self.exchange
        if exchange is not None and not exchange.done:
            if data:
                exchange.on_request_body(data)
            if end:
                exchange.on_request_complete()
        elif exchange is not None and end:
            exchange.request_done = True

    def on_trailers(self, fields: tuple[tuple[bytes, bytes], ...]) -> None:
        exchange = self.exchange
        if exchange is not None:
            for name, value in fields:
                if forwardable_trailer(name) and name not in REQUEST_FIELDS:
                    exchange.add_trailer(name, value)
            if not exchange.request_done:
                exchange.on_request_complete()

    def on_closed(self) -> None:
        """The stream closed: reset by the client, or done both ways."""
        if self.closed:
            return
        self.closed = True
        exchange = self.exchange
        if exchange is not None and not exchange.done:
            exchange.downstream_lost()
        self.conn.forget(self)

    # exchange.Downstream

    def pause(self, reason: int) -> None:
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.unacked and not self.closed:
                self.conn.codec.acknowledge_received_data(self.unacked, self.stream_id)
                self.unacked = 0
                self.conn.flush()

    def pause_for_peer(self) -> None:
        self.pause(PAUSE_PEER)

    def resume_for_peer(self) -> None:
        self.resume(PAUSE_PEER)

    def exchange_done(self, exchange: Exchange) -> None:
        self.finished = True
        self.check_queued()

    def close(self) -> None:
        """Give up on the stream mid-response: RST_STREAM, the HTTP/2 way of closing one request."""
        self.reset(http2.INTERNAL_ERROR)

    def reset(self, code: int) -> None:
        if not self.closed:
            self.closed = True
            if not self.conn.closed:
                with contextlib.suppress(http2.NGH2Error):  # the stream closed both ways meanwhile
                    self.conn.codec.reset_stream(self.stream_id, code)
                self.conn.flush()
        self.conn.forget(self)

    # the response

    # Each send is dropped when the codec has closed the stream already (a reset in the read that opened it, say):
    # its StreamReset or StreamClosed event follows and ends the exchange.

    def send_head(self, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        if not self.closed and not self.conn.closed:
            with contextlib.suppress(http2.NGH2Error):
                self.conn.codec.send_response(self.stream_id, fields, end_stream=end)
                self.ended = end

    def send_interim(self, fields: list[tuple[bytes, bytes]]) -> None:
        if not self.closed and not self.conn.closed:
            with contextlib.suppress(http2.NGH2Error):
                self.conn.codec.send_informational_response(self.stream_id, fields)

    def send_body(self, data: bytes) -> None:
        if not self.closed and not self.conn.closed:
            with contextlib.suppress(http2.NGH2Error):
                self.conn.codec.send_data(self.stream_id, data)

    def send_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if self.closed or self.ended or self.conn.closed:
            return
        self.ended = True
        with contextlib.suppress(http2.NGH2Error):
            if trailers:
                self.conn.codec.send_trailers(self.stream_id, trailers)
            else:
                self.conn.codec.end_stream(self.stream_id)

    def queued(self) -> int:
        """Response bytes waiting for the client's window (or for its reading, when the socket is full)."""
        if self.closed or self.conn.closed:
            return 0
        try:
            return self.conn.codec.queued_body_size(self.stream_id)
        except http2.NGH2Error:
            return 0

    def check_queued(self) -> None:
        """Pause the upstream while more of the response waits for the client than PENDING_LIMIT, resume once it
        has gone; and once the exchange is done and nothing waits, the stream is done."""
        queued = self.queued()
        over = queued > http2.PENDING_LIMIT or self.conn.write_paused
        exchange = self.exchange
        if over != self.upstream_paused:
            self.upstream_paused = over
            upstream = exchange.upstream if exchange is not None else None
            if upstream is not None and not upstream.closed:
                upstream.transport.pause_reading() if over else upstream.transport.resume_reading()
        if self.finished and not queued and not self.closed:
            if exchange is not None and not exchange.request_done:
                self.reset(http2.NO_ERROR)  # answered before the request ended: the client may stop sending
            elif self.ended:
                self.closed = True
                self.conn.forget(self)

    def sweep(self, now: float, limits: Limits) -> None:
        """From the connection's sweep: the stream's idle and send timeouts. Nothing moved either way for the
        service's `timeouts.stream_idle`: the stream is ended (a gRPC call with DEADLINE_EXCEEDED). A response
        queued for a client that took none of it for `limits.send_timeout`: the same."""
        exchange = self.exchange
        queued = self.queued()
        moved = exchange.bytes_in + exchange.bytes_out - queued if exchange is not None else 0
        if moved != self.progress:
            self.progress, self.progress_at = moved, now
            return
        still = now - self.progress_at
        if exchange is None or exchange.done:
            if queued and still > limits.send_timeout:
                self.reset(http2.CANCEL)
        elif queued and still > limits.send_timeout:
            exchange.error = "send_timeout"
            exchange.abort()
        elif exchange.service is not None and still > (idle := exchange.service.config.timeouts.stream_idle):
            exchange.error = "stream_idle_timeout"
            if exchange.status:
                exchange.abort()
            elif exchange.request_done:
                exchange.fail_local(504, f"upstream sent nothing for the {idle:g}s stream idle timeout")
            else:
                exchange.fail_local(408, f"request stream idle for the {idle:g}s stream idle timeout")


class StreamExchange(Exchange):
    """One request on an HTTP/2 stream: `Exchange`, with the response written as frames and gRPC's semantics."""

    __slots__ = ("stream", "grpc", "grpc_deadline", "resp_fields", "resp_trailers")

    peer_h2 = True
    total_timeout = False  # streams: `max_stream_duration` and `stream_idle` instead of `timeouts.request`

    def __init__(self, stream: Stream, now: float) -> None:
        super().__init__(stream, now)  # type: ignore[arg-type]  # a Stream is the Downstream of one request
        self.stream = stream
        self.version = "2"
        self.grpc = False
        self.grpc_deadline = math.inf
        self.resp_fields: list[tuple[bytes, bytes]] | None = None  # the head, sent with the first body or the end
        self.resp_trailers: list[tuple[bytes, bytes]] | None = None

    def take_fields(self, fields: tuple[tuple[bytes, bytes], ...]) -> None:
        """The request head (the codec bounded its size and count), sorted as proxy.py sorts HTTP/1.1 headers."""
        content_length = False
        for name, value in fields:
            if name[:1] == b":":
                if name == b":method":
                    self.method = value
                elif name == b":path":
                    self.url = value
                elif name == b":authority":
                    self.host = value
                continue
            kind = REQUEST_FIELDS.get(name)
            if kind is None:
                if name == b"content-type" and rpc.is_grpc(value):
                    self.grpc = True
                elif name == b"grpc-timeout":
                    timeout = rpc.parse_timeout(value)
                    if timeout is not None:
                        self.grpc_deadline = self.start_time + timeout
                    continue  # sent on reduced by the time spent here (request_fields)
                if not name.startswith(b"proxy-"):
                    self.headers += (name, b": ", value, b"\r\n")
            elif kind == REQ_HOST:
                self.host = self.host or value
            elif kind == REQ_CONTENT_LENGTH:
                content_length = True
                self.headers += (name, b": ", value, b"\r\n")
            else:
                self.remember(kind, name, value)
        if not content_length:
            self.chunked = b"chunked"  # to an HTTP/1.1 upstream, a body of unknown length goes chunked

    # request side

    def start(self) -> None:
        if self.grpc_deadline != math.inf:
            self.limit = self.grpc_deadline
        super().start()

    def request_fields(self, forwarded: tuple[bytes, bytes, bytes, bytes], trace: bytes) -> list[tuple[bytes, bytes]]:
        fields = super().request_fields(forwarded, trace)
        if self.grpc_deadline != math.inf:
            fields.append((b"grpc-timeout", rpc.format_timeout(self.grpc_deadline - monotonic())))
        return fields

    def send(self, upstream: UpstreamProtocol) -> None:
        if self.grpc_deadline != math.inf and self.fields is not None:  # a retry: the time left now
            self.fields[-1] = (b"grpc-timeout", rpc.format_timeout(self.grpc_deadline - monotonic()))
        super().send(upstream)

    def end_try(self, failed: bool) -> None:
        """A gRPC answer counts against its endpoint (outlier ejection, the balancer) when its code is one of the
        service's `grpc.failure_codes`."""
        service = self.service
        if not failed and self.grpc_status >= 0 and service is not None:
            failed = self.grpc_status in service.config.grpc.failure_codes
        super().end_try(failed)

    # response side

    def on_response_head(self, upstream: UpstreamProtocol, status: int) -> None:
        """A Trailers-Only answer with a code `retries.on` names (unavailable, resource-exhausted, cancelled,
        deadline-exceeded) is retried within the retry budget while the request body is still held."""
        if self.grpc and status == 200 and self.service is not None:
            field = _grpc_status_field(upstream.headers)
            code = rpc.parse_status(field) if field is not None else -1
            condition = rpc.RETRY_CONDITIONS.get(code)
            if condition is not None and self.may_retry(condition, nothing_sent=False):
                self.upstream = None
                upstream.close()
                self.end_try(failed=True)
                return self.retry((200, code))
        super().on_response_head(upstream, status)

    def answer_code(self, upstream: UpstreamProtocol, status: int) -> Code:
        """A gRPC call's answer counts with its grpc-status, or UNKNOWN without one (as on_response_complete)."""
        if not self.grpc:
            return status
        code = _grpc_status_field(upstream.headers)
        return (status, rpc.UNKNOWN if code is None else rpc.parse_status(code))

    def failed_code(self, error: UpstreamError) -> Code:
        """A gRPC call's failed try counts as the Trailers-Only answer reply_local would have made of it."""
        return (200, _ERROR_CODES.get(error.error_type, rpc.from_http(error.status))) if self.grpc else error.status

    def interim(self, upstream: UpstreamProtocol, status: int) -> None:
        fields = [(b":status", b"%d" % status)]
        headers = upstream.headers
        fields += [(headers[i].lower(), headers[i + 2]) for i in range(0, len(headers), 4)]
        self.stream.send_interim(fields)
        self.stream.conn.flush()

    def begin_response(self, upstream: UpstreamProtocol, status: int) -> None:
        fields = [(b":status", b"%d" % status)]
        headers = upstream.headers
        for i in range(0, len(headers), 4):
            name = headers[i].lower()
            if name not in http2.CONNECTION_SPECIFIC:
                fields.append((name, headers[i + 2]))
                if name == b"grpc-status" and self.grpc:
                    self.grpc_status = rpc.parse_status(headers[i + 2])
        fields.append((b"x-request-id", self.request_id))
        self.resp_fields = fields
        if self.method == b"HEAD" or status in (204, 304):
            upstream.reset_parser()
            self.on_response_complete(upstream)

    def after_upstream_data(self, upstream: UpstreamProtocol) -> None:
        self.flush()
        if self.status and not self.resp_done and self.timer is None and not self.done and self.deadline != math.inf:
            self.arm(self.deadline)

    def flush(self) -> None:
        stream = self.stream
        fields = self.resp_fields
        if fields is not None:
            self.resp_fields = None
            stream.send_head(fields, end=self.resp_done and not self.out and not self.resp_trailers)
        if self.out:
            out = self.out
            stream.send_body(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.resp_done:
            stream.send_end(self.resp_trailers)
        stream.conn.flush()
        stream.check_queued()

    def on_response_complete(self, upstream: UpstreamProtocol) -> None:
        if self.status == 0:
            return
        trailers = upstream.trailers
        if trailers is not None:
            self.resp_trailers = [(trailers[i].lower(), trailers[i + 2]) for i in range(0, len(trailers), 4)]
            if self.grpc:
                for name, value in self.resp_trailers:
                    if name == b"grpc-status":
                        self.grpc_status = rpc.parse_status(value)
        if self.grpc:
            if self.grpc_status < 0:
                self.grpc_status = rpc.UNKNOWN  # a gRPC answer that ended without a status (the client says so too)
            service = self.service
            if not self.error and service is not None and self.grpc_status in service.config.grpc.failure_codes:
                # A failure by the service's own `grpc.failure_codes`: the span's error (and so always exported, as
                # a 5xx is), the access log's and the lookup's.
                self.error = rpc.NAMES[self.grpc_status]
        super().on_response_complete(upstream)

    def reply_local(self, status: int, reason: str) -> None:
        stream = self.stream
        if self.grpc:
            code = self.grpc_status = _ERROR_CODES.get(self.error, rpc.from_http(status))
            self.status = 200
            stream.send_head(self.grpc_head(code, reason), end=True)
        else:
            body = b"meshgate: " + reason.encode("utf-8", "replace") + b"\n"
            head = [(b":status", b"%d" % status), (b"content-type", b"text/plain; charset=utf-8")]
            head += ((b"content-length", b"%d" % len(body)), (b"x-request-id", self.request_id))
            bodiless = self.method == b"HEAD"
            stream.send_head(head, end=bodiless)
            if not bodiless:
                self.bytes_out += len(body)
                stream.send_body(body)
                stream.send_end(None)
        stream.conn.flush()

    def grpc_head(self, code: int, message: str) -> list[tuple[bytes, bytes]]:
        """A Trailers-Only answer: HTTP 200, and the call's outcome in the one HEADERS frame."""
        return [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", b"%d" % code),
            (b"grpc-message", rpc.encode_message("meshgate: " + message)),
            (b"x-request-id", self.request_id or b"-"),
        ]

    def local_response(self, status: int, content_type: str, body: bytes) -> None:
        self.status = status
        stream = self.stream
        head = [(b":status", b"%d" % status), (b"content-type", content_type.encode())]
        head += ((b"content-length", b"%d" % len(body)), (b"x-request-id", self.request_id))
        stream.send_head(head, end=self.method == b"HEAD")
        if self.method != b"HEAD":
            stream.send_body(body)
            stream.send_end(None)
        stream.conn.flush()
        self.finish()

    def cancelled_at_once(self) -> None:
        """Reset by the client in the read that opened it: counted as cancelled under its service, never routed
        further or sent upstream."""
        table = self.stream.runtime.table
        self.service = table.lookup(self.host) if table is not None and self.host else None
        self.downstream_lost()

    def downstream_lost(self) -> None:
        if self.grpc and not self.done:
            self.grpc_status = rpc.CANCELLED  # the client reset the stream: what its side reports too
        super().downstream_lost()

    def abort(self) -> None:
        """A gRPC call whose upstream failed mid-response still ends with a status (UNAVAILABLE, or
        DEADLINE_EXCEEDED); anything else is reset."""
        stream = self.stream
        if not self.grpc or stream.closed or self.error == "downstream_disconnect":
            return super().abort()
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.close()
        self.end_try(failed=True)
        code = self.grpc_status = _ERROR_CODES.get(self.error, rpc.UNAVAILABLE)
        message = f"upstream failed mid-call ({self.error or 'reset'})"
        if self.resp_fields is not None or not stream.ended and self.status == 0:
            self.resp_fields = None  # no head sent yet: the whole answer is the status, Trailers-Only
            stream.send_head(self.grpc_head(code, message), end=True)
            stream.conn.flush()
        else:  # what the upstream sent so far, then the status as trailers
            self.resp_trailers = [
                (b"grpc-status", b"%d" % code),
                (b"grpc-message", rpc.encode_message("meshgate: " + message)),
            ]
            self.resp_done = True
            self.flush()
        self.finish()


def _grpc_status_field(headers: list[bytes]) -> bytes | None:
    """The grpc-status field of a response head (a Trailers-Only answer), in upstream.py's flat header list."""
    return next((headers[i + 2] for i in range(0, len(headers), 4) if headers[i] == b"grpc-status"), None)
