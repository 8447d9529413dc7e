"""`meshgate_request_first_attempts_total` end to end: a real gateway process, real upstreams, all on 127.0.0.1.

Retries hide an upstream's faults from `meshgate_requests_total` (a 503 retried into a 200 counts as a 200), so the
gateway also counts each request under the outcome of its first attempt (issue 14, automated canary analysis).
Checked here: a 503 retried into a 200, a per-try timeout retried (504), a connect failure that failed over to a
live endpoint (not an attempt: 200), a gRPC Trailers-Only UNAVAILABLE retried (200 with grpc-status 14), and the
sum across two workers. Every request is counted once in each counter, so their totals per series agree.

The rule and the arithmetic are tested without sockets in tests/gateway/test_telemetry.py and test_control.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc  # type: ignore[import-untyped]
import httpx
import pytest

from tests.conftest import (
    Gateway,
    Scripted,
    StartGateway,
    StartUpstream,
    gateway_config,
    hello,
    metric,
    service,
    wait_for,
)
from tests.e2e.servers import SERVER_TIMEOUT, Exchange, refusing_address

SVC = "hello"
REQUESTS = "meshgate_requests_total"
FIRST = "meshgate_request_first_attempts_total"


def get(gw: Gateway, path: str = "/", count: int = 1) -> list[int]:
    with httpx.Client(base_url=gw.url(), trust_env=False, timeout=10.0) as client:
        return [client.get(path, headers={"host": SVC}).status_code for _ in range(count)]


def counts(gw: Gateway, name: str, destination: str = SVC) -> dict[tuple[str, str], float]:
    """`name`'s samples of `destination` by (code, grpc_status), from the admin /metrics."""
    text = httpx.get(gw.url("admin") + "/metrics", timeout=5, trust_env=False).text
    found: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and f'destination="{destination}"' in line:
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
            code = (labels["code"].strip('"'), labels["grpc_status"].strip('"'))
            found[code] = found.get(code, 0) + float(line.rsplit(" ", 1)[1])
    return found


def alternating(exchange: Exchange) -> None:
    """503 to every other request, starting with the first: each request's first try fails, its retry succeeds
    (as long as the client sends one request at a time)."""
    server = exchange.server
    exchange.reply(503 if len(server.requests) % 2 else 200)


def test_a_503_retried_into_a_200_counts_its_first_attempt_as_503(
    start_gateway: StartGateway, scripted: Scripted
) -> None:
    upstream = scripted(alternating, name="flaky")
    gw = start_gateway(gateway_config(hello(upstream.address)))  # the default retry policy retries a 503
    assert get(gw, "/flaky", 3) == [200] * 3
    assert len(upstream.requests) == 6  # 503, 200 three times
    assert metric(gw, "meshgate_retries_total", destination=SVC) == 3
    assert counts(gw, REQUESTS) == {("200", ""): 3}, "a retried request is one request, counted by its answer"
    assert counts(gw, FIRST) == {("503", ""): 3}


def test_a_request_never_retried_has_its_answer_as_first_attempt(
    start_gateway: StartGateway, scripted: Scripted
) -> None:
    served = scripted(alternating, name="flaky")
    gw = start_gateway(gateway_config(hello(served.address, retries={"attempts": 0})))
    assert get(gw, "/unretried", 4) == [503, 200, 503, 200]
    assert counts(gw, REQUESTS) == counts(gw, FIRST) == {("200", ""): 2, ("503", ""): 2}


def test_a_per_try_timeout_retried_counts_its_first_attempt_as_504(
    start_gateway: StartGateway, scripted: Scripted
) -> None:
    release = threading.Event()

    def stall_the_first(exchange: Exchange) -> None:
        if len(exchange.server.requests) == 1:
            release.wait(SERVER_TIMEOUT)  # past the per-try timeout: the gateway gives up on this try
            exchange.keep_alive = False  # then closes without an answer
            return
        exchange.reply(200)

    upstream = scripted(stall_the_first, name="stalling")
    policy = {"timeouts": {"per_try": "200ms", "request": "10s"}, "retries": {"attempts": 1}}
    gw = start_gateway(gateway_config(hello(upstream.address, **policy)))
    try:
        assert get(gw, "/stall") == [200]
    finally:
        release.set()
    assert len(upstream.requests) == 2
    assert counts(gw, REQUESTS) == {("200", ""): 1}
    assert counts(gw, FIRST) == {("504", ""): 1}  # the status the per-try timeout would have answered


