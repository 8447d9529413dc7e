"""HTTP/1.1 proxying end to end: a real gateway process between real sockets on 127.0.0.1.

Covers keep-alive on both sides, pipelining, streamed bodies in both directions (with backpressure and bounded
memory), HEAD/204/304/100-continue, Upgrade tunnels, hop-by-hop header hygiene, forwarding headers, request
identity per listener, the outbound listener's absolute-form and the gateway's own error replies.

Clients are raw sockets (`Wire`) where the exact bytes matter, httpx elsewhere. Upstreams are the shared
`upstream_app` (via `start_upstream`) or `ScriptedUpstream` below, a blocking-socket server in threads for
behaviour the shared app lacks: hop-by-hop response headers, body hashing, streams of any size.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, gateway_config, wait_for
from tests.e2e.upstream_app import UpstreamServer

READ_TIMEOUT = 10.0  # deadline for each read a test makes
SERVER_TIMEOUT = 60.0  # scripted upstreams wait this long on an idle or stalled connection
RECV_SIZE = 1 << 20
MiB = 1 << 20
ALL_LISTENERS = {"inbound": "127.0.0.1:0", "edge": "127.0.0.1:0", "outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"}
# Large transfers take longer than the default 1 s per-try / 15 s request timeouts on a loaded machine;
# these tests are about streaming, not timeouts.
PATIENT = {"timeouts": {"per_try": "60s", "request": "120s"}}
MEMORY_LIMIT_KIB = 150 * 1024

Headers = list[tuple[str, str]]
StartGateway = Callable[..., Gateway]
StartUpstream = Callable[[str], UpstreamServer]
Sink = Callable[[bytes], object]


# --- raw HTTP/1.1 on a blocking socket -------------------------------------------------------------------


@dataclass
class Message:
    """One parsed request or response: start line, headers in arrival order, body (unless streamed)."""

    start: str
    headers: Headers
    body: bytes = b""
    size: int = 0

    @property
    def status(self) -> int:
        return int(self.start.split(" ", 2)[1])

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]

    def header(self, name: str) -> str | None:
        found = self.values(name)
        assert len(found) <= 1, f"{name} sent {len(found)} times: {found}"
        return found[0] if found else None

    def names(self) -> set[str]:
        return {key.lower() for key, _ in self.headers}

    def json(self) -> Any:
        return json.loads(self.body)


class Wire:
    """A blocking socket with a receive buffer. Every read has a deadline and fails the test when it passes."""

    def __init__(self, sock: socket.socket, timeout: float = READ_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self.buffer = bytearray()
        self.eof = False

    @classmethod
    def connect(cls, address: tuple[str, int], timeout: float = READ_TIMEOUT, rcvbuf: int | None = None) -> Wire:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return cls(sock, timeout)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes | memoryview) -> None:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _fill(self, deadline: float) -> bool:
        """Receive more bytes into the buffer; False at end of stream."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no data within the deadline (have {len(self.buffer)} unread bytes)")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(RECV_SIZE)
        except TimeoutError:
            raise AssertionError(f"no data within the deadline (have {len(self.buffer)} unread bytes)") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def read_until(self, marker: bytes, timeout: float | None = None) -> bytes:
        deadline = self._deadline(timeout)
        start = 0
        while (end := self.buffer.find(marker, start)) < 0:
            start = max(0, len(self.buffer) - len(marker) + 1)
            if not self._fill(deadline):
                raise AssertionError(f"connection closed before {marker!r}; got {bytes(self.buffer[:300])!r}")
        data = bytes(self.buffer[: end + len(marker)])
        del self.buffer[: end + len(marker)]
        return data

    def read_exact(self, size: int, timeout: float | None = None) -> bytes:
        parts: list[bytes] = []
        self.stream(size, parts.append, timeout)
        return b"".join(parts)

    def stream(self, size: int, sink: Sink, timeout: float | None = None) -> None:
        """Pass exactly `size` bytes to `sink`; the deadline restarts whenever bytes arrive."""
        remaining = size
        while remaining:
            if not self.buffer and not self._fill(self._deadline(timeout)):
                raise AssertionError(f"connection closed with {remaining} of {size} bytes still expected")
            piece = bytes(self.buffer[:remaining])
            del self.buffer[: len(piece)]
            sink(piece)
            remaining -= len(piece)

    def stream_to_eof(self, sink: Sink, timeout: float | None = None) -> int:
        size = 0
        while True:
            if self.buffer:
                size += len(self.buffer)
                sink(bytes(self.buffer))
                self.buffer.clear()
            if not self._fill(self._deadline(timeout)):
                return size

    def expect_eof(self, timeout: float | None = None) -> None:
        """The peer closes the connection without sending anything more."""
        extra = bytearray()
        self.stream_to_eof(extra.extend, timeout)
        assert not extra, f"expected the connection to close, got more bytes: {bytes(extra[:300])!r}"

    def read_head(self, timeout: float | None = None) -> tuple[str, Headers] | None:
        """A start line and headers, or None if the peer closed cleanly before sending anything."""
        deadline = self._deadline(timeout)
        while not self.buffer:
            if not self._fill(deadline):
                return None
        block = self.read_until(b"\r\n\r\n", deadline - time.monotonic()).decode("latin-1")
        start, *lines = block[:-4].split("\r\n")
        headers: Headers = []
        for line in lines:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        return start, headers

    def read_body(self, message: Message, sink: Sink, *, bodiless: bool = False, response: bool = True) -> int:
        """Read the body `message`'s framing announces into `sink`; returns its size."""
        if bodiless:
            return 0
        if any("chunked" in value.lower() for value in message.values("transfer-encoding")):
            return self._read_chunked(sink)
        length = message.header("content-length")
        if length is not None:
            self.stream(int(length), sink)
            return int(length)
        return self.stream_to_eof(sink) if response else 0

    def _read_chunked(self, sink: Sink) -> int:
        size = 0
        while True:
            line = self.read_until(b"\r\n")
            chunk = int(line.split(b";", 1)[0].strip(), 16)
            if chunk == 0:
                while self.read_until(b"\r\n") != b"\r\n":  # trailer fields, if any
                    pass
                return size
            self.stream(chunk, sink)
            assert self.read_exact(2) == b"\r\n", "chunk not followed by CRLF"
            size += chunk

    def read_response(self, method: str = "GET", sink: Sink | None = None, timeout: float | None = None) -> Message:
        head = self.read_head(timeout)
        assert head is not None, "connection closed before a response"
        message = Message(*head)
        assert message.start.startswith("HTTP/1."), f"not a status line: {message.start!r}"
        status = message.status
        bodiless = method == "HEAD" or status < 200 or status in (204, 304)
        parts: list[bytes] = []
        message.size = self.read_body(message, sink or parts.append, bodiless=bodiless)
        message.body = b"".join(parts)
        return message


