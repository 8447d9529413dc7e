"""The hot path without sockets: a real `Runtime` whose client and upstream connections are in-memory transports.

Everything is driven through the public protocol methods (`connection_made`, `data_received`, `eof_received`,
`connection_lost`) on a plain asyncio loop, so the harness does not depend on how proxy.py, exchange.py and
upstream.py share the work between them.

- `MemoryTransport` stands in for uvloop's TCP transport and keeps its rules: nothing is delivered while reading is
  paused or once the transport is closing; what arrives while paused is read in one go on resume; `write()` after
  `write_eof()` or after the loss was reported raises RuntimeError; `close()` reports the loss an iteration later.
- `H11Upstream` is the server at the far end of each upstream connection: h11, an HTTP/1.1 parser independent of
  the gateway's httptools, reads what the gateway sent and answers every complete request with a small fixed
  response numbered by arrival (`x-upstream-seq`).
- The bare wiring `bench/hotpath.py` measures (`wiring.keepalive_pair`: writes only counted, the protocols fed
  directly) is in wiring.py, which imports nothing beyond the gateway, so the benchmark counts the gateway alone.
- `MemoryGateway.run(data)` builds a fresh runtime (its pools are `MemoryPool`s, seeded into `runtime.pools`
  before the config is applied, so every connection the gateway opens is an `H11Upstream`), sends `data` from a
  client, lets the loop settle, ends the client's input, and returns a `Run`: what the client got, what the
  gateway's parser read (`RecordingDownstream`), what each upstream connection got, and anything that escaped.

>>> run = MemoryGateway().run(b"GET /a HTTP/1.1\\r\\nHost: hello\\r\\n\\r\\n")
>>> run.upstream_requests[0].target, run.client_output.startswith(b"HTTP/1.1 200 ")
(b'/a', True)
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections import deque
from collections.abc import Callable
from contextvars import Context
from dataclasses import dataclass, field
from typing import Any, TypeVarTuple

import h11

from gateway.config import Config
from gateway.proxy import DownstreamProtocol, Listener
from gateway.runtime import Runtime
from gateway.server import data_listener
from gateway.units import Address
from gateway.upstream import Pool, UpstreamProtocol
from tests.gateway.wiring import CLIENT_PEER

UPSTREAMS = (Address("127.0.0.1", 9001), Address("127.0.0.1", 9002))
MAX_EVENT = 1 << 20  # h11's limit on a head it buffers; above the gateway's own header limits
SETTLE_LIMIT = 100_000  # loop iterations one settle may take before the run counts as a livelock

# One service with two subsets and a header route, so routing reads the headers the client sent. (Not `hash`
# balancing: building its table takes milliseconds, and every run builds a fresh runtime.)
# Timeouts are far longer than any run takes: no deadline fires in the middle of a run on a loaded machine.
CONFIG = {
    "gateway": {"group": "memory", "telemetry": {"access_log": "off", "recent_requests": 1024}},
    "services": {
        "hello": {
            "subsets": {"v1": {"endpoints": [str(UPSTREAMS[0])]}, "v2": {"endpoints": [str(UPSTREAMS[1])]}},
            "routes": [
                {"name": "beta", "match": {"headers": {"x-beta": "1"}}, "split": {"v2": 100}},
                {"name": "default", "split": {"v1": 100}},
            ],
            "timeouts": {"connect": "60s", "per_try": "60s", "request": "120s"},
        }
    },
}


_Ts = TypeVarTuple("_Ts")


class CountingLoop(asyncio.SelectorEventLoop):
    """A plain asyncio loop that knows when nothing is ready to run (timers aside): `ready` counts the callbacks
    scheduled with call_soon, which is how asyncio itself schedules task steps and future callbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.ready = 0

    def call_soon(
        self, callback: Callable[[*_Ts], object], *args: *_Ts, context: Context | None = None
    ) -> asyncio.Handle:
        self.ready += 1
        return super().call_soon(self._counted, callback, args, context=context)

    def _counted(self, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.ready -= 1
        callback(*args)

    async def settle(self) -> None:
        """Run until nothing is ready. A handle cancelled before it ran would leave `ready` high: the limit."""
        for _ in range(SETTLE_LIMIT):
            if self.ready == 0:
                return
            await asyncio.sleep(0)
        raise RuntimeError(f"the loop did not settle within {SETTLE_LIMIT} iterations")


class MemoryTransport(asyncio.Transport):
    """One side of an in-memory connection, with uvloop's TCP transport's rules (see the module docstring).

    `sink` receives what the protocol writes, `on_eof` its `write_eof()`; `feed()` and `feed_eof()` are the
    peer sending, delivered on a later loop iteration when the protocol is reading.
    """

    def __init__(
        self,
        loop: CountingLoop,
        protocol: asyncio.Protocol,
        peer: tuple[str, int],
        sink: Callable[[bytes], None],
        on_eof: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__()
        self.loop = loop
        self.protocol = protocol
        self.peer = peer
        self.sink = sink
        self.on_eof = on_eof
        self.reading = True
        self.closing = False  # close() or abort() was called, or the peer's EOF closed it
        self.lost = False  # connection_lost() was delivered
        self.eof_written = False
        self.inbox: deque[bytes | None] = deque()  # what the peer sent and the protocol has not read; None: EOF
        self.scheduled = False

    # What the protocol calls.

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self.lost:
            raise RuntimeError("unable to perform operation on a closed transport")
        if data:
            self.sink(bytes(data))

    def write_eof(self) -> None:
        if self.lost:
            raise RuntimeError("unable to perform operation on a closed transport")
        if not self.eof_written:
            self.eof_written = True
            self.on_eof()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self._lose, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self._schedule()

    def is_reading(self) -> bool:
        return self.reading and not self.closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    # What the peer does.

    def feed(self, data: bytes) -> None:
        self.inbox.append(data)
        self._schedule()

    def feed_eof(self) -> None:
        self.inbox.append(None)
        self._schedule()

    def lose(self, exc: Exception | None) -> None:
        """The connection breaks (a reset): reported at once, whatever the protocol is doing."""
        self.closing = True
        self._lose(exc)

    @property
    def unread(self) -> int:
        return sum(len(data) for data in self.inbox if data is not None)

    def _schedule(self) -> None:
        if not self.scheduled and self.inbox:
            self.scheduled = True
            self.loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        self.scheduled = False
        if not self.is_reading() or not self.inbox:
            return
        data = []
        while self.inbox and self.inbox[0] is not None:
            data.append(self.inbox.popleft())  # what arrived while paused is read in one go, as from a socket
        if data:
            self.protocol.data_received(b"".join(data))  # type: ignore[arg-type]  # (the None was not taken)
        if self.inbox and self.inbox[0] is None and self.is_reading():
            self.inbox.popleft()
            if not self.protocol.eof_received():
                self.close()
        self._schedule()

    def _lose(self, exc: Exception | None) -> None:
        if not self.lost:
            self.lost = True
            self.reading = False
            self.protocol.connection_lost(exc)


@dataclass
class ParsedRequest:
    """One request as the gateway's own parser read it: what the gateway accepted from the client."""

    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    url: bytes = b""
    method: bytes = b""  # set when the head was complete
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False
    request_id: bytes = b""  # the ID the gateway chose (known once its head was complete)


class RecordingDownstream(DownstreamProtocol):
    """The client side of the gateway, unchanged, that also writes down each request as httptools delivered it."""

    def __init__(self, listener: Listener, loop: asyncio.AbstractEventLoop, parsed: list[ParsedRequest]) -> None:
        super().__init__(listener, loop)
        self.parsed = parsed

    def on_message_begin(self) -> None:
        self.parsed.append(ParsedRequest())
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self.parsed[-1].url += url
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.parsed[-1].headers.append((name, value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        request = self.parsed[-1]
        request.method = self.parser.get_method()
        exchange = self.parsing
        super().on_headers_complete()
        request.request_id = exchange.request_id if exchange is not None else b""

    def on_body(self, body: bytes) -> None:
        self.parsed[-1].body += body
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.parsed[-1].complete = True
        super().on_message_complete()


@dataclass
class UpstreamRequest:
    """One request as h11 read it at the upstream."""

    connection: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False
    seq: int = -1  # its number among the complete requests of the run, sent back as x-upstream-seq

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


class H11Upstream:
    """The server end of one upstream connection, in h11: every complete request gets `200` with
    `x-upstream-seq: N` and a body `upstream N`. Whatever h11 refuses, or bytes that arrive after a complete request
    before its response went out (the gateway never pipelines to an upstream), is written down in `errors`."""

    def __init__(self, state: RunState, index: int, address: Address) -> None:
        self.state = state
        self.index = index
        self.address = address
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_EVENT)
        self.requests: list[UpstreamRequest] = []
        self.errors: list[str] = []
        self.received = bytearray()
        self.protocol = UpstreamProtocol(state.pools[address])
        self.transport = MemoryTransport(state.loop, self.protocol, (address.host, address.port), self.receive)
        self.protocol.connection_made(self.transport)

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    def receive(self, data: bytes) -> None:
        self.received += data
        if self.failed:
            return
        if self.h11.their_state not in (h11.IDLE, h11.SEND_BODY):  # the request is complete (or was to close)
            self.errors.append(f"{len(data)} bytes after a complete request, before its response: {data[:60]!r}")
            return
        self.h11.receive_data(data)
        self.pump()

    def pump(self) -> None:
        while not self.failed:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self.errors.append(f"h11 cannot parse what the gateway sent: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                headers = [(name, value) for name, value in event.headers]
                self.requests.append(UpstreamRequest(self.index, event.method, event.target, headers))
            elif isinstance(event, h11.Data):
                self.requests[-1].body += event.data
            elif isinstance(event, h11.EndOfMessage):
                request = self.requests[-1]
                request.complete = True
                request.seq = len(self.state.upstream_requests)
                self.state.upstream_requests.append(request)
                self.state.loop.call_soon(self.respond, request)
                # Anything after the end of the request that came in the same write is already too much.
                leftover = self.h11.trailing_data[0]
                if leftover:
                    self.errors.append(f"{len(leftover)} bytes after a complete request, in the same write")
                return

    def respond(self, request: UpstreamRequest) -> None:
        if self.transport.closing or self.failed:
            return  # the gateway gave up on this connection before the response
        body = b"upstream %d" % request.seq
        headers = [(b"content-length", b"%d" % len(body)), (b"x-upstream-seq", b"%d" % request.seq)]
        out = self.h11.send(h11.Response(status_code=200, headers=headers)) or b""
        if request.method != b"HEAD":
            out += self.h11.send(h11.Data(data=body)) or b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        self.transport.feed(out)
        if self.h11.our_state is h11.MUST_CLOSE:
            self.transport.feed_eof()
        else:
            self.h11.start_next_cycle()
            self.pump()

    def idle(self) -> bool:
        """Between requests with nothing unread: a connection the gateway may reuse."""
        return not self.failed and self.h11.their_state is h11.IDLE and not self.h11.trailing_data[0]


class MemoryPool(Pool):
    """A `Pool` whose new connections are `H11Upstream`s; idle ones are kept and handed out as usual."""

    __slots__ = ("state",)

    def __init__(self, address: Address, state: RunState) -> None:
        super().__init__(address)
        self.state = state

    async def dial(self) -> UpstreamProtocol:
        await asyncio.sleep(0)  # a connect takes at least one loop iteration: the client's bytes may arrive meanwhile
        return self.state.open_upstream(self.address).protocol


@dataclass
class RunState:
    """What the upstream side of one run shares: its loop, pools, connections and the complete requests so far."""

    loop: CountingLoop
    pools: dict[Address, MemoryPool] = field(default_factory=dict)
    upstreams: list[H11Upstream] = field(default_factory=list)
    upstream_requests: list[UpstreamRequest] = field(default_factory=list)

    def open_upstream(self, address: Address) -> H11Upstream:
        upstream = H11Upstream(self, len(self.upstreams), address)
        self.upstreams.append(upstream)
        return upstream


@dataclass
class Run:
    """What one run produced. `escaped` holds exceptions and error logs: none should ever appear."""

    data: bytes
    step: int
    listener: str
    client_output: bytes
    client_closed: bool  # the gateway closed the client connection (the client had not yet sent EOF)
    stuck: int | None  # settled with the client connection open and not read: the bytes it had yet to read
    parsed: list[ParsedRequest]
    upstreams: list[H11Upstream]
    upstream_requests: list[UpstreamRequest]
    escaped: list[str]
    runtime: Runtime


class ErrorLog(logging.Handler):
    """Writes down every error the gateway logs (with where its exception was raised)."""

    def __init__(self, found: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        cause = record.exc_info[1] if record.exc_info else None
        self.found.append(
            f"log {record.name}: {record.getMessage()}" + (f": {cause!r}{_where(cause)}" if cause else "")
        )


class MemoryGateway:
    """Runs client byte streams through a fresh gateway each time (see the module docstring).

    `listener` is the listener kind the client connects to; `step` 0 sends the data in one piece and lets the loop
    settle, `step` n sends n bytes per loop iteration (reads that split heads, chunk sizes and bodies anywhere).
    """

    def __init__(
        self, config: Config | None = None, downstream: type[RecordingDownstream] = RecordingDownstream
    ) -> None:
        self.config = config if config is not None else Config.parse(CONFIG)
        self.downstream = downstream  # a subclass can plant a fault, to show that the checks catch it

    def run(self, data: bytes, step: int = 0, listener: str = "inbound") -> Run:
        loop = CountingLoop()
        escaped: list[str] = []
        loop.set_exception_handler(lambda _, context: escaped.append(describe_loop_error(context)))
        collect = ErrorLog(escaped)
        logger = logging.getLogger("meshgate")
        logger.addHandler(collect)
        try:
            return loop.run_until_complete(self._drive(loop, data, step, listener, escaped))
        finally:
            logger.removeHandler(collect)
            loop.close()

    async def _drive(self, loop: CountingLoop, data: bytes, step: int, kind: str, escaped: list[str]) -> Run:
        state = RunState(loop)
        runtime = Runtime(self.config)
        for address in UPSTREAMS:
            state.pools[address] = runtime.pools[address] = MemoryPool(address, state)
        runtime.apply(self.config, 1)
        parsed: list[ParsedRequest] = []
        output = bytearray()
        protocol = self.downstream(data_listener(kind, runtime, None), loop, parsed)
        client = MemoryTransport(loop, protocol, CLIENT_PEER, output.extend)
        stuck: int | None = None
        try:
            protocol.connection_made(client)
            if step:
                for at in range(0, len(data), step):
                    client.feed(data[at : at + step])
                    await asyncio.sleep(0)
            elif data:
                client.feed(data)
            await loop.settle()
            closed_by_gateway = client.closing
            if not client.closing and not client.is_reading():
                stuck = client.unread
            client.feed_eof()
            await loop.settle()
            if not client.lost:
                client.lose(ConnectionResetError("the client gave up"))  # it stopped reading us: the client leaves
                await loop.settle()
        except Exception as exc:  # anything a protocol method raised into its transport is a finding
            escaped.append(f"raised {exc!r}{_where(exc)}")
            closed_by_gateway = client.closing
        return Run(
            data,
            step,
            kind,
            bytes(output),
            closed_by_gateway,
            stuck,
            parsed,
            state.upstreams,
            state.upstream_requests,
            escaped,
            runtime,
        )


def describe_loop_error(context: dict[str, Any]) -> str:
    exc = context.get("exception")
    return f"loop: {exc!r}{_where(exc)}" if exc is not None else f"loop: {context.get('message')}"


def _where(exc: BaseException | None) -> str:
    """Where an exception was raised: the innermost frames of the gateway's code."""
    if exc is None or exc.__traceback__ is None:
        return ""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if "/gateway/" in frame.filename]
    return "".join(
        f" <- {frame.name} ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})" for frame in frames[::-1][:4]
    )
