"""Stalls in the middle of an exchange, on a real gateway: a client that stops sending its body or stops reading
the response, and an upstream that stops reading the request body or stops sending the response body.

`limits.body_timeout` bounds the pauses of a body in either direction, `limits.send_timeout` a client that
leaves a response unread. The gateway's sweep checks them twice a second, so each fires within about half a
second of its limit; both are set to 1 s here.

Each rule is tested alone, without sockets, in the unit tier (tests/gateway/test_exchange.py, test_proxy.py,
test_upstream.py); the tests here keep one end-to-end check per behaviour on a real process.
"""

from __future__ import annotations

import time

from tests.conftest import Connect, Scripted, StartGateway, gateway_config, hello, wait_for
from tests.e2e.wire import request

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
