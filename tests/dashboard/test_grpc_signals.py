"""gRPC status codes in the golden signals: which calls fail (the destination's `grpc.failure_codes`), the per-code
counts the API and the service page show, and what the history does with hostile `grpc` counts.

Heartbeats are what a gateway sends: `gateway.telemetry.Metrics` records each call as the hot path does, under
(HTTP status, grpc-status), and `gateway.control.stats_json` encodes it (tests/dashboard/test_stats.py's helpers).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dashboard.signals.history import GRPC_CODES, MeshRules, parse_heartbeat
from dashboard.signals.prometheus import PrometheusSignals
from dashboard.store import open_store
from dashboard.store.model import Store
from gateway import rpc
from gateway.telemetry import BUCKETS, Metrics, SnapshotCollector
from tests.conftest import wait_for
from tests.dashboard.dashboards import Dashboard, mesh
from tests.dashboard.test_sessions import login
from tests.dashboard.test_stats import EDGE, feed, heartbeat, record, stats_at
from tests.e2e.test_prometheus import PROMETHEUS, Prometheus, start_prometheus  # noqa: F401 (fixture)

pytestmark = pytest.mark.anyio
SERVICES = {"catalog": {"subsets": {"v1": {}}, "protocol": "grpc"}}


def grpc_traffic(metrics: Metrics, calls: dict[int, int], http: dict[int, int] | None = None) -> None:
    for code, n in calls.items():
        record(metrics, EDGE, (200, code), 0.003, n)  # type: ignore[arg-type]  # a gRPC call's (HTTP, grpc) code
    for status, n in (http or {}).items():
        record(metrics, EDGE, status, 0.003, n)


async def commit(store: Store, failure_codes: list[str] | None) -> None:
    catalog: dict[str, Any] = {**SERVICES["catalog"]}
    if failure_codes is not None:
        catalog["grpc"] = {"failure_codes": failure_codes}
    document = {"groups": {"catalog": ["catalog"]}, "services": {"catalog": catalog}}
    await store.commit(document, author="test", reason="codes", action="config.replace", target="mesh")


# The history


async def test_by_default_unavailable_fails_and_ok_and_not_found_do_not(store: Store) -> None:
    stats, metrics = stats_at(store), Metrics()
    feed(stats, [heartbeat(metrics, 100.0)], 100.0)
    grpc_traffic(metrics, {rpc.OK: 90, rpc.UNAVAILABLE: 6, rpc.NOT_FOUND: 4}, http={200: 8, 503: 2})
    feed(stats, [heartbeat(metrics, 105.0)], 105.0)
    totals = (await stats.traffic(10.0)).totals()
    summary = totals.summary()
    assert summary["requests"] == 110 and summary["errors"] == 6 + 2  # UNAVAILABLE and the 503s
    assert summary["error_rate"] == pytest.approx(8 / 110, abs=1e-5)
    assert totals.grpc_codes() == {"OK": 90, "NOT_FOUND": 4, "UNAVAILABLE": 6}


async def test_a_services_failure_codes_decide_and_a_change_applies_from_then_on(store: Store) -> None:
    clock = [1000.0]
    stats, metrics = stats_at(store, origin=1000.0), Metrics()
    stats.clock = lambda: clock[0]
    await commit(store, ["NOT_FOUND"])
    await store.put_gateway(heartbeat(metrics, 1000.5, started=990.0))  # counted before: a baseline
    clock[0] = 1001.0
    await stats.sample()
    grpc_traffic(metrics, {rpc.OK: 80, rpc.NOT_FOUND: 15, rpc.UNAVAILABLE: 5})
    await store.put_gateway(heartbeat(metrics, 1010.0, started=990.0))
    clock[0] = 1010.0
    await stats.sample()
    first = (await stats.traffic(60.0)).totals().summary()
    assert first["requests"] == 100 and first["errors"] == 15  # NOT_FOUND only: the list replaces the default

    await commit(store, None)  # back to the default set, from the next increase on
    grpc_traffic(metrics, {rpc.OK: 10, rpc.NOT_FOUND: 20, rpc.UNAVAILABLE: 3})
    await store.put_gateway(heartbeat(metrics, 1020.0, started=990.0))
    clock[0] = 1020.0
    await stats.sample()
    both = (await stats.traffic(60.0)).totals().summary()
    assert both["requests"] == 133 and both["errors"] == 15 + 3  # the past stays as counted; no reset, no spike


async def test_mesh_rules_parse_once_per_version_and_default_for_unknown_services(store: Store) -> None:
    await commit(store, ["not_found", "DATA_LOSS"])
    revision = await store.current()
    rules = MeshRules.of(revision)
    assert rules.failures("catalog") == {rpc.NOT_FOUND, rpc.DATA_LOSS} and rules.owners == {"catalog": "catalog"}
    assert rules.failures("elsewhere") == rpc.DEFAULT_FAILURE_CODES
    assert MeshRules.of(revision, rules) is rules
    await commit(store, ["INTERNAL"])
    assert MeshRules.of(await store.current(), rules).failures("catalog") == {rpc.INTERNAL}


def buckets() -> list[int]:
    return [0] * (len(BUCKETS) + 1)


@pytest.mark.parametrize(
    "grpc",
    [
        {"99": 1},
        {"17": 1},
        {"-1": 1},
        {"014": 1},
        {"١٤": 1},  # Arabic-Indic digits: isdigit(), and int() reads them
        {"14": -3},
        {"14": "7"},
        {"14": True},
        {"14": float("inf")},
        {str(code): 1 for code in range(5000)},
        [14, 1],
        "14",
    ],
    ids=repr,
)
async def test_hostile_grpc_counts_leave_their_series_out(store: Store, grpc: object) -> None:
    stats, metrics = stats_at(store), Metrics()
    feed(stats, [heartbeat(metrics, 100.0)], 100.0)
    grpc_traffic(metrics, {rpc.OK: 5})
    beat = heartbeat(metrics, 105.0)
    hostile = {"labels": ["destination", "x", "catalog", "v1", "r"], "codes": {"200": 9}, "buckets": buckets()}
    beat.data["stats"]["series"].append({**hostile, "grpc": grpc})
    assert len(parse_heartbeat(beat.data).series) == 1  # type: ignore[union-attr]
    feed(stats, [beat], 105.0)
    traffic = await stats.traffic(10.0)
    assert set(traffic.counts) == {("shop", "catalog", "v1")}
    assert traffic.totals().grpc_codes() == {"OK": 5}


def test_every_code_is_accepted_and_only_those() -> None:
    item = {"labels": ["destination", "x", "catalog", "v1", "r"], "codes": {"200": 17}, "buckets": buckets()}
    item["grpc"] = {str(code): 1 for code in range(len(rpc.NAMES))}
    beat = parse_heartbeat({"stats": {"series": [item]}})
    assert beat is not None and len(beat.series) == 1 and set(GRPC_CODES.values()) == set(range(17))


# The API and the service page, on a running dashboard with the gateway's heartbeats in its store


@pytest.fixture
def grpc_dash(dash: Dashboard) -> Dashboard:
    document = mesh()
    document["services"]["catalog"]["grpc"] = {"failure_codes": ["UNAVAILABLE", "NOT_FOUND"]}
    dash.seed(document)
    metrics = Metrics()
    labels = ("destination", "web", "catalog", "v1", "default")
    for code, n in {rpc.OK: 900, rpc.UNAVAILABLE: 21, rpc.NOT_FOUND: 3, rpc.DEADLINE_EXCEEDED: 6}.items():
        record(metrics, labels, (200, code), 0.004, n)  # type: ignore[arg-type]
    record(metrics, labels, 503, 0.004, 70)  # plain HTTP calls to the same service
    started = time.time()  # started while the dashboard watched: everything it counted is new
    beat = heartbeat(metrics, time.time(), started=started, group="shop", instance="gw-shop")
    dash.call(lambda: dash.store.put_gateway(beat))
    dash.call(lambda: dash.app.state.signals.source.sample())
    return dash


@pytest.fixture
def viewer(grpc_dash: Dashboard) -> Iterator[httpx.Client]:
    with grpc_dash.client() as client:
        login(client, grpc_dash.token("viewer"))
        yield client


def test_the_api_gives_a_services_grpc_codes_and_counts_its_failures(grpc_dash: Dashboard) -> None:
    with grpc_dash.client(grpc_dash.token("viewer")) as api:
        catalog = api.get("/api/v1/services/catalog/signals", params={"window": "1h"}).json()
        frontend = api.get("/api/v1/services/frontend/signals", params={"window": "1h"}).json()
        spec = api.get("/api/v1/openapi.json").json()
    assert catalog["grpc"] == {"OK": 900, "NOT_FOUND": 3, "DEADLINE_EXCEEDED": 6, "UNAVAILABLE": 21}
    totals = catalog["totals"]
    assert totals["requests"] == 1000 and totals["errors"] == 70 + 21 + 3  # not DEADLINE_EXCEEDED: not listed
    assert totals["error_rate"] == pytest.approx(0.094)
    assert frontend["grpc"] == {}
    described = spec["paths"]["/api/v1/services/{name}/signals"]["get"]["responses"]["200"]["description"]
    assert "grpc" in described and "failure_codes" in described


def test_the_service_page_shows_each_non_ok_codes_share(viewer: httpx.Client) -> None:
    page = viewer.get("/services/catalog?window=1h").text
    rows = re.findall(
        r'<tr id="grpc-(\w+)"><th scope="row">(\w+)</th><td class="grpc-share">([^<]+)</td><td>([^<]+)</td>'
        r"<td>(yes|no)</td></tr>",
        page,
    )
    assert [(code, share, calls, failure) for code, _, share, calls, failure in rows] == [
        ("UNAVAILABLE", "2.26 %", "21", "yes"),  # 21 of the 930 gRPC calls
        ("DEADLINE_EXCEEDED", "0.65 %", "6", "no"),
        ("NOT_FOUND", "0.32 %", "3", "yes"),
    ]
    assert "OK" not in [code for code, *_ in rows]
    frontend = viewer.get("/services/frontend?window=1h").text
    assert 'id="grpc-codes"' not in frontend and 'id="grpc-codes"' in page


# The same traffic through Prometheus: a real Prometheus scraping the gateway's own exposition of one `Metrics`


class Exposition:
    """/metrics as a gateway renders it (`SnapshotCollector`), of whatever `metrics` holds now, on a loopback port."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        registry = CollectorRegistry()
        registry.register(SnapshotCollector(lambda: snapshot(self.metrics)))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("content-type", CONTENT_TYPE_LATEST)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def snapshot(metrics: Metrics) -> dict[str, Any]:
    series = {key: (dict(s.codes), list(s.buckets), s.sum) for key, s in metrics.series.items()}
    return {"series": series, "counters": {}, "gauges": {}, "loop_lag": 0.0, "cpu": 0.0, "rss": 0}


