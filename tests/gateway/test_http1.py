"""Unit tests of the HTTP/1.1 rules both sides of the gateway share (`gateway.http1`). No I/O.

The head a gateway sends upstream is parsed back with h11, a parser independent of the gateway's httptools, so a
test fails if the bytes are not a well-formed HTTP/1.1 request, not only if they differ from a copy.
"""

from __future__ import annotations

import h11
import pytest

from gateway.http1 import (
    CHUNK_FRAMING,
    MAX_LINE,
    connection_options,
    drop_headers,
    forwardable_trailer,
    framing_exceeds,
    request_head,
)
from gateway.propagation import extract, inject

FORWARDED = (b"10.0.0.1, 127.0.0.1", b"https", b"shop.example", b"req-1")
TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def rendered(*fields: tuple[bytes, bytes]) -> list[bytes]:
    """Headers as the client side keeps them: name, ": ", value, CRLF."""
    return [part for name, value in fields for part in (name, b": ", value, b"\r\n")]


def parse(head: bytes) -> h11.Request:
    server = h11.Connection(h11.SERVER)
    server.receive_data(head)
    event = server.next_event()
    assert isinstance(event, h11.Request), f"not a request head: {head!r}"
    return event


def fields(request: h11.Request) -> dict[bytes, list[bytes]]:
    found: dict[bytes, list[bytes]] = {}
    for name, value in request.headers:
        found.setdefault(name, []).append(value)
    return found


def test_the_upstream_head_carries_the_request_the_forwarded_fields_and_the_trace() -> None:
    trace = extract({b"traceparent": TRACEPARENT})
    headers = rendered((b"Accept", b"text/plain"), (b"X-Custom", b"a b"))
    head = request_head(b"GET", b"/items?x=1", b"shop:8080", headers, FORWARDED, b"", b"", inject(trace))
    request = parse(head)
    found = fields(request)
    assert (request.method, request.target, request.http_version) == (b"GET", b"/items?x=1", b"1.1")
    assert found[b"host"] == [b"shop:8080"]
    assert found[b"accept"] == [b"text/plain"] and found[b"x-custom"] == [b"a b"]
    assert found[b"x-forwarded-for"] == [b"10.0.0.1, 127.0.0.1"]
    assert found[b"x-forwarded-proto"] == [b"https"] and found[b"x-forwarded-host"] == [b"shop.example"]
    assert found[b"x-request-id"] == [b"req-1"]
    assert found[b"traceparent"][0].startswith(b"00-0af7651916cd43dd8448eb211c80319c-")
    assert b"transfer-encoding" not in found and b"upgrade" not in found


def test_a_chunked_body_is_announced_as_rechunked_and_an_upgrade_asked_again() -> None:
    trace = extract({})
    chunked = parse(request_head(b"POST", b"/", b"h", [], FORWARDED, b"chunked", b"", inject(trace)))
    assert fields(chunked)[b"transfer-encoding"] == [b"chunked"]
    upgrade = parse(request_head(b"GET", b"/ws", b"h", [], FORWARDED, b"", b"websocket", inject(trace)))
    assert fields(upgrade)[b"upgrade"] == [b"websocket"] and fields(upgrade)[b"connection"] == [b"upgrade"]


def test_connection_options_names_the_fields_to_drop_but_never_the_framing() -> None:
    assert connection_options(b"keep-alive") == [] and connection_options(b"Close") == []
    assert connection_options(b"X-Secret, keep-alive") == [b"x-secret"]
    # Naming Content-Length or Transfer-Encoding must not drop the framing of a message forwarded with its body.
    assert connection_options(b"content-length, transfer-encoding, upgrade, x-a") == [b"x-a"]


def test_drop_headers_removes_exactly_the_listed_fields() -> None:
    headers = rendered((b"X-Secret", b"1"), (b"Accept", b"*/*"), (b"x-secret", b"2"))
    assert drop_headers(headers, [b"x-secret"]) == rendered((b"Accept", b"*/*"))
    assert drop_headers(headers, []) == headers


@pytest.mark.parametrize(
    "name",
    [b"content-length", b"transfer-encoding", b"host", b"authorization", b"x-request-id", b"traceparent", b"te"],
)
def test_trailers_never_carry_framing_routing_identity_or_trace_fields(name: bytes) -> None:
    assert not forwardable_trailer(name)


def test_ordinary_trailers_and_grpc_status_are_forwarded_but_proxy_fields_are_not() -> None:
    assert forwardable_trailer(b"grpc-status") and forwardable_trailer(b"x-checksum")
    assert not forwardable_trailer(b"proxy-authorization")


def test_framing_beyond_chunk_sizes_is_bounded_by_the_header_limit() -> None:
    max_head = 1024
    chunks, data = 10, 5000
    allowed = data + CHUNK_FRAMING * chunks + 2 * max_head + MAX_LINE
    assert not framing_exceeds(allowed, data, chunks, max_head)
    assert framing_exceeds(allowed + 1, data, chunks, max_head)