def request(
    method: str,
    target: str,
    host: str | None = "hello",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
    version: str = "1.1",
) -> bytes:
    """A request's bytes. Header values are latin-1, so a str can carry any raw byte."""
    lines = [f"{method} {target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


# --- deterministic payloads ------------------------------------------------------------------------------

# An odd length so that repeats never line up with socket reads or chunk boundaries.
PATTERN = random.Random(20240601).randbytes(MiB + 7)


def pattern(size: int) -> Iterator[bytes]:
    view = memoryview(PATTERN)
    offset = 0
    while size:
        piece = view[offset : offset + min(size, len(PATTERN) - offset)]
        yield bytes(piece)
        size -= len(piece)
        offset = (offset + len(piece)) % len(PATTERN)


@functools.cache
def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern(size):
        digest.update(piece)
    return digest.hexdigest()


# --- a scripted upstream ---------------------------------------------------------------------------------


class ScriptedUpstream:
    """An HTTP/1.1 upstream on blocking sockets, one thread per connection. Behaviour by path:

    - `/sha256`: reads the request body, answers JSON with method, target, headers, body size and SHA-256;
    - `/stream/N`: N pattern bytes with content-length, written as fast as the socket takes them
      (`sent`, `progress_at` and `done_sending` say how far it got);
    - `/stream-close/N`: the same, delimited by closing the connection;
    - `/hop`, `/hop-chunked`: responses carrying hop-by-hop headers;
    - `/no-content`: 204 without content-length;  `/not-modified`: 304 with `content-length: 1234`;
    - `/resource`: 1234 bytes; to HEAD only the headers, as a correct server does.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[Message] = []
        self.errors: list[str] = []
        self.sent = 0
        self.progress_at = time.monotonic()
        self.done_sending = False
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.stopping = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.stopping = True
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):  # already closed by its peer
                sock.shutdown(socket.SHUT_RDWR)
        self.acceptor.join(5)
        for thread in self.threads:
            thread.join(5)
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # the listener was shut down
            self.connections += 1
            self.sockets.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        wire = Wire(sock, SERVER_TIMEOUT)
        try:
            while self._respond(wire):
                pass
        except (OSError, AssertionError) as exc:
            if not self.stopping:
                self.errors.append(repr(exc))
        finally:
            sock.close()

    def _respond(self, wire: Wire) -> bool:
        head = wire.read_head()
        if head is None:
            return False
        message = Message(*head)
        method, target, _ = message.start.split(" ", 2)
        self.requests.append(message)
        digest = hashlib.sha256()
        size = wire.read_body(message, digest.update, response=False)
        if target == "/sha256":
            seen: dict[str, list[str]] = {}
            for name, value in message.headers:
                seen.setdefault(name.lower(), []).append(value)
            echo = {"method": method, "target": target, "headers": seen, "size": size, "sha256": digest.hexdigest()}
            body = json.dumps(echo).encode()
            wire.send(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )
        elif target.startswith(("/stream/", "/stream-close/")):
            total = int(target.rsplit("/", 1)[1])
            close = target.startswith("/stream-close/")
            framing = b"connection: close\r\n" if close else b"content-length: %d\r\n" % total
            self.progress_at = time.monotonic()
            wire.send(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n%s\r\n" % framing)
            for piece in pattern(total):
                wire.send(piece)
                self.sent += len(piece)
                self.progress_at = time.monotonic()
            self.done_sending = True
            return not close
        elif target == "/hop":
            wire.send(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\n"
                b"Keep-Alive: timeout=5, max=100\r\nProxy-Connection: keep-alive\r\nTrailer: X-Checksum\r\n"
                b"Upgrade: h2c\r\nTE: trailers\r\n"
                b"X-Request-Id: upstream-made-id\r\nX-End-To-End: kept\r\nContent-Length: 5\r\n\r\nhello"
            )
        elif target == "/hop-chunked":
            wire.send(
                b"HTTP/1.1 200 OK\r\nConnection: X-Other\r\nX-Other: 1\r\nTransfer-Encoding: chunked\r\n"
                b"X-End-To-End: kept\r\n\r\n" + chunked(b"first,", b"second")
            )
        elif target == "/no-content":
            wire.send(b"HTTP/1.1 204 No Content\r\nx-kind: no-content\r\n\r\n")
        elif target == "/not-modified":
            wire.send(b'HTTP/1.1 304 Not Modified\r\netag: "v1"\r\ncontent-length: 1234\r\n\r\n')
        elif target == "/resource":
            head_only = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1234\r\n\r\n"
            wire.send(head_only if method == "HEAD" else head_only + b"r" * 1234)
        else:
            wire.send(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        return True


@pytest.fixture
def scripted() -> Iterator[Callable[[], ScriptedUpstream]]:
    started: list[ScriptedUpstream] = []

    def start() -> ScriptedUpstream:
        server = ScriptedUpstream()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def connect() -> Iterator[Callable[..., Wire]]:
    """Open raw client connections; all are closed after the test."""
    opened: list[Wire] = []

    def open_wire(address: tuple[str, int], timeout: float = READ_TIMEOUT, rcvbuf: int | None = None) -> Wire:
        wire = Wire.connect(address, timeout, rcvbuf)
        opened.append(wire)
        return wire

    yield open_wire
    for wire in opened:
        wire.close()


Connect = Callable[..., Wire]
Scripted = Callable[[], ScriptedUpstream]


# --- helpers ---------------------------------------------------------------------------------------------


def hello(*endpoints: str, **policy: Any) -> dict[str, Any]:
    return {"hello": {"subsets": {"v1": {"endpoints": list(endpoints)}}, **policy}}


def http_client(gw: Gateway, kind: str = "inbound") -> httpx.Client:
    return httpx.Client(base_url=gw.url(kind), trust_env=False, timeout=30.0, headers={"host": "hello"})


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def assert_not_buffered(gw: Gateway, baseline_kib: int, size: int) -> None:
    """The gateway's peak RSS grew by well under the body's size: it streamed rather than held the body."""
    growth = proc_status_kib(gw.proc.pid, "VmHWM") - baseline_kib
    assert growth * 1024 < size // 2, f"gateway peak RSS grew {growth // 1024} MiB for a {size // MiB} MiB body"


def assert_uuid4(value: str | None) -> None:
    assert value is not None, "no x-request-id"
    parsed = uuid.UUID(value)
    assert parsed.version == 4 and parsed.variant == uuid.RFC_4122, value
    assert str(parsed) == value, f"not a canonical UUID4: {value!r}"


def is_one_line_reason(body: bytes) -> bool:
    return body.endswith(b"\n") and body.count(b"\n") == 1 and body.startswith(b"meshgate: ")


UPGRADE_HEAD = request(
    "GET",
    "/ws",
    headers=[
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ],
)


def upgrade(wire: Wire, early: bytes = b"") -> Message:
    wire.send(UPGRADE_HEAD + early)
    response = wire.read_response()
    assert response.status == 101, response
    return response


def echo_round_trip(wire: Wire, payload: bytes) -> None:
    wire.send(payload)
    assert wire.read_exact(len(payload)) == payload


# --- keep-alive ------------------------------------------------------------------------------------------


def test_keep_alive_reuses_one_upstream_connection(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    for i in range(5):
        wire.send(request("GET", f"/echo/{i}"))
        echoed = wire.read_response()
        assert echoed.status == 200 and echoed.json()["path"] == f"/echo/{i}"
        assert echoed.header("connection") is None
        wire.send(request("POST", "/count", body=b"z" * (1000 + i)))
        assert wire.read_response().body == str(1000 + i).encode()
        wire.send(request("GET", "/chunked/3"))
        assert wire.read_response().body == b"chunk-0\nchunk-1\nchunk-2\n"
        wire.send(request("GET", "/bytes/777"))
        assert wire.read_response().body == b"x" * 777
    assert upstream.requests == 20
    assert upstream.connections == 1
    # A later client connection gets the pooled upstream connection too.
    other = connect(gw.inbound)
    other.send(request("GET", "/echo/other"))
    assert other.read_response().status == 200
    assert upstream.connections == 1


def test_client_connection_close_is_honoured(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("GET", "/echo/first"))
    first = wire.read_response()
    assert first.status == 200 and first.header("connection") is None
    wire.send(request("GET", "/echo/last", headers=[("Connection", "close")]))
    last = wire.read_response()
    assert last.status == 200 and last.json()["path"] == "/echo/last"
    assert last.header("connection") == "close"
    wire.expect_eof()


def test_request_after_connection_close_is_ignored(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    """RFC 9112 9.6: answer the request that says close, then close; bytes after it are not processed."""
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("GET", "/echo/last", headers=[("Connection", "close")]) + request("GET", "/echo/ignored"))
    last = wire.read_response()
    assert last.status == 200, last
    assert last.json()["path"] == "/echo/last"
    assert last.header("connection") == "close"
    wire.expect_eof()
    assert upstream.requests == 1


def test_http10_client_without_keep_alive_gets_body_then_close(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("GET", "/echo/old", version="1.0"))
    response = wire.read_response()
    assert response.status == 200 and response.json()["path"] == "/echo/old"
    assert response.header("connection") == "close"
    wire.expect_eof()


def test_http10_client_gets_chunked_upstream_body_unchunked(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("GET", "/chunked/4", version="1.0"))
    response = wire.read_response()
    assert response.status == 200
    assert response.header("transfer-encoding") is None, "HTTP/1.0 clients do not understand chunked"
    assert response.body == b"chunk-0\nchunk-1\nchunk-2\nchunk-3\n"
    assert response.header("connection") == "close"


# --- pipelining ------------------------------------------------------------------------------------------


def test_pipelined_requests_answered_in_order(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    batch = [
        request("GET", "/delay/150"),  # the slowest first: answers must still come back in request order
        request("POST", "/echo/two", body=b"abcde"),
        request("GET", "/chunked/2"),
        request("POST", "/count", headers=[("Transfer-Encoding", "chunked")]) + chunked(b"12345", b"678"),
        request("GET", "/bytes/10"),
        request("GET", "/echo/six?q=1"),
    ]
    wire.send(b"".join(batch))
    responses = [wire.read_response() for _ in batch]
    assert [r.status for r in responses] == [200] * 6
    assert responses[0].json()["path"] == "/delay/150"
    assert responses[1].json()["path"] == "/echo/two" and responses[1].json()["body"] == 5
    assert responses[2].body == b"chunk-0\nchunk-1\n"
    assert responses[3].body == b"8"
    assert responses[4].body == b"x" * 10
    assert responses[5].json()["path"] == "/echo/six?q=1"
    ids = [r.header("x-request-id") for r in responses]
    assert len(set(ids)) == 6
    # Still the same, usable client connection.
    wire.send(request("GET", "/echo/after"))
    assert wire.read_response().json()["path"] == "/echo/after"
    assert upstream.connections == 1


# --- bodies ----------------------------------------------------------------------------------------------


def test_content_length_upload(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    with http_client(gw) as client:
        response = client.post("/count", content=b"u" * 300_000)
    assert response.status_code == 200 and response.text == "300000"


def test_raw_chunked_upload(start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("POST", "/echo/up", headers=[("Transfer-Encoding", "chunked")]))
    wire.send(b"5;ext=1\r\nhello\r\n1000\r\n" + b"a" * 2048)  # a chunk split across writes
    wire.send(b"a" * 2048 + b"\r\n")
    wire.send(b"3\r\nend\r\n0\r\n\r\n")
    response = wire.read_response()
    assert response.status == 200
    echo = response.json()
    assert echo["body"] == 5 + 4096 + 3
    assert echo["headers"]["transfer-encoding"] == ["chunked"]
    assert "content-length" not in echo["headers"]


def test_generator_upload_streams_chunked(start_gateway: StartGateway, scripted: Scripted) -> None:
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address)))
    size = 3 * MiB + 11
    with http_client(gw) as client:
        response = client.post("/sha256", content=pattern(size))
    assert response.status_code == 200
    echo = response.json()
    assert echo["size"] == size and echo["sha256"] == pattern_sha256(size)
    assert echo["headers"]["transfer-encoding"] == ["chunked"]


def test_chunked_response_relayed(start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("GET", "/chunked/50"))
    response = wire.read_response()
    assert response.status == 200
    assert response.values("transfer-encoding") == ["chunked"]
    assert response.header("content-length") is None
    assert response.body == b"".join(b"chunk-%d\n" % i for i in range(50))
    with http_client(gw) as client:
        assert client.get("/chunked/7").content == b"".join(b"chunk-%d\n" % i for i in range(7))


def test_content_length_response_relayed(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("GET", "/bytes/100000"))
    response = wire.read_response()
    assert response.header("content-length") == "100000"
    assert response.header("transfer-encoding") is None
    assert response.body == b"x" * 100000


def test_close_delimited_response_relayed_fully(
    start_gateway: StartGateway, start_upstream: StartUpstream, scripted: Scripted, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("GET", "/close"))
    response = wire.read_response()
    assert response.status == 200 and response.body == b"until-close"
    assert response.header("connection") == "close"

    big = scripted()
    gw2 = start_gateway(gateway_config(hello(big.address, **PATIENT)))
    size = 5 * MiB + 3
    wire2 = connect(gw2.inbound)
    wire2.send(request("GET", f"/stream-close/{size}"))
    digest = hashlib.sha256()
    streamed = wire2.read_response(sink=digest.update)
    assert streamed.status == 200
    assert streamed.size == size and digest.hexdigest() == pattern_sha256(size)


def test_large_download_intact(start_gateway: StartGateway, scripted: Scripted) -> None:
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address, **PATIENT)))
    size = 50 * MiB + 5
    baseline = proc_status_kib(gw.proc.pid, "VmHWM")
    digest = hashlib.sha256()
    received = 0
    with http_client(gw) as client, client.stream("GET", f"/stream/{size}") as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(size)
        for piece in response.iter_raw():
            digest.update(piece)
            received += len(piece)
    assert received == size
    assert digest.hexdigest() == pattern_sha256(size)
    assert_not_buffered(gw, baseline, size)


def test_large_content_length_upload_intact(start_gateway: StartGateway, scripted: Scripted, connect: Connect) -> None:
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address, **PATIENT)))
    size = 50 * MiB + 9
    baseline = proc_status_kib(gw.proc.pid, "VmHWM")
    wire = connect(gw.inbound)
    wire.send(request("POST", "/sha256", headers=[("Content-Length", str(size))]))
    for piece in pattern(size):
        wire.send(piece)
    response = wire.read_response(timeout=60)
    assert response.status == 200
    echo = response.json()
    assert echo["size"] == size and echo["sha256"] == pattern_sha256(size)
    assert echo["headers"]["content-length"] == [str(size)]
    assert_not_buffered(gw, baseline, size)


def test_large_chunked_upload_intact(start_gateway: StartGateway, scripted: Scripted) -> None:
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address, **PATIENT)))
    size = 50 * MiB + 13
    baseline = proc_status_kib(gw.proc.pid, "VmHWM")
    with http_client(gw) as client:
        response = client.post("/sha256", content=pattern(size), timeout=60)
    assert response.status_code == 200
    echo = response.json()
    assert echo["size"] == size and echo["sha256"] == pattern_sha256(size)
    assert_not_buffered(gw, baseline, size)


# --- backpressure and memory -----------------------------------------------------------------------------


def test_stalled_client_does_not_grow_gateway_memory(
    start_gateway: StartGateway, scripted: Scripted, connect: Connect
) -> None:
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address, **PATIENT)))
    size = 200 * MiB
    wire = connect(gw.inbound, timeout=30, rcvbuf=64 * 1024)
    wire.send(request("GET", f"/stream/{size}"))
    head = wire.read_head()
    assert head is not None and Message(*head).header("content-length") == str(size)

    # Read nothing more. The upstream writes as fast as the gateway takes bytes; it must end up blocked.
    peak = 0

    def settled() -> bool:
        nonlocal peak
        peak = max(peak, proc_status_kib(gw.proc.pid, "VmRSS"))
        stalled = time.monotonic() - upstream.progress_at > 1.0
        return upstream.done_sending or peak > MEMORY_LIMIT_KIB or stalled

    wait_for(settled, timeout=60, interval=0.05, what="the upstream to block or the gateway to balloon")
    assert peak < MEMORY_LIMIT_KIB, f"gateway RSS reached {peak // 1024} MiB while the client read nothing"
    assert not upstream.done_sending, "the gateway read the whole response while its client read nothing"
    assert upstream.sent < size // 4, f"{upstream.sent} bytes left the upstream while the client read nothing"

    digest = hashlib.sha256()
    already = bytes(wire.buffer)
    wire.buffer.clear()
    digest.update(already)
    wire.stream(size - len(already), digest.update)
    assert digest.hexdigest() == pattern_sha256(size)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_gib_upload_in_bounded_memory(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    timeouts = {"timeouts": {"per_try": "600s", "request": "600s"}}
    gw = start_gateway(gateway_config(hello(upstream.address, **timeouts)))
    size = 1 << 30
    block = memoryview(random.Random(3).randbytes(MiB))
    wire = connect(gw.inbound, timeout=120)
    wire.send(request("POST", "/count", headers=[("Content-Length", str(size))]))
    for _ in range(size // MiB):
        wire.send(block)
    response = wire.read_response(timeout=300)
    assert response.status == 200
    assert response.body == b"1073741824"
    peak = proc_status_kib(gw.proc.pid, "VmHWM")
    assert peak < MEMORY_LIMIT_KIB, f"gateway peak RSS {peak // 1024} MiB for a streamed 1 GiB upload"


# --- bodiless responses, 100-continue --------------------------------------------------------------------


def test_head_gets_headers_without_body(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("HEAD", "/bytes/1000"))
    head = wire.read_response(method="HEAD")
    assert head.status == 200
    assert head.header("content-length") == "1000"
    assert head.header("x-request-id")
    wire.send(request("GET", "/echo/next"))
    following = wire.read_response()  # would hold body bytes of the HEAD if any had been relayed
    assert following.status == 200 and following.json()["path"] == "/echo/next"


def test_head_204_304_keep_both_connections(start_gateway: StartGateway, scripted: Scripted, connect: Connect) -> None:
    upstream = scripted()  # a correct server: no body after HEAD, 204 or 304
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("HEAD", "/resource"))
    head = wire.read_response(method="HEAD")
    assert head.status == 200 and head.header("content-length") == "1234"
    wire.send(request("GET", "/no-content"))
    no_content = wire.read_response()
    assert no_content.status == 204 and no_content.header("x-kind") == "no-content"
    assert no_content.header("transfer-encoding") is None
    wire.send(request("GET", "/not-modified"))
    not_modified = wire.read_response(timeout=3)
    assert not_modified.status == 304 and not_modified.header("etag") == '"v1"'
    wire.send(request("GET", "/resource"))
    full = wire.read_response(timeout=3)
    assert full.status == 200 and full.body == b"r" * 1234
    assert upstream.connections == 1
    assert len(upstream.requests) == 4


def test_204_and_304_have_no_body(start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    for status in (204, 304):
        wire.send(request("GET", f"/status/{status}"))
        response = wire.read_response()
        assert response.status == status
        assert response.header("transfer-encoding") is None
    wire.send(request("GET", "/echo/then"))
    assert wire.read_response().json()["path"] == "/echo/then"


def test_expect_100_continue(start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    body = b"b" * 70_000
    wire.send(request("POST", "/count", headers=[("Expect", "100-continue"), ("Content-Length", str(len(body)))]))
    interim = wire.read_response(timeout=5)
    assert interim.start.startswith("HTTP/1.1 100"), interim.start
    wire.send(body)
    final = wire.read_response()
    assert final.status == 200 and final.body == b"70000"
    assert final.header("x-request-id")


# --- Upgrade ---------------------------------------------------------------------------------------------


def test_websocket_upgrade_tunnels_both_ways(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    response = upgrade(wire, early=b"sent-with-the-head")
    assert response.header("upgrade") == "websocket"
    assert "upgrade" in (response.header("connection") or "").lower()
    assert_uuid4(response.header("x-request-id"))
    assert wire.read_exact(len(b"sent-with-the-head")) == b"sent-with-the-head"
    for i in range(20):
        echo_round_trip(wire, b"frame-%d;" % i * (i + 1))
    echo_round_trip(wire, random.Random(5).randbytes(256 * 1024))


def test_upgraded_upstream_connection_is_not_pooled(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    ws = connect(gw.inbound)
    upgrade(ws)
    echo_round_trip(ws, b"before")
    other = connect(gw.inbound)
    other.send(request("GET", "/echo/plain"))
    plain = other.read_response()
    assert plain.status == 200 and plain.json()["path"] == "/echo/plain"
    # The tunnel carries only its own bytes and is still open.
    echo_round_trip(ws, b"after")
    assert upstream.connections == 2


def test_active_tunnel_outlives_idle_timeout(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address), limits={"idle_timeout": "1s"}))
    wire = connect(gw.inbound, timeout=5)
    upgrade(wire)
    # Traffic flows the whole time, so the connection is never idle; it must outlast 1 s.
    end = time.monotonic() + 2.5
    rounds = 0
    while time.monotonic() < end:
        echo_round_trip(wire, b"tick-%d" % rounds)
        rounds += 1
    assert rounds > 10


def test_declined_upgrade_keeps_connection_usable(
    start_gateway: StartGateway, scripted: Scripted, connect: Connect
) -> None:
    upstream = scripted()  # ignores Upgrade and answers 200, as a server without h2c does
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound, timeout=3)
    h2c = [
        ("Connection", "Upgrade, HTTP2-Settings"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
    ]
    wire.send(request("GET", "/sha256", headers=h2c))
    declined = wire.read_response()
    assert declined.status == 200
    wire.send(request("GET", "/sha256"))
    following = wire.read_response()
    assert following.status == 200 and following.json()["target"] == "/sha256"


# --- header hygiene --------------------------------------------------------------------------------------


def test_hop_by_hop_request_headers_removed(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    hop = [
        ("Connection", "keep-alive, X-Drop-Me"),
        ("Connection", "x-also-drop"),
        ("X-Drop-Me", "1"),
        ("X-Also-Drop", "2"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Custom", "x"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("X-Keep", "yes"),
    ]
    wire.send(request("POST", "/echo/hyg", headers=[*hop, ("Transfer-Encoding", "chunked")]) + chunked(b"body"))
    echo = wire.read_response().json()
    seen = echo["headers"]
    for name in ("connection", "x-drop-me", "x-also-drop", "keep-alive", "te", "trailer", "upgrade"):
        assert name not in seen, f"{name} reached the upstream: {seen.get(name)}"
    assert not [name for name in seen if name.startswith("proxy-")], seen
    assert seen["x-keep"] == ["yes"]
    assert seen["transfer-encoding"] == ["chunked"]  # the gateway's own framing for its hop, once
    assert echo["body"] == 4


def test_stray_upgrade_header_not_forwarded(start_gateway: StartGateway, scripted: Scripted, connect: Connect) -> None:
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound, timeout=5)
    # Upgrade without `Connection: upgrade` is no upgrade request, and Upgrade is hop-by-hop: drop it.
    wire.send(request("GET", "/sha256", headers=[("Upgrade", "h2c")]))
    response = wire.read_response()
    assert response.status == 200
    seen = response.json()["headers"]
    assert "upgrade" not in seen and "connection" not in seen, {k: seen.get(k) for k in ("upgrade", "connection")}


def test_forwarding_headers_set_and_host_preserved(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("GET", "/echo/fwd"))
    seen = wire.read_response().json()["headers"]
    assert seen["host"] == ["hello"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["hello"]

    claimed = [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil")]
    wire.send(request("GET", "/echo/fwd2", host="hello.mesh.local:8080", headers=claimed))
    seen = wire.read_response().json()["headers"]
    assert seen["host"] == ["hello.mesh.local:8080"]
    assert seen["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    # The inbound listener does not trust a plain-HTTP client's claims about scheme and host.
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["hello.mesh.local:8080"]


def test_x_forwarded_for_keeps_every_incoming_line(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    lines = [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.7")]
    wire.send(request("GET", "/echo/xff", headers=lines))
    seen = wire.read_response().json()["headers"]
    chain = ", ".join(seen["x-forwarded-for"])
    assert chain == "198.51.100.1, 203.0.113.7, 127.0.0.1"


def test_hop_by_hop_response_headers_removed(start_gateway: StartGateway, scripted: Scripted, connect: Connect) -> None:
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("GET", "/hop"))
    response = wire.read_response()
    assert response.status == 200 and response.body == b"hello"
    for name in ("connection", "x-hop", "keep-alive", "proxy-connection", "trailer", "upgrade", "te"):
        assert name not in response.names(), f"{name} reached the client: {response.values(name)}"
    assert response.values("x-end-to-end") == ["kept"]
    request_id = response.header("x-request-id")
    assert request_id != "upstream-made-id"
    assert_uuid4(request_id)

    wire.send(request("GET", "/hop-chunked"))
    relayed = wire.read_response()
    assert relayed.status == 200 and relayed.body == b"first,second"
    assert relayed.values("transfer-encoding") == ["chunked"]
    assert "x-other" not in relayed.names() and "connection" not in relayed.names()
    assert relayed.values("x-end-to-end") == ["kept"]


# --- request identity ------------------------------------------------------------------------------------

WELL_FORMED = "client-id.42:A_b"


@pytest.mark.parametrize(
    ("listener", "preserve", "incoming", "kept"),
    [
        pytest.param("inbound", True, WELL_FORMED, False, id="inbound-untrusted-replaced"),
        pytest.param("edge", True, WELL_FORMED, True, id="edge-kept-by-default"),
        pytest.param("edge", True, "a" * 128, True, id="edge-128-chars-kept"),
        pytest.param("edge", False, WELL_FORMED, False, id="edge-preserve-off-replaced"),
        pytest.param("edge", True, "a" * 129, False, id="edge-too-long-replaced"),
        pytest.param("edge", True, "has space", False, id="edge-space-replaced"),
        pytest.param("edge", True, "caf\xc3\xa9", False, id="edge-non-ascii-replaced"),
        pytest.param("outbound", True, WELL_FORMED, True, id="outbound-trusted-kept"),
        pytest.param("outbound", True, "a" * 129, False, id="outbound-too-long-replaced"),
    ],
)
def test_request_id_per_listener(
    start_gateway: StartGateway,
    start_upstream: StartUpstream,
    connect: Connect,
    listener: str,
    preserve: bool,
    incoming: str,
    kept: bool,
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(
        gateway_config(hello(upstream.address), listen=ALL_LISTENERS, preserve_request_id=preserve),
    )
    wire = connect(gw.addresses[listener])
    wire.send(request("GET", "/echo/id", headers=[("X-Request-Id", incoming)]))
    response = wire.read_response()
    assert response.status == 200
    returned = response.header("x-request-id")
    assert response.json()["headers"]["x-request-id"] == [returned], "upstream saw a different ID"
    if kept:
        assert returned == incoming
    else:
        assert returned != incoming
        assert_uuid4(returned)


def test_request_id_generated_when_absent(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address), listen=ALL_LISTENERS))
    returned = []
    for kind in ("inbound", "edge", "outbound", "inbound"):
        wire = connect(gw.addresses[kind])
        wire.send(request("GET", "/echo/id"))
        response = wire.read_response()
        request_id = response.header("x-request-id")
        assert_uuid4(request_id)
        assert response.json()["headers"]["x-request-id"] == [request_id]
        returned.append(request_id)
    assert len(set(returned)) == len(returned)


@pytest.mark.parametrize("kind", ["inbound", "edge", "outbound"])
def test_gateway_errors_carry_request_id(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect, kind: str
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address), listen=ALL_LISTENERS))
    wire = connect(gw.addresses[kind])
    wire.send(request("GET", "/echo", host="nope.example"))
    missing = wire.read_response()
    assert missing.status == 404
    assert_uuid4(missing.header("x-request-id"))
    wire.send(request("GET", "/echo", host=None))
    no_host = wire.read_response()
    assert no_host.status == 400
    assert_uuid4(no_host.header("x-request-id"))


@pytest.mark.parametrize(
    ("listener", "incoming", "kept"),
    [
        pytest.param("inbound", WELL_FORMED, False, id="inbound-untrusted"),
        pytest.param("edge", "has space", False, id="edge-malformed"),
        pytest.param("edge", WELL_FORMED, True, id="edge-well-formed"),
    ],
)
def test_refused_request_gets_decided_request_id(
    start_gateway: StartGateway,
    start_upstream: StartUpstream,
    connect: Connect,
    listener: str,
    incoming: str,
    kept: bool,
) -> None:
    """A request refused while its head is parsed (here: two Host headers) follows the same identity rules."""
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address), listen=ALL_LISTENERS))
    wire = connect(gw.addresses[listener])
    wire.send(request("GET", "/echo", headers=[("X-Request-Id", incoming), ("Host", "other")]))
    refused = wire.read_response()
    assert refused.status == 400
    assert is_one_line_reason(refused.body), refused.body
    returned = refused.header("x-request-id")
    if kept:
        assert returned == incoming
    else:
        assert returned != incoming
        assert_uuid4(returned)
    assert upstream.requests == 0


# --- outbound listener, routing errors -------------------------------------------------------------------


def test_outbound_host_and_absolute_form(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address), listen=ALL_LISTENERS))
    wire = connect(gw.addresses["outbound"])
    wire.send(request("GET", "/echo/by-host"))
    by_host = wire.read_response().json()
    assert by_host["path"] == "/echo/by-host" and by_host["headers"]["host"] == ["hello"]
    # The target's authority wins over any Host header (RFC 9112 3.2.2).
    wire.send(request("GET", "http://hello/echo/abs?q=1", host="ignored.example"))
    absolute = wire.read_response()
    assert absolute.status == 200
    echo = absolute.json()
    assert echo["path"] == "/echo/abs?q=1"
    assert echo["headers"]["host"] == ["hello"]
    wire.send(request("GET", "http://hello/echo/no-host-header", host=None))
    assert wire.read_response().json()["path"] == "/echo/no-host-header"


def test_inbound_refuses_absolute_form(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("GET", "http://hello/echo/abs"))
    refused = wire.read_response()
    assert refused.status == 400
    assert is_one_line_reason(refused.body) and b"absolute-form" in refused.body, refused.body
    assert_uuid4(refused.header("x-request-id"))
    assert upstream.requests == 0


def test_unknown_service_gets_404_naming_the_host(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("GET", "/echo", host="nope.example"))
    missing = wire.read_response()
    assert missing.status == 404
    assert is_one_line_reason(missing.body), missing.body
    assert b"nope.example" in missing.body
    assert_uuid4(missing.header("x-request-id"))
    wire.send(request("GET", "/echo/still-open"))
    assert wire.read_response().status == 200
    assert upstream.requests == 1
