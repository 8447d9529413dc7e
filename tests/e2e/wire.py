"""Raw HTTP/1.1 on a blocking socket, for tests where the exact bytes matter.

`Wire` is one end of a connection with a receive buffer and a deadline on every read; `Message` is a parsed
request or response. `request()` and `chunked()` build the bytes to send. Clients (the `connect` fixture) and
`ScriptedUpstream` (tests/e2e/servers.py) both speak through them.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

READ_TIMEOUT = 10.0  # deadline for each read a test makes
RECV_SIZE = 1 << 20

Headers = list[tuple[str, str]]
Sink = Callable[[bytes], object]


@dataclass
class Message:
    """One parsed request or response: start line, headers in arrival order, body (unless streamed)."""

    start: str
    headers: Headers
    body: bytes = b""
    size: int = 0
    trailers: Headers = field(default_factory=list)  # after a chunked body

    @property
    def status(self) -> int:
        return int(self.start.split(" ", 2)[1])

    @property
    def method(self) -> str:
        return self.start.split(" ", 1)[0]

    @property
    def target(self) -> str:
        return self.start.split(" ", 2)[1]

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
            return self._read_chunked(sink, message.trailers)
        length = message.header("content-length")
        if length is not None:
            self.stream(int(length), sink)
            return int(length)
        return self.stream_to_eof(sink) if response else 0

    def _read_chunked(self, sink: Sink, trailers: Headers) -> int:
        size = 0
        while True:
            line = self.read_until(b"\r\n")
            chunk = int(line.split(b";", 1)[0].strip(), 16)
            if chunk == 0:
                while (field_line := self.read_until(b"\r\n")) != b"\r\n":
                    name, _, value = field_line.decode("latin-1").partition(":")
                    trailers.append((name, value.strip()))
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
