"""Golden signals and saturation on /metrics, end to end: a real gateway process, real upstreams, known traffic.

Each test sends traffic whose outcome it knows, scrapes the admin listener (or the metrics listener) and parses
the exposition with prometheus-client's parser, as Prometheus would read it (the OpenMetrics parser when the scrape
asks for OpenMetrics, whose latency buckets carry exemplars of exported requests). Label sets are compared whole, so a
missing, extra or misspelt label fails. The contract is DESIGN.md's: `meshgate_requests_total`,
`meshgate_request_duration_seconds` (with the listed buckets) and `meshgate_inflight_requests`; the saturation
names are gateway/telemetry.py's and admin.py's.
"""

from __future__ import annotations

import random
import signal
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    Connect,
    Gateway,
    Scripted,
    StartGateway,
    StartUpstream,
    gateway_config,
    hello,
    listeners,
    service,
    wait_for,
    workers_of,
)
from tests.e2e.identities import issue_client_cert
from tests.e2e.servers import always
from tests.e2e.upstream_app import UpstreamServer

BUCKETS = ["0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5"]
BUCKETS += ["1", "2.5", "5", "10"]  # DESIGN.md, Contracts
SERIES_LABELS = ("reporter", "source", "destination", "subset", "route")
Labels = frozenset[tuple[str, str]]


# Scraping


class Scrape:
    """One /metrics answer, parsed: every sample by (sample name, exact label set), and each family's type."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[str, dict[Labels, float]] = {}
        self.order: dict[str, list[dict[str, str]]] = {}  # label dicts in exposition order, per sample name
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
                self.order.setdefault(sample.name, []).append(dict(sample.labels))

    def series(self, name: str) -> dict[Labels, float]:
        return self.samples.get(name, {})

    def value(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels, or None."""
        return self.series(name).get(frozenset(labels.items()))

    def keys(self) -> set[tuple[str, Labels]]:
        return {(name, labels) for name, series in self.samples.items() for labels in series}


def scrape(gw: Gateway, kind: str = "admin") -> Scrape:
    response = httpx.get(gw.url(kind) + "/metrics", timeout=5.0, trust_env=False)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    return Scrape(response.text)


def key(reporter: str, source: str, destination: str, subset: str, route: str, **extra: str) -> Labels:
    """The label set of one golden-signal series (plus `code` or `le`)."""
    values = (reporter, source, destination, subset, route)
    return frozenset({**dict(zip(SERIES_LABELS, values, strict=True)), **extra}.items())


def requests_by_series(metrics: Scrape) -> dict[Labels, float]:
    """meshgate_requests_total by labels. An HTTP request's `grpc_status` is empty (checked here, then left out)."""
    found: dict[Labels, float] = {}
    for labels, value in metrics.series("meshgate_requests_total").items():
        assert ("grpc_status", "") in labels, labels
        found[labels - {("grpc_status", "")}] = value
    return found


def client(gw: Gateway, kind: str = "inbound", timeout: float = 10.0, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=gw.url(kind), trust_env=False, timeout=timeout, **kwargs)


def assert_histogram(metrics: Scrape, labels: Labels, count: int) -> dict[str, float]:
    """The series' buckets are exactly the contract's plus +Inf, cumulative, and agree with `_count`; returns them."""
    buckets = {
        dict(bucket)["le"]: value
        for bucket, value in metrics.series("meshgate_request_duration_seconds_bucket").items()
        if bucket - {("le", dict(bucket)["le"])} == labels
    }
    order = [
        found["le"]
        for found in metrics.order["meshgate_request_duration_seconds_bucket"]
        if frozenset(found.items()) - {("le", found["le"])} == labels
    ]
    assert [float(le) for le in order[:-1]] == [float(b) for b in BUCKETS], order
    assert order[-1] == "+Inf"
    values = [buckets[le] for le in order]
    assert values == sorted(values), f"buckets not cumulative: {values}"
    assert buckets["+Inf"] == count
    assert metrics.series("meshgate_request_duration_seconds_count")[labels] == count
    total = metrics.series("meshgate_request_duration_seconds_sum")[labels]
    assert 0 < total < 10 * count, total
    return {str(float(le)) if le != "+Inf" else le: value for le, value in buckets.items()}


