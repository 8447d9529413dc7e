"""`PrometheusSignals` against a real Prometheus scraping a real gateway under real traffic.

`/usr/bin/prometheus` (Debian package `prometheus`) is started by the `start_prometheus` fixture of
tests/e2e/test_prometheus.py (1 s scrapes of the gateway's admin listener, its own data directory under tmp_path).
The answers are checked against Prometheus's own PromQL at the same evaluation time: the counts must agree, and the
quantiles computed here from the bucket increases must equal Prometheus's histogram_quantile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from dashboard.signals.history import SignalsError
from dashboard.signals.prometheus import PrometheusSignals
from dashboard.store import open_store
from dashboard.store.model import GatewayRecord
from tests.conftest import Gateway, wait_for
from tests.dashboard.dashboards import running
from tests.e2e.test_prometheus import PROMETHEUS, Prometheus, free_port, start_prometheus  # noqa: F401 (fixture)
from tests.e2e.upstream_app import UpstreamServer

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,  # two real Prometheus servers, ~25 s; the default run keeps tests/e2e/test_prometheus.py
    pytest.mark.skipif(not PROMETHEUS.exists(), reason="/usr/bin/prometheus not installed (Debian package prometheus)"),
]
WINDOW = 60.0


def instant(prometheus: Prometheus, promql: str, at: float) -> float | None:
    answer = httpx.get(
        f"{prometheus.url}/api/v1/query", params={"query": promql, "time": f"{at:.3f}"}, timeout=5, trust_env=False
    )
    result = answer.json()["data"]["result"]
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


@pytest.fixture
def scraped(
    hello_gateway: Gateway,
    hello_upstream: UpstreamServer,
    start_prometheus: Callable[[tuple[str, int]], Prometheus],  # noqa: F811 (the fixture imported above)
) -> Iterator[tuple[Prometheus, Gateway, list[int]]]:
    """Prometheus scraping `hello_gateway`, after traffic (a 500 in every ten calls, the rest 50 ms) that spanned
    six scrapes (so rate() over 4 s has points) and has been scraped in full."""
    prometheus = start_prometheus(hello_gateway.admin)
    wait_for(lambda: prometheus.scalar('up{job="meshgate"}') == 1, timeout=10.0, interval=0.2, what="a first scrape")
    sent: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=hello_gateway.url(), trust_env=False, timeout=5.0) as http:
            while not stop.is_set():
                path = "/status/500" if len(sent) % 10 == 9 else "/delay/50"
                sent.append(http.get(path, headers={"host": "hello"}).status_code)

    threads = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_for(
            lambda: (prometheus.scalar('sum(changes(meshgate_requests_total{destination="hello"}[30s]))') or 0) >= 5,
            timeout=20.0,
            interval=0.2,
            what="six scrapes under traffic",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    wait_for(
        lambda: prometheus.scalar('sum(meshgate_requests_total{destination="hello"})') == len(sent),
        timeout=10.0,
        interval=0.2,
        what="every request scraped",
    )
    yield prometheus, hello_gateway, sent


async def test_traffic_quantiles_and_points_agree_with_promql(
    scraped: tuple[Prometheus, Gateway, list[int]], tmp_path: Path
) -> None:
    prometheus, gateway, sent = scraped
    assert 500 in sent and 200 in sent
    store = open_store(str(tmp_path / "data"))
    at = time.time()
    signals = PrometheusSignals(prometheus.url, store, scrape_interval=1.0, clock=lambda: at)
    try:
        traffic = await signals.traffic(WINDOW)
        assert set(traffic.counts) == {("unknown", "hello", "v1")}  # a standalone gateway's callers are unknown
        totals = traffic.totals()
        where = '{reporter="destination"}'
        requests = instant(prometheus, f"sum(increase(meshgate_requests_total{where}[60s]))", at)
        errors = instant(
            prometheus, 'sum(increase(meshgate_requests_total{reporter="destination",code="500"}[60s]))', at
        )
        assert requests and totals.requests == pytest.approx(requests, rel=1e-9)
        assert errors and totals.counts[1] == pytest.approx(errors, rel=1e-9)
        assert totals.error_rate == pytest.approx(errors / requests, rel=1e-9)
        for q in (0.5, 0.95, 0.99):
            theirs = instant(
                prometheus,
                f"histogram_quantile({q}, sum by (le) "
                f"(increase(meshgate_request_duration_seconds_bucket{where}[60s])))",
                at,
            )
            assert theirs is not None and totals.quantile_ms(q) == pytest.approx(theirs * 1000, abs=1e-3), q
        p50 = totals.quantile_ms(0.5)
        assert p50 is not None and 50.0 <= p50 <= 100.0  # nine calls in ten waited 50 ms at the upstream

        points = await signals.points(WINDOW, "hello")
        assert len(points) == 60 and all(point.seconds == 1.0 for point in points)
        assert (
            points[-1].time <= at and [b.time - a.time for a, b in zip(points, points[1:], strict=False)] == [1.0] * 59
        )
        busy = [point.totals() for point in points if point.totals().requests > 0]
        assert len(busy) >= 3 and all((item.rps or 0) > 0 for item in busy)
        assert any(item.error_rate for item in busy) and all(item.quantile_ms(0.5) for item in busy)

        host, port = gateway.admin
        record = GatewayRecord("hello-gw", "test", {"listeners": {"admin": f"{host}:{port}"}}, at)
        own = await signals.gateway(record, WINDOW)
        assert own.served.requests == pytest.approx(requests, rel=1e-9) and own.sent.requests == 0
        measured = [point for point in own.points if point.seconds > 0]
        assert measured and all(point.gauges[-1] > 10_000_000 for point in measured)  # RSS of a real process
        assert any(point.cpu is not None and point.cpu > 0 for point in measured)
        elsewhere = GatewayRecord("gone", "test", {"listeners": {"admin": "127.0.0.1:1"}}, at)
        assert all(point.seconds == 0 for point in (await signals.gateway(elsewhere, WINDOW)).points)
    finally:
        await signals.close()
        await store.close()


async def test_an_unreachable_prometheus_is_a_clear_error(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "data"))
    signals = PrometheusSignals(f"http://127.0.0.1:{free_port()}", store, scrape_interval=1.0, timeout=1.0)
    try:
        with pytest.raises(SignalsError, match="cannot be used"):
            await signals.traffic(WINDOW)
        with pytest.raises(ValueError):
            await signals.points(WINDOW, 'hello"} or up{x="')  # never spliced into PromQL
    finally:
        await signals.close()
        await store.close()


def test_the_api_reads_prometheus_when_configured(
    scraped: tuple[Prometheus, Gateway, list[int]], tmp_path: Path
) -> None:
    prometheus, _, _ = scraped
    configured = running(tmp_path / "dashboard", prometheus=prometheus.url, prometheus_scrape_interval=1.0)
    with configured as dashboard, dashboard.client(dashboard.token("viewer")) as api:
        topology = api.get("/api/v1/topology", params={"window": "1m"}).json()
        (edge,) = topology["edges"]
        assert (edge["source"], edge["destination"]) == ("unknown:source", "service:hello")
        assert edge["rps"] > 0 and edge["mtls"] is False and 0 < edge["error_rate"] < 0.5
        hello = api.get("/api/v1/services/hello/signals", params={"window": "1m"}).json()
        assert hello["totals"]["requests"] > 0 and hello["subsets"]["v1"]["points"]
        # Beyond the embedded history's 6 h: Prometheus keeps longer.
        assert api.get("/api/v1/topology", params={"window": "24h"}).status_code == 200
        dashboard.call(dashboard.app.state.signals.source.close)  # what the server does at shutdown
    down = running(tmp_path / "down", prometheus=f"http://127.0.0.1:{free_port()}")
    with down as dashboard, dashboard.client(dashboard.token("viewer")) as api:
        answer = api.get("/api/v1/topology")
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
        assert list(answer.json()) == ["error"] and "Prometheus" in answer.json()["error"]
        dashboard.call(dashboard.app.state.signals.source.close)
