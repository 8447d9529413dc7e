"""The upstream side of the gateway (gateway/upstream.py), played without sockets (playbook.py): how responses are
framed and relayed, the limits on what an upstream sends, and the keep-alive pool."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.runtime import UPSTREAM_IDLE_TIMEOUT
from gateway.units import Address
from tests.gateway.playbook import Playbook, reply

A = Address("127.0.0.1", 9001)
GET = b"GET / HTTP/1.1\r\nHost: hello\r\n\r\n"
SWEEP = 0.5  # runtime.SWEEP_INTERVAL: pool expiry runs in the sweep


def config(**limits: Any) -> dict[str, Any]:
    """Service `hello` on endpoint A, without retries, with the gateway's client limits given."""
    service = {"subsets": {"v1": {"endpoints": [str(A)]}}, "retries": {"attempts": 0}}
    return {"gateway": {"limits": limits}, "services": {"hello": service}}


FRAMINGS = {
    "content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", False, b"content-length"),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        False,
        b"transfer-encoding",
    ),
    "close-delimited": (b"HTTP/1.1 200 OK\r\n\r\nhello world", True, b"connection"),
}


@pytest.mark.parametrize(("response", "delimited", "framing"), FRAMINGS.values(), ids=FRAMINGS.keys())
def test_a_response_is_relayed_whatever_its_framing(response: bytes, delimited: bool, framing: bytes) -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(GET)
        upstream = pb.next_upstream()
        upstream.answer(response)
        if delimited:
            assert client.responses() == [] and not client.closed  # its end is the upstream's FIN
            upstream.close()
        (relayed,) = client.responses()
        assert relayed.body == b"hello world" and relayed.header(framing) is not None
        # A close-delimited body can only be passed on close-delimited: that client connection ends with it.
        assert client.closed is delimited
        assert upstream.closed is delimited  # else kept for the next request


def test_an_http10_client_gets_a_chunked_response_unchunked_then_close() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(b"GET / HTTP/1.0\r\nHost: hello\r\n\r\n")
        upstream = pb.next_upstream()
        upstream.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        (response,) = client.responses()
        assert response.header(b"transfer-encoding") is None and response.body == b"hello"
        assert response.header(b"connection") == b"close" and client.closed
        assert not upstream.closed  # the upstream's response was complete: its connection is kept


def test_a_response_head_over_the_limit_gets_502() -> None:
    with Playbook(config(max_header_bytes="1KiB")) as pb:
        client = pb.connect()
        client.send(GET)
        upstream = pb.next_upstream()
        upstream.answer(reply(200, b"ok", b"X-Big: " + b"a" * 2000))
        (response,) = client.responses()
        assert response.status == 502 and b"exceed" in response.body
        assert upstream.closed and not client.closed


def test_a_response_head_that_never_ends_gets_502() -> None:
    with Playbook(config(max_header_bytes="1KiB")) as pb:
        client = pb.connect()
        client.send(GET)
        upstream = pb.next_upstream()
        upstream.answer(b"HTTP/1.1 200 OK\r\nX-Big: ")
        for _ in range(20):
            if upstream.closed:
                break
            upstream.answer(b"a" * 1024)
        (response,) = client.responses()
        assert response.status == 502 and upstream.closed


def test_forbidden_response_trailers_are_dropped() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(GET)
        pb.next_upstream().answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
            b"X-Checksum: abc\r\nSet-Cookie: a=b\r\nX-Request-Id: forged\r\nTraceparent: 00-x\r\n"
            b"Proxy-Status: x\r\nServer-Timing: db;dur=1\r\n\r\n"
        )
        (response,) = client.responses()
        assert response.trailers == [(b"x-checksum", b"abc"), (b"server-timing", b"db;dur=1")]
        assert response.body == b"ok"


@pytest.mark.parametrize(
    "trailers",
    [b"X-Big: " + b"a" * 2000 + b"\r\n\r\n", b"Content-Length: 99\r\n\r\n"],
    ids=["over the header limit", "framing in a trailer"],
)
def test_bad_response_trailers_abort_the_response(trailers: bytes) -> None:
    with Playbook(config(max_header_bytes="1KiB")) as pb:
        client = pb.connect()
        client.send(GET)
        upstream = pb.next_upstream()
        upstream.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n")
        assert client.received().endswith(b"ok\r\n")
        upstream.answer(trailers)
        assert client.responses() == []  # the response had begun: nothing to say but to cut it off
        assert client.closed and upstream.closed


def test_a_keep_alive_connection_is_reused_until_it_idles_out() -> None:
    with Playbook(config()) as pb:
        first, second = pb.connect(), pb.connect()
        first.send(GET)
        upstream = pb.next_upstream()
        upstream.answer(reply(200, b"one"))
        second.send(GET)  # another client: the pooled connection carries its request too
        assert len(pb.upstreams) == 1 and len(upstream.requests()) == 2
        upstream.answer(reply(200, b"two"))
        assert [response.body for response in first.responses() + second.responses()] == [b"one", b"two"]
        pb.advance(UPSTREAM_IDLE_TIMEOUT - SWEEP)
        assert not upstream.closed
        pb.advance(2 * SWEEP)
        assert upstream.closed  # expired from the pool by the sweep
        first.send(GET)
        fresh = pb.next_upstream()
        assert fresh is not upstream and len(fresh.requests()) == 1


def test_a_connection_the_upstream_asks_to_close_is_not_reused() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(GET)
        upstream = pb.next_upstream()
        upstream.answer(reply(200, b"one", b"Connection: close"))
        assert upstream.closed
        client.send(GET)
        pb.next_upstream().answer(reply(200, b"two"))
        assert [response.body for response in client.responses()] == [b"one", b"two"]


def test_stray_bytes_on_an_idle_connection_make_it_unusable() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(GET)
        upstream = pb.next_upstream()
        upstream.answer(reply(200))
        upstream.answer(b"HTTP/1.1 200 OK\r\n")  # nobody asked
        assert upstream.closed
        client.send(GET)
        assert pb.next_upstream() is not upstream


def test_an_upstream_that_closes_mid_response_aborts_the_client_connection() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(GET)
        upstream = pb.next_upstream()
        upstream.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        assert client.received().endswith(b"partial") and not client.closed
        upstream.close()
        assert client.closed and client.responses() == []  # the client sees a cut-off response, not a complete one


def test_an_upstream_that_stops_sending_the_body_is_cut_off() -> None:
    with Playbook(config(body_timeout="3s")) as pb:
        client = pb.connect()
        client.send(GET)
        upstream = pb.next_upstream()
        upstream.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nslow")
        pb.advance(3 - SWEEP)
        assert not client.closed
        pb.advance(3 * SWEEP)
        assert client.closed and upstream.closed and client.responses() == []
