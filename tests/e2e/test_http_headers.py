"""HTTP/1.1 headers end to end: hop-by-hop hygiene both ways, forwarding headers, and request identity
(`x-request-id`) per listener, on proxied requests and on the gateway's own replies.

Each rule is tested alone, without sockets, in the unit tier (tests/gateway/test_exchange.py, test_proxy.py,
test_upstream.py); the tests here keep one end-to-end check per behaviour on a real process.
"""

from __future__ import annotations

import pytest

from tests.conftest import (
    Connect,
    Gateway,
    Scripted,
    StartGateway,
    assert_uuid4,
    gateway_config,
    hello,
    is_one_line_reason,
    listeners,
)
from tests.e2e.upstream_app import UpstreamServer
from tests.e2e.wire import Wire, chunked, request

# --- header hygiene --------------------------------------------------------------------------------------


def test_hop_by_hop_request_headers_removed(hello_wire: Wire) -> None:
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
    hello_wire.send(request("POST", "/echo/hyg", headers=[*hop, ("Transfer-Encoding", "chunked")]) + chunked(b"body"))
    echo = hello_wire.read_response().json()
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


def test_forwarding_headers_set_and_host_preserved(hello_wire: Wire) -> None:
    hello_wire.send(request("GET", "/echo/fwd"))
    seen = hello_wire.read_response().json()["headers"]
    assert seen["host"] == ["hello"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["hello"]

    claimed = [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil")]
    hello_wire.send(request("GET", "/echo/fwd2", host="hello.mesh.local:8080", headers=claimed))
    seen = hello_wire.read_response().json()["headers"]
    assert seen["host"] == ["hello.mesh.local:8080"]
    assert seen["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    # The inbound listener does not trust a plain-HTTP client's claims about scheme and host.
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["hello.mesh.local:8080"]


# --- request identity ------------------------------------------------------------------------------------

WELL_FORMED = "client-id.42:A_b"


def assert_request_id(returned: str | None, incoming: str, kept: bool) -> None:
    """The gateway kept the client's request ID, or replaced it with a fresh UUID4."""
    if kept:
        assert returned == incoming
    else:
        assert returned != incoming
        assert_uuid4(returned)


@pytest.mark.parametrize("kind", ["inbound", "edge", "outbound"])
def test_gateway_errors_carry_request_id(edge_gateway: Gateway, connect: Connect, kind: str) -> None:
    wire = connect(edge_gateway.addresses[kind])
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
    edge_gateway: Gateway, hello_upstream: UpstreamServer, connect: Connect, listener: str, incoming: str, kept: bool
) -> None:
    """A request refused while its head is parsed (here: two Host headers) follows the same identity rules."""
    wire = connect(edge_gateway.addresses[listener])
    wire.send(request("GET", "/echo", headers=[("X-Request-Id", incoming), ("Host", "other")]))
    refused = wire.read_response()
    assert refused.status == 400
    assert is_one_line_reason(refused.body), refused.body
    assert_request_id(refused.header("x-request-id"), incoming, kept)
    assert hello_upstream.requests == 0


# --- what the edge trusts -----------------------------------------------------------------------------------

CLAIMS = [
    ("X-Forwarded-For", "203.0.113.7"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "shop.example"),
    ("X-Request-Id", "client-chosen-id"),
]


@pytest.mark.parametrize(
    ("trusted_proxies", "believed"),
    [
        pytest.param([], False, id="no-trusted-proxies"),
        pytest.param(["10.0.0.0/8", "fd00::/8"], False, id="other-networks"),
        pytest.param(["127.0.0.0/8"], True, id="from-a-trusted-proxy"),
        pytest.param(["127.0.0.1"], True, id="one-address"),
    ],
)
def test_edge_believes_forwarding_headers_only_from_trusted_proxies(
    start_gateway: StartGateway,
    hello_upstream: UpstreamServer,
    connect: Connect,
    trusted_proxies: list[str],
    believed: bool,
) -> None:
    """The edge is where the untrusted world comes in: it sets X-Forwarded-Proto and -Host itself unless the
    client is a front load balancer named in `trusted_proxies`; X-Forwarded-For is only ever appended to."""
    config = gateway_config(
        hello(hello_upstream.address),
        listen=listeners("edge"),
        trusted_proxies=trusted_proxies,
        preserve_request_id=False,
    )
    gw = start_gateway(config)
    wire = connect(gw.addresses["edge"])
    wire.send(request("GET", "/echo/edge", headers=CLAIMS))
    response = wire.read_response()
    seen = response.json()["headers"]
    assert seen["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == (["https"] if believed else ["http"])
    assert seen["x-forwarded-host"] == (["shop.example"] if believed else ["hello"])
    # preserve_request_id: false replaces an ordinary client's ID; a trusted proxy's is kept.
    assert (response.header("x-request-id") == "client-chosen-id") is believed
    assert seen["x-request-id"] == [response.header("x-request-id")]


def test_preserve_request_id_governs_only_the_request_id(
    start_gateway: StartGateway, hello_upstream: UpstreamServer, connect: Connect
) -> None:
    gw = start_gateway(gateway_config(hello(hello_upstream.address), listen=listeners("edge")))
    wire = connect(gw.addresses["edge"])
    wire.send(request("GET", "/echo/edge", headers=CLAIMS))
    response = wire.read_response()
    seen = response.json()["headers"]
    assert response.header("x-request-id") == "client-chosen-id"  # kept: preserve_request_id defaults to true
    assert seen["x-forwarded-proto"] == ["http"] and seen["x-forwarded-host"] == ["hello"]
