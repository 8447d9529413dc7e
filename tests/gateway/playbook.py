"""Scripted tests of the hot path, in the spirit of mitmproxy's Playbook: the test plays the client and every
upstream, step by step, on a real `Runtime` whose connections are in-memory transports (inmemory.py), so a retry,
timeout or framing rule reads as what happens on the wire:

>>> two_endpoints = {"v1": {"endpoints": ["127.0.0.1:9001", "127.0.0.1:9002"]}}
>>> with Playbook({"services": {"hello": {"subsets": two_endpoints}}}) as pb:
...     client = pb.connect()
...     client.send(b"GET / HTTP/1.1\\r\\nHost: hello\\r\\n\\r\\n")
...     first = pb.next_upstream()                   # the gateway connects to one endpoint
...     first.answer(b"HTTP/1.1 503 No\\r\\ncontent-length: 0\\r\\n\\r\\n")
...     pb.advance(BACKOFF)                          # the retry's jittered backoff passes
...     second = pb.next_upstream()                  # ... and retries on the other one
...     second.answer(b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\nok")
...     client.responses()[0].status
200

- Time is virtual (`VirtualLoop`): it stands still until `pb.advance(seconds)` moves it, firing on the way every
  timer that falls due (the deadline wheel, retry backoffs, connect timeouts, the runtime's sweep), in order.
  The exchange's and the proxy's `monotonic()` read the same clock while a playbook is open.
- Every step runs the loop until nothing is ready (`settle`), so what a step caused has happened when it returns.
- A connect the gateway starts stays pending until the test touches that connection (`accept()`, `received()`,
  `answer()`, ...) or fails it (`fail_connect()`), or until its connect timeout passes: connect failures, pending
  breakers and timeouts are scripted like any other step.
- Transports have a write buffer: `client.stop_reading()` (or `upstream.stop_reading()`) lets what the gateway writes
  pile up, and past `HIGH_WATER` bytes the gateway is told `pause_writing()`, as by asyncio's transports;
  `resume_reading()` drains it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from contextvars import Context
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVarTuple
from unittest import mock

import h11

import gateway.exchange
import gateway.proxy
from gateway.config import Config
from gateway.proxy import DownstreamProtocol
from gateway.runtime import Runtime
from gateway.server import data_listener
from gateway.units import Address
from gateway.upstream import Pool, UpstreamProtocol
from tests.gateway.inmemory import CountingLoop, ErrorLog, MemoryTransport, describe_loop_error
from tests.gateway.wiring import CLIENT_PEER

START = 1000.0  # the virtual clock's first reading
# Stepping onto a timer's due time lands just after it: the deadline wheel rounds `time / 0.01` down, and a float
# product can land a hair before its slot.
STEP_PAST = 1e-6
BACKOFF = 0.3  # longer than any retry backoff (exchange.retry: at most 250 ms)
HIGH_WATER = 64 * 1024  # asyncio's default write buffer high-water mark
ADVANCE_LIMIT = 100_000  # timers one advance may fire before it counts as a runaway

_Ts = TypeVarTuple("_Ts")


class VirtualLoop(CountingLoop):
    """A `CountingLoop` whose clock moves only in `advance`. It keeps its pending timers, so `advance` can step
    from one to the next (a plain loop would wait for them in real time)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.timers: set[asyncio.TimerHandle] = set()

    def time(self) -> float:
        return self.now

    def call_at(
        self, when: float, callback: Callable[[*_Ts], object], *args: *_Ts, context: Context | None = None
    ) -> asyncio.TimerHandle:
        cell: list[asyncio.TimerHandle] = []
        handle = super().call_at(when, self._fire, cell, callback, args, context=context)
        cell.append(handle)
        self.timers.add(handle)
        return handle

    def _fire(self, cell: list[asyncio.TimerHandle], callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.timers.discard(cell[0])
        callback(*args)

    def next_timer(self) -> float | None:
        self.timers = {handle for handle in self.timers if not handle.cancelled()}
        return min((handle.when() for handle in self.timers), default=None)

    async def advance(self, seconds: float) -> None:
        target = self.now + seconds
        await self.settle()
        for _ in range(ADVANCE_LIMIT):
            due = self.next_timer()
            if due is None or due > target:
                break
            self.now = max(self.now, due + STEP_PAST)
            await asyncio.sleep(0)  # one iteration runs every timer now due
            await self.settle()
        else:
            raise RuntimeError(f"more than {ADVANCE_LIMIT} timers fell due within {seconds}s")
        self.now = max(self.now, target)
        await asyncio.sleep(0)
        await self.settle()


class BufferedTransport(MemoryTransport):
    """A `MemoryTransport` with a write buffer: while its peer (the test's client or upstream) does not read,
    what the protocol writes piles up, and past `HIGH_WATER` the protocol is told `pause_writing()`; draining the
    buffer tells it `resume_writing()`, as asyncio's transports do."""

    def __init__(self, loop: CountingLoop, protocol: asyncio.Protocol, peer: tuple[str, int]) -> None:
        super().__init__(loop, protocol, peer, self._take)
        self.output = bytearray()  # what the peer has read
        self.buffer = bytearray()  # what the protocol wrote and the peer has not read
        self.peer_reading = True
        self.protocol_paused = False

    def _take(self, data: bytes) -> None:
        if self.peer_reading:
            self.output += data
            return
        self.buffer += data
        if len(self.buffer) > HIGH_WATER and not self.protocol_paused:
            self.protocol_paused = True
            self.protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def drain(self) -> None:
        self.peer_reading = True
        self.output += self.buffer
        self.buffer.clear()
        if self.protocol_paused:
            self.protocol_paused = False
            self.protocol.resume_writing()


class _Fields:
    headers: list[tuple[bytes, bytes]]  # names lower-cased

    def header(self, name: bytes) -> bytes | None:
        values = [value for key, value in self.headers if key == name]
        assert len(values) <= 1, f"{name!r} appears {len(values)} times"
        return values[0] if values else None


@dataclass
class Request(_Fields):
    """One request as h11 read it off an upstream connection: what the gateway forwarded."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def names(self) -> set[bytes]:
        return {name for name, _ in self.headers}


def parse_requests(data: bytes) -> list[Request]:
    """The complete requests in `data`, as an HTTP/1.1 server reads them."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    requests: list[Request] = []
    current: Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED and conn.their_state is not h11.DONE:
            return requests
        if event is h11.PAUSED:  # one complete: answer it (h11 wants a response) to read the next
            conn.send(h11.Response(status_code=204, headers=[]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is h11.MUST_CLOSE:
                return requests
            conn.start_next_cycle()
        elif isinstance(event, h11.Request):
            current = Request(event.method, event.target, list(event.headers))
        elif isinstance(event, h11.Data) and current is not None:
            current.body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage) and current is not None:
            current.trailers = list(event.headers)
            requests.append(current)
            current = None


@dataclass
class Response(_Fields):
    """One response as h11 (not the gateway's parser) read it off the client's connection."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)


def parse_responses(data: bytes, eof: bool, methods: list[bytes] | None = None) -> list[Response]:
    """The complete responses in `data` (a close-delimited body needs `eof`); `methods` are the requests', in
    order, when one was a HEAD."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    responses: list[Response] = []
    for method in methods or [b"GET"] * 1000:
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        current: Response | None = None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:  # cut off (EOF inside a body): not a complete response
                return responses
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return responses
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                current = Response(event.status_code, list(event.headers))
            elif isinstance(event, h11.Data) and current is not None:
                current.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage) and current is not None:
                current.trailers = list(event.headers)
                responses.append(current)
                break
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return responses
        conn.start_next_cycle()
    return responses


class Client:
    """One client connection to the gateway."""

    def __init__(self, playbook: Playbook, protocol: DownstreamProtocol, peer: tuple[str, int]) -> None:
        self.playbook = playbook
        self.protocol = protocol
        self.transport = BufferedTransport(playbook.loop, protocol, peer)
        self.read_at = 0

    def send(self, data: bytes) -> None:
        self.playbook.run(lambda: self.transport.feed(data))

    def send_eof(self) -> None:
        self.playbook.run(self.transport.feed_eof)

    def reset(self) -> None:
        self.playbook.run(lambda: self.transport.lose(ConnectionResetError("the client reset the connection")))

    def stop_reading(self) -> None:
        self.transport.peer_reading = False

    def resume_reading(self) -> None:
        self.playbook.run(self.transport.drain)

    def received(self) -> bytes:
        """Everything the client has read so far."""
        return bytes(self.transport.output)

    def read(self) -> bytes:
        """What the client has read since the last `read()`."""
        data = self.transport.output[self.read_at :]
        self.read_at = len(self.transport.output)
        return bytes(data)

    def responses(self, methods: list[bytes] | None = None) -> list[Response]:
        return parse_responses(self.received(), self.closed, methods)

    @property
    def closed(self) -> bool:
        """The gateway closed the connection, or half-closed it (FIN after its answer: a lingering close)."""
        return self.transport.closing or self.transport.eof_written

    @property
    def reading(self) -> bool:
        """The gateway reads from this client (it pauses to push back, or while pipelined requests wait)."""
        return self.transport.is_reading()


class Upstream:
    """One connection the gateway opened to an upstream address; the test plays the server."""

    def __init__(self, playbook: Playbook, pool: Pool) -> None:
        self.playbook = playbook
        self.address = pool.address
        self.accepted: asyncio.Future[None] = playbook.loop.create_future()
        self.protocol = UpstreamProtocol(pool)
        self.transport = BufferedTransport(playbook.loop, self.protocol, (pool.address.host, pool.address.port))
        self.data = self.transport.output  # what the gateway wrote on it
        self.read_at = 0

    def accept(self) -> None:
        if not self.accepted.done():
            self.protocol.connection_made(self.transport)
            self.accepted.set_result(None)
        self.playbook.settle()

    def fail_connect(self) -> None:
        assert not self.accepted.done(), "the connect already ended"
        self.accepted.set_exception(ConnectionRefusedError(111, "Connection refused"))
        self.playbook.settle()

    def received(self) -> bytes:
        """Everything the gateway wrote on this connection (accepting it first, if its connect is pending)."""
        self.accept()
        return bytes(self.data)

    def read(self) -> bytes:
        """What the gateway wrote since the last `read()`."""
        self.accept()
        data = self.data[self.read_at :]
        self.read_at = len(self.data)
        return bytes(data)

    def stop_reading(self) -> None:
        self.transport.peer_reading = False

    def resume_reading(self) -> None:
        self.playbook.run(self.transport.drain)

    def requests(self) -> list[Request]:
        """The complete requests the gateway sent on this connection."""
        return parse_requests(self.received())

    def answer(self, data: bytes) -> None:
        self.accept()
        self.playbook.run(lambda: self.transport.feed(data))

    def close(self) -> None:
        """The upstream closes its end (FIN)."""
        self.accept()
        self.playbook.run(self.transport.feed_eof)

    def reset(self) -> None:
        self.accept()
        self.playbook.run(lambda: self.transport.lose(ConnectionResetError("the upstream reset the connection")))

    @property
    def connecting(self) -> bool:
        return not self.accepted.done()

    @property
    def closed(self) -> bool:
        """The gateway closed (or gave up on) this connection."""
        return self.transport.closing or self.accepted.cancelled()

    @property
    def reading(self) -> bool:
        return self.transport.is_reading()


class ScriptedPool(Pool):
    """A `Pool` whose connects are `Upstream`s the test accepts or fails; idle connections are pooled as usual."""

    __slots__ = ("playbook",)

    def __init__(self, address: Address, playbook: Playbook) -> None:
        super().__init__(address)
        self.playbook = playbook

    async def dial(self) -> UpstreamProtocol:  # Pool.connect bounds it and turns a refusal into ConnectFailed
        upstream = Upstream(self.playbook, self)
        self.playbook.upstreams.append(upstream)
        await upstream.accepted
        return upstream.protocol


def endpoint_addresses(config: Config) -> set[Address]:
    return {address for service in config.services for subset in service.subsets for address in subset.endpoints}


class Playbook:
    """A real `Runtime` on a `VirtualLoop`, with scripted clients and upstreams (see the module docstring).

    `config` is plain data for `Config.parse`; the access log is off unless it says otherwise. Use it as a context
    manager: leaving it stops the runtime, restores the clocks, and fails the test if anything escaped (an
    exception in a callback, an error logged).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        gateway_section = {"telemetry": {"access_log": "off"}, **config.get("gateway", {})}
        self.config = Config.parse({**config, "gateway": gateway_section})
        self.loop = VirtualLoop()
        self.escaped: list[str] = []
        self.loop.set_exception_handler(lambda _, context: self.escaped.append(describe_loop_error(context)))
        self.error_log = ErrorLog(self.escaped)
        self.runtime = Runtime(self.config)
        for address in endpoint_addresses(self.config):
            self.runtime.pools[address] = ScriptedPool(address, self)
        self.upstreams: list[Upstream] = []
        self.taken = 0
        self.clocks = [
            mock.patch.object(module, "monotonic", self.loop.time) for module in (gateway.exchange, gateway.proxy)
        ]

    def __enter__(self) -> Playbook:
        for clock in self.clocks:
            clock.start()
        logging.getLogger("meshgate").addHandler(self.error_log)
        self.run(self._start)
        return self

    def _start(self) -> None:
        self.runtime.apply(self.config, 1)
        self.runtime.spawn(self.runtime.sweep())  # header, body, send and idle timeouts; pool expiry

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            for task in list(self.runtime.tasks):
                task.cancel()
            self.settle()
            self.runtime.deadlines.close()
        finally:
            for clock in self.clocks:
                clock.stop()
            logging.getLogger("meshgate").removeHandler(self.error_log)
            self.loop.close()
        if kind is None:
            assert not self.escaped, f"escaped from the gateway: {self.escaped}"

    def _drive(self, coro: Coroutine[Any, Any, None]) -> None:
        self.loop.run_until_complete(coro)

    def run(self, step: Callable[[], object]) -> None:
        """Take `step` on the loop (protocol calls expect a running loop), then settle."""

        async def take() -> None:
            step()
            await self.loop.settle()

        self._drive(take())

    def settle(self) -> None:
        self._drive(self.loop.settle())

    def advance(self, seconds: float) -> None:
        """Move the clock `seconds` forward, firing every timer due on the way, in order."""
        self._drive(self.loop.advance(seconds))

    def connect(self, kind: str = "inbound", peer: tuple[str, int] = CLIENT_PEER) -> Client:
        """A client connects to the listener `kind` (inbound, edge or outbound) from `peer`."""
        protocol = DownstreamProtocol(data_listener(kind, self.runtime, None), self.loop)
        client = Client(self, protocol, peer)
        self.run(lambda: protocol.connection_made(client.transport))
        return client

    def next_upstream(self) -> Upstream:
        """The next connection the gateway opened (or is opening), in the order it opened them."""
        assert self.taken < len(self.upstreams), f"the gateway opened only {len(self.upstreams)} upstream connections"
        upstream = self.upstreams[self.taken]
        self.taken += 1
        return upstream

    def upstream(self, address: Address) -> Upstream:
        """The latest connection the gateway opened to `address`."""
        opened = [upstream for upstream in self.upstreams if upstream.address == address]
        assert opened, f"the gateway opened no connection to {address}"
        return opened[-1]

    def waiting(self) -> list[Upstream]:
        """Open connections whose connect is pending, or that hold bytes the test has not `read()`."""
        return [
            upstream
            for upstream in self.upstreams
            if not upstream.closed and (upstream.connecting or len(upstream.data) > upstream.read_at)
        ]

    def counter(self, name: str, service: str) -> float:
        return self.runtime.metrics.counters.get((name, service), 0)


def reply(status: int, body: bytes = b"", *headers: bytes) -> bytes:
    """An upstream's response with a Content-Length, `headers` given as `b"name: value"`."""
    head = b"".join(header + b"\r\n" for header in headers)
    return b"HTTP/1.1 %d X\r\n%scontent-length: %d\r\n\r\n%s" % (status, head, len(body), body)
