"""Stalls in the middle of an exchange, on a real gateway: a client that stops sending its body or stops reading
the response, and an upstream that stops reading the request body or stops sending the response body.

`limits.body_timeout` bounds the pauses of a body in either direction, `limits.send_timeout` a client that
leaves a response unread. The gateway's sweep checks them twice a second, so each fires within about half a
second of its limit; both are set to 1 s here.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Connect, Scripted, StartGateway, gateway_config, hello, hop_records, wait_for
from tests.e2e.servers import Exchange
from tests.e2e.wire import Wire, request

LIMIT = 1.0
LIMITS = {"body_timeout": f"{LIMIT:g}s", "send_timeout": f"{LIMIT:g}s"}
LATE = LIMIT + 2.5  # the latest a stall may be noticed: limit, sweep period, and a loaded machine's slack
LONG_TIMEOUTS = {"timeouts": {"per_try": "60s", "request": "60s"}}  # so that only the stall limits can fire


def test_a_stalled_upload_gets_408_and_frees_its_place(
    start_gateway: StartGateway, scripted: Scripted, connect: Connect
) -> None:
    """Five uploads stall after 10 bytes against `max_requests: 5`: they held the service forever, and everyone
    else got 503. Now each gets 408 at the body timeout, its upstream request is dropped, and service resumes."""
    upstream = scripted()
    policy = {"limits": {"max_requests": 5}, **LONG_TIMEOUTS}
    gw = start_gateway(gateway_config(hello(upstream.address, **policy), limits=LIMITS))
    stalled = [connect(gw.inbound) for _ in range(5)]
    started = time.monotonic()
    for wire in stalled:
        wire.send(request("POST", "/sha256", headers=[("Content-Length", "100")]) + b"0123456789")
    wait_for(lambda: len(upstream.requests) == 5, what="the five heads to reach the upstream")
    probe = connect(gw.inbound)
    probe.send(request("GET", "/sha256"))
    assert probe.read_response().status == 503  # the breaker is full while they stall
    for wire in stalled:
        response = wire.read_response(timeout=LATE + 2)
        assert response.status == 408, response.body
        assert b"body" in response.body
        assert response.header("connection") == "close"
        wire.expect_eof(timeout=5)
    waited = time.monotonic() - started
    assert LIMIT * 0.9 <= waited <= LATE + 1, f"answered after {waited:.2f}s"
    wait_for(lambda: len(upstream.errors) == 5, what="the upstream requests to be dropped")  # truncated bodies
    fresh = connect(gw.inbound)
    fresh.send(request("GET", "/sha256"))
    assert fresh.read_response().status == 200


def test_an_upload_that_keeps_coming_is_not_cut(start_gateway: StartGateway, scripted: Scripted) -> None:
    """The limit is on pauses, not on the whole upload: 2 s of 10 bytes every 0.4 s is served."""
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address, **LONG_TIMEOUTS), limits=LIMITS))

    def trickle() -> Iterator[bytes]:
        for _ in range(6):
            yield b"0123456789"
            time.sleep(0.4)  # pacing the upload: the pauses stay under the body timeout

    with httpx.Client(base_url=gw.url(), trust_env=False, timeout=10) as client:
        response = client.post("/sha256", content=trickle(), headers={"host": "hello"})
    assert response.status_code == 200, response.text
    assert response.json()["size"] == 60


def test_a_client_that_stops_reading_is_dropped(
    start_gateway: StartGateway, scripted: Scripted, connect: Connect
) -> None:
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address, **LONG_TIMEOUTS), limits=LIMITS))
    wire = connect(gw.inbound, rcvbuf=4096)
    wire.send(request("GET", f"/stream/{256 << 20}"))
    head = wire.read_head()
    assert head is not None and head[0].startswith("HTTP/1.1 200")
    request_id = dict((name.lower(), value) for name, value in head[1])["x-request-id"]
    # ... and never read again. The gateway stops reading the upstream (backpressure), then gives up on both.
    found = wait_for(lambda: hop_records(gw, request_id), timeout=LATE + 5, what="the exchange to end")
    assert found[0]["error"] == "send_timeout", found
    wait_for(lambda: upstream.errors, timeout=5, what="the upstream connection to be closed")
    assert upstream.sent < 256 << 20


@pytest.fixture
def deaf_upstream() -> Iterator[str]:
    """An upstream that accepts connections and never reads from them."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                sock, _ = listener.accept()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                accepted.append(sock)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for sock in [listener, *accepted]:
        sock.close()


def test_an_upstream_that_stops_reading_the_body_is_504(
    start_gateway: StartGateway, deaf_upstream: str, connect: Connect
) -> None:
    gw = start_gateway(gateway_config(hello(deaf_upstream, **LONG_TIMEOUTS), limits=LIMITS))
    wire = connect(gw.inbound)
    size = 256 << 20
    wire.send(request("POST", "/upload", headers=[("Content-Length", str(size))]))
    sent = 0
    piece = b"u" * (256 << 10)
    wire.sock.setblocking(False)
    deadline = time.monotonic() + LATE + 10
    while sent < size and time.monotonic() < deadline:
        with contextlib.suppress(BlockingIOError):
            sent += wire.sock.send(piece)
        with contextlib.suppress(BlockingIOError):
            if wire.sock.recv(1, socket.MSG_PEEK):
                break
        time.sleep(0.01)  # pacing a non-blocking sender, not synchronisation
    wire.sock.setblocking(True)
    response = wire.read_response(timeout=5)
    assert response.status == 504, response.body
    assert b"upstream read none of the request body" in response.body
    assert sent < size


def test_an_upstream_that_stops_sending_the_body_is_cut(
    start_gateway: StartGateway, scripted: Scripted, connect: Connect
) -> None:
    release = threading.Event()

    def stall(exchange: Exchange) -> None:
        exchange.wire.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        release.wait(30)

    upstream = scripted(stall, name="stalling")
    gw = start_gateway(gateway_config(hello(upstream.address, **LONG_TIMEOUTS), limits=LIMITS))
    wire: Wire = connect(gw.inbound)
    started = time.monotonic()
    wire.send(request("GET", "/"))
    try:
        head = wire.read_head()
        assert head is not None and head[0].startswith("HTTP/1.1 200")
        received = bytearray()
        wire.stream_to_eof(received.extend, timeout=LATE + 2)  # fails unless the gateway closes
    finally:
        release.set()
    assert bytes(received) == b"0123456789"
    assert LIMIT * 0.9 <= time.monotonic() - started <= LATE + 1
