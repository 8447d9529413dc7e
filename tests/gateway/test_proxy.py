"""The client side of the gateway (gateway/proxy.py), played without sockets (playbook.py): pipelining, request
bodies, framing the gateway refuses, header limits, the sweep's timeouts and backpressure from a slow reader."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.units import Address
from tests.gateway.playbook import HIGH_WATER, Playbook, reply

A = Address("127.0.0.1", 9001)
GET = b"GET /%s HTTP/1.1\r\nHost: hello\r\n\r\n"
SWEEP = 0.5  # runtime.SWEEP_INTERVAL: a sweep timeout is noticed up to this late


def config(**limits: Any) -> dict[str, Any]:
    """Service `hello` on endpoint A, with the gateway's client limits given (short timeouts by default)."""
    limits = {"header_timeout": "2s", "idle_timeout": "5s", "body_timeout": "3s", "send_timeout": "4s", **limits}
    service = {"subsets": {"v1": {"endpoints": [str(A)]}}, "timeouts": {"per_try": "60s", "request": "120s"}}
    return {"gateway": {"limits": limits}, "services": {"hello": service}}


def test_pipelined_requests_are_answered_in_order() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(GET % b"one" + GET % b"two" + GET % b"three")
        upstream = pb.next_upstream()
        assert [request.target for request in upstream.requests()] == [b"/one"]  # one at a time
        for number, body in enumerate((b"first", b"second", b"third"), 1):
            upstream.answer(reply(200, body))
            assert len(upstream.requests()) == min(number + 1, 3)  # the next goes out on the same connection
        assert [request.target for request in upstream.requests()] == [b"/one", b"/two", b"/three"]
        assert [response.body for response in client.responses()] == [b"first", b"second", b"third"]
        assert len(pb.upstreams) == 1 and not client.closed


def test_a_content_length_body_is_forwarded() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(b"POST /up HTTP/1.1\r\nHost: hello\r\nContent-Length: 11\r\n\r\nhello")
        upstream = pb.next_upstream()
        upstream.accept()
        client.send(b" world")  # the rest streams on as it comes
        (request,) = upstream.requests()
        assert (request.header(b"content-length"), request.body) == (b"11", b"hello world")
        upstream.answer(reply(201))
        assert [response.status for response in client.responses()] == [201]


def test_a_chunked_body_is_reframed_with_its_forwardable_trailers() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(
            b"POST /up HTTP/1.1\r\nHost: hello\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n"
            b"0\r\nX-Sum: 42\r\nHost: evil\r\nX-Request-Id: forged\r\nCookie: a=1\r\n\r\n"
        )
        upstream = pb.next_upstream()
        (request,) = upstream.requests()
        assert request.header(b"transfer-encoding") == b"chunked"
        assert (request.body, request.trailers) == (b"hello world", [(b"x-sum", b"42")])
        assert b"ext=1" not in upstream.received()
        upstream.answer(reply(200))
        assert [response.status for response in client.responses()] == [200]


def request(*headers: bytes, method: bytes = b"POST", target: bytes = b"/", body: bytes = b"") -> bytes:
    fields = b"".join(header + b"\r\n" for header in headers)
    return b"%s %s HTTP/1.1\r\nHost: hello\r\n%s\r\n%s" % (method, target, fields, body)


