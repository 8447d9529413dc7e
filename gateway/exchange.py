"""One proxied request (`Exchange`): routing decision, tries, and the response relayed to the client.

1. `start()` routes the authority to a service and a route, picks a subset with the route's smooth weighted
   split, decides the request ID, and renders the upstream request head once.
2. `attempt()` picks an endpoint, takes a pooled keep-alive connection (or opens one), and writes head and
   body. Bodies stream with backpressure both ways: a full write buffer on one side pauses reading on the other.
3. The upstream side (upstream.py) feeds the response back through `on_response_head/body/complete`; response
   bytes are gathered and written once per upstream read.
Failures before the response is committed retry when the policy allows (jittered backoff, a retry budget),
else become one `local_reply`; failures after it abort both connections.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable
from random import random
from time import monotonic
from typing import TYPE_CHECKING, Protocol, cast

import httptools
from httptools import HttpParserError

from gateway.errors import (
    ConnectFailed,
    RequestTimeout,
    TryTimeout,
    UpstreamError,
    UpstreamReset,
    local_reply,
    reason_phrase,
)
from gateway.exporter import SLOW
from gateway.hops import hop_record
from gateway.http1 import REQ_REQUEST_ID, REQ_TRACE, REQ_XFF, REQ_XFH, REQ_XFP, drop_headers, request_head
from gateway.propagation import TraceContext, extract, inject, new_request_id, new_trace
from gateway.routing import BUDGET_EXHAUSTED, RETRY
from gateway.runtime import LocalHandler, Runtime
from gateway.upstream import H2Request, Multiplexed, Pool, UpstreamProtocol

if TYPE_CHECKING:
    from gateway.balancer import Endpoint
    from gateway.deadlines import Owner as Deadline
    from gateway.routing import RouteEntry, ServiceRoutes, SubsetTarget
    from gateway.telemetry import Code

REPLAY_LIMIT = 64 * 1024  # request bodies up to this size are kept so an idempotent request can be retried
BUFFER_LIMIT = 64 * 1024  # body bytes held while the upstream connection is being opened

# Reasons a client connection's reading is paused; reading resumes when none is left.
PAUSE_PEER, PAUSE_QUEUE, PAUSE_BUFFER, PAUSE_UPGRADE = 1, 2, 4, 8

_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}").fullmatch


class ListenerInfo(Protocol):
    """The listener a request arrived on (proxy.Listener), as far as the exchange reads it."""

    @property
    def kind(self) -> str: ...  # inbound, edge, outbound, admin or metrics

    @property
    def scheme(self) -> bytes: ...  # what X-Forwarded-Proto says when no trusted proxy said otherwise

    @property
    def reporter(self) -> str | None: ...  # the `reporter` label of what it records


class Downstream(Protocol):
    """The client connection an exchange answers (proxy.Downstream): who it is, its transport, and the
    back-pressure and hand-over calls. The exchange never parses; the connection never routes."""

    runtime: Runtime
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    peer_ip: bytes
    source: str
    trusted: bool
    keep_request_id: bool
    local: LocalHandler | None
    exchange: Exchange | None
    tunnel: asyncio.Transport | None
    paused: int
    write_paused: bool
    closing: bool
    closed: bool
    max_head: int
    max_headers: int

    @property
    def listener(self) -> ListenerInfo: ...

    def pause(self, reason: int) -> None: ...

    def resume(self, reason: int) -> None: ...

    def pause_for_peer(self) -> None: ...

    def resume_for_peer(self) -> None: ...

    def exchange_done(self, exchange: Exchange) -> None: ...

    def close(self) -> None: ...


class Exchange:
    """One proxied request: routing decision, tries, and the response relayed to the client."""

    # Whether requests to another group's gateways ride HTTP/2: yes for HTTP/2 clients (gRPC needs it end to end),
    # no for HTTP/1.1 ones, which keep the pooled HTTP/1.1 mTLS connections.
    peer_h2 = False
    # Whether `timeouts.request` bounds the request (HTTP/1.1); an HTTP/2 stream has `max_stream_duration` instead.
    total_timeout = True

    __slots__ = (
        "downstream",
        "method",
        "url",
        "version",
        "host",
        "host_seen",
        "headers",
        "keep_alive",
        "has_body",
        "chunked",
        "trailers",
        "upgrade",
        "tunnel_data",
        "request_id",
        "forwarded_for",
        "forwarded_proto",
        "forwarded_host",
        "connection_tokens",
        "service",
        "route",
        "target",
        "endpoint",
        "upstream",
        "head",
        "fields",
        "body",
        "body_size",
        "replayable",
        "request_done",
        "tries",
        "trying",
        "failovers",
        "refused",
        "first",
        "attempt_id",
        "timer",
        "timer_index",
        "trace_headers",
        "trace",
        "bytes_in",
        "bytes_out",
        "upstream_time",
        "start_time",
        "try_start",
        "deadline",
        "limit",
        "status",
        "grpc_status",
        "resp_chunked",
        "resp_close_delimited",
        "resp_done",
        "out",
        "done",
        "error",
    )

    def __init__(self, downstream: Downstream, now: float) -> None:
        self.downstream = downstream
        # time.monotonic(), not loop.time(): uvloop's clock counts whole milliseconds, too coarse for latency.
        self.start_time = now
        self.method = b""
        self.url = b""
        self.version = "1.1"
        self.host = b""
        self.host_seen = False
        self.headers: list[bytes] = []
        self.keep_alive = True
        self.has_body = False
        self.chunked = b""  # the Transfer-Encoding value: the body is chunked (proxy.py refuses any other coding)
        self.trailers: list[bytes] | None = None  # request trailer fields to forward, rendered
        self.upgrade = b""
        self.tunnel_data = b""
        self.request_id = b""
        self.forwarded_for = b""
        self.forwarded_proto = b""
        self.forwarded_host = b""
        self.connection_tokens: list[bytes] | None = None
        self.service: ServiceRoutes | None = None
        self.route: RouteEntry | None = None
        self.target: SubsetTarget | None = None
        self.endpoint: Endpoint | None = None
        self.upstream: UpstreamProtocol | None = None
        self.head = b""
        # The upstream speaks HTTP/2 (h2client.py): the head as fields instead of `head`, and the body unframed.
        self.fields: list[tuple[bytes, bytes]] | None = None
        self.body: list[bytes] = []  # request body data kept to send once connected, or to replay
        self.body_size = 0
        self.replayable = True
        self.request_done = False
        self.tries = 0
        self.failovers = 0  # tries after a connect failure, outside `retries.attempts` and the retry budget
        self.refused: list[Endpoint] | None = None  # endpoints whose connect failed for this request
        self.trying = False  # a try holds the endpoint (counted in its `active`) until end_try
        self.first: Code = 0  # the outcome of the first try, once one was retried; 0 while none was
        self.attempt_id = 0
        self.timer: list[Deadline | None] | None = None  # the slot of the armed deadline (deadlines.py)
        self.timer_index = 0
        self.trace_headers: dict[bytes, bytes] | None = None
        self.trace: TraceContext | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream_time = 0.0
        self.try_start = 0.0
        self.deadline = 0.0
        self.limit = math.inf  # a deadline the client set (gRPC's grpc-timeout), which no timeout extends
        self.status = 0  # the status sent to the client; 0 until the response is committed
        self.grpc_status = -1  # a gRPC call's outcome (rpc.py); -1 for other requests
        self.resp_chunked = False
        self.resp_close_delimited = False
        self.resp_done = False
        self.out: list[bytes] = []
        self.done = False
        self.error = ""

    def remember(self, kind: int, lname: bytes, value: bytes) -> None:
        """A request header that says who asked and through what (http1.REQUEST_FIELDS): the request ID, the
        X-Forwarded-* a trusted sender may set, the trace context. Other kinds are ignored here (dropped)."""
        if kind == REQ_REQUEST_ID:
            self.request_id = value
        elif kind == REQ_XFF:
            self.forwarded_for = self.forwarded_for + b", " + value if self.forwarded_for else value
        elif kind == REQ_XFP:
            self.forwarded_proto = value
        elif kind == REQ_XFH:
            self.forwarded_host = value
        elif kind == REQ_TRACE:
            if self.trace_headers is None:
                self.trace_headers = {}
            self.trace_headers[lname] = value

    def decide_request_id(self) -> None:
        """Keep a well-formed ID from a trusted sender (docs/design.md, "The request path"); otherwise make one."""
        if not self.downstream.keep_request_id or not self.request_id or _VALID_REQUEST_ID(self.request_id) is None:
            self.request_id = new_request_id()

    # request side

    def start(self) -> None:
        downstream = self.downstream
        listener = downstream.listener
        if self.method == b"CONNECT":
            return self.fail_local(405, "CONNECT tunnels are not supported", close=True)
        if downstream.local is not None:
            return self.answer_locally(downstream.local)
        if self.url[:1] != b"/" and not self.absolute_form(listener.kind):
            return
        runtime = downstream.runtime
        trace = self.trace = extract(self.trace_headers) if self.trace_headers is not None else new_trace()
        if trace.sampled is None or (not downstream.trusted and listener.kind == "edge"):
            # An external client's trace is joined, but its "sampled" flag could force every span to be exported.
            trace.sampled = random() < runtime.sampling
        table = runtime.table
        if table is None:
            return self.fail_local(503, "no configuration loaded yet")
        if not self.host:
            return self.fail_local(400, "missing Host header")
        service = table.lookup(self.host)
        if service is None:
            host = self.host.decode("ascii", "replace")[:200]
            return self.fail_local(404, f"no service matches host {host!r}", error="no_route")
        if service.remote and downstream.listener.kind != "outbound":
            # Another group's service: only local callers may reach it through here, or gateways become relays.
            return self.fail_local(404, f"service {service.name!r} is not served by this gateway", error="no_route")
        self.service = service
        allow = service.config.authorization.allow
        if "*" not in allow and downstream.source not in allow:
            return self.fail_local(403, f"source {downstream.source!r} may not call service {service.name!r}")
        route = service.match(self.url, self.header_map() if service.needs_headers else {})
        if route is None:
            return self.fail_local(404, f"no route of service {service.name!r} matches", error="no_route")
        self.route = route
        self.target = route.pick()
        limits = service.config.limits
        if service.load.active >= limits.max_requests:
            runtime.metrics.count("meshgate_circuit_breaker_rejections_total", service.name)
            return self.fail_local(
                503, f"circuit breaker open: {limits.max_requests} requests active", error="overflow"
            )
        service.load.active += 1
        service.load.requests += 1
        # Like Envoy's, the timeouts count from the end of the request: an upload may take as long as it takes.
        timeouts = service.config.timeouts
        self.deadline = self.start_time + timeouts.request if not self.has_body and self.total_timeout else math.inf
        if not self.total_timeout and timeouts.max_stream_duration is not None:
            self.limit = min(self.limit, self.start_time + timeouts.max_stream_duration)
        if self.limit != math.inf:
            self.deadline = min(self.deadline, self.limit)
        if self.connection_tokens:
            self.headers = drop_headers(self.headers, self.connection_tokens)
        # The head sent upstream: X-Forwarded-* from a trusted sender are kept, else they say what this hop saw.
        peer = downstream.peer_ip
        forwarded_for = self.forwarded_for + b", " + peer if self.forwarded_for else peer
        trusted = downstream.trusted
        proto = self.forwarded_proto if trusted and self.forwarded_proto else listener.scheme
        forwarded_host = self.forwarded_host if trusted and self.forwarded_host else self.host
        forwarded = (forwarded_for, proto, forwarded_host, self.request_id)
        if self.peer_h2 if service.remote else self.target.h2:
            self.fields = self.request_fields(forwarded, inject(trace))
            self.upgrade = b""  # HTTP/2 has no Upgrade: the request goes as a plain one
        else:
            self.head = request_head(
                self.method, self.url, self.host, self.headers, forwarded, self.chunked, self.upgrade, inject(trace)
            )
        self.attempt()

    def request_fields(self, forwarded: tuple[bytes, bytes, bytes, bytes], trace: bytes) -> list[tuple[bytes, bytes]]:
        from gateway.h2client import request_fields  # the HTTP/2 codec is loaded only when a request needs it

        return request_fields(self.method, self.url, self.host, self.headers, forwarded, trace, b"http")

    def absolute_form(self, kind: str) -> bool:
        """Turn an absolute-form target (an app using HTTP_PROXY) into origin form plus Host."""
        if kind != "outbound" or not self.url.startswith(b"http://"):
            self.fail_local(400, "request target must be origin-form (absolute-form only on the outbound listener)")
            return False
        try:
            parsed = httptools.parse_url(self.url)
        except HttpParserError:
            self.fail_local(400, "malformed absolute-form request target")
            return False
        self.host = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
        self.url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
        return True

    def header_map(self) -> dict[bytes, bytes]:
        headers = self.headers
        return {headers[i].lower(): headers[i + 2] for i in range(0, len(headers), 4)}

    def on_request_body(self, chunk: bytes) -> None:
        self.bytes_in += len(chunk)
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.write(
                b"%x\r\n%s\r\n" % (len(chunk), chunk) if self.chunked and not self.fields else chunk
            )
            if self.replayable:
                self._keep_for_replay(chunk)
            return
        if self.done:
            return  # already answered (e.g. refused): the rest of the body is read and dropped
        self.body.append(chunk)
        self.body_size += len(chunk)
        if self.body_size > BUFFER_LIMIT:
            self.downstream.pause(PAUSE_BUFFER)

    def last_chunk(self) -> bytes:
        """The end of a chunked body, with the trailers that may be forwarded (proxy.py's `on_trailer` chose them)."""
        return b"0\r\n\r\n" if self.trailers is None else b"".join((b"0\r\n", *self.trailers, b"\r\n"))

    def framed_body(self) -> bytes:
        """The body kept so far as it goes to an HTTP/1.1 upstream: chunked again when it came chunked."""
        if not self.chunked:
            return b"".join(self.body)
        framed = b"".join([b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in self.body])
        return framed + self.last_chunk() if self.request_done else framed

    def _keep_for_replay(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self.body_size > REPLAY_LIMIT:
            self.replayable = False
            self.body = []
        else:
            self.body.append(chunk)

    def add_trailer(self, name: bytes, value: bytes) -> None:
        if self.trailers is None:
            self.trailers = []
        self.trailers += (name, b": ", value, b"\r\n")

    def on_request_complete(self) -> None:
        self.request_done = True
        upstream = self.upstream
        if upstream is not None:  # else send() ends the request when it is connected
            if self.fields is not None:
                cast(H2Request, upstream).end_request(self.trailers)
            elif self.chunked:
                upstream.transport.write(self.last_chunk())
        if self.done:
            if self.downstream.exchange is self:
                self.downstream.exchange_done(self)
        elif self.has_body and self.service is not None:
            self.arm_timeouts()

    def arm_timeouts(self) -> None:
        assert self.service is not None
        timeouts = self.service.config.timeouts
        now = monotonic()
        self.deadline = min(now + timeouts.request, self.limit) if self.total_timeout else self.limit
        if self.trying and self.status == 0:
            self.arm(min(now + timeouts.per_try, self.deadline))

    # tries

    def attempt(self, endpoint: Endpoint | None = None) -> None:
        service, target = self.service, self.target
        assert service is not None and target is not None
        if self.done:
            return
        now = monotonic()
        if endpoint is None:
            balancer = target.balancer
            key = self.header_map().get(balancer.hash_header) if balancer.hash_header is not None else None
            endpoint = balancer.pick(now, self.endpoint, key)
        if endpoint is None:
            return self.fail_local(
                503, f"no endpoints available in {service.name}/{target.name}", error="no_healthy_upstream"
            )
        self.endpoint = endpoint
        endpoint.active += 1
        self.trying = True
        self.tries += 1
        self.attempt_id += 1
        self.try_start = now
        timeouts = service.config.timeouts
        if not self.has_body or self.request_done:
            self.arm(min(now + timeouts.per_try, self.deadline))
        elif self.deadline != math.inf:
            self.arm(self.deadline)  # while a body streams in, only the client's own deadline runs
        pool: Pool | Multiplexed = endpoint.pool if self.fields is None else self.h2_pool(endpoint.pool)
        upstream = pool.acquire()
        if upstream is not None:
            return self.send(upstream)
        limits = service.config.limits
        if service.load.pending >= limits.max_pending:
            self.downstream.runtime.metrics.count("meshgate_circuit_breaker_rejections_total", service.name)
            return self.fail_local(
                503, f"circuit breaker open: {limits.max_pending} requests pending", error="overflow"
            )
        service.load.pending += 1
        self.downstream.runtime.spawn(self.connect(pool, self.attempt_id, timeouts.connect))

    def h2_pool(self, pool: Pool) -> Multiplexed:
        """The HTTP/2 connections to the pool's address, made on first use (for a peer gateway, mTLS with ALPN h2)."""
        multiplexed = pool.h2
        if multiplexed is None:
            from gateway.h2client import H2Pool

            tls = self.downstream.runtime.peer_tls_h2 if pool.tls else None
            h2pool = H2Pool(pool.address, tls, pool.peer_id, self.downstream.max_head, self.downstream.max_headers)
            multiplexed = pool.h2 = cast(Multiplexed, h2pool)  # its streams have UpstreamProtocol's surface
        return multiplexed

    async def connect(self, pool: Pool | Multiplexed, attempt_id: int, timeout: float) -> None:
        service = self.service
        assert service is not None
        try:
            upstream = await pool.connect(timeout)
        except ConnectFailed as exc:
            if self.attempt_id == attempt_id and not self.done:
                self.try_failed(exc)
            return
        finally:
            service.load.pending -= 1
        if self.attempt_id == attempt_id and not self.done:
            self.send(upstream)
        else:
            pool.release(upstream, monotonic())

    def send(self, upstream: UpstreamProtocol) -> None:
        self.upstream = upstream
        upstream.exchange = self
        if self.downstream.write_paused:
            upstream.transport.pause_reading()
        if self.fields is not None:
            cast(H2Request, upstream).send_request(
                self.fields, self.body, self.trailers if self.request_done else None, self.request_done
            )
        elif not self.body and not (self.chunked and self.request_done):
            upstream.transport.write(self.head)
        else:
            upstream.transport.write(self.head + self.framed_body())
        if self.body:
            if self.body_size > REPLAY_LIMIT or not self.replayable:
                self.replayable = False
                self.body = []
            self.downstream.resume(PAUSE_BUFFER)

    def arm(self, when: float) -> None:
        if self.timer is not None:  # checked before calling: a call costs more than the check, per request
            self.disarm()
        self.timer, self.timer_index = self.downstream.runtime.deadlines.add(when, self)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer[self.timer_index] = None
            self.timer = None

    def on_deadline(self) -> None:
        self.timer = None
        if self.status:
            self.on_request_deadline()
        else:
            self.on_try_timeout()

    def on_try_timeout(self) -> None:
        if self.done or self.status:
            return
        if monotonic() >= self.deadline - 0.001:
            if self.deadline == self.limit:
                return self.try_failed(RequestTimeout("the call's deadline (grpc-timeout) passed"))
            timeout = self.service.config.timeouts.request if self.service else 0.0
            return self.try_failed(RequestTimeout(f"upstream did not answer within the {timeout:g}s request timeout"))
        per_try = self.service.config.timeouts.per_try if self.service else 0.0
        self.try_failed(TryTimeout(f"upstream did not answer within the {per_try:g}s per-try timeout"))

    def try_failed(self, error: UpstreamError) -> None:
        """A try ended without a usable response: retry when allowed, else tell the client why."""
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.close()
        self.end_try(failed=True)
        if isinstance(error, ConnectFailed) and self.fail_over():
            return
        if self.may_retry(error.retry_on, isinstance(error, ConnectFailed)):
            return self.retry(self.failed_code(error))
        self.fail_local(error.status, str(error), error=error.error_type)

    def failed_code(self, error: UpstreamError) -> Code:
        """What a failed try would have been counted as, had it not been retried: its error's status."""
        return error.status

    def fail_over(self) -> bool:
        """After a connect failure, which cost that endpoint nothing: eject it at once, and try an endpoint of the
        subset not tried yet for this request, each at most once, outside `retries.attempts` and the retry
        budget (as linkerd2-proxy's balancer does), while the client waits and the deadline allows."""
        endpoint, target, service = self.endpoint, self.target, self.service
        assert endpoint is not None and target is not None and service is not None
        now = monotonic()
        target.balancer.eject(endpoint, now)
        if self.downstream.closed or now >= self.deadline:
            return False
        refused = self.refused
        if refused is None:
            refused = self.refused = []
        refused.append(endpoint)
        other = target.balancer.pick_other(now, refused)
        if other is None:
            return False
        self.failovers += 1
        self.downstream.runtime.metrics.count("meshgate_connect_failovers_total", service.name)
        self.attempt(other)
        return True

    def may_retry(self, condition: str, nothing_sent: bool) -> bool:
        service = self.service
        if service is None or self.downstream.closed:
            return False
        time_left = self.deadline - monotonic()
        tries = self.tries - self.failovers
        verdict = service.retry.decide(condition, tries, self.method, self.replayable, nothing_sent, time_left)
        if verdict == BUDGET_EXHAUSTED:
            self.downstream.runtime.metrics.count("meshgate_retry_budget_exhausted_total", service.name)
        return verdict == RETRY

    def retry(self, outcome: Code) -> None:
        """Try again after a backoff; `outcome` is what the try given up would have been counted as (the first
        one's goes to `meshgate_request_first_attempts_total`)."""
        service = self.service
        assert service is not None
        if not self.first:
            self.first = outcome
        self.downstream.runtime.metrics.count("meshgate_retries_total", service.name)
        service.load.retries += 1
        self.downstream.loop.call_later(service.retry.backoff(self.tries - self.failovers), self._retry_now)

    def _retry_now(self) -> None:
        if not self.done:
            self.attempt()

    def end_try(self, failed: bool) -> None:
        if self.timer is not None:
            self.disarm()
        if not self.trying:
            return
        self.trying = False
        endpoint, target = self.endpoint, self.target
        if endpoint is not None and target is not None:
            endpoint.active -= 1
            now = monotonic()
            self.upstream_time = now - self.try_start
            if not failed:
                endpoint.observe(self.upstream_time, now)
            target.balancer.record(endpoint, failed, now)

    # response side

    def on_response_head(self, upstream: UpstreamProtocol, status: int) -> None:
        if 100 <= status < 200 and status != 101:
            return self.interim(upstream, status)
        service = self.service
        assert service is not None
        if status == 101 and not self.upgrade:
            # An unsolicited switch would turn the client connection into a raw tunnel that later requests
            # ride past routing, request IDs and X-Forwarded-For (websocket smuggling).
            self.upstream = None
            upstream.close()
            self.end_try(failed=True)
            return self.fail_local(
                502, "upstream switched protocols without an upgrade request", close=True, error="protocol_error"
            )
        if status >= 400 and self.may_retry(service.retry.condition(status), nothing_sent=False):
            self.upstream = None
            upstream.close()
            self.end_try(failed=True)
            return self.retry(self.answer_code(upstream, status))
        if self.timer is not None:
            self.disarm()
        self.status = status
        self.begin_response(upstream, status)

    def answer_code(self, upstream: UpstreamProtocol, status: int) -> Code:
        """What a response given up for a retry would have been counted as: its status."""
        return status

    def begin_response(self, upstream: UpstreamProtocol, status: int) -> None:
        """The response head goes to the client (only gathered here: written once the upstream's read is done)."""
        downstream = self.downstream
        close = not self.keep_alive or downstream.closing or (self.has_body and not self.request_done and status != 101)
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, upstream.reason or reason_phrase(status))]
        parts += upstream.headers
        parts += (b"x-request-id: ", self.request_id, b"\r\n")
        bodiless = self.method == b"HEAD" or status in (204, 304) or status == 101
        if status == 101:
            parts += (b"connection: upgrade\r\nupgrade: ", self.upgrade, b"\r\n")
        elif not bodiless and upstream.content_length < 0:
            if upstream.chunked and self.version == "1.1":
                self.resp_chunked = True
                parts += (b"transfer-encoding: ", upstream.chunked, b"\r\n")
            else:
                # Body ends when the connection does (or HTTP/1.0 client): close-delimited to the client too.
                self.resp_close_delimited = not upstream.chunked
                close = True
        if close:
            self.keep_alive = False
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self.out.append(b"".join(parts))
        if bodiless and status != 101:
            if self.method == b"HEAD":
                upstream.reset_parser()
            self.on_response_complete(upstream)

    def interim(self, upstream: UpstreamProtocol, status: int) -> None:
        """An interim (1xx) response, relayed with its fields: 103's Link is its whole point."""
        if self.version == "1.1" and not self.out:
            reason = upstream.reason or reason_phrase(status)
            self.downstream.transport.write(b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, b"".join(upstream.headers)))

    def on_response_body(self, chunk: bytes) -> None:
        self.bytes_out += len(chunk)
        if self.resp_chunked:
            self.out += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
        else:
            self.out.append(chunk)

    def after_upstream_data(self, upstream: UpstreamProtocol) -> None:
        """End of one upstream read: write what it produced in one go, and arm the overall deadline."""
        if self.out:
            self.flush()
        if self.status and not self.resp_done and self.timer is None and not self.done and self.deadline != math.inf:
            self.arm(self.deadline)

    def flush(self) -> None:
        out = self.out
        self.downstream.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def on_request_deadline(self) -> None:
        if not self.done:
            self.error = RequestTimeout.error_type
            self.abort()

    def on_response_complete(self, upstream: UpstreamProtocol) -> None:
        if self.status == 0 or self.status == 101:
            return  # an interim (1xx) response, one discarded for a retry, or a tunnel (start_tunnel takes over)
        if self.resp_chunked:
            trailers = upstream.trailers
            self.out.append(b"0\r\n\r\n" if trailers is None else b"".join((b"0\r\n", *trailers, b"\r\n")))
        self.resp_done = True
        self.flush()
        self.upstream = None
        upstream.exchange = None
        if upstream.keep_alive and self.request_done and not upstream.closed:
            upstream.pool.release(upstream, monotonic())
        else:
            upstream.close()
        self.end_try(failed=self.status >= 500)
        self.finish()

    def start_tunnel(self, upstream: UpstreamProtocol, rest: bytes) -> None:
        """After 101 Switching Protocols both connections carry opaque bytes until either side closes."""
        downstream = self.downstream
        if self.out:
            self.flush()
        if rest:
            downstream.transport.write(rest)
        self.upstream = None
        upstream.exchange = None
        upstream.tunnel = downstream.transport
        downstream.tunnel = upstream.transport
        if self.tunnel_data:
            upstream.transport.write(self.tunnel_data)
        downstream.resume(PAUSE_UPGRADE)
        self.end_try(failed=False)
        self.finish()

    def upstream_lost(self, upstream: UpstreamProtocol) -> None:
        if self.upstream is not upstream:
            return
        if self.status and self.resp_close_delimited:
            self.upstream = None
            self.on_response_complete(upstream)
        elif self.status:
            self.error = UpstreamReset.error_type
            self.abort()
        else:
            self.try_failed(UpstreamReset("upstream closed the connection before responding"))

    def upstream_failed(self, error: UpstreamError) -> None:
        if self.status:
            self.error = error.error_type
            self.abort()
        else:
            self.try_failed(error)

    def downstream_lost(self) -> None:
        if not self.done:
            self.error = "downstream_disconnect"
            if not self.status:
                self.status = 499  # nginx's code for "client closed request"; never sent, only recorded
            self.abort()

    def abort(self) -> None:
        """Give up mid-response: nothing valid can be sent any more, so both connections close."""
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.close()
        self.end_try(failed=True)
        self.finish()
        self.downstream.close()

    def fail_local(self, status: int, reason: str, close: bool = False, error: str = "") -> None:
        """Answer with the gateway's own response (nothing was committed from upstream yet)."""
        if self.done:
            return
        upstream = self.upstream
        if upstream is not None:  # e.g. the client's body framing broke mid-stream: the upstream request is void
            self.upstream = None
            upstream.close()
        self.end_try(failed=False)  # not the endpoint's fault
        self.status = status
        if error:
            self.error = error
        if close or (self.has_body and not self.request_done):
            self.keep_alive = False
        self.reply_local(status, reason)
        self.finish()

    def reply_local(self, status: int, reason: str) -> None:
        request_id = self.request_id or new_request_id()
        reply = local_reply(status, reason, request_id, self.keep_alive, head_only=self.method == b"HEAD")
        self.bytes_out += len(reply) - reply.index(b"\r\n\r\n") - 4
        self.out.append(reply)
        self.flush()

    def answer_locally(self, handler: LocalHandler) -> None:
        answer = handler(self.method, self.url, self.downstream.peer_ip, self.header_map())
        if isinstance(answer, tuple):
            self.local_response(*answer)
        else:
            self.downstream.runtime.spawn(self._answer_later(answer))

    async def _answer_later(self, answer: Awaitable[tuple[int, str, bytes]]) -> None:
        response = await answer
        if not self.downstream.closed:
            self.local_response(*response)

    def local_response(self, status: int, content_type: str, body: bytes) -> None:
        self.status = status
        if self.has_body and not self.request_done:
            self.keep_alive = False
        head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nx-request-id: %s\r\n%s\r\n" % (
            status,
            reason_phrase(status),
            content_type.encode(),
            len(body),
            self.request_id,
            b"" if self.keep_alive else b"connection: close\r\n",
        )
        self.out.append(head if self.method == b"HEAD" else head + body)
        self.flush()
        self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        service = self.service
        if service is not None and (self.head or self.fields is not None):  # counted in `active` by start()
            service.load.active -= 1
        downstream = self.downstream
        if downstream.listener.reporter is not None and downstream.local is None:
            self.record()  # traffic only: the dashboard's lookups of hop records (answered locally) are not
        if downstream.paused & (PAUSE_PEER | PAUSE_BUFFER):
            downstream.resume(PAUSE_PEER | PAUSE_BUFFER)  # the upstream that caused the pause is gone
        if self.request_done or not self.keep_alive:
            downstream.exchange_done(self)

    def record(self) -> None:
        """Golden signals, the hop record for lookup by request ID, the access log and the span export."""
        downstream = self.downstream
        runtime = downstream.runtime
        duration = monotonic() - self.start_time
        service, target, route, trace = self.service, self.target, self.route, self.trace
        reporter = downstream.listener.reporter
        assert reporter is not None
        destination = service.name if service is not None else "unknown"
        subset, route_name = target.name if target else "", route.name if route else ""
        key = (reporter, downstream.source, destination, subset, route_name)
        metrics = runtime.metrics
        series = metrics.series.get(key) or metrics.series_for(key)
        code = self.status if self.grpc_status < 0 else (self.status, self.grpc_status)
        series.record(code, duration)
        if self.first:
            series.retried(self.first, code)
        if trace is None:
            trace = self.trace = new_trace()  # refused before it was routed
        status, error = self.status, self.error
        export = trace.sampled or status >= 500 or error != "" or duration >= SLOW
        start = runtime.wall_offset + self.start_time
        hop = hop_record(self, trace, key, downstream.peer_ip, start, duration, export)
        ring = runtime.ring
        if ring.size:  # HopRing.add(hop), inlined: this runs for every request
            young = ring.young
            young += hop
            if len(young) >= ring.limit:
                ring.seal()
        if runtime.access_log is not None:
            runtime.access_log.add(hop)
        if export and runtime.exporter is not None:
            runtime.exporter.add(hop)
            series.exemplar(duration, trace.trace_id, self.request_id, hop[0] + duration)