# The contract series


def test_contract_series_after_known_traffic(hello_upstream: UpstreamServer, hello_gateway: Gateway) -> None:
    with client(hello_gateway) as http:
        assert [http.get(f"/echo/{i}", headers={"host": "hello"}).status_code for i in range(3)] == [200] * 3
        retried = http.get("/fail-first/1", headers={"host": "hello"})  # 503, retried, 200
        assert retried.status_code == 200
        assert hello_upstream.requests == 4 + 1
        unknown = http.get("/echo", headers={"host": "nosuch.example"})
        assert unknown.status_code == 404
    metrics = scrape(hello_gateway)

    assert metrics.types["meshgate_requests"] == "counter"
    assert metrics.types["meshgate_request_duration_seconds"] == "histogram"
    assert metrics.types["meshgate_inflight_requests"] == "gauge"
    hello_key = key("destination", "unknown", "hello", "v1", "default")
    unknown_key = key("destination", "unknown", "unknown", "", "")
    # A retried request is one request (code 200), not two; the retry is counted on its own.
    assert requests_by_series(metrics) == {hello_key | {("code", "200")}: 4, unknown_key | {("code", "404")}: 1}
    assert set(metrics.series("meshgate_request_duration_seconds_count")) == {hello_key, unknown_key}
    assert_histogram(metrics, hello_key, 4)
    assert_histogram(metrics, unknown_key, 1)
    assert metrics.series("meshgate_retries_total") == {frozenset({("destination", "hello")}): 1}
    assert metrics.series("meshgate_inflight_requests") == {frozenset({("destination", "hello")}): 0}


