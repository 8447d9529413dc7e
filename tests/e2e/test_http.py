"""HTTP/1.1 proxying end to end, a real gateway process between real sockets on 127.0.0.1: connections.

Covers keep-alive on both sides, `Connection: close` and HTTP/1.0 clients, pipelining, the outbound listener's
absolute-form and the gateway's own routing-error replies. Bodies, headers and Upgrade have their own modules
(test_http_bodies.py, test_http_headers.py, test_upgrade.py).

Clients are raw sockets (`Wire`, tests/e2e/wire.py) where the exact bytes matter, httpx elsewhere. Upstreams are
the shared `upstream_app` (via `start_upstream`, or `hello_upstream` behind `hello_gateway`) or a
`ScriptedUpstream` (tests/e2e/servers.py) for behaviour the shared app lacks.

Each rule is tested alone, without sockets, in the unit tier (tests/gateway/test_exchange.py, test_proxy.py,
test_upstream.py); the tests here keep one end-to-end check per behaviour on a real process.
"""

from __future__ import annotations

from tests.conftest import Connect, Gateway, assert_uuid4, is_one_line_reason
from tests.e2e.upstream_app import UpstreamServer
from tests.e2e.wire import Wire, request

# --- keep-alive ------------------------------------------------------------------------------------------


def test_keep_alive_reuses_one_upstream_connection(
    hello_upstream: UpstreamServer, hello_gateway: Gateway, hello_wire: Wire, connect: Connect
) -> None:
    for i in range(5):
        hello_wire.send(request("GET", f"/echo/{i}"))
        echoed = hello_wire.read_response()
        assert echoed.status == 200 and echoed.json()["path"] == f"/echo/{i}"
        assert echoed.header("connection") is None
        hello_wire.send(request("POST", "/count", body=b"z" * (1000 + i)))
        assert hello_wire.read_response().body == str(1000 + i).encode()
        hello_wire.send(request("GET", "/chunked/3"))
        assert hello_wire.read_response().body == b"chunk-0\nchunk-1\nchunk-2\n"
        hello_wire.send(request("GET", "/bytes/777"))
        assert hello_wire.read_response().body == b"x" * 777
    assert hello_upstream.requests == 20
    assert hello_upstream.connections == 1
    # A later client connection gets the pooled upstream connection too.
    other = connect(hello_gateway.inbound)
    other.send(request("GET", "/echo/other"))
    assert other.read_response().status == 200
    assert hello_upstream.connections == 1


def test_client_connection_close_is_honoured(hello_wire: Wire) -> None:
    hello_wire.send(request("GET", "/echo/first"))
    first = hello_wire.read_response()
    assert first.status == 200 and first.header("connection") is None
    hello_wire.send(request("GET", "/echo/last", headers=[("Connection", "close")]))
    last = hello_wire.read_response()
    assert last.status == 200 and last.json()["path"] == "/echo/last"
    assert last.header("connection") == "close"
    hello_wire.expect_eof()


def test_request_after_connection_close_is_ignored(hello_upstream: UpstreamServer, hello_wire: Wire) -> None:
    """RFC 9112 9.6: answer the request that says close, then close; bytes after it are not processed."""
    hello_wire.send(request("GET", "/echo/last", headers=[("Connection", "close")]) + request("GET", "/echo/ignored"))
    last = hello_wire.read_response()
    assert last.status == 200, last
    assert last.json()["path"] == "/echo/last"
    assert last.header("connection") == "close"
    hello_wire.expect_eof()
    assert hello_upstream.requests == 1


def test_http10_client_without_keep_alive_gets_body_then_close(hello_wire: Wire) -> None:
    hello_wire.send(request("GET", "/echo/old", version="1.0"))
    response = hello_wire.read_response()
    assert response.status == 200 and response.json()["path"] == "/echo/old"
    assert response.header("connection") == "close"
    hello_wire.expect_eof()


# --- pipelining ------------------------------------------------------------------------------------------


# --- outbound listener, routing errors -------------------------------------------------------------------


def test_outbound_host_and_absolute_form(edge_gateway: Gateway, connect: Connect) -> None:
    wire = connect(edge_gateway.addresses["outbound"])
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


def test_inbound_refuses_absolute_form(hello_upstream: UpstreamServer, hello_wire: Wire) -> None:
    hello_wire.send(request("GET", "http://hello/echo/abs"))
    refused = hello_wire.read_response()
    assert refused.status == 400
    assert is_one_line_reason(refused.body) and b"absolute-form" in refused.body, refused.body
    assert_uuid4(refused.header("x-request-id"))
    assert hello_upstream.requests == 0
