"""A real Prometheus scrapes a real gateway under traffic, and PromQL over its HTTP API agrees with what was sent.

The test starts `/usr/bin/prometheus` (Debian package `prometheus`) itself, on loopback, with its own config (a 1 s
scrape interval, the gateway's admin listener as the only target) and its own data directory under tmp_path, and
stops it afterwards. It is skipped only where that binary is absent; CI installs it. Prometheus asks for
OpenMetrics first, so it reads the gateway's OpenMetrics exposition; with `--enable-feature=exemplar-storage` it
also keeps the exemplars that lead from a latency bucket to an exported request's trace and request ID.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import Gateway, StartGateway, gateway_config, hello, wait_for
from tests.e2e.upstream_app import UpstreamServer

PROMETHEUS = Path("/usr/bin/prometheus")
pytestmark = pytest.mark.skipif(
    not PROMETHEUS.exists(), reason="/usr/bin/prometheus not installed (Debian package `prometheus`); CI installs it"
)


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector (`/api/v1/query`)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5.0, trust_env=False)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return list(body["data"]["result"])

    def scalar(self, promql: str) -> float | None:
        """The value of a query expected to return at most one series; None when it returns none."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited:\n" + self.log.read_text()
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1.0, trust_env=False).status_code == 200
        except httpx.TransportError:  # not listening yet
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    started: list[Prometheus] = []

    def start(target: tuple[str, int], *features: str) -> Prometheus:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "meshgate", "static_configs": [{"targets": [f"{target[0]}:{target[1]}"]}]}],
        }
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        log = tmp_path / "prometheus.log"
        address = f"127.0.0.1:{free_port()}"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
                    f"--web.listen-address={address}",
                    "--log.level=warn",
                    *(f"--enable-feature={feature}" for feature in features),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        prometheus = Prometheus(proc, f"http://{address}", log)
        started.append(prometheus)
        wait_for(prometheus.ready, timeout=20.0, interval=0.1, what="prometheus /-/ready")
        return prometheus

    yield start
    for prometheus in started:
        prometheus.stop()


def test_prometheus_scrapes_request_count_and_latency(
    hello_gateway: Gateway, hello_upstream: UpstreamServer, start_prometheus: Callable[..., Prometheus]
) -> None:
    prometheus = start_prometheus(hello_gateway.admin)
    # Traffic starts only once the target is up, so that it spans several scrapes: rate() needs the counters to
    # rise between samples, not to appear already at their final value.
    wait_for(lambda: prometheus.scalar('up{job="meshgate"}') == 1, timeout=10.0, interval=0.2, what="the first scrape")
    sent: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=hello_gateway.url(), trust_env=False, timeout=5.0) as http:
            while not stop.is_set():
                sent.append(http.get("/delay/50", headers={"host": "hello"}).status_code)

    threads = [threading.Thread(target=traffic, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        # Until Prometheus has seen the count rise twice (three scrapes under traffic), so rate() has a slope.
        wait_for(
            lambda: (prometheus.scalar('sum(changes(meshgate_requests_total{destination="hello"}[30s]))') or 0) >= 2,
            timeout=15.0,
            interval=0.2,
            what="three scrapes under traffic",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert sent and set(sent) == {200}, sent
    assert hello_upstream.requests == len(sent)

    def scraped_total() -> float | None:
        return prometheus.scalar('sum(meshgate_requests_total{destination="hello"})')

    total = wait_for(
        lambda: (value := scraped_total()) is not None and value >= len(sent) and value,
        timeout=10.0,
        interval=0.2,
        what=f"Prometheus to have scraped all {len(sent)} requests",
    )
    assert total == len(sent)
    assert prometheus.scalar('sum(meshgate_requests_total{destination="hello",code="200"})') == len(sent)
    assert prometheus.scalar('sum(meshgate_request_duration_seconds_count{destination="hello"})') == len(sent)

    p99 = prometheus.scalar(
        "histogram_quantile(0.99, sum by (le) (rate(meshgate_request_duration_seconds_bucket[30s])))"
    )
    p50 = prometheus.scalar(
        "histogram_quantile(0.5, sum by (le) (rate(meshgate_request_duration_seconds_bucket[30s])))"
    )
    assert p99 is not None and 0.05 <= p99 <= 0.25, p99  # each request waited 50 ms at the upstream
    assert p50 is not None and 0.05 <= p50 <= p99, (p50, p99)


def test_prometheus_stores_exemplars_of_exported_requests(
    start_gateway: StartGateway, hello_upstream: UpstreamServer, start_prometheus: Callable[..., Prometheus]
) -> None:
    # Every span is exported (to the upstream, which answers any POST with 200: an OTLP sink is all it takes).
    tracing = {"endpoint": f"http://{hello_upstream.address}/v1/traces", "sampling": 1.0}
    gw = start_gateway(
        gateway_config(hello(hello_upstream.address), telemetry={"access_log": "off", "tracing": tracing})
    )
    prometheus = start_prometheus(gw.admin, "exemplar-storage")
    wait_for(lambda: prometheus.scalar('up{job="meshgate"}') == 1, timeout=10.0, interval=0.2, what="the first scrape")
    started = time.time()
    with httpx.Client(base_url=gw.url(), trust_env=False, timeout=5.0) as http:
        sent = {http.get("/delay/20", headers={"host": "hello"}).headers["x-request-id"] for _ in range(5)}

    def stored() -> list[dict[str, Any]]:
        response = httpx.get(
            f"{prometheus.url}/api/v1/query_exemplars",
            params={"query": "meshgate_request_duration_seconds_bucket", "start": started - 5, "end": time.time() + 5},
            timeout=5.0,
            trust_env=False,
        )
        assert response.status_code == 200, response.text
        return [exemplar for series in response.json()["data"] for exemplar in series["exemplars"]]

    found = wait_for(stored, timeout=15.0, interval=0.2, what="an exemplar in Prometheus")
    for exemplar in found:
        labels = exemplar["labels"]
        assert labels["request_id"] in sent, labels
        (hop,) = httpx.get(gw.url("admin") + f"/requests/{labels['request_id']}", trust_env=False).json()["hops"]
        assert labels["trace_id"] == hop["trace_id"]
        assert 0.02 <= float(exemplar["value"]) < 1.0 and float(exemplar["value"]) == hop["duration"]