def test_per_route_series_with_two_routes(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    v1, v2 = start_upstream("v1"), start_upstream("v2")
    services = {
        "hello": {
            "subsets": {"v1": {"endpoints": [v1.address]}, "v2": {"endpoints": [v2.address]}},
            "routes": [
                {"name": "canary-header", "match": {"headers": {"x-canary": "always"}}, "split": {"v2": 100}},
                {"name": "stable", "split": {"v1": 100}},
            ],
        }
    }
    gw = start_gateway(gateway_config(services))
    with client(gw) as http:
        canary = [http.get("/echo", headers={"host": "hello", "x-canary": "always"}) for _ in range(3)]
        stable = [http.get("/echo", headers={"host": "hello"}) for _ in range(5)]
        missing = http.get("/status/404", headers={"host": "hello"})  # the upstream's 404: code, not a route miss
    assert [r.headers["x-upstream"] for r in canary + stable] == ["v2"] * 3 + ["v1"] * 5
    assert missing.status_code == 404
    metrics = scrape(gw)
    canary_key = key("destination", "unknown", "hello", "v2", "canary-header")
    stable_key = key("destination", "unknown", "hello", "v1", "stable")
    assert requests_by_series(metrics) == {
        canary_key | {("code", "200")}: 3,
        stable_key | {("code", "200")}: 5,
        stable_key | {("code", "404")}: 1,
    }
    assert_histogram(metrics, canary_key, 3)
    assert_histogram(metrics, stable_key, 6)


def test_inflight_gauge_and_upstream_pool_while_slow_requests_run(
    hello_upstream: UpstreamServer, hello_gateway: Gateway
) -> None:
    slow = 3
    hello_only = frozenset({("destination", "hello")})

    def inflight() -> float | None:
        return scrape(hello_gateway).value("meshgate_inflight_requests", destination="hello")

    assert inflight() == 0
    with ThreadPoolExecutor(slow) as pool:
        futures = [
            pool.submit(httpx.get, hello_gateway.url() + "/delay/700", headers={"host": "hello"}, trust_env=False)
            for _ in range(slow)
        ]
        # Once the upstream holds all of them, each is connected (nothing pending) and waiting for its answer.
        wait_for(lambda: hello_upstream.requests == slow, timeout=5.0, what=f"{slow} requests at the upstream")
        during = scrape(hello_gateway)
        assert during.value("meshgate_inflight_requests", destination="hello") == slow
        assert all(not f.done() for f in futures), "the slow requests finished before the gauge showed them"
        assert during.series("meshgate_upstream_connections_active") == {hello_only: slow}
        assert during.series("meshgate_pending_requests") == {hello_only: 0}
        assert [f.result(timeout=10).status_code for f in futures] == [200] * slow
    wait_for(lambda: inflight() == 0, timeout=2.0, what="the in-flight gauge back to 0")
    after = scrape(hello_gateway)
    assert after.series("meshgate_upstream_connections_active") == {hello_only: 0}
    assert after.series("meshgate_upstream_connections_idle") == {hello_only: slow}  # kept alive in the pool
    buckets = assert_histogram(after, key("destination", "unknown", "hello", "v1", "default"), slow)
    assert buckets["0.5"] == 0 and buckets["1.0"] == slow, buckets  # 0.7 s each (under the 1 s per-try timeout)


def test_metrics_listener_serves_the_same_metrics(start_gateway: StartGateway, hello_upstream: UpstreamServer) -> None:
    gw = start_gateway(gateway_config(hello(hello_upstream.address), listen=listeners("metrics")))
    with client(gw) as http:
        for path in ("/echo", "/status/503", "/echo"):
            http.get(path, headers={"host": "hello"})
        http.get("/echo", headers={"host": "other"})
    admin, exposed = scrape(gw, "admin"), scrape(gw, "metrics")
    contract = [
        "meshgate_requests_total",
        "meshgate_request_duration_seconds_bucket",
        "meshgate_request_duration_seconds_count",
        "meshgate_request_duration_seconds_sum",
        "meshgate_inflight_requests",
        "meshgate_retries_total",
        "meshgate_config_version",
    ]
    for name in contract:
        assert exposed.series(name) == admin.series(name), name
    assert sum(admin.series("meshgate_requests_total").values()) == 4
    assert set(exposed.types) == set(admin.types)


# source, destination and reporter


def test_edge_is_external_and_outbound_reports_as_source(
    start_gateway: StartGateway, hello_upstream: UpstreamServer
) -> None:
    gw = start_gateway(gateway_config(hello(hello_upstream.address), group="shop", listen=listeners("edge")))
    for kind, n in [("edge", 2), ("outbound", 3), ("inbound", 1)]:
        with client(gw, kind) as http:
            assert [http.get("/echo", headers={"host": "hello"}).status_code for _ in range(n)] == [200] * n, kind
    with client(gw, "outbound") as http:
        assert http.get("/echo", headers={"host": "nowhere"}).status_code == 404
    metrics = scrape(gw)
    ok = ("code", "200")
    assert requests_by_series(metrics) == {
        key("destination", "external", "hello", "v1", "default") | {ok}: 2,
        key("source", "shop", "hello", "v1", "default") | {ok}: 3,
        key("destination", "unknown", "hello", "v1", "default") | {ok}: 1,
        key("source", "shop", "unknown", "", "") | {("code", "404")}: 1,
    }


def test_mtls_inbound_source_is_the_peer_group(
    start_gateway: StartGateway, hello_upstream: UpstreamServer, tmp_path: Path
) -> None:
    ca = trustme.CA()
    ca_file, server_cert, server_key = tmp_path / "ca.pem", tmp_path / "gw.pem", tmp_path / "gw.key"
    ca.cert_pem.write_to_path(str(ca_file))
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(server_cert))
    server.private_key_pem.write_to_path(str(server_key))
    peer = issue_client_cert(ca, "spiffe://example.test/group/checkout", tmp_path)
    tls = {"cert": str(server_cert), "key": str(server_key), "ca": str(ca_file)}
    gw = start_gateway(gateway_config(hello(hello_upstream.address), tls=tls))
    context = ssl.create_default_context(cafile=str(ca_file))
    context.load_cert_chain(str(peer[0]), str(peer[1]))
    host, port = gw.inbound
    with httpx.Client(base_url=f"https://{host}:{port}", verify=context, trust_env=False, timeout=10.0) as http:
        assert [http.get("/echo", headers={"host": "hello"}).status_code for _ in range(2)] == [200, 200]
        assert http.get("/echo", headers={"host": "nosuch"}).status_code == 404
    metrics = scrape(gw)
    assert requests_by_series(metrics) == {
        key("destination", "checkout", "hello", "v1", "default") | {("code", "200")}: 2,
        key("destination", "checkout", "unknown", "", "") | {("code", "404")}: 1,
    }


