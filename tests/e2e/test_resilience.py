"""Resilience end to end: a real gateway process in front of real upstreams, all on 127.0.0.1.

Covers weighted splits, retries (one retried 503, the budget under load, a burst of resets), connect failover,
timeouts (per-try, request, connect), passive outlier ejection, active health checks, circuit breakers, the balancing
policies, and an upstream SIGKILLed under load.

Upstreams are the shared `UpstreamServer` (tests/e2e/upstream_app.py) where its behaviour suffices, and a
`ScriptedUpstream` (tests/e2e/servers.py) where a test must decide per request what an upstream answers, and when.

Each rule is tested alone, without sockets, in the unit tier (tests/gateway/test_exchange.py, test_proxy.py,
test_upstream.py); the tests here keep one end-to-end check per behaviour on a real process.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from gateway.routing import MIN_RETRIES_PER_SECOND, RETRY_WINDOW
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
from tests.e2e.servers import SERVER_TIMEOUT, Exchange, UpstreamProcess, always, blackhole_address, refusing_address
from tests.e2e.upstream_app import UpstreamServer

SVC = "hello"


# Talking to the gateway


def client(gw: Gateway, timeout: float = 10.0) -> httpx.Client:
    return httpx.Client(base_url=gw.url(), trust_env=False, timeout=timeout)


def get(c: httpx.Client, path: str = "/echo", host: str = SVC, **headers: str) -> httpx.Response:
    return c.get(path, headers={"host": host, **{k.replace("_", "-"): v for k, v in headers.items()}})


def served_by(responses: list[httpx.Response]) -> Counter[str | None]:
    return Counter(r.headers.get("x-upstream") for r in responses)


def assert_local_reply(response: httpx.Response, status: int, reason: str) -> None:
    """A response the gateway made itself: the status, a one-line reason, a request ID and no upstream."""
    assert response.status_code == status, response.text
    assert response.text.startswith("meshgate: "), response.text
    assert reason in response.text, response.text
    assert response.headers.get("x-request-id")
    assert "x-upstream" not in response.headers


def timed_get(c: httpx.Client, path: str = "/echo", host: str = SVC) -> tuple[httpx.Response, float]:
    """`get`, and how many seconds it took."""
    started = time.monotonic()
    response = get(c, path, host)
    return response, time.monotonic() - started


# Weighted splits and header routes


def test_weighted_split_90_10_over_2000_requests(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    v1, v2 = start_upstream("v1"), start_upstream("v2")
    config = {
        SVC: {
            "subsets": {"v1": {"endpoints": [v1.address]}, "v2": {"endpoints": [v2.address]}},
            "routes": [{"name": "default", "split": {"v1": 90, "v2": 10}}],
        }
    }
    gw = start_gateway(gateway_config(config))

    def run(n: int) -> list[httpx.Response]:
        with client(gw) as c:
            return [get(c) for _ in range(n)]

    with ThreadPoolExecutor(4) as pool:
        responses = [r for batch in pool.map(run, [500] * 4) for r in batch]
    assert [r.status_code for r in responses] == [200] * 2000
    seen = served_by(responses)
    assert set(seen) == {"v1", "v2"}
    assert abs(seen["v2"] / 2000 - 0.10) <= 0.02, seen
    assert abs(seen["v1"] / 2000 - 0.90) <= 0.02, seen
    assert v1.requests + v2.requests == 2000  # no retries, no duplicates


# Retries


def test_get_retried_on_503_then_succeeds(hello_upstream: UpstreamServer, hello_gateway: Gateway) -> None:
    with client(hello_gateway) as c:  # hello_gateway's service has the default retry policy
        response = get(c, "/fail-first/2")
    assert response.status_code == 200
    assert response.text == "ok\n"
    assert hello_upstream.requests == 3  # 503, 503, 200: the first try and both default retries


def test_retry_budget_bounds_amplification_of_an_overload(start_gateway: StartGateway, scripted: Scripted) -> None:
    """Every try fails with 503 (an overloaded service), and every request would like two retries. The budget
    (Linkerd's: retries up to 20 % of the requests of the last 10 s, plus 10 a second) must hold the load the
    upstream sees near 1.2x, not the 3x that retrying everything would send; and it must still spend itself."""
    requests, budget = 600, 0.2
    upstream = scripted(always(503), name="overloaded")
    policy = {"retries": {"attempts": 2, "budget": f"{budget:.0%}"}, "outlier": {"consecutive_5xx": 1_000_000}}
    gw = start_gateway(gateway_config(hello(upstream.address, **policy)))

    def calls(count: int) -> list[int]:
        with client(gw) as c:
            return [get(c, "/overload").status_code for _ in range(count)]

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        statuses = [status for part in pool.map(calls, [requests // 8] * 8) for status in part]
    elapsed = time.monotonic() - started
    assert statuses == [503] * requests
    tries = len(upstream.requests)
    retries = tries - requests
    reserve = MIN_RETRIES_PER_SECOND * (elapsed + RETRY_WINDOW)  # at most this many windows' worth of the minimum
    assert retries <= budget * requests + reserve, f"{retries} retries for {requests} requests in {elapsed:.1f}s"
    assert retries >= budget * requests * 0.9, f"only {retries} retries: the budget was not spent"
    assert metric(gw, "meshgate_retry_budget_exhausted_total", destination=SVC) > 0


def test_a_burst_of_resets_is_retried_whole(start_gateway: StartGateway, scripted: Scripted) -> None:
    """16 GETs are in flight on one endpoint when it drops them all at once (as a SIGKILLed process does): each
    is retried on the other endpoint. A budget of concurrent retries (Envoy's, at least 3) would fail 13."""
    inflight = 16
    arrived: queue.Queue[Exchange] = queue.Queue()
    release = threading.Event()

    def hold_then_drop(exchange: Exchange) -> None:
        arrived.put(exchange)
        release.wait(SERVER_TIMEOUT)
        exchange.keep_alive = False  # closes without an answer

    dying = scripted(hold_then_drop, name="dying")
    live = scripted(always(200), name="live")
    policy = {"lb": "round_robin", "outlier": {"consecutive_5xx": 1_000_000}}
    gw = start_gateway(gateway_config(hello(dying.address, live.address, **policy)))
    results: list[int] = []

    def call() -> None:
        with client(gw) as c:
            while not release.is_set():  # round robin: about every other request reaches the dying endpoint, held
                response = get(c, "/burst")
                results.append(response.status_code)
                if response.status_code != 200:
                    return

    threads = [threading.Thread(target=call, daemon=True) for _ in range(inflight)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: arrived.qsize() == inflight, timeout=10, what=f"{inflight} requests held by the endpoint")
    finally:
        release.set()
        dying.stop()  # it drops them all, and refuses connections from now on
        for thread in threads:
            thread.join(timeout=15)
    assert results.count(200) == len(results) and len(results) >= inflight, Counter(results)
    assert len(live.requests) == len(results)  # every held request was answered by the live endpoint


def test_connect_failure_fails_over_outside_attempts_and_budget(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    """With retries off entirely, a request whose endpoint refuses connections still reaches the live one: it
    was never sent, so trying another endpoint costs nobody anything. The refusing endpoint is ejected at once."""
    live = start_upstream("live")
    with refusing_address() as dead:
        policy = {"lb": "round_robin", "retries": {"attempts": 0}}
        gw = start_gateway(gateway_config(hello(dead, live.address, **policy)))

        def call(index: int) -> tuple[int, str]:
            with client(gw) as c:
                response = c.post(f"/echo/{index}", content=b"x" * index, headers={"host": SVC})
                return response.status_code, response.text

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(call, range(1, 161)))
    assert [status for status, _ in answers] == [200] * 160, [text for status, text in answers if status != 200]
    assert live.requests == 160
    assert metric(gw, "meshgate_outlier_ejections_total", destination=SVC) == 1
    # Ejected at the first refusal: only requests already on their way to it failed over.
    assert 1 <= metric(gw, "meshgate_connect_failovers_total", destination=SVC) <= 16
    assert metric(gw, "meshgate_retries_total", destination=SVC) == 0


# Timeouts


@pytest.mark.parametrize(
    ("policy", "reason", "seconds", "tries"),
    [
        pytest.param(  # three tries of 200 ms, not the upstream's 3 s
            {"timeouts": {"per_try": "200ms", "request": "10s"}, "retries": {"attempts": 2}},
            "0.2s per-try timeout",
            (0.6, 2.0),
            (3, 3),
            id="per-try-timeout-retried",
        ),
        pytest.param(  # the overall deadline is final: no retry after it
            {"timeouts": {"per_try": "5s", "request": "300ms"}},
            "0.3s request timeout",
            (0.28, 1.5),
            (1, 1),
            id="request-timeout",
        ),
        pytest.param(
            {"timeouts": {"per_try": "200ms", "request": "500ms"}, "retries": {"attempts": 5}},
            "0.5s request timeout",
            (0.45, 1.5),
            (1, 3),
            id="request-timeout-bounds-retries",
        ),
    ],
)
def test_timeout_is_504(
    start_gateway: StartGateway,
    start_upstream: StartUpstream,
    policy: dict[str, Any],
    reason: str,
    seconds: tuple[float, float],
    tries: tuple[int, int],
) -> None:
    upstream = start_upstream("slow")
    gw = start_gateway(gateway_config(hello(upstream.address, **policy)))
    with client(gw) as c:
        response, elapsed = timed_get(c, "/delay/3000")
    assert_local_reply(response, 504, reason)
    assert seconds[0] <= elapsed < seconds[1], elapsed
    fewest, most = tries
    wait_for(lambda: upstream.requests >= fewest, timeout=5, what=f"{fewest} tries at the upstream")
    assert fewest <= upstream.requests <= most


def test_connect_timeout(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    live = start_upstream("live")
    with blackhole_address() as hole:
        policy = {"timeouts": {"connect": "300ms", "per_try": "5s"}, "retries": {"attempts": 0}}
        retrying = {
            "timeouts": {"connect": "300ms", "per_try": "5s"},
            "lb": "round_robin",
            "outlier": {"consecutive_5xx": 1000},
        }
        config = {"hole": service(hole, **policy), **hello(hole, live.address, **retrying)}
        gw = start_gateway(gateway_config(config))
        with client(gw) as c:
            response, elapsed = timed_get(c, host="hole")
            assert_local_reply(response, 503, f"connect to {hole} timed out after 0.3s")
            assert 0.28 <= elapsed < 1.5, elapsed
            # with a live endpoint next to it, a connect timeout is a connect failure like any other: retried
            timings = []
            for _ in range(6):
                response, elapsed = timed_get(c, "/echo")
                timings.append(elapsed)
                assert response.status_code == 200
                assert response.headers["x-upstream"] == "live"
    assert max(timings) >= 0.28  # round robin put the blackhole first for some of them
    assert live.requests == 6


# Passive outlier ejection


def test_outlier_ejected_after_consecutive_5xx(
    start_gateway: StartGateway, start_upstream: StartUpstream, scripted: Scripted
) -> None:
    good = start_upstream("good")
    bad = scripted(always(500), name="bad")
    base_ejection = 2.0
    policy = {
        "lb": "round_robin",
        "outlier": {"consecutive_5xx": 5, "base_ejection": f"{base_ejection:g}s", "max_ejected": "50%"},
    }
    gw = start_gateway(gateway_config(hello(bad.address, good.address, **policy)))
    with client(gw) as c:
        before = [get(c) for _ in range(10)]
        ejected_at = time.monotonic()
        # round robin alternates, so the bad endpoint got exactly 5 and answered each with a 500
        assert served_by(before) == {"bad": 5, "good": 5}
        assert sorted(r.status_code for r in before) == [200] * 5 + [500] * 5
        assert len(bad.requests) == 5
        during = [get(c) for _ in range(40)]
        assert time.monotonic() - ejected_at < base_ejection * 0.75, "too slow to observe the ejection window"
        assert served_by(during) == {"good": 40}
        assert len(bad.requests) == 5

        def bad_back() -> bool:
            return bool(get(c).headers.get("x-upstream") == "bad")

        wait_for(bad_back, timeout=base_ejection + 5, interval=0.05, what="the ejected endpoint to return")
        assert time.monotonic() - ejected_at >= base_ejection - 0.2


# Active health checks


def test_active_health_check_takes_endpoint_out_and_back(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    a, b = start_upstream("a"), start_upstream("b")
    policy = {
        "lb": "round_robin",
        "health": {"path": "/healthz", "interval": "200ms", "timeout": "500ms", "healthy": 1, "unhealthy": 1},
    }
    gw = start_gateway(gateway_config(hello(a.address, b.address, **policy)))
    with client(gw) as c, httpx.Client(trust_env=False, timeout=5) as direct:
        assert served_by([get(c) for _ in range(10)]) == {"a": 5, "b": 5}

        assert direct.get(f"http://{b.address}/health/off").status_code == 200
        wait_for(lambda: served_by([get(c) for _ in range(6)]) == {"a": 6}, timeout=5, what="b to be taken out")
        assert served_by([get(c) for _ in range(40)]) == {"a": 40}

        assert direct.get(f"http://{b.address}/health/on").status_code == 200
        wait_for(lambda: served_by([get(c) for _ in range(6)])["b"] > 0, timeout=5, what="b to come back")
        assert served_by([get(c) for _ in range(40)]) == {"a": 20, "b": 20}


# Circuit breakers


def test_circuit_breaker_max_requests(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    upstream = start_upstream("slow")
    policy = {"limits": {"max_requests": 2}, "timeouts": {"per_try": "5s"}}
    gw = start_gateway(gateway_config(hello(upstream.address, **policy)))

    def slow() -> httpx.Response:
        with client(gw) as c:
            return get(c, "/delay/1000")

    with ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(slow) for _ in range(2)]
        wait_for(lambda: upstream.requests == 2, timeout=5, what="two slow requests at the upstream")
        with client(gw) as c:
            third = get(c, "/echo")
        assert not any(f.done() for f in in_flight), "the slow requests finished too early to test the breaker"
        assert_local_reply(third, 503, "circuit breaker")
        assert [f.result().status_code for f in in_flight] == [200, 200]
    assert upstream.requests == 2  # the refused request never reached the upstream
    with client(gw) as c:
        assert get(c, "/echo").status_code == 200  # closed again once the others finished


# Load-balancing policies


def test_hash_policy_keeps_a_user_on_one_endpoint(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    ups = [start_upstream(f"e{i}") for i in range(3)]
    gw = start_gateway(gateway_config(hello(*(u.address for u in ups), lb="hash(header:x-user)")))
    homes: dict[str, set[str]] = {}
    with client(gw) as c:
        for _ in range(5):
            for user in range(30):
                response = get(c, x_user=f"user-{user}")
                assert response.status_code == 200
                homes.setdefault(f"user-{user}", set()).add(response.headers["x-upstream"])
    assert all(len(home) == 1 for home in homes.values()), homes
    assert len({home.pop() for home in homes.values()}) >= 2  # users are spread, not all on one endpoint


def test_round_robin_spreads_evenly(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    ups = [start_upstream(f"e{i}") for i in range(3)]
    gw = start_gateway(gateway_config(hello(*(u.address for u in ups), lb="round_robin")))
    with client(gw) as c:
        responses = [get(c) for _ in range(300)]
    assert served_by(responses) == {"e0": 100, "e1": 100, "e2": 100}
    assert [u.requests for u in ups] == [100, 100, 100]


# An upstream process SIGKILLed under load


@pytest.mark.slow
def test_sigkill_one_endpoint_under_load_no_client_errors(
    start_gateway: StartGateway, upstream_processes: Callable[..., UpstreamProcess]
) -> None:
    """SIGKILL one of three endpoints under 16 keep-alive connections of GETs and POSTs: no GET fails (resets
    are retried, connect failures fail over), and no request fails that had not reached the dying process. A POST
    it had already read may fail with the reset (it is not idempotent), and only so."""
    ups = [upstream_processes(f"p{i}") for i in range(3)]
    victim = ups[1]
    gw = start_gateway(gateway_config(hello(*(u.address for u in ups))))  # default ewma, default retries
    stop = threading.Event()
    lock = threading.Lock()
    served: list[tuple[float, str]] = []
    errors: list[str] = []
    posts_reset: list[str] = []

    def load(index: int) -> None:
        method = "POST" if index % 2 else "GET"
        with client(gw, timeout=10) as c:
            while not stop.is_set():
                try:
                    response = c.request(method, "/echo/load", content=b"p" * 100, headers={"host": SVC})
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(f"{method}: {exc!r}")
                    continue
                with lock:
                    if response.status_code == 200:
                        served.append((time.monotonic(), response.headers["x-upstream"]))
                    elif method == "POST" and "closed the connection before responding" in response.text:
                        posts_reset.append(response.text.strip())
                    else:
                        errors.append(f"{method} {response.status_code}: {response.text.strip()}")

    def count(name: str, since: float = 0.0) -> int:
        with lock:
            return sum(1 for at, who in served if who == name and at >= since)

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(16)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        wait_for(
            lambda: time.monotonic() - started >= 2.0 and count(victim.name) >= 50,
            timeout=15,
            what="steady load reaching the victim",
        )
        served_before = count(victim.name)
        victim.proc.kill()
        victim.proc.wait(timeout=10)
        killed_at = time.monotonic()
        wait_for(
            lambda: time.monotonic() - killed_at >= 2.0 and count("p0", killed_at) + count("p2", killed_at) >= 100,
            timeout=15,
            what="load to run on after the kill",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
    assert errors == [], f"{len(errors)} client-visible errors, first: {errors[:5]}"
    assert len(posts_reset) <= 8, posts_reset  # at most one in flight per POSTing connection
    assert served_before >= 50
    assert count(victim.name, killed_at + 0.5) == 0  # nothing answered from a dead process