@pytest.mark.slow
@pytest.mark.skipif(not PROMETHEUS.exists(), reason="/usr/bin/prometheus not installed (Debian package prometheus)")
async def test_history_and_prometheus_count_the_same_failures(
    start_prometheus: Callable[..., Prometheus],  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    exposition = Exposition()
    store = open_store(str(tmp_path / "data"))
    try:
        await commit(store, ["NOT_FOUND", "UNAVAILABLE"])
        grpc = (rpc.OK, rpc.NOT_FOUND, rpc.UNAVAILABLE, rpc.DEADLINE_EXCEEDED)
        codes = exposition.metrics.series_for(EDGE).codes  # every series from the first scrape on, at 0
        codes.update({(200, code): 0 for code in grpc} | {200: 0, 503: 0})
        stats = stats_at(store, origin=100.0)
        rules = MeshRules.of(await store.current())
        feed(stats, [heartbeat(exposition.metrics, 100.0)], 100.0)  # the baseline: zeros
        prometheus = start_prometheus(("127.0.0.1", exposition.server.server_address[1]))
        wait_for(lambda: prometheus.scalar("count(meshgate_requests_total)") == 6, 10.0, 0.2, "a first scrape")
        calls = dict(zip(grpc, (700, 50, 30, 20), strict=True))
        grpc_traffic(exposition.metrics, calls, http={200: 150, 503: 50})
        stats.ingest([heartbeat(exposition.metrics, 110.0)], 110.0, rules.owners, rules.failures)
        wait_for(lambda: prometheus.scalar("sum(meshgate_requests_total)") == 1000, 10.0, 0.2, "the traffic scraped")
        signals = PrometheusSignals(prometheus.url, store, scrape_interval=1.0)
        try:
            theirs = (await signals.traffic(60.0)).totals()
        finally:
            await signals.close()
        ours = (await stats.traffic(60.0)).totals()
    finally:
        await store.close()
        exposition.close()
    assert ours.summary()["errors"] == 50 + 50 + 30 and ours.error_rate == pytest.approx(0.13)
    # increase() extrapolates every series alike (all scraped together), so the shares agree exactly.
    assert theirs.error_rate == pytest.approx(ours.error_rate, rel=1e-9)
    scale = theirs.requests / ours.requests
    assert {code: count / scale for code, count in theirs.grpc_codes().items()} == pytest.approx(ours.grpc_codes())
