"""One request through the gateway (gateway/exchange.py), played step by step without sockets (playbook.py):
routing, retries, failover, timeouts, circuit breakers, the headers the gateway adds and drops, and what it
relays back."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.routing import MIN_RETRIES_PER_SECOND, RETRY_WINDOW
from gateway.units import Address
from tests.gateway.playbook import BACKOFF, Playbook, Request, Upstream, reply

A, B = Address("127.0.0.1", 9001), Address("127.0.0.1", 9002)
GET = b"GET /items HTTP/1.1\r\nHost: hello\r\n\r\n"
POST = b"POST /items HTTP/1.1\r\nHost: hello\r\nContent-Length: 5\r\n\r\nhello"


def one_subset(**policy: Any) -> dict[str, Any]:
    """Service `hello`: one subset of two endpoints, round robin, with the traffic policy given."""
    subsets = {"v1": {"endpoints": [str(A), str(B)]}}
    return {"services": {"hello": {"subsets": subsets, "lb": "round_robin", **policy}}}


def two_subsets(routes: list[dict[str, Any]]) -> dict[str, Any]:
    """Service `hello`: subset v1 is endpoint A, v2 is endpoint B."""
    subsets = {"v1": {"endpoints": [str(A)]}, "v2": {"endpoints": [str(B)]}}
    return {"services": {"hello": {"subsets": subsets, "routes": routes}}}


def forwarded(pb: Playbook, response: bytes = reply(200, b"ok")) -> tuple[Upstream, Request]:
    """The one upstream connection holding a request not yet looked at: it answers `response`."""
    (upstream,) = pb.waiting()
    upstream.read()
    request = upstream.requests()[-1]
    upstream.answer(response)
    return upstream, request


# retries and failover


def test_a_503_is_retried_on_the_other_endpoint() -> None:
    with Playbook(one_subset()) as pb:
        client = pb.connect()
        client.send(GET)
        first = pb.next_upstream()
        first.answer(reply(503, b"busy"))
        assert first.closed and client.received() == b""  # the 503 is held back while a retry is possible
        pb.advance(BACKOFF)
        second = pb.next_upstream()
        assert second.address != first.address
        assert second.requests()[0].header(b"x-request-id") == first.requests()[0].header(b"x-request-id")
        second.answer(reply(200, b"ok"))
        (response,) = client.responses()
        assert (response.status, response.body) == (200, b"ok")
        assert pb.counter("meshgate_retries_total", "hello") == 1


def test_after_the_last_attempt_the_503_is_passed_on() -> None:
    with Playbook(one_subset(retries={"attempts": 2})) as pb:
        client = pb.connect()
        client.send(GET)
        for attempt in range(3):
            forwarded(pb, reply(503, b"busy %d" % attempt))
            pb.advance(BACKOFF)
        assert pb.waiting() == []
        (response,) = client.responses()
        assert (response.status, response.body) == (503, b"busy 2")
        assert pb.counter("meshgate_retries_total", "hello") == 2


def test_an_idempotent_put_is_retried_with_its_body() -> None:
    with Playbook(one_subset()) as pb:
        client = pb.connect()
        client.send(b"PUT /items HTTP/1.1\r\nHost: hello\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        forwarded(pb, reply(503))
        pb.advance(BACKOFF)
        _, request = forwarded(pb, reply(200))
        assert (request.method, request.body) == (b"PUT", b"hello")
        assert [response.status for response in client.responses()] == [200]


@pytest.mark.parametrize(
    ("failure", "status"),
    [("answers 503", 503), ("closes before answering", 502)],
)
def test_a_post_is_not_retried_once_it_was_sent(failure: str, status: int) -> None:
    with Playbook(one_subset()) as pb:
        client = pb.connect()
        client.send(POST)
        upstream = pb.next_upstream()
        assert upstream.requests()[0].body == b"hello"
        if failure == "answers 503":
            upstream.answer(reply(503, b"busy"))
        else:
            upstream.close()
        pb.advance(BACKOFF)
        assert len(pb.upstreams) == 1
        (response,) = client.responses()
        assert response.status == status
        assert pb.counter("meshgate_retries_total", "hello") == 0


@pytest.mark.parametrize("status", [500, 404])
def test_other_errors_are_not_retried_by_default(status: int) -> None:
    with Playbook(one_subset()) as pb:
        client = pb.connect()
        client.send(GET)
        forwarded(pb, reply(status))
        pb.advance(BACKOFF)
        assert len(pb.upstreams) == 1  # not gateway errors: passed through
        assert [response.status for response in client.responses()] == [status]


def test_a_get_whose_upstream_closed_before_answering_is_retried() -> None:
    with Playbook(one_subset()) as pb:
        client = pb.connect()
        client.send(GET)
        pb.next_upstream().close()
        pb.advance(BACKOFF)
        pb.next_upstream().answer(reply(200, b"ok"))
        assert [response.status for response in client.responses()] == [200]


def test_when_the_retry_budget_is_spent_the_503_is_passed_on() -> None:
    # With a 0% budget only the floor is left: MIN_RETRIES_PER_SECOND a second over the window. The first
    # retry's backoff is at most 25 ms, so the window does not move while the budget is spent.
    floor = int(MIN_RETRIES_PER_SECOND * RETRY_WINDOW)
    with Playbook(one_subset(retries={"budget": "0%"})) as pb:
        client = pb.connect()
        for _ in range(floor):
            client.send(GET)
            forwarded(pb, reply(503))
            pb.advance(0.03)
            forwarded(pb, reply(200))
        assert pb.counter("meshgate_retries_total", "hello") == floor
        client.send(GET)
        forwarded(pb, reply(503, b"busy"))
        pb.advance(BACKOFF)
        assert pb.waiting() == []
        (response,) = client.responses()[floor:]
        assert (response.status, response.body) == (503, b"busy")
        assert pb.counter("meshgate_retry_budget_exhausted_total", "hello") == 1


@pytest.mark.parametrize("data", [GET, POST], ids=["GET", "POST"])
def test_a_refused_connect_fails_over_to_the_other_endpoint(data: bytes) -> None:
    with Playbook(one_subset(retries={"attempts": 0})) as pb:
        client = pb.connect()
        client.send(data)
        first = pb.next_upstream()
        first.fail_connect()
        second = pb.next_upstream()  # at once: a failover waits for no backoff
        assert second.address != first.address
        assert second.requests()[0].body == data.partition(b"\r\n\r\n")[2]  # a body is sent intact, once
        second.answer(reply(200, b"ok"))
        assert [response.status for response in client.responses()] == [200]
        assert pb.counter("meshgate_connect_failovers_total", "hello") == 1
        assert pb.counter("meshgate_retries_total", "hello") == 0  # outside `retries.attempts` and the budget


def test_when_every_connect_fails_the_client_gets_503() -> None:
    with Playbook(one_subset(retries={"attempts": 0})) as pb:
        client = pb.connect()
        client.send(GET)
        pb.next_upstream().fail_connect()
        pb.next_upstream().fail_connect()
        assert len(pb.upstreams) == 2  # each endpoint tried once
        (response,) = client.responses()
        assert response.status == 503 and b"Connection refused" in response.body


def test_a_connect_that_times_out_fails_over() -> None:
    with Playbook(one_subset(timeouts={"connect": "1s", "per_try": "5s"})) as pb:
        client = pb.connect()
        client.send(GET)
        first = pb.next_upstream()
        pb.advance(1.01)
        assert first.closed
        pb.next_upstream().answer(reply(200))
        assert [response.status for response in client.responses()] == [200]


# timeouts


def test_a_try_that_outlasts_the_per_try_timeout_gets_504() -> None:
    with Playbook(one_subset(timeouts={"per_try": "1s"}, retries={"attempts": 0})) as pb:
        client = pb.connect()
        client.send(GET)
        upstream = pb.next_upstream()
        upstream.accept()
        pb.advance(0.9)
        assert client.received() == b""
        pb.advance(0.2)
        (response,) = client.responses()
        assert response.status == 504 and b"per-try timeout" in response.body
        assert upstream.closed and not client.closed  # the client's connection is still good


def test_a_per_try_timeout_is_retried_on_the_other_endpoint() -> None:
    with Playbook(one_subset(timeouts={"per_try": "1s"}, retries={"attempts": 1})) as pb:
        client = pb.connect()
        client.send(GET)
        first = pb.next_upstream()
        first.accept()
        pb.advance(1.0 + BACKOFF)
        second = pb.next_upstream()
        assert first.closed and second.address != first.address
        second.answer(reply(200, b"ok"))
        assert [response.status for response in client.responses()] == [200]


def test_the_request_timeout_ends_every_try() -> None:
    with Playbook(one_subset(timeouts={"per_try": "5s", "request": "1s"})) as pb:
        client = pb.connect()
        client.send(GET)
        pb.next_upstream().accept()
        pb.advance(1.05)
        (response,) = client.responses()
        assert response.status == 504 and b"request timeout" in response.body
        assert len(pb.upstreams) == 1  # a request timeout is never retried


def test_the_request_timeout_bounds_the_retries() -> None:
    with Playbook(one_subset(timeouts={"per_try": "200ms", "request": "500ms"}, retries={"attempts": 5})) as pb:
        client = pb.connect()
        client.send(GET)
        for _ in range(6):
            for upstream in pb.waiting():
                upstream.accept()
            pb.advance(0.1)
        # Tries start at 0, about 0.2 and about 0.4 s (backoffs of at most 25 and 50 ms); the deadline ends the third.
        assert len(pb.upstreams) == 3 and all(upstream.closed for upstream in pb.upstreams)
        (response,) = client.responses()
        assert response.status == 504 and b"0.5s request timeout" in response.body


def test_the_timeouts_count_from_the_end_of_a_slow_upload() -> None:
    with Playbook(one_subset(timeouts={"per_try": "300ms", "request": "400ms"})) as pb:
        client = pb.connect()
        client.send(b"POST /items HTTP/1.1\r\nHost: hello\r\nContent-Length: 3000\r\n\r\n")
        upstream = pb.next_upstream()
        upstream.accept()
        for _ in range(2):
            client.send(b"x" * 1000)
            pb.advance(0.5)  # 1 s into the request, past both timeouts
        client.send(b"x" * 1000)
        pb.advance(0.25)
        assert client.received() == b"" and not upstream.closed
        upstream.answer(reply(200, b"3000"))
        assert [response.body for response in client.responses()] == [b"3000"]


def test_the_request_timeout_cuts_off_a_response_that_has_begun() -> None:
    with Playbook(one_subset(timeouts={"per_try": "5s", "request": "1s"})) as pb:
        client = pb.connect()
        client.send(GET)
        upstream = pb.next_upstream()
        upstream.answer(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
        assert client.received().endswith(b"half") and not client.closed
        pb.advance(1.05)
        assert client.closed and upstream.closed  # the response cannot be completed, so both connections close
        assert client.responses() == []


# routing


def test_a_header_route_picks_its_subset() -> None:
    routes = [
        {"name": "beta", "match": {"headers": {"x-beta": "1"}}, "split": {"v2": 100}},
        {"name": "default", "split": {"v1": 100}},
    ]
    with Playbook(two_subsets(routes)) as pb:
        client = pb.connect()
        client.send(GET)
        plain, _ = forwarded(pb)
        client.send(b"GET /items HTTP/1.1\r\nHost: hello\r\nX-Beta: 1\r\n\r\n")
        beta, _ = forwarded(pb)
        client.send(b"GET /items HTTP/1.1\r\nHost: hello\r\nX-Beta: 2\r\n\r\n")
        other, _ = forwarded(pb)
        assert (plain.address, beta.address, other.address) == (A, B, A)


def test_a_weighted_split_sends_each_subset_its_share() -> None:
    with Playbook(two_subsets([{"name": "canary", "split": {"v1": 75, "v2": 25}}])) as pb:
        client = pb.connect()
        picked = []
        for _ in range(8):
            client.send(GET)
            upstream, _ = forwarded(pb)
            picked.append(upstream.address)
        assert (picked.count(A), picked.count(B)) == (6, 2)
        assert len(client.responses()) == 8


def test_an_unknown_host_gets_404_without_an_upstream() -> None:
    with Playbook(one_subset()) as pb:
        client = pb.connect()
        client.send(b"GET / HTTP/1.1\r\nHost: nope.example\r\n\r\n")
        client.send(GET)
        forwarded(pb)
        assert [response.status for response in client.responses()] == [404, 200]  # the connection stays usable
        assert b"nope.example" in client.responses()[0].body and len(pb.upstreams) == 1


# headers


REQUEST_IDS = {
    "inbound, untrusted: replaced": ("inbound", {}, b"abc-123", False),
    "inbound from a trusted proxy: kept": ("inbound", {"trusted_proxies": ["127.0.0.0/8"]}, b"abc-123", True),
    "edge: kept by default": ("edge", {}, b"abc-123", True),
    "edge: 128 characters kept": ("edge", {}, b"a" * 128, True),
    "edge, preserve_request_id off: replaced": ("edge", {"preserve_request_id": False}, b"abc-123", False),
    "edge: too long, replaced": ("edge", {}, b"a" * 129, False),
    "edge: a space, replaced": ("edge", {}, b"has space", False),
    "edge: non-ASCII, replaced": ("edge", {}, "café".encode(), False),
    "outbound (the local app, trusted): kept": ("outbound", {}, b"abc-123", True),
    "outbound: too long, replaced": ("outbound", {}, b"a" * 129, False),
}


@pytest.mark.parametrize(("kind", "gateway", "sent", "kept"), REQUEST_IDS.values(), ids=REQUEST_IDS.keys())
def test_the_request_id_is_kept_only_when_trusted_and_well_formed(
    kind: str, gateway: dict[str, Any], sent: bytes, kept: bool
) -> None:
    with Playbook({**one_subset(), "gateway": gateway}) as pb:
        client = pb.connect(kind)
        client.send(b"GET / HTTP/1.1\r\nHost: hello\r\nX-Request-Id: %s\r\n\r\n" % sent)
        _, request = forwarded(pb)
        request_id = request.header(b"x-request-id")
        assert request_id and (request_id == sent) is kept
        (response,) = client.responses()
        assert response.header(b"x-request-id") == request_id


def test_a_request_without_an_id_gets_a_new_one_each() -> None:
    with Playbook(one_subset()) as pb:
        client = pb.connect()
        ids = []
        for _ in range(2):
            client.send(GET)
            ids.append(forwarded(pb)[1].header(b"x-request-id"))
        assert ids[0] and ids[1] and ids[0] != ids[1]


def test_x_forwarded_for_gets_the_client_address_appended() -> None:
    with Playbook(one_subset()) as pb:
        client = pb.connect(peer=("192.0.2.9", 50000))
        client.send(
            b"GET / HTTP/1.1\r\nHost: hello\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
        )
        _, request = forwarded(pb)
        assert request.header(b"x-forwarded-for") == b"203.0.113.7, 10.0.0.1, 192.0.2.9"
        assert request.header(b"x-forwarded-proto") == b"http"  # an untrusted client's own claim is not kept
        assert request.header(b"x-forwarded-host") == b"hello"


def test_hop_by_hop_headers_are_not_forwarded_either_way() -> None:
    with Playbook(one_subset()) as pb:
        client = pb.connect()
        client.send(
            b"GET / HTTP/1.1\r\nHost: hello\r\nConnection: keep-alive, X-Secret\r\nConnection: x-also\r\n"
            b"X-Secret: 1\r\nX-Also: 2\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-Checksum\r\n"
            b"Proxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\nProxy-Custom: x\r\nX-Kept: yes\r\n\r\n"
        )
        _, request = forwarded(
            pb, reply(200, b"ok", b"Connection: X-Up-Secret", b"X-Up-Secret: 1", b"Keep-Alive: timeout=9", b"X-Up: 1")
        )
        assert request.header(b"x-kept") == b"yes"
        assert request.names().isdisjoint({b"connection", b"x-secret", b"x-also", b"keep-alive", b"te", b"trailer"})
        assert not [name for name in request.names() if name.startswith(b"proxy-")]
        (response,) = client.responses()
        assert response.header(b"x-up") == b"1"
        assert {name for name, _ in response.headers}.isdisjoint({b"connection", b"x-up-secret", b"keep-alive"})


def test_a_connection_header_cannot_make_the_framing_hop_by_hop() -> None:
    with Playbook(one_subset()) as pb:
        client = pb.connect()
        client.send(b"POST / HTTP/1.1\r\nHost: hello\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello")
        _, request = forwarded(pb)
        assert (request.header(b"content-length"), request.body) == (b"5", b"hello")
        assert [response.status for response in client.responses()] == [200]


# the response


def test_a_chunked_response_is_relayed_with_its_trailers() -> None:
    with Playbook(one_subset()) as pb:
        client = pb.connect()
        client.send(GET)
        upstream = pb.next_upstream()
        upstream.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n")
        upstream.answer(b"5\r\nhello\r\n6\r\n world\r\n")
        assert client.responses() == []  # not complete yet, but relayed as it comes
        upstream.answer(b"0\r\nX-Checksum: abc\r\n\r\n")
        (response,) = client.responses()
        assert response.header(b"transfer-encoding") == b"chunked"
        assert (response.body, response.trailers) == (b"hello world", [(b"x-checksum", b"abc")])
        assert not upstream.closed and not client.closed  # both kept alive


def test_an_interim_response_is_relayed_with_its_headers_before_the_final_one() -> None:
    """103 Early Hints exists for its Link headers (RFC 8297): relayed without them it tells the client nothing."""
    with Playbook(one_subset()) as pb:
        client = pb.connect()
        client.send(GET)
        upstream = pb.next_upstream()
        upstream.answer(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\nConnection: x-hop\r\n\r\n")
        assert client.read() == b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        upstream.answer(reply(200, b"ok"))
        (response,) = client.responses()
        assert (response.status, response.body) == (200, b"ok")
        assert response.header(b"link") is None  # the hint was the interim response's, not the final one's


def test_an_unrequested_switch_of_protocols_is_refused_with_502() -> None:
    with Playbook(one_subset()) as pb:
        client = pb.connect()
        client.send(GET)
        upstream = pb.next_upstream()
        upstream.answer(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        (response,) = client.responses()
        assert response.status == 502 and b"switched protocols" in response.body
        assert upstream.closed and client.closed  # no tunnel: later bytes would bypass routing


# circuit breakers


def test_past_max_requests_the_breaker_answers_503() -> None:
    with Playbook(one_subset(limits={"max_requests": 1})) as pb:
        first, second = pb.connect(), pb.connect()
        first.send(GET)
        second.send(GET)
        (refused,) = second.responses()
        assert refused.status == 503 and b"circuit breaker" in refused.body
        assert len(pb.upstreams) == 1
        forwarded(pb)
        assert [response.status for response in first.responses()] == [200]
        assert pb.counter("meshgate_circuit_breaker_rejections_total", "hello") == 1
        second.send(GET)  # the first is done: room again
        forwarded(pb)
        assert [response.status for response in second.responses()] == [503, 200]


def test_past_max_pending_connects_the_breaker_answers_503() -> None:
    with Playbook(one_subset(limits={"max_pending": 1})) as pb:
        first, second = pb.connect(), pb.connect()
        first.send(GET)
        second.send(GET)
        assert pb.next_upstream().connecting
        (refused,) = second.responses()
        assert refused.status == 503 and b"requests pending" in refused.body
        assert pb.counter("meshgate_circuit_breaker_rejections_total", "hello") == 1