def test_random_host_flood_adds_only_the_unknown_series(hello_gateway: Gateway) -> None:
    with client(hello_gateway) as http:
        assert [http.get("/echo", headers={"host": "hello"}).status_code for _ in range(5)] == [200] * 5
    before = scrape(hello_gateway)
    flood, threads = 2000, 4
    rng = random.Random(7)
    hosts = [
        rng.choice(
            [
                f"h{rng.getrandbits(64):x}.example",
                f"{rng.getrandbits(32):x}.svc:{rng.randrange(1, 65536)}",
                f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
                f"HELLO-{rng.getrandbits(40):x}",
            ]
        )
        for _ in range(flood)
    ]

    def send(batch: list[str]) -> list[int]:
        with client(hello_gateway) as http:
            return [http.get(f"/echo/{i}", headers={"host": host}).status_code for i, host in enumerate(batch)]

    with ThreadPoolExecutor(threads) as pool:
        statuses = [s for batch in pool.map(send, [hosts[i::threads] for i in range(threads)]) for s in batch]
    assert statuses == [404] * flood
    after = scrape(hello_gateway)

    unknown = key("destination", "unknown", "unknown", "", "")
    expected_new = {("meshgate_requests_total", unknown | {("code", "404"), ("grpc_status", "")})}
    expected_new |= {("meshgate_request_first_attempts_total", unknown | {("code", "404"), ("grpc_status", "")})}
    expected_new |= {("meshgate_request_duration_seconds_bucket", unknown | {("le", le)}) for le in [*BUCKETS, "+Inf"]}
    expected_new |= {
        ("meshgate_request_duration_seconds_count", unknown),
        ("meshgate_request_duration_seconds_sum", unknown),
    }
    new = {(name, labels) for name, labels in after.keys() - before.keys() if name != "meshgate_open_connections"}
    assert {numeric_le(item) for item in new} == {numeric_le(item) for item in expected_new}
    assert after.value("meshgate_requests_total", **dict(unknown | {("code", "404"), ("grpc_status", "")})) == flood


def numeric_le(item: tuple[str, Labels]) -> tuple[str, Labels]:
    """`le` compared as a number: "1" and "1.0" are the same bound."""
    name, labels = item
    return name, frozenset((k, str(float(v)) if k == "le" else v) for k, v in labels)


# Saturation


def test_open_connections_per_listener(hello_gateway: Gateway, connect: Connect) -> None:
    def open_by_listener() -> dict[str, float]:
        metrics = scrape(hello_gateway)
        return {dict(labels)["listener"]: v for labels, v in metrics.series("meshgate_open_connections").items()}

    held = [connect(hello_gateway.inbound) for _ in range(3)] + [connect(hello_gateway.addresses["outbound"])]
    found = wait_for(
        lambda: (seen := open_by_listener()).get("inbound") == 3 and seen.get("outbound") == 1 and seen,
        timeout=5.0,
        what="3 inbound and 1 outbound connections",
    )
    assert found["admin"] >= 1  # the scrape's own connection
    assert set(found) <= {"inbound", "outbound", "admin"}
    for wire in held:
        wire.close()
    wait_for(
        lambda: not (seen := open_by_listener()).get("inbound") and not seen.get("outbound"),
        timeout=5.0,
        what="the closed connections to leave the gauge",
    )


