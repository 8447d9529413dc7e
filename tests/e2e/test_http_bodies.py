"""HTTP/1.1 bodies end to end: streamed in both directions (with backpressure and bounded memory), every framing,
HEAD, 204, 304 and 100-continue.

Large bodies are the deterministic `pattern` (tests/e2e/servers.py), checked by size and SHA-256 on the far side.

Each rule is tested alone, without sockets, in the unit tier (tests/gateway/test_exchange.py, test_proxy.py,
test_upstream.py); the tests here keep one end-to-end check per behaviour on a real process.
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Connect, Gateway, Scripted, StartGateway, StartUpstream, gateway_config, hello, wait_for
from tests.e2e.servers import MiB, pattern, pattern_sha256
from tests.e2e.wire import Message, Wire, request

# Large transfers take longer than the default 1 s per-try / 15 s request timeouts on a loaded machine;
# these tests are about streaming, not timeouts.
PATIENT = {"timeouts": {"per_try": "60s", "request": "120s"}}
MEMORY_LIMIT_KIB = 150 * 1024


def http_client(gw: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gw.url(), trust_env=False, timeout=30.0, headers={"host": "hello"})


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def assert_not_buffered(gw: Gateway, baseline_kib: int, size: int) -> None:
    """The gateway's peak RSS grew by well under the body's size: it streamed rather than held the body."""
    growth = proc_status_kib(gw.proc.pid, "VmHWM") - baseline_kib
    assert growth * 1024 < size // 2, f"gateway peak RSS grew {growth // 1024} MiB for a {size // MiB} MiB body"


# --- bodies ----------------------------------------------------------------------------------------------


def test_generator_upload_streams_chunked(start_gateway: StartGateway, scripted: Scripted) -> None:
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address)))
    size = 3 * MiB + 11
    with http_client(gw) as client:
        response = client.post("/sha256", content=pattern(size))
    assert response.status_code == 200
    echo = response.json()
    assert echo["size"] == size and echo["sha256"] == pattern_sha256(size)
    assert echo["headers"]["transfer-encoding"] == ["chunked"]


def test_close_delimited_response_relayed_fully(
    start_gateway: StartGateway, hello_wire: Wire, scripted: Scripted, connect: Connect
) -> None:
    hello_wire.send(request("GET", "/close"))
    response = hello_wire.read_response()
    assert response.status == 200 and response.body == b"until-close"
    assert response.header("connection") == "close"

    big = scripted()
    gw2 = start_gateway(gateway_config(hello(big.address, **PATIENT)))
    size = 5 * MiB + 3
    wire2 = connect(gw2.inbound)
    wire2.send(request("GET", f"/stream-close/{size}"))
    digest = hashlib.sha256()
    streamed = wire2.read_response(sink=digest.update)
    assert streamed.status == 200
    assert streamed.size == size and digest.hexdigest() == pattern_sha256(size)


def test_large_download_intact(start_gateway: StartGateway, scripted: Scripted) -> None:
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address, **PATIENT)))
    size = 50 * MiB + 5
    baseline = proc_status_kib(gw.proc.pid, "VmHWM")
    digest = hashlib.sha256()
    received = 0
    with http_client(gw) as client, client.stream("GET", f"/stream/{size}") as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(size)
        for piece in response.iter_raw():
            digest.update(piece)
            received += len(piece)
    assert received == size
    assert digest.hexdigest() == pattern_sha256(size)
    assert_not_buffered(gw, baseline, size)


def test_large_content_length_upload_intact(start_gateway: StartGateway, scripted: Scripted, connect: Connect) -> None:
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address, **PATIENT)))
    size = 50 * MiB + 9
    baseline = proc_status_kib(gw.proc.pid, "VmHWM")
    wire = connect(gw.inbound)
    wire.send(request("POST", "/sha256", headers=[("Content-Length", str(size))]))
    for piece in pattern(size):
        wire.send(piece)
    response = wire.read_response(timeout=60)
    assert response.status == 200
    echo = response.json()
    assert echo["size"] == size and echo["sha256"] == pattern_sha256(size)
    assert echo["headers"]["content-length"] == [str(size)]
    assert_not_buffered(gw, baseline, size)


def test_large_chunked_upload_intact(start_gateway: StartGateway, scripted: Scripted) -> None:
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address, **PATIENT)))
    size = 50 * MiB + 13
    baseline = proc_status_kib(gw.proc.pid, "VmHWM")
    with http_client(gw) as client:
        response = client.post("/sha256", content=pattern(size), timeout=60)
    assert response.status_code == 200
    echo = response.json()
    assert echo["size"] == size and echo["sha256"] == pattern_sha256(size)
    assert_not_buffered(gw, baseline, size)


# --- backpressure and memory -----------------------------------------------------------------------------


def test_stalled_client_does_not_grow_gateway_memory(
    start_gateway: StartGateway, scripted: Scripted, connect: Connect
) -> None:
    upstream = scripted()
    gw = start_gateway(gateway_config(hello(upstream.address, **PATIENT)))
    size = 200 * MiB
    wire = connect(gw.inbound, timeout=30, rcvbuf=64 * 1024)
    wire.send(request("GET", f"/stream/{size}"))
    head = wire.read_head()
    assert head is not None and Message(*head).header("content-length") == str(size)

    # Read nothing more. The upstream writes as fast as the gateway takes bytes; it must end up blocked.
    peak = 0

    def settled() -> bool:
        nonlocal peak
        peak = max(peak, proc_status_kib(gw.proc.pid, "VmRSS"))
        stalled = time.monotonic() - upstream.progress_at > 1.0
        return upstream.done_sending or peak > MEMORY_LIMIT_KIB or stalled

    wait_for(settled, timeout=60, interval=0.05, what="the upstream to block or the gateway to balloon")
    assert peak < MEMORY_LIMIT_KIB, f"gateway RSS reached {peak // 1024} MiB while the client read nothing"
    assert not upstream.done_sending, "the gateway read the whole response while its client read nothing"
    assert upstream.sent < size // 4, f"{upstream.sent} bytes left the upstream while the client read nothing"

    digest = hashlib.sha256()
    already = bytes(wire.buffer)
    wire.buffer.clear()
    digest.update(already)
    wire.stream(size - len(already), digest.update)
    assert digest.hexdigest() == pattern_sha256(size)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_gib_upload_in_bounded_memory(
    start_gateway: StartGateway, start_upstream: StartUpstream, connect: Connect
) -> None:
    upstream = start_upstream("v1")
    timeouts = {"timeouts": {"per_try": "600s", "request": "600s"}}
    gw = start_gateway(gateway_config(hello(upstream.address, **timeouts)))
    size = 1 << 30
    block = memoryview(random.Random(3).randbytes(MiB))
    wire = connect(gw.inbound, timeout=120)
    wire.send(request("POST", "/count", headers=[("Content-Length", str(size))]))
    for _ in range(size // MiB):
        wire.send(block)
    response = wire.read_response(timeout=300)
    assert response.status == 200
    assert response.body == b"1073741824"
    peak = proc_status_kib(gw.proc.pid, "VmHWM")
    assert peak < MEMORY_LIMIT_KIB, f"gateway peak RSS {peak // 1024} MiB for a streamed 1 GiB upload"


# --- bodiless responses, 100-continue --------------------------------------------------------------------


def test_head_gets_headers_without_body(hello_wire: Wire) -> None:
    hello_wire.send(request("HEAD", "/bytes/1000"))
    head = hello_wire.read_response(method="HEAD")
    assert head.status == 200
    assert head.header("content-length") == "1000"
    assert head.header("x-request-id")
    hello_wire.send(request("GET", "/echo/next"))
    following = hello_wire.read_response()  # would hold body bytes of the HEAD if any had been relayed
    assert following.status == 200 and following.json()["path"] == "/echo/next"


def test_head_204_304_keep_both_connections(start_gateway: StartGateway, scripted: Scripted, connect: Connect) -> None:
    upstream = scripted()  # a correct server: no body after HEAD, 204 or 304
    gw = start_gateway(gateway_config(hello(upstream.address)))
    wire = connect(gw.inbound)
    wire.send(request("HEAD", "/resource"))
    head = wire.read_response(method="HEAD")
    assert head.status == 200 and head.header("content-length") == "1234"
    wire.send(request("GET", "/no-content"))
    no_content = wire.read_response()
    assert no_content.status == 204 and no_content.header("x-kind") == "no-content"
    assert no_content.header("transfer-encoding") is None
    wire.send(request("GET", "/not-modified"))
    not_modified = wire.read_response(timeout=3)
    assert not_modified.status == 304 and not_modified.header("etag") == '"v1"'
    wire.send(request("GET", "/resource"))
    full = wire.read_response(timeout=3)
    assert full.status == 200 and full.body == b"r" * 1234
    assert upstream.connections == 1
    assert len(upstream.requests) == 4


def test_204_and_304_have_no_body(hello_wire: Wire) -> None:
    for status in (204, 304):
        hello_wire.send(request("GET", f"/status/{status}"))
        response = hello_wire.read_response()
        assert response.status == status
        assert response.header("transfer-encoding") is None
    hello_wire.send(request("GET", "/echo/then"))
    assert hello_wire.read_response().json()["path"] == "/echo/then"


def test_expect_100_continue(hello_wire: Wire) -> None:
    body = b"b" * 70_000
    hello_wire.send(request("POST", "/count", headers=[("Expect", "100-continue"), ("Content-Length", str(len(body)))]))
    interim = hello_wire.read_response(timeout=5)
    assert interim.start.startswith("HTTP/1.1 100"), interim.start
    hello_wire.send(body)
    final = hello_wire.read_response()
    assert final.status == 200 and final.body == b"70000"
    assert final.header("x-request-id")