CHUNKED = b"Transfer-Encoding: chunked"
# Request smuggling and other framing the gateway will not read (RFC 9112 §6.3, §6.1, §5; RFC 9110 §5.5).
REFUSED = {
    "content-length and chunked": (request(b"Content-Length: 5", CHUNKED, body=b"0\r\n\r\n"), 400),
    "chunked and content-length": (request(CHUNKED, b"Content-Length: 5", body=b"0\r\n\r\n"), 400),
    "two content-lengths": (request(b"Content-Length: 5", b"Content-Length: 6", body=b"hello!"), 400),
    "a content-length list": (request(b"Content-Length: 5, 6", body=b"hello!"), 400),
    "content-length abc": (request(b"Content-Length: abc"), 400),
    "content-length -1": (request(b"Content-Length: -1"), 400),
    "content-length +5": (request(b"Content-Length: +5", body=b"hello"), 400),
    "chunk size not hex": (request(CHUNKED, body=b"zz\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk data without CRLF": (request(CHUNKED, body=b"5\r\nhelloXX0\r\n\r\n"), 400),
    "chunked twice": (request(CHUNKED, CHUNKED, body=b"0\r\n\r\n"), 400),
    "chunked then gzip": (request(b"Transfer-Encoding: chunked, gzip", body=b"0\r\n\r\n"), 400),
    "chunked then gzip in two fields": (request(CHUNKED, b"Transfer-Encoding: gzip", body=b"0\r\n\r\n"), 400),
    "gzip only": (request(b"Transfer-Encoding: gzip", body=b"0\r\n\r\n"), 501),
    "gzip, chunked": (request(b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"), 501),
    "identity then chunked in two fields": (request(b"Transfer-Encoding: identity", CHUNKED, body=b"0\r\n\r\n"), 501),
    "transfer-encoding from HTTP/1.0": (
        b"POST / HTTP/1.0\r\nHost: hello\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "an upgrade with a body": (
        request(b"Connection: upgrade", b"Upgrade: websocket", b"Content-Length: 5", body=b"hello"),
        400,
    ),
    "content-length 1 2": (request(b"Content-Length: 1 2", body=b"12"), 400),
    "identity, chunked": (request(b"Transfer-Encoding: identity, chunked", body=b"0\r\n\r\n"), 501),
    "two hosts": (request(b"Host: other"), 400),
    "two hosts the same": (request(b"Host: hello"), 400),
    "two hosts, the first empty": (b"GET / HTTP/1.1\r\nHost:\r\nHost: hello\r\n\r\n", 400),
    "obs-fold": (request(b"X-Folded: a", b" b"), 400),
    "obs-fold with a tab": (request(b"X-Folded: a", b"\tb"), 400),
    "a NUL in a value": (request(b"X-Bad: a\x00b"), 400),
    "a bare CR in a value": (request(b"X-Bad: a\rb"), 400),
    "a bare LF in a value": (request(b"X-Bad: a\nX-Other: b"), 400),
    "a garbage request line": (b"hello there, gateway\r\n\r\n", 400),
    "a space before the colon": (b"GET / HTTP/1.1\r\nHost : hello\r\n\r\n", 400),
    "an invalid method": (request(method=b"G@T"), 400),
    "an HTTP/0.9 request line": (b"GET /\nHost: hello\r\n\r\n", 505),
    "HTTP/2.0 in the request line": (b"GET / HTTP/2.0\r\nHost: hello\r\n\r\n", 505),
    "a 10KiB target": (request(method=b"GET", target=b"/" + b"a" * 10 * 1024), 414),
    "CONNECT": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
}


@pytest.mark.parametrize(("data", "status"), REFUSED.values(), ids=REFUSED.keys())
def test_a_request_the_gateway_cannot_trust_is_refused_and_the_connection_closed(data: bytes, status: int) -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(data + GET % b"smuggled")
        (response,) = client.responses()
        assert response.status == status and response.body.startswith(b"meshgate: ")
        assert response.header(b"x-request-id") and response.header(b"connection") == b"close" and client.closed
        assert all(upstream.connecting or upstream.requests() == [] for upstream in pb.upstreams)


LIMITS = {"max_header_bytes": "1KiB", "max_headers": 5}
HEADS = {
    "a header over the byte limit": (b"X-Big: " + b"a" * 2000 + b"\r\n", 431),
    "headers over the byte limit together": (b"".join(b"X-%d: %s\r\n" % (n, b"a" * 300) for n in range(4)), 431),
    "one field too many": (b"".join(b"X-%d: 1\r\n" % n for n in range(5)), 431),  # with Host: 6
    "just within both limits": (b"".join(b"X-%d: %s\r\n" % (n, b"a" * 150) for n in range(4)), 200),
}


@pytest.mark.parametrize(("head", "status"), HEADS.values(), ids=HEADS.keys())
def test_a_head_over_the_limits_gets_431(head: bytes, status: int) -> None:
    with Playbook(config(**LIMITS)) as pb:
        client = pb.connect()
        client.send(b"GET / HTTP/1.1\r\nHost: hello\r\n" + head + b"\r\n")
        if status == 200:
            pb.next_upstream().answer(reply(200))
        (response,) = client.responses()
        assert response.status == status and client.closed is (status != 200)


def test_bad_chunk_framing_mid_stream_drops_the_upstream_request() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(request(CHUNKED, body=b"5\r\nhello\r\n"))
        upstream = pb.next_upstream()
        assert upstream.received().endswith(b"5\r\nhello\r\n")  # head and first chunk went upstream
        client.send(b"zz\r\n")
        (response,) = client.responses()
        assert response.status == 400 and client.closed
        assert upstream.closed  # at once: a truncated request is never left on a pooled connection


def test_a_request_without_host_gets_400_on_a_connection_that_stays_usable() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(b"GET / HTTP/1.1\r\n\r\n")
        client.send(GET % b"next")
        pb.next_upstream().answer(reply(200))
        assert [response.status for response in client.responses()] == [400, 200]
        assert not client.closed


def test_a_head_that_never_ends_is_refused_before_it_is_all_read() -> None:
    with Playbook(config(max_header_bytes="1KiB")) as pb:
        client = pb.connect()
        client.send(b"GET / HTTP/1.1\r\nHost: hello\r\nX-Big: ")
        for _ in range(20):  # one header, never finished: httptools gathers it without a callback
            if client.closed:
                break
            client.send(b"a" * 1024)
        (response,) = client.responses()
        assert response.status == 431 and client.closed


def test_a_slow_head_gets_408_from_the_sweep() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(b"GET / HTTP/1.1\r\nHost: hel")
        pb.advance(2 - SWEEP)
        assert client.received() == b"" and not client.closed
        pb.advance(2 * SWEEP)
        (response,) = client.responses()
        assert response.status == 408 and client.closed
        assert pb.upstreams == []


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        pb.advance(2 - SWEEP)
        assert not client.closed
        pb.advance(2 * SWEEP)
        assert client.closed and client.received() == b""


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(GET % b"")
        pb.next_upstream().answer(reply(200))
        assert [response.status for response in client.responses()] == [200]
        pb.advance(5 - SWEEP)
        assert not client.closed
        client.send(GET % b"again")  # a request in time restarts the idle clock
        pb.upstream(A).answer(reply(200))
        pb.advance(5 - SWEEP)
        assert not client.closed
        pb.advance(2 * SWEEP)
        assert client.closed
        assert [response.status for response in client.responses()] == [200, 200]  # closed without a word


def test_a_stalled_request_body_gets_408() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(b"POST /up HTTP/1.1\r\nHost: hello\r\nContent-Length: 10\r\n\r\nhello")
        upstream = pb.next_upstream()
        assert upstream.requests() == [] and upstream.received().endswith(b"hello")  # forwarded as it came
        pb.advance(3 - SWEEP)
        assert client.received() == b""
        pb.advance(3 * SWEEP)  # no progress for longer than body_timeout, as the sweep sees it
        (response,) = client.responses()
        assert response.status == 408 and b"body" in response.body and client.closed
        assert upstream.closed  # the upstream request is void
        assert pb.runtime.loads["hello"].active == 0  # its place under `max_requests` is free again


def test_an_upload_that_keeps_coming_is_not_cut() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(b"POST /up HTTP/1.1\r\nHost: hello\r\nContent-Length: 60\r\n\r\n")
        upstream = pb.next_upstream()
        upstream.accept()
        for _ in range(6):  # 10 bytes every 2.5 s: 15 s in all, no pause as long as the 3 s body timeout
            client.send(b"0123456789")
            pb.advance(2.5)
        (request,) = upstream.requests()
        assert len(request.body) == 60
        upstream.answer(reply(200))
        assert [response.status for response in client.responses()] == [200]


def test_a_client_that_stops_reading_pauses_the_upstream_until_it_reads_again() -> None:
    body = bytes(range(256)) * (4 * HIGH_WATER // 256)
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(GET % b"big")
        upstream = pb.next_upstream()
        client.stop_reading()
        upstream.answer(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body[: 2 * HIGH_WATER])
        assert not upstream.reading  # the client's write buffer is over the high-water mark
        upstream.answer(body[2 * HIGH_WATER :])  # sent, but not read while the client lags
        assert client.responses() == [] and upstream.transport.unread == len(body) - 2 * HIGH_WATER
        client.resume_reading()
        assert upstream.reading
        (response,) = client.responses()
        assert response.body == body and not client.closed


def test_a_client_that_never_reads_its_response_is_cut_off_after_the_send_timeout() -> None:
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(GET % b"big")
        upstream = pb.next_upstream()
        client.stop_reading()
        upstream.answer(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (4 * HIGH_WATER) + b"x" * 2 * HIGH_WATER)
        pb.advance(4 - SWEEP)
        assert not client.closed
        pb.advance(3 * SWEEP)
        assert client.closed and upstream.closed
        request_id = upstream.requests()[0].header(b"x-request-id")
        assert request_id is not None and pb.runtime.lookup(request_id)[0]["error"] == "send_timeout"


def test_an_upstream_that_stops_reading_the_body_pauses_the_client_then_gets_504() -> None:
    size = 4 * HIGH_WATER
    with Playbook(config()) as pb:
        client = pb.connect()
        client.send(b"POST /up HTTP/1.1\r\nHost: hello\r\nContent-Length: %d\r\n\r\n" % size)
        upstream = pb.next_upstream()
        upstream.accept()
        upstream.stop_reading()
        client.send(b"x" * 2 * HIGH_WATER)
        assert not client.reading  # pushed back: the upstream's write buffer is over the high-water mark
        pb.advance(3 - SWEEP)
        assert client.received() == b""
        pb.advance(3 * SWEEP)
        (response,) = client.responses()
        assert response.status == 504 and b"read none of the request body" in response.body
        assert upstream.closed and client.closed