def test_ejected_endpoint_gauge_and_ejections_counter(
    start_gateway: StartGateway, hello_upstream: UpstreamServer, scripted: Scripted
) -> None:
    bad = scripted(always(500), name="bad")
    policy = {"lb": "round_robin", "outlier": {"consecutive_5xx": 2, "base_ejection": "30s"}}
    gw = start_gateway(gateway_config(hello(hello_upstream.address, bad.address, **policy)))
    assert scrape(gw).value("meshgate_endpoints_ejected", destination="hello") == 0
    with client(gw) as http:
        first = [http.get("/echo", headers={"host": "hello"}).status_code for _ in range(6)]
        later = [http.get("/echo", headers={"host": "hello"}).status_code for _ in range(10)]
    assert first.count(500) == 2, first  # round robin: the bad endpoint's second 500 ejects it
    assert later == [200] * 10
    assert len(bad.requests) == 2
    metrics = scrape(gw)
    assert metrics.value("meshgate_endpoints_ejected", destination="hello") == 1
    assert metrics.value("meshgate_outlier_ejections_total", destination="hello") == 1
    hello_key = key("destination", "unknown", "hello", "v1", "default")
    assert requests_by_series(metrics) == {hello_key | {("code", "500")}: 2, hello_key | {("code", "200")}: 14}


def test_endpoint_in_two_subsets_is_counted_once(start_gateway: StartGateway, hello_upstream: UpstreamServer) -> None:
    """Subsets may share an endpoint (a canary not yet deployed elsewhere, say); the gateway then keeps one
    endpoint and one pool for it, and the per-destination gauges must count it once, not once per subset."""
    services = {
        "hello": {
            "subsets": {"v1": {"endpoints": [hello_upstream.address]}, "v2": {"endpoints": [hello_upstream.address]}},
            "routes": [{"name": "default", "split": {"v1": 50, "v2": 50}}],
            "outlier": {"consecutive_5xx": 2, "base_ejection": "30s"},
        }
    }
    gw = start_gateway(gateway_config(services))
    with client(gw) as http:  # one client connection, one request at a time: one upstream connection, reused
        assert [http.get("/echo", headers={"host": "hello"}).status_code for _ in range(4)] == [200] * 4
        assert hello_upstream.connections == 1
        idle = scrape(gw).value("meshgate_upstream_connections_idle", destination="hello")
        assert [http.get("/status/500", headers={"host": "hello"}).status_code for _ in range(2)] == [500] * 2
    metrics = scrape(gw)
    assert metrics.value("meshgate_outlier_ejections_total", destination="hello") == 1
    ejected = metrics.value("meshgate_endpoints_ejected", destination="hello")
    assert (idle, ejected) == (1, 1), f"one idle connection reported as {idle}, one ejected endpoint as {ejected}"


def test_inflight_gauge_keeps_counting_requests_across_a_reload(
    start_gateway: StartGateway, hello_upstream: UpstreamServer
) -> None:
    """Requests in flight finish on the snapshot they started with (DESIGN.md); the gauge must still show them
    after a reload swaps in a new snapshot, as a canary weight step does."""
    config = gateway_config(hello(hello_upstream.address, timeouts={"per_try": "5s", "request": "10s"}))
    gw = start_gateway(config)
    slow = 2

    def inflight() -> float | None:
        return scrape(gw).value("meshgate_inflight_requests", destination="hello")

    with ThreadPoolExecutor(slow) as pool:
        futures = [
            pool.submit(httpx.get, gw.url() + "/delay/2000", headers={"host": "hello"}, trust_env=False, timeout=10)
            for _ in range(slow)
        ]
        wait_for(lambda: inflight() == slow, timeout=5.0, what=f"{slow} requests in flight")
        config["services"]["second"] = service(hello_upstream.address)
        gw.config_path.write_text(yaml.safe_dump(config))
        gw.signal(signal.SIGHUP)
        wait_for(lambda: scrape(gw).value("meshgate_config_version") == 2, timeout=5.0, what="config version 2")
        during = inflight()
        assert not any(f.done() for f in futures), "the slow requests ended before the check"
        assert [f.result(timeout=10).status_code for f in futures] == [200] * slow
    assert during == slow, f"{slow} requests in flight across the reload, gauge {during}"
    wait_for(lambda: inflight() == 0, timeout=2.0, what="the in-flight gauge back to 0")