def test_a_connect_failover_is_not_an_attempt(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    """A refused connect cost that endpoint nothing: the request moves to the live one, and its first attempt is
    the one that answered (linkerd2-proxy's view), even with retries on connect failures allowed."""
    live = start_upstream("live")
    with refusing_address() as dead:
        policy = {"lb": "round_robin", "retries": {"on": ["connect-failure", "5xx"]}}
        gw = start_gateway(gateway_config(hello(dead, live.address, **policy)))
        assert get(gw, "/echo", 6) == [200] * 6
    assert metric(gw, "meshgate_connect_failovers_total", destination=SVC) >= 1  # round robin tried `dead` once
    assert metric(gw, "meshgate_retries_total", destination=SVC) == 0
    assert counts(gw, REQUESTS) == counts(gw, FIRST) == {("200", ""): 6}


def test_workers_sum_first_attempts_in_one_scrape(start_gateway: StartGateway, scripted: Scripted) -> None:
    upstream = scripted(alternating, name="flaky")
    config = gateway_config(hello(upstream.address), listen={"inbound": "127.0.0.1:0", "admin": "127.0.0.1:0"})
    gw = start_gateway(config, "--workers", "2")
    requests = 8
    for _ in range(requests):  # a new connection each: the kernel spreads them over the workers
        assert get(gw, "/flaky") == [200]
    # Workers push their stats each second: poll until the sum arrives, then it must be exactly this.
    wait_for(lambda: counts(gw, REQUESTS).get(("200", "")) == requests, timeout=5.0, what=f"{requests} requests")
    wait_for(lambda: counts(gw, FIRST).get(("503", "")) == requests, timeout=5.0, what="their first attempts")
    assert counts(gw, FIRST) == {("503", ""): requests}
    assert counts(gw, REQUESTS) == {("200", ""): requests}


# gRPC

GRPC_SERVICE = "flaky-rpc"
METHOD = "/meshgate.test.Flaky/Call"


class FlakyRpc:
    """A gRPC server whose one method answers UNAVAILABLE (Trailers-Only: nothing sent before the status) to the
    first call, then echoes. Raw bytes, no protos."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.unary_unary_rpc_method_handler(self.call)
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("meshgate.test.Flaky", {"Call": handler})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def call(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls += 1
            first = self.calls == 1
        if first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return request


@pytest.fixture
def flaky_rpc() -> Iterator[FlakyRpc]:
    server = FlakyRpc()
    yield server
    server.server.stop(None)


def test_a_grpc_unavailable_retried_counts_its_first_attempt_as_grpc_status_14(
    start_gateway: StartGateway, flaky_rpc: FlakyRpc
) -> None:
    retries = {"attempts": 2, "on": ["unavailable"], "budget": "100%"}
    grpc_service = service(f"127.0.0.1:{flaky_rpc.port}", protocol="grpc", retries=retries)
    gw = start_gateway(gateway_config({GRPC_SERVICE: grpc_service}))
    host, port = gw.addresses["outbound"]
    with grpc.insecure_channel(f"{host}:{port}", options=[("grpc.default_authority", GRPC_SERVICE)]) as channel:
        call = channel.unary_unary(METHOD)
        assert call(b"ping", timeout=10) == b"ping"
        assert call(b"pong", timeout=10) == b"pong"  # not retried: its first attempt is its answer
    assert flaky_rpc.calls == 3
    assert metric(gw, "meshgate_retries_total", destination=GRPC_SERVICE) == 1
    assert counts(gw, REQUESTS, GRPC_SERVICE) == {("200", "0"): 2}
    assert counts(gw, FIRST, GRPC_SERVICE) == {("200", "0"): 1, ("200", "14"): 1}
