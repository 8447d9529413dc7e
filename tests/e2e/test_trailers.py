"""Trailers both ways on a real gateway: what is forwarded, what is dropped, and the limits on their size.

Trailer fields share the head's limits (`max_header_bytes`, `max_headers`) and never change a request's
identity or routing (RFC 9110 §6.5.1). A trailer that never ends is cut off after about the header limit, not
gathered whole; an upstream's response head and trailers have the same limits.

Each rule is tested alone, without sockets, in the unit tier (tests/gateway/test_exchange.py, test_proxy.py,
test_upstream.py); the tests here keep one end-to-end check per behaviour on a real process.
"""

from __future__ import annotations

import select
import socket

import psutil
import pytest

from tests.conftest import (
    Connect,
    Scripted,
    StartGateway,
    gateway_config,
    hello,
    hop_records,
    is_one_line_reason,
    listeners,
)
from tests.e2e.servers import Exchange
from tests.e2e.wire import Wire, request

KIB = 1024
MIB = 1024 * KIB
FORGED_ID = "forged-by-a-trailer"


def chunked_post(target: str = "/sha256", headers: list[tuple[str, str]] | None = None) -> bytes:
    return request("POST", target, headers=[("Transfer-Encoding", "chunked"), *(headers or [])])


def trailer_block(*fields: tuple[str, str]) -> bytes:
    return (
        b"5\r\nhello\r\n0\r\n" + b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in fields) + b"\r\n"
    )


def read_refusal(wire: Wire, status: int) -> None:
    response = wire.read_response()
    assert response.status == status, (response.start, response.body)
    assert is_one_line_reason(response.body), response.body
    assert response.header("connection") == "close"
    wire.expect_eof(timeout=5)


def test_request_trailers_are_forwarded_but_never_change_identity(
    start_gateway: StartGateway, scripted: Scripted, connect: Connect
) -> None:
    upstream = scripted()
    config = gateway_config(hello(upstream.address), listen=listeners("edge"), preserve_request_id=False)
    gw = start_gateway(config)
    wire = connect(gw.addresses["edge"])
    wire.send(chunked_post())
    wire.send(
        trailer_block(
            ("X-Checksum", "sha256:abc"),
            ("X-Request-Id", FORGED_ID),
            ("Host", "another-service"),
            ("Authorization", "Bearer stolen"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("Set-Cookie", "session=1"),
            ("Proxy-Anything", "1"),
            ("Grpc-Status", "0"),
        )
    )
    response = wire.read_response()
    assert response.status == 200, response.body
    request_id = response.header("x-request-id")
    assert request_id is not None and request_id != FORGED_ID
    seen = upstream.requests[-1]
    assert seen.header("x-request-id") == request_id, "the upstream and the client were told different IDs"
    assert seen.trailers == [("X-Checksum", "sha256:abc"), ("Grpc-Status", "0")]
    assert response.json()["size"] == 5
    # The ring of recent requests knows the request by its real ID only.
    assert hop_records(gw, FORGED_ID) == []
    hops = hop_records(gw, request_id)
    assert [hop["request_id"] for hop in hops] == [request_id]
    assert [hop["destination"] for hop in hops] == ["hello"]


@pytest.mark.parametrize(
    ("trailers", "status"),
    [
        pytest.param([("x-t", "a" * (3 * KIB))], 200, id="head-and-trailers-under-8KiB"),
        pytest.param([("x-t", "a" * (5 * KIB))], 400, id="head-and-trailers-over-8KiB"),
        pytest.param([(f"x-t{i}", "1") for i in range(9)], 200, id="20-fields-with-the-head"),
        pytest.param([(f"x-t{i}", "1") for i in range(10)], 400, id="21-fields-with-the-head"),
    ],
)
def test_trailers_count_against_the_header_limits(
    start_gateway: StartGateway,
    scripted: Scripted,
    connect: Connect,
    trailers: list[tuple[str, str]],
    status: int,
) -> None:
    upstream = scripted()
    limits = {"max_header_bytes": "8KiB", "max_headers": 20}
    gw = start_gateway(gateway_config(hello(upstream.address), limits=limits))
    wire = connect(gw.inbound)
    head = [("x-pad", "p" * (4 * KIB))] + [(f"x-h{i}", "1") for i in range(8)]  # 11 fields with Host and TE
    wire.send(chunked_post(headers=head) + trailer_block(*trailers))
    if status == 200:
        response = wire.read_response()
        assert response.status == 200, response.body
        assert upstream.requests[-1].trailers == trailers
    else:
        read_refusal(wire, 400)


def test_a_trailer_that_never_ends_is_cut_off_early(
    start_gateway: StartGateway, scripted: Scripted, connect: Connect
) -> None:
    """A 64 MiB trailer field cost 7.7 s of CPU and 100 MB of memory when it was gathered whole; it must be
    refused once it passes about the header limit, while other clients of the same worker are served."""
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address)))
    process = psutil.Process(gw.proc.pid)
    rss_before = process.memory_info().rss
    sock = socket.create_connection(gw.inbound, timeout=10)
    sock.sendall(chunked_post() + b"5\r\nhello\r\n0\r\nx-endless: ")
    piece = b"a" * (64 * KIB)
    sent = 0
    answered = False
    while sent < 64 * MIB:
        readable, writable, _ = select.select([sock], [sock], [], 5)
        if readable:
            answered = True
            break
        assert writable, "the gateway neither read nor answered for 5 s"
        sock.sendall(piece)
        sent += len(piece)
    assert answered, "the whole 64 MiB trailer was read without a refusal"
    wire = Wire(sock)
    try:
        read_refusal(wire, 400)
    finally:
        wire.close()
    assert sent < 16 * MIB, f"{sent} bytes sent before the refusal"
    assert process.memory_info().rss - rss_before < 20 * MIB
    second = connect(gw.inbound)
    second.send(request("GET", "/sha256"))
    assert second.read_response().status == 200


# Responses: the upstream's head and trailers.


def answer_with(raw: bytes):  # type: ignore[no-untyped-def]
    def answer(exchange: Exchange) -> None:
        exchange.wire.send(raw)

    return answer


def test_response_trailers_are_relayed_without_forbidden_fields(
    start_gateway: StartGateway, scripted: Scripted, connect: Connect
) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n5\r\nhello\r\n0\r\n"
        b"X-Checksum: 1\r\nX-Request-Id: made-up\r\nSet-Cookie: a=b\r\nGrpc-Status: 0\r\n\r\n"
    )
    upstream = scripted(answer_with(raw), name="trailing")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    for _ in range(2):  # the connection stays usable after a response with trailers
        wire.send(request("GET", "/"))
        response = wire.read_response()
        assert response.status == 200
        assert response.body == b"hello"
        assert response.trailers == [("X-Checksum", "1"), ("Grpc-Status", "0")]
        assert response.header("x-request-id") != "made-up"