def test_saturation_series_exist_at_zero_before_anything_happens(
    start_gateway: StartGateway, hello_upstream: UpstreamServer
) -> None:
    """Series whose label values are known from the config are exported as 0 from the start (Prometheus'
    "avoid missing metrics"): a counter that appears only at its first increment hides that increment from
    `rate()` and `increase()`, and a gauge that vanishes at 0 reads as "no data", not 0."""
    services = {"hello": service(hello_upstream.address), "other": service(hello_upstream.address)}
    gw = start_gateway(gateway_config(services, listen=listeners("edge", "metrics")))
    metrics = scrape(gw)
    per_destination = [
        "meshgate_retries_total",
        "meshgate_retry_budget_exhausted_total",
        "meshgate_circuit_breaker_rejections_total",
        "meshgate_outlier_ejections_total",
        "meshgate_inflight_requests",
        "meshgate_pending_requests",
        "meshgate_endpoints_ejected",
        "meshgate_endpoints_unhealthy",
    ]
    missing = [
        f"{name}{{destination={destination!r}}}"
        for name in per_destination
        for destination in ("hello", "other")
        if metrics.value(name, destination=destination) != 0
    ]
    missing += [
        f"meshgate_open_connections{{listener={kind!r}}}"
        for kind in ("inbound", "edge", "outbound")
        if metrics.value("meshgate_open_connections", listener=kind) != 0
    ]
    assert not missing, "not exported as 0 before any traffic: " + ", ".join(missing)


def test_health_check_state_config_version_and_last_reload(
    start_gateway: StartGateway, hello_upstream: UpstreamServer
) -> None:
    health = {"path": "/healthz", "interval": "100ms", "timeout": "1s", "healthy": 1, "unhealthy": 1}
    config = gateway_config(hello(hello_upstream.address, health=health))
    gw = start_gateway(config)

    def unhealthy() -> float | None:
        return scrape(gw).value("meshgate_endpoints_unhealthy", destination="hello")

    metrics = scrape(gw)
    assert metrics.value("meshgate_config_version") == 1
    assert metrics.value("meshgate_config_last_reload_success") == 1
    assert unhealthy() == 0
    with httpx.Client(base_url=f"http://{hello_upstream.address}", trust_env=False, timeout=5.0) as upstream:
        upstream.get("/health/off")
        wait_for(lambda: unhealthy() == 1, timeout=5.0, what="the endpoint to turn unhealthy")
        upstream.get("/health/on")
        wait_for(lambda: unhealthy() == 0, timeout=5.0, what="the endpoint to turn healthy again")

    gw.config_path.write_text("gateway: {group: [not, a, name]}\n")
    gw.signal(signal.SIGHUP)
    wait_for(lambda: scrape(gw).value("meshgate_config_last_reload_success") == 0, timeout=5.0, what="a rejection")
    assert scrape(gw).value("meshgate_config_version") == 1  # the last good config stays
    config["services"]["second"] = service(hello_upstream.address)
    gw.config_path.write_text(yaml.safe_dump(config))
    gw.signal(signal.SIGHUP)
    wait_for(lambda: scrape(gw).value("meshgate_config_version") == 2, timeout=5.0, what="version 2")
    assert scrape(gw).value("meshgate_config_last_reload_success") == 1


def test_process_figures(hello_gateway: Gateway) -> None:
    metrics = scrape(hello_gateway)
    cpu = metrics.value("meshgate_process_cpu_seconds_total")
    rss = metrics.value("meshgate_process_resident_memory_bytes")
    lag = metrics.value("meshgate_event_loop_lag_seconds")
    assert cpu is not None and cpu > 0
    assert rss is not None and 10_000_000 < rss < 2_000_000_000  # a Python process with uvloop: tens of MB
    assert lag is not None and 0 <= lag < 1.0
    assert metrics.types["meshgate_process_cpu_seconds"] == "counter"
    assert metrics.types["meshgate_event_loop_lag_seconds"] == "gauge"


# --workers N


# Exemplars (OpenMetrics)

OPENMETRICS_ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"


def exemplars(gw: Gateway, kind: str = "admin") -> dict[str, tuple[str, str, float]]:
    """{request id: (trace id, le, value)} of the exemplars on `meshgate_request_duration_seconds` buckets."""
    response = httpx.get(gw.url(kind) + "/metrics", headers={"accept": OPENMETRICS_ACCEPT}, trust_env=False)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    found = {}
    for family in openmetrics_families(response.text):  # type: ignore[no-untyped-call]
        for sample in family.samples:
            if sample.exemplar is not None:
                assert sample.name == "meshgate_request_duration_seconds_bucket", sample
                labels = sample.exemplar.labels
                found[labels["request_id"]] = (labels["trace_id"], sample.labels["le"], sample.exemplar.value)
    return found


