"""Bad input on a real gateway socket: raw bytes in, one clear 4xx out, and the connection closed when the
byte stream can no longer be trusted (RFC 9112 §6.3, §5.1, §3.2; RFC 9110 §5.5).

Every refusal must be a complete response with `x-request-id` and a one-line plain-text body starting
"meshgate: ", and the gateway must go on serving fresh connections afterwards. The "control" cases next to the
refusals prove that each limit is the limit and not something stricter.

Each rule is tested alone, without sockets, in the unit tier (tests/gateway/test_exchange.py, test_proxy.py,
test_upstream.py); the tests here keep one end-to-end check per behaviour on a real process.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Gateway, gateway_config, raw_request, service
from tests.e2e.upstream_app import UpstreamServer

SERVICE = "svc"
HEADER_TIMEOUT = 1.0
DEADLINE = 5.0  # no single exchange in this module may take longer
CLOSE_DEADLINE = 3.0  # how long a refused connection may stay open after the response
REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
KIB = 1024

Address = tuple[str, int]


# Talking raw HTTP/1.1 with deadlines.


@dataclass
class Reply:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name, [])
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None


def _recv(sock: socket.socket, deadline: float) -> bytes | None:
    """One recv bounded by `deadline`: None on timeout, b"" when the peer closed."""
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None


def read_reply(sock: socket.socket, deadline: float, buffer: bytes = b"") -> tuple[Reply, bytes]:
    """Read one response delimited by content-length; returns it and any bytes received after it."""
    while b"\r\n\r\n" not in buffer:
        try:
            chunk = _recv(sock, deadline)
        except ConnectionResetError:
            raise AssertionError(f"connection reset before a complete response head; got {buffer!r}") from None
        if not chunk:
            what = "closed" if chunk == b"" else "timed out"
            raise AssertionError(f"{what} before a complete response head; got {buffer!r}")
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    match = re.fullmatch(r"HTTP/1\.[01] (\d{3}) .*", status_line)
    assert match, f"bad status line {status_line!r}"
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        assert colon, f"bad header line {line!r}"
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    length = headers.get("content-length")
    assert length is not None and len(length) == 1, f"expected one content-length, got {head!r}"
    size = int(length[0])
    while len(rest) < size:
        try:
            chunk = _recv(sock, deadline)
        except ConnectionResetError:
            raise AssertionError(f"connection reset inside the response body; got {buffer + rest!r}") from None
        if not chunk:
            raise AssertionError(f"response body incomplete ({len(rest)} of {size} bytes): {head + rest!r}")
        rest += chunk
    reply = Reply(int(match[1]), headers, rest[:size], head + b"\r\n\r\n" + rest[:size])
    return reply, rest[size:]


def wait_closed(sock: socket.socket, deadline: float, extra: bytes = b"") -> str:
    """ "closed" once recv returns b"", or why not: "still open", "reset", or the unexpected bytes sent."""
    if extra:
        return f"sent more after the response: {extra[:200]!r}"
    try:
        chunk = _recv(sock, deadline)
    except ConnectionResetError:
        return "reset (RST, not an orderly close)"
    if chunk is None:
        return f"still open {CLOSE_DEADLINE}s after the response"
    return "closed" if chunk == b"" else f"sent more after the response: {chunk[:200]!r}"


def converse(address: Address, data: bytes, expect_close: bool) -> tuple[Reply, str]:
    """Send `data`, read one response and, when `expect_close`, whether the gateway then closes."""
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        # Refused before reading everything: the answer must still be readable.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        reply, extra = read_reply(sock, time.monotonic() + DEADLINE)
        closed = wait_closed(sock, time.monotonic() + CLOSE_DEADLINE, extra) if expect_close else "not checked"
        return reply, closed


def request(*headers: str | bytes, method: bytes = b"GET", target: bytes = b"/echo", body: bytes = b"") -> bytes:
    lines = [h.encode() if isinstance(h, str) else h for h in headers]
    return method + b" " + target + b" HTTP/1.1\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


def host(name: str = SERVICE) -> str:
    return f"Host: {name}"


def filler(count: int, size: int) -> list[str]:
    """`count` distinct headers whose name and value together take `size` bytes each."""
    return [f"x-fill-{i:04d}: " + "a" * (size - len(f"x-fill-{i:04d}")) for i in range(count)]


def assert_refusal(reply: Reply, status: int) -> None:
    assert reply.status == status, f"expected {status}, got {reply.raw[:500]!r}"
    request_id = reply.header("x-request-id")
    assert request_id is not None and REQUEST_ID.fullmatch(request_id), f"bad x-request-id in {reply.raw[:500]!r}"
    assert (reply.header("content-type") or "").startswith("text/plain"), reply.raw[:500]
    assert reply.body.startswith(b"meshgate: "), reply.body
    assert reply.body.endswith(b"\n") and reply.body.count(b"\n") == 1, f"not one line: {reply.body!r}"
    assert len(reply.body) > len(b"meshgate: \n"), "the reason is empty"


def assert_still_serves(gateway: Gateway) -> None:
    reply, _ = converse(gateway.inbound, request(host(), "Connection: close"), expect_close=False)
    assert reply.status == 200, reply.raw[:500]
    assert reply.header("x-upstream") == "v1"


# Gateways shared by the module.


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer("v1").start()
    yield server
    server.stop()


def _module_gateway(directory: Path, services: dict[str, Any], limits: dict[str, Any]) -> Gateway:
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(gateway_config(services, limits=limits)))
    return Gateway(path, [])


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamServer) -> Iterator[Gateway]:
    """Default size limits (60 KiB, 100 headers) and a 1 s header timeout."""
    services = {SERVICE: service(upstream.address)}
    gw = _module_gateway(tmp_path_factory.mktemp("gateway"), services, {"header_timeout": f"{HEADER_TIMEOUT:g}s"})
    yield gw
    gw.stop()


# One request, one refusal.

CHUNKED = "Transfer-Encoding: chunked"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: svc\r\n\r\n"  # must never be answered as a second request

REFUSED = [
    # Request smuggling shapes (RFC 9112 §6.3).
    pytest.param(
        request(host(), "Content-Length: 5", CHUNKED, method=b"POST", body=b"0\r\n\r\n" + SMUGGLED),
        400,
        id="content-length-and-chunked",
    ),
    pytest.param(
        request(host(), CHUNKED, "Content-Length: 5", method=b"POST", body=b"0\r\n\r\n" + SMUGGLED),
        400,
        id="chunked-and-content-length",
    ),
    pytest.param(
        request(host(), "Content-Length: 5", "Content-Length: 6", method=b"POST", body=b"hello!"),
        400,
        id="content-length-duplicate-differing",
    ),
    pytest.param(
        request(host(), "Content-Length: 5, 6", method=b"POST", body=b"hello!"),
        400,
        id="content-length-list-differing",
    ),
    pytest.param(request(host(), "Content-Length: abc", method=b"POST"), 400, id="content-length-abc"),
    pytest.param(request(host(), "Content-Length: -1", method=b"POST"), 400, id="content-length-negative"),
    pytest.param(
        request(host(), "Content-Length: 1 2", method=b"POST", body=b"12"), 400, id="content-length-1-space-2"
    ),
    pytest.param(request(host(), "Content-Length: +5", method=b"POST", body=b"hello"), 400, id="content-length-plus"),
    # Chunk framing.
    pytest.param(
        request(host(), CHUNKED, method=b"POST", body=b"zz\r\nhello\r\n0\r\n\r\n"), 400, id="chunk-size-not-hex"
    ),
    pytest.param(
        request(host(), CHUNKED, method=b"POST", body=b"5\r\nhelloXX0\r\n\r\n"), 400, id="chunk-data-without-crlf"
    ),
    # A final transfer coding other than chunked: the body length cannot be known (RFC 9112 §6.3 item 4).
    pytest.param(
        request(host(), "Transfer-Encoding: chunked, gzip", method=b"POST", body=b"0\r\n\r\n"),
        400,
        id="te-chunked-then-gzip",
    ),
    # Any coding but one `chunked` is refused as nginx does (501), so no upstream can read the body differently.
    pytest.param(request(host(), "Transfer-Encoding: gzip", method=b"POST", body=b"0\r\n\r\n"), 501, id="te-gzip-only"),
    pytest.param(
        request(host(), "Transfer-Encoding: identity, chunked", method=b"POST", body=b"0\r\n\r\n" + SMUGGLED),
        501,
        id="te-identity-chunked",
    ),
    pytest.param(
        request(host(), "Transfer-Encoding: gzip, chunked", method=b"POST", body=b"0\r\n\r\n" + SMUGGLED),
        501,
        id="te-gzip-chunked",
    ),
    pytest.param(
        request(host(), "Transfer-Encoding: identity", CHUNKED, method=b"POST", body=b"0\r\n\r\n" + SMUGGLED),
        501,
        id="te-identity-then-chunked-in-two-fields",
    ),
    pytest.param(
        request(host(), CHUNKED, CHUNKED, method=b"POST", body=b"0\r\n\r\n" + SMUGGLED),
        400,  # httptools itself refuses chunked applied twice
        id="te-chunked-in-two-fields",
    ),
    # RFC 9112 §6.1: HTTP/1.0 with Transfer-Encoding has faulty framing; refused and closed (as nginx does).
    pytest.param(
        b"POST /echo HTTP/1.0\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
        id="http10-with-transfer-encoding",
    ),
    pytest.param(
        request(host(), CHUNKED, "Transfer-Encoding: gzip", method=b"POST", body=b"0\r\n\r\n"),
        400,
        id="te-chunked-then-gzip-in-two-fields",
    ),
    # Header size and count limits (defaults: 60 KiB, 100 headers).
    pytest.param(request(host(), "x-big: " + "a" * (61 * KIB)), 431, id="one-huge-header"),
    pytest.param(request(host(), *filler(64, KIB)), 431, id="many-medium-headers-over-60KiB"),
    pytest.param(request(host(), *filler(100, 16)), 431, id="101-headers"),
    # Request line.
    pytest.param(request(host(), target=b"/" + b"a" * (10 * KIB)), 414, id="10KiB-url"),
    # Malformed header lines (RFC 9112 §5.1, §5.2; RFC 9110 §5.5).
    pytest.param(request(host(), "x-folded: a", " b"), 400, id="obs-fold-space"),
    pytest.param(request(host(), "x-folded: a", "\tb"), 400, id="obs-fold-tab"),
    pytest.param(request(host(), b"x-bad: a\x00b"), 400, id="nul-in-value"),
    pytest.param(request(host(), b"x-bad: a\rb"), 400, id="bare-cr-in-value"),
    pytest.param(request(host(), b"x-bad: a\nx-other: b"), 400, id="bare-lf-in-value"),
    pytest.param(request("Host : svc"), 400, id="space-before-colon"),
    # Not an HTTP/1.1 request at all.
    pytest.param(request(host(), method=b"G@T"), 400, id="invalid-method"),
    pytest.param(b"hello there, gateway\r\n\r\n", 400, id="garbage-request-line"),
    # Host (RFC 9112 §3.2).
    pytest.param(request(host(), "Host: other"), 400, id="two-hosts-differing"),
    pytest.param(request(host(), host()), 400, id="two-hosts-same"),
    pytest.param(request("Host:", host()), 400, id="two-hosts-first-empty"),
    # An upgrade request's body would be read as tunnel bytes (httptools ends the message at the head).
    pytest.param(
        request(host(), "Connection: upgrade", "Upgrade: websocket", "Content-Length: 5", body=b"hello" + SMUGGLED),
        400,
        id="upgrade-with-body",
    ),
    # httptools reads a request line without a version as HTTP/0.9, yet lets headers follow.
    pytest.param(b"GET /echo\nHost: svc\r\n\r\n" + SMUGGLED, 505, id="http09-with-headers"),
    # CONNECT: the bytes after it would be a tunnel.
    pytest.param(request("Host: example.com:443", method=b"CONNECT", target=b"example.com:443"), 405, id="connect"),
]


@pytest.mark.parametrize(("data", "status"), REFUSED)
def test_refused_and_closed(gateway: Gateway, data: bytes, status: int) -> None:
    reply, closed = converse(gateway.inbound, data, expect_close=True)
    assert_refusal(reply, status)
    assert closed == "closed"
    assert_still_serves(gateway)


def test_an_http2_preface_is_http2_on_data_listeners_and_refused_on_admin(gateway: Gateway) -> None:
    """The plaintext data listeners take HTTP/2 with prior knowledge (its SETTINGS come back); the admin listener
    speaks HTTP/1.1 only and refuses the preface as a malformed request."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    with socket.create_connection(gateway.inbound, timeout=DEADLINE) as sock:
        sock.sendall(preface + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # and an empty SETTINGS frame
        head = sock.recv(9)
        assert head[3] == 0x4 and head[4] == 0 and int.from_bytes(head[5:9]) == 0, head  # the gateway's SETTINGS
    reply, closed = converse(gateway.admin, preface, expect_close=True)
    assert_refusal(reply, 400)
    assert closed == "closed"
    assert_still_serves(gateway)


ACCEPTED = [
    pytest.param(request(host(), *filler(50, KIB)), id="50KiB-of-headers"),
    pytest.param(request(host(), *filler(99, 16)), id="100-headers"),
    pytest.param(request(host(), target=b"/echo/" + b"a" * (4 * KIB)), id="4KiB-url"),
    # The header limit counts header bytes only, not a body that arrives in the same read.
    pytest.param(
        request(host(), f"Content-Length: {100 * KIB}", method=b"POST", body=b"b" * (100 * KIB)),
        id="100KiB-body-with-head",
    ),
]


@pytest.mark.parametrize("data", ACCEPTED)
def test_within_default_limits_is_served(gateway: Gateway, data: bytes) -> None:
    reply, _ = converse(gateway.inbound, data, expect_close=False)
    assert reply.status == 200, reply.raw[:500]
    assert reply.header("x-upstream") == "v1"


def test_chunked_in_any_case_is_forwarded_as_chunked(gateway: Gateway) -> None:
    """Transfer coding names are case-insensitive (RFC 9112 §7): `Chunked` is the one coding accepted."""
    data = request(host(), "Transfer-Encoding: Chunked", method=b"POST", body=b"5\r\nhello\r\n0\r\n\r\n")
    reply, _ = converse(gateway.inbound, data, expect_close=False)
    assert reply.status == 200, reply.raw[:500]
    seen = json.loads(reply.body)
    assert seen["headers"].get("transfer-encoding") == ["chunked"]
    assert seen["body"] == 5
    assert_still_serves(gateway)


# Slow senders.


class SlowClient(threading.Thread):
    """Sends `payload` one byte every `interval` seconds until the gateway answers or closes."""

    def __init__(self, address: Address, payload: bytes, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.payload = payload
        self.interval = interval
        self.sending = threading.Event()  # set once the first bytes are out
        self.answered = threading.Event()
        self.started_at = 0.0
        self.answered_at = 0.0
        self.reply: Reply | None = None
        self.closed = "not checked"
        self.error = ""

    def run(self) -> None:
        try:
            with socket.create_connection(self.address, timeout=DEADLINE) as sock:
                self._trickle(sock)
        except (AssertionError, OSError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.answered.set()

    def _trickle(self, sock: socket.socket) -> None:
        self.started_at = time.monotonic()
        deadline = self.started_at + DEADLINE
        for index in range(len(self.payload)):
            try:
                sock.sendall(self.payload[index : index + 1])
            except (BrokenPipeError, ConnectionResetError):
                break  # the gateway gave up on us; its answer is already in our receive buffer
            if index == 2:
                self.sending.set()
            chunk = _recv(sock, min(deadline, time.monotonic() + self.interval))  # paces the next byte
            if chunk is not None:
                self._answered(sock, chunk, deadline)
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no answer within {DEADLINE}s")
        self._answered(sock, b"", deadline)

    def _answered(self, sock: socket.socket, first: bytes, deadline: float) -> None:
        self.answered_at = time.monotonic()
        self.answered.set()
        self.reply, extra = read_reply(sock, deadline, first)
        self.closed = wait_closed(sock, time.monotonic() + CLOSE_DEADLINE, extra)


def test_slowloris_gets_408_and_does_not_hold_the_worker(gateway: Gateway) -> None:
    payload = request(host(), "x-slow: " + "a" * 100)
    clients = [SlowClient(gateway.inbound, payload) for _ in range(5)]
    for client in clients:
        client.start()
    try:
        for client in clients:
            assert client.sending.wait(DEADLINE), "slow client could not connect"
        # While every slow client is connected and trickling, a normal request is answered promptly.
        started = time.monotonic()
        reply, _ = converse(gateway.inbound, request(host(), "Connection: close"), expect_close=False)
        elapsed = time.monotonic() - started
        assert reply.status == 200, reply.raw[:500]
        assert elapsed < HEADER_TIMEOUT / 2, f"normal request took {elapsed:.2f}s next to slow clients"
        assert not any(client.answered.is_set() for client in clients), "slow clients were answered too early"
    finally:
        for client in clients:
            client.join(DEADLINE + CLOSE_DEADLINE + 1)
    for client in clients:
        assert not client.is_alive(), "slow client still running"
        assert not client.error, client.error
        assert client.reply is not None
        assert_refusal(client.reply, 408)
        assert client.closed == "closed"
        waited = client.answered_at - client.started_at
        # Not before the 1 s header timeout, and well before anything like the default 10 s.
        assert HEADER_TIMEOUT * 0.9 <= waited <= HEADER_TIMEOUT + 2.5, f"answered after {waited:.2f}s"
    assert_still_serves(gateway)


def test_a_refused_client_that_is_still_sending_reads_the_answer_and_an_orderly_close(gateway: Gateway) -> None:
    """Lingering close, as nginx does it: the gateway answers 400, sends FIN and reads and drops the rest of the
    upload, instead of closing with unread input, which makes the kernel send a RST that can destroy the answer."""
    head = request(host(), "Content-Length: 5", "Transfer-Encoding: chunked", method=b"POST")
    with socket.create_connection(gateway.inbound, timeout=DEADLINE) as sock:
        sock.sendall(head + b"x" * 8_000_000)  # far beyond the socket buffers: completes only if the gateway reads
        received = b""
        while chunk := sock.recv(65536):  # a RST would raise ConnectionResetError here
            received += chunk
    assert received.startswith(b"HTTP/1.1 400 "), received[:200]
    assert b"connection: close" in received.lower()
    assert_still_serves(gateway)


def test_the_gateways_own_answer_to_head_has_no_body(gateway: Gateway) -> None:
    """Else the client reads the body as the start of the next response (found by the fuzzer)."""
    received = raw_request(
        gateway.inbound, request(host("nowhere"), method=b"HEAD") + request(host(), "Connection: close")
    )
    first, second = received.split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 404 ") and b"content-length: " in first
    assert second.startswith(b"HTTP/1.1 200 "), received
