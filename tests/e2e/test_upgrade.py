"""HTTP/1.1 Upgrade end to end: a WebSocket tunnel carries bytes both ways, is never pooled nor idle-swept while
traffic flows, and a declined upgrade leaves an ordinary HTTP/1.1 connection.

Each rule is tested alone, without sockets, in the unit tier (tests/gateway/test_exchange.py, test_proxy.py,
test_upstream.py); the tests here keep one end-to-end check per behaviour on a real process.
"""

from __future__ import annotations

import random
import time

from tests.conftest import Connect, Gateway, Scripted, StartGateway, assert_uuid4, gateway_config, hello
from tests.e2e.servers import Exchange
from tests.e2e.upstream_app import UpstreamServer
from tests.e2e.wire import Message, Wire, request

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

H2C = [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAoAAAAAIAAAAA")]


def upgrade(wire: Wire, early: bytes = b"") -> Message:
    wire.send(UPGRADE_HEAD + early)
    response = wire.read_response()
    assert response.status == 101, response
    return response


def echo_round_trip(wire: Wire, payload: bytes) -> None:
    wire.send(payload)
    assert wire.read_exact(len(payload)) == payload


def test_websocket_upgrade_tunnels_both_ways(hello_wire: Wire) -> None:
    response = upgrade(hello_wire, early=b"sent-with-the-head")
    assert response.header("upgrade") == "websocket"
    assert "upgrade" in (response.header("connection") or "").lower()
    assert_uuid4(response.header("x-request-id"))
    assert hello_wire.read_exact(len(b"sent-with-the-head")) == b"sent-with-the-head"
    for i in range(20):
        echo_round_trip(hello_wire, b"frame-%d;" % i * (i + 1))
    echo_round_trip(hello_wire, random.Random(5).randbytes(256 * 1024))


def test_upgraded_upstream_connection_is_not_pooled(
    hello_upstream: UpstreamServer, hello_gateway: Gateway, hello_wire: Wire, connect: Connect
) -> None:
    upgrade(hello_wire)
    echo_round_trip(hello_wire, b"before")
    other = connect(hello_gateway.inbound)
    other.send(request("GET", "/echo/plain"))
    plain = other.read_response()
    assert plain.status == 200 and plain.json()["path"] == "/echo/plain"
    # The tunnel carries only its own bytes and is still open.
    echo_round_trip(hello_wire, b"after")
    assert hello_upstream.connections == 2


def test_active_tunnel_outlives_idle_timeout(
    start_gateway: StartGateway, hello_upstream: UpstreamServer, connect: Connect
) -> None:
    gw = start_gateway(gateway_config(hello(hello_upstream.address), limits={"idle_timeout": "1s"}))
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
    wire.send(request("GET", "/sha256", headers=H2C))
    declined = wire.read_response()
    assert declined.status == 200
    wire.send(request("GET", "/sha256"))
    following = wire.read_response()
    assert following.status == 200 and following.json()["target"] == "/sha256"


SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"


def switch_anyway(exchange: Exchange) -> None:
    """An upstream that answers 101 whatever was asked, then reads on as if HTTP continued."""
    exchange.wire.send(SWITCH)


def test_h2c_is_never_tunnelled(start_gateway: StartGateway, scripted: Scripted, connect: Connect) -> None:
    """`Upgrade: h2c` would hand the connection to HTTP/2 frames the gateway cannot route; like Envoy, the gateway
    drops the upgrade (and HTTP2-Settings), so an upstream that switches anyway gets a 502."""
    upstream = scripted(switch_anyway, name="switcher")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound, timeout=5)
    wire.send(request("GET", "/h2c", headers=H2C) + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    response = wire.read_response()
    assert response.status == 502, response
    wire.expect_eof(timeout=5)
    (seen,) = upstream.requests
    assert not {"upgrade", "http2-settings", "connection"} & seen.names(), seen.headers