def traced_config(upstream: UpstreamServer, sampling: float, **gateway: Any) -> dict[str, Any]:
    # Spans go to the upstream, which answers any POST with 200: an OTLP sink is all the exporter needs here.
    tracing = {"endpoint": f"http://{upstream.address}/v1/traces", "sampling": sampling}
    return gateway_config(hello(upstream.address), telemetry={"access_log": "off", "tracing": tracing}, **gateway)


def assert_in_bucket(le: str, value: float) -> None:
    bounds = [0.0] + [float(b) for b in BUCKETS] + [float("inf")]
    upper = bounds.index(float(le))
    assert bounds[upper - 1] < value <= bounds[upper], (le, value)


def test_exemplars_lead_to_exported_requests_only(start_gateway: StartGateway, hello_upstream: UpstreamServer) -> None:
    gw = start_gateway(traced_config(hello_upstream, sampling=0.0))  # only errors and slow requests are exported
    with client(gw) as c:
        quick = [c.get("/echo", headers={"host": "hello"}) for _ in range(5)]
        failed = c.get("/status/503", headers={"host": "hello"})
        # 300 ms: a bucket of its own (the 503's retries with backoff can take 25-50 ms, and a bucket keeps one).
        sampled = c.get("/delay/300", headers={"host": "hello", "traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"})
    assert failed.status_code == 503 and sampled.status_code == 200
    found = wait_for(lambda: len(exemplars(gw)) == 2 and exemplars(gw), timeout=5, what="two exemplars")
    assert set(found) == {failed.headers["x-request-id"], sampled.headers["x-request-id"]}
    assert not {r.headers["x-request-id"] for r in quick} & set(found), "unsampled requests leave no exemplar"
    trace, le, value = found[sampled.headers["x-request-id"]]
    assert trace == "ab" * 16  # the incoming trace, which the exported span belongs to
    assert 0.03 <= value < 1 and float(le) >= 0.05
    for request_id, (trace, le, value) in found.items():
        assert_in_bucket(le, value)
        (hop,) = httpx.get(gw.url("admin") + f"/requests/{request_id}", trust_env=False).json()["hops"]
        assert hop["trace_id"] == trace and hop["duration"] == value
    assert "trace_id" not in scrape(gw).text, "plain Prometheus text carries no exemplars"


def test_workers_exemplars_merge_to_one_per_bucket(start_gateway: StartGateway, hello_upstream: UpstreamServer) -> None:
    gw = start_gateway(traced_config(hello_upstream, sampling=1.0, listen=listeners("metrics")), "--workers", "2")
    hello_key = key("destination", "unknown", "hello", "v1", "default")
    responses = fresh_connection_requests(gw, 40)
    wait_for(
        lambda: requests_by_series(scrape(gw)).get(hello_key | {("code", "200")}) == 40,
        timeout=5.0,
        what="40 requests in one scrape",
    )
    request_ids = {r.headers["x-request-id"] for r in responses}
    found = exemplars(gw)
    assert found and set(found) <= request_ids
    buckets = [le for _, le, _ in found.values()]
    assert len(buckets) == len(set(buckets)), "one exemplar per bucket, the latest of any worker"
    for _, le, value in found.values():
        assert_in_bucket(le, value)
    assert exemplars(gw, "metrics") == found  # the metrics listener serves the same
    # The same 40 requests are counted, whatever the format.
    assert_histogram(scrape(gw), hello_key, 40)


def fresh_connection_requests(gw: Gateway, n: int) -> list[httpx.Response]:
    """`n` requests, each on its own new connection, so SO_REUSEPORT spreads them over the workers."""
    return [
        httpx.get(gw.url() + f"/echo/{i}", headers={"host": "hello", "connection": "close"}, trust_env=False)
        for i in range(n)
    ]


