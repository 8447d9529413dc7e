"""Upstreams whose every answer a test scripts, the deterministic payloads they serve, and dead endpoints.

`ScriptedUpstream` is a blocking-socket HTTP/1.1 server, one thread per connection. It reads each request and its
body (hashing it, not keeping it) and hands the `Exchange` to a handler:

- `by_path` (the default): behaviour chosen by the request target, for what the shared `upstream_app` lacks:
  hop-by-hop response headers, body hashing, streams of any size;
- `always(status)`: every request gets `status`;
- a test's own function, which may block as long as it likes (on a `Future` the test resolves, say), so that a
  test decides what each request gets, and when.

`refusing_address()` and `blackhole_address()` give endpoints where no upstream answers at all.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.wire import Message, Wire, chunked

SERVER_TIMEOUT = 60.0  # scripted upstreams wait this long on an idle or stalled connection
MiB = 1 << 20


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


# --- the scripted upstream -------------------------------------------------------------------------------


@dataclass
class Exchange:
    """A request as a ScriptedUpstream received it (its body hashed, not kept), and the connection to answer on."""

    server: ScriptedUpstream
    request: Message
    sha256: str
    wire: Wire
    keep_alive: bool = True  # a handler sets False to have the connection closed after its answer

    def reply(self, status: int, body: bytes = b"") -> None:
        """A response framed by content-length, carrying `x-upstream: <the server's name>`."""
        head = b"HTTP/1.1 %d X\r\nx-upstream: %s\r\ncontent-length: %d\r\n\r\n" % (
            status,
            self.server.name.encode(),
            len(body),
        )
        self.wire.send(head + body)


Handler = Callable[[Exchange], None]


CANNED = {
    "/hop": (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\n"
        b"Keep-Alive: timeout=5, max=100\r\nProxy-Connection: keep-alive\r\nTrailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\nTE: trailers\r\n"
        b"X-Request-Id: upstream-made-id\r\nX-End-To-End: kept\r\nContent-Length: 5\r\n\r\nhello"
    ),
    "/hop-chunked": (
        b"HTTP/1.1 200 OK\r\nConnection: X-Other\r\nX-Other: 1\r\nTransfer-Encoding: chunked\r\n"
        b"X-End-To-End: kept\r\n\r\n" + chunked(b"first,", b"second")
    ),
    "/no-content": b"HTTP/1.1 204 No Content\r\nx-kind: no-content\r\n\r\n",
    "/not-modified": b'HTTP/1.1 304 Not Modified\r\netag: "v1"\r\ncontent-length: 1234\r\n\r\n',
}
RESOURCE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1234\r\n\r\n"


def by_path(exchange: Exchange) -> None:
    """Behaviour by request target:

    - `/sha256`: answers JSON with method, target, headers, body size and SHA-256;
    - `/stream/N`: N pattern bytes with content-length, written as fast as the socket takes them
      (the server's `sent`, `progress_at` and `done_sending` say how far it got);
    - `/stream-close/N`: the same, delimited by closing the connection;
    - `/hop`, `/hop-chunked`: responses carrying hop-by-hop headers;
    - `/no-content`: 204 without content-length;  `/not-modified`: 304 with `content-length: 1234`;
    - `/resource`: 1234 bytes; to HEAD only the headers, as a correct server does.
    """
    request, wire = exchange.request, exchange.wire
    target = request.target
    if target == "/sha256":
        seen: dict[str, list[str]] = {}
        for name, value in request.headers:
            seen.setdefault(name.lower(), []).append(value)
        echo = {
            "method": request.method,
            "target": target,
            "headers": seen,
            "size": request.size,
            "sha256": exchange.sha256,
        }
        body = json.dumps(echo).encode()
        wire.send(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
    elif target.startswith(("/stream/", "/stream-close/")):
        close = target.startswith("/stream-close/")
        exchange.server.stream(wire, int(target.rsplit("/", 1)[1]), close)
        exchange.keep_alive = not close
    elif target in CANNED:
        wire.send(CANNED[target])
    elif target == "/resource":
        wire.send(RESOURCE_HEAD if request.method == "HEAD" else RESOURCE_HEAD + b"r" * 1234)
    else:
        wire.send(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")


def always(status: int) -> Handler:
    def answer(exchange: Exchange) -> None:
        exchange.reply(status, b"%d from scripted upstream\n" % status)

    return answer


class ScriptedUpstream:
    """An HTTP/1.1 upstream on blocking sockets, one thread per connection, answering through `handler`.

    `requests` holds every request received (`size` is its body's length); `connections` counts accepted ones.

        upstream = ScriptedUpstream(always(500), name="bad")
        ...  # point a gateway at upstream.address
        assert len(upstream.requests) == 5
        upstream.stop()
    """

    def __init__(self, handler: Handler = by_path, name: str = "scripted") -> None:
        self.handler = handler
        self.name = name
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[Message] = []
        self.errors: list[str] = []
        # How far a `/stream/N` answer got: `by_path` writes as fast as the socket takes the bytes.
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
        self.requests.append(message)
        digest = hashlib.sha256()
        message.size = wire.read_body(message, digest.update, response=False)
        exchange = Exchange(self, message, digest.hexdigest(), wire)
        self.handler(exchange)
        return exchange.keep_alive

    def stream(self, wire: Wire, total: int, close: bool) -> None:
        """`total` pattern bytes after a head framed by content-length, or by closing the connection."""
        framing = b"connection: close\r\n" if close else b"content-length: %d\r\n" % total
        self.progress_at = time.monotonic()
        wire.send(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n%s\r\n" % framing)
        for piece in pattern(total):
            wire.send(piece)
            self.sent += len(piece)
            self.progress_at = time.monotonic()
        self.done_sending = True


# --- an upstream in a process of its own ------------------------------------------------------------------


class UpstreamProcess:
    """`python tests/e2e/upstream_app.py NAME [PORT]` in its own process, so that it can be SIGKILLed, and
    started again on the same port (`restart`), as a crashed server comes back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("upstream_app.py")), self.name, str(self.port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "PORT n" once listening; "" if it died
        if not line.startswith("PORT "):
            proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()
            raise AssertionError(f"upstream {self.name} did not start: {line!r}")
        self.port = int(line.split()[1])
        return proc

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.kill()
        self.stop()

    def restart(self) -> None:
        self.stop()
        self.proc = self._spawn()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --- addresses where no upstream answers ----------------------------------------------------------------


@contextlib.contextmanager
def refusing_address() -> Iterator[str]:
    """A loopback port with nothing listening on it (bound, so nobody else takes it): connects are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextlib.contextmanager
def blackhole_address() -> Iterator[str]:
    """A loopback port where a connect neither succeeds nor fails: it hangs until the connect timeout.

    A listener with `listen(0)` that never accepts holds one connection in its accept queue; once that is
    full, Linux drops further SYNs (tcp_abort_on_overflow=0), so connects stay in SYN-SENT. Only loopback
    addresses are used, so nothing leaves the machine.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers: list[socket.socket] = []
    try:
        for _ in range(16):
            filler = socket.socket()
            filler.settimeout(0.2)
            try:
                filler.connect(address)
            except OSError:  # TimeoutError included: the queue is full
                filler.close()
                break
            fillers.append(filler)
        else:
            pytest.skip("cannot fill a loopback listener's accept queue here, so no connect can be made to hang")
        yield f"127.0.0.1:{address[1]}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