@pytest.fixture
def two_worker_gateway(start_gateway: StartGateway, hello_upstream: UpstreamServer) -> Iterator[Gateway]:
    yield start_gateway(gateway_config(hello(hello_upstream.address), listen=listeners("metrics")), "--workers", "2")


def test_workers_one_scrape_shows_the_whole_gateway(two_worker_gateway: Gateway) -> None:
    n = 40
    responses = fresh_connection_requests(two_worker_gateway, n)
    assert [r.status_code for r in responses] == [200] * n
    hello_key = key("destination", "unknown", "hello", "v1", "default")

    def total() -> float:
        return requests_by_series(scrape(two_worker_gateway)).get(hello_key | {("code", "200")}, 0)

    # Workers push their stats each second: poll until the sum arrives, then it must be exactly n, and stay so.
    wait_for(lambda: total() >= n, timeout=5.0, what=f"{n} requests in one scrape")
    metrics = scrape(two_worker_gateway)
    assert requests_by_series(metrics) == {hello_key | {("code", "200")}: n}
    assert_histogram(metrics, hello_key, n)
    assert metrics.series("meshgate_inflight_requests") == {frozenset({("destination", "hello")}): 0}
    assert metrics.series("meshgate_open_connections").get(frozenset({("listener", "inbound")})) == 0
    exposed = scrape(two_worker_gateway, "metrics")  # the supervisor serves the metrics listener too
    assert requests_by_series(exposed) == requests_by_series(metrics)


def test_workers_request_lookup_through_the_supervisor(
    two_worker_gateway: Gateway, hello_upstream: UpstreamServer
) -> None:
    # 40 fresh connections land on both workers (all on one of two would happen once in 2**39 runs).
    responses = fresh_connection_requests(two_worker_gateway, 40)
    assert hello_upstream.requests == 40
    with client(two_worker_gateway, "admin") as admin:
        for response in responses:
            request_id = response.headers["x-request-id"]
            started = time.monotonic()
            found = admin.get(f"/requests/{request_id}")
            # Every worker answered: the supervisor waits up to 2 s only for a worker that does not.
            assert time.monotonic() - started < 1.0
            assert found.status_code == 200, found.text
            hops = found.json()["hops"]
            assert len(hops) == 1, hops
            hop = hops[0]
            assert (hop["request_id"], hop["destination"], hop["status"]) == (request_id, "hello", 200)
            assert (hop["reporter"], hop["source"], hop["subset"], hop["route"]) == (
                "destination",
                "unknown",
                "v1",
                "default",
            )
        missing = admin.get("/requests/no-such-request-id")
        assert missing.status_code == 404
        assert missing.json()["hops"] == []


def test_workers_counters_stay_monotonic_when_a_worker_is_replaced(two_worker_gateway: Gateway) -> None:
    """A counter that goes down reads to Prometheus as a reset, and rate() then counts the whole remaining total
    again as new increase. The supervisor replaces a worker that died; the requests it counted stay counted."""
    n = 40
    assert [r.status_code for r in fresh_connection_requests(two_worker_gateway, n)] == [200] * n
    hello_ok = key("destination", "unknown", "hello", "v1", "default") | {("code", "200")}
    wait_for(
        lambda: requests_by_series(scrape(two_worker_gateway)).get(hello_ok) == n, timeout=5.0, what=f"{n} requests"
    )
    before = scrape(two_worker_gateway)
    workers = wait_for(lambda: len(found := workers_of(two_worker_gateway)) == 2 and found, timeout=10.0)
    victim = workers[0]
    victim.kill()
    wait_for(
        lambda: len(found := workers_of(two_worker_gateway)) == 2 and victim.pid not in {p.pid for p in found},
        timeout=10.0,
        what="the supervisor to replace the killed worker",
    )
    after = scrape(two_worker_gateway)
    assert requests_by_series(after).get(hello_ok) == n, requests_by_series(after)
    assert after.series("meshgate_request_duration_seconds_count") == before.series(
        "meshgate_request_duration_seconds_count"
    )
    cpu_before, cpu_after = (m.value("meshgate_process_cpu_seconds_total") for m in (before, after))
    assert cpu_before is not None and cpu_after is not None and cpu_after >= cpu_before, (cpu_before, cpu_after)
