"""The golden-signal API over real traffic: a real dashboard (uvicorn, SQLite, its CA) with its sampler running,
three joined `meshgate gateway` processes over mTLS, real upstreams, and requests sent through the gateways.

Heartbeats and samples come every 0.2 s here. The mesh is shared by the module's tests; each test first reads the
counts it will change (the fixture waits until everything sent before it has been counted), then waits until the
API shows exactly its own requests on top.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import Gateway, listeners, wait_for
from tests.dashboard.dashboards import Dashboard
from tests.e2e.mesh import wait_ready
from tests.e2e.upstream_app import UpstreamServer

STEP = 0.2
MESH: dict[str, Any] = {
    "groups": {"shop": ["storefront"], "catalog": ["catalog"], "payments": ["payments"]},
    "services": {
        "storefront": {"subsets": {"v1": {"endpoints": []}}},
        "catalog": {
            "subsets": {"v1": {"endpoints": []}, "v2": {"endpoints": []}},
            "routes": [{"name": "default", "split": {"v1": 50, "v2": 50}}],
        },
        "payments": {"subsets": {"v1": {"endpoints": []}}, "authorization": {"allow": ["shop"]}},
    },
}


@dataclass
class Mesh:
    dashboard: Dashboard
    gateways: dict[str, Gateway]
    directory: Path
    api: httpx.Client

    def call(self, group: str, service: str, path: str = "/echo") -> httpx.Response:
        """What an app of `group` does: call `service` through its own gateway's outbound listener."""
        url = self.gateways[group].url("outbound") + path
        return httpx.get(url, headers={"host": service}, timeout=10, trust_env=False)

    def get(self, path: str, **params: str) -> Any:
        answer = self.api.get(path, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def service(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.get(f"/api/v1/services/{name}/signals", window="5m")
        return found

    def edge(self, source: str, destination: str) -> dict[str, Any] | None:
        topology = self.get("/api/v1/topology", window="5m")
        return next(
            (item for item in topology["edges"] if (item["source"], item["destination"]) == (source, destination)),
            None,
        )

    def wait_count(self, service: str, key: str, expected: int, where: tuple[str, ...] = ("totals",)) -> dict[str, Any]:
        """Poll the service's signals until `key` under `where` is exactly `expected`."""

        def counted() -> dict[str, Any] | None:
            found = self.service(service)
            value: Any = found
            for step in where:
                value = value.get(step, {})
            return found if value.get(key) == expected else None

        result: dict[str, Any] = wait_for(counted, 15.0, 0.1, what=f"{service} {'.'.join(where)}.{key} == {expected}")
        return result


def join(dashboard: Dashboard, directory: Path, group: str, *extra: str) -> Gateway:
    path = directory / f"gateway-{group}.yaml"
    section = {"listen": listeners(*extra), "telemetry": {"access_log": "off"}}
    path.write_text(yaml.safe_dump({"gateway": section}))
    token = dashboard.token("gateway", group)
    data = directory / f"gateway-{group}-data"
    return Gateway(path, ["--control", dashboard.url, "--group", group, "--token", token, "--data", str(data)])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    directory = tmp_path_factory.mktemp("signals")
    upstreams = {name: UpstreamServer(name).start() for name in ("store", "v1", "v2", "pay")}
    spec = yaml.safe_load(yaml.safe_dump(MESH))
    services = spec["services"]
    services["storefront"]["subsets"]["v1"]["endpoints"] = [upstreams["store"].address]
    services["catalog"]["subsets"]["v1"]["endpoints"] = [upstreams["v1"].address]
    services["catalog"]["subsets"]["v2"]["endpoints"] = [upstreams["v2"].address]
    services["payments"]["subsets"]["v1"]["endpoints"] = [upstreams["pay"].address]
    dashboard = Dashboard(directory / "dashboard", heartbeat_interval=STEP, signals_step=STEP)
    sampler: concurrent.futures.Future[None] = asyncio.run_coroutine_threadsafe(
        dashboard.app.state.signals.source.run(), dashboard.loop
    )
    gateways: dict[str, Gateway] = {}
    try:
        dashboard.seed(spec)
        gateways["shop"] = join(dashboard, directory, "shop", "edge")
        gateways["catalog"] = join(dashboard, directory, "catalog")
        gateways["payments"] = join(dashboard, directory, "payments")
        wait_ready(*gateways.values())
        with dashboard.client(dashboard.token("viewer")) as api:
            found = Mesh(dashboard, gateways, directory, api)
            reached = wait_for(lambda: found.call("shop", "catalog").status_code == 200 and 1, 15, what="shop->catalog")
            denied = wait_for(lambda: found.call("catalog", "payments").status_code == 403 and 1, 15, what="403")
            # Everything the start-up checks sent reached its owner's gateway exactly once: wait until counted.
            found.wait_count("catalog", "requests", reached)
            found.wait_count("payments", "denied", denied)
            yield found
    finally:
        sampler.cancel()
        for gateway in gateways.values():
            gateway.stop()
        dashboard.stop()
        for upstream in upstreams.values():
            upstream.stop()


def test_a_canary_split_shows_per_subset_rates_errors_and_latency(mesh: Mesh) -> None:
    before = mesh.service("catalog")["totals"]
    sent: list[int] = []
    for i in range(40):
        # A 500 every fourth call: never five in a row at one endpoint, so outlier ejection stays out of it.
        sent.append(mesh.call("shop", "catalog", "/status/500" if i % 4 == 3 else "/delay/30").status_code)
    assert sent.count(500) == 10 and sent.count(200) == 30
    found = mesh.wait_count("catalog", "requests", before["requests"] + 40)
    totals = found["totals"]
    assert totals["errors"] - before["errors"] == 10
    assert found["group"] == "catalog" and found["window"] == 300.0
    subsets = found["subsets"]
    assert set(subsets) == {"v1", "v2"} and subsets["v1"]["weight"] == subsets["v2"]["weight"] == 50
    assert subsets["v1"]["totals"]["requests"] + subsets["v2"]["totals"]["requests"] == totals["requests"]
    assert subsets["v1"]["totals"]["requests"] > 0 and subsets["v2"]["totals"]["requests"] > 0
    # Three quarters of this test's calls waited 30 ms at the upstream: the median is in (25 ms, 50 ms].
    assert 25.0 < totals["p50_ms"] <= 100.0 and totals["p50_ms"] <= totals["p99_ms"] <= 250.0
    assert found["callers"]["shop"]["requests"] == totals["requests"]
    # Chart points: the service and each subset, side by side over the same times, adding up to the totals.
    times = [item["t"] for item in found["points"]]
    assert times == sorted(times) and [item["t"] for item in subsets["v2"]["points"]] == times
    busy = [item for item in found["points"] if item["rps"]]
    assert busy and any(item["error_rate"] for item in busy) and any(item["p99_ms"] for item in busy)
    edge = mesh.edge("group:shop", "service:catalog")
    assert edge is not None and edge["rps"] > 0 and edge["mtls"] is True and edge["denied"] == 0
    assert edge["error_rate"] is not None and 0 < edge["error_rate"] < 0.5
    detail = mesh.get("/api/v1/topology/edge", source="group:shop", destination="service:catalog", window="5m")
    assert detail["totals"]["requests"] == totals["requests"] and set(detail["subsets"]) == {"v1", "v2"}


def test_denied_calls_are_counted_on_their_edge(mesh: Mesh) -> None:
    before = mesh.service("payments")["totals"]
    answers = [mesh.call("catalog", "payments").status_code for _ in range(6)]
    assert answers == [403] * 6
    allowed = mesh.call("shop", "payments")
    assert allowed.status_code == 200 and allowed.headers["x-upstream"] == "pay"
    # The allowed call came last: once it is counted, so are the refusals before it (snapshots are cumulative).
    found = mesh.wait_count("payments", "requests", before["requests"] + 7)
    assert found["totals"]["denied"] == before["denied"] + 6
    assert found["callers"]["catalog"]["denied"] == found["totals"]["denied"]
    assert found["callers"]["shop"]["denied"] == 0
    denied = mesh.edge("group:catalog", "service:payments")
    assert denied is not None and denied["denied"] == found["totals"]["denied"] and denied["mtls"] is True
    topology = mesh.get("/api/v1/topology", window="5m")
    nodes = {node["id"]: node for node in topology["nodes"]}
    assert nodes["service:payments"]["health"] == "ok"  # a refusal is the policy working, not an error


def test_external_clients_and_calls_a_group_serves_itself(mesh: Mesh) -> None:
    before = mesh.service("storefront")["totals"]["requests"]
    edge_url = mesh.gateways["shop"].url("edge")
    for _ in range(5):
        answer = httpx.get(edge_url + "/echo", headers={"host": "storefront"}, timeout=10, trust_env=False)
        assert answer.status_code == 200
    for _ in range(4):  # shop's app calls storefront, which shop owns: one hop, reported by the source side
        assert mesh.call("shop", "storefront").status_code == 200
    found = mesh.wait_count("storefront", "requests", before + 9)
    assert found["callers"]["external"]["requests"] >= 5 and found["callers"]["shop"]["requests"] >= 4
    external = mesh.edge("external", "service:storefront")
    local = mesh.edge("group:shop", "service:storefront")
    assert external is not None and external["mtls"] is False and external["rps"] > 0
    assert local is not None and local["rps"] > 0 and local["mtls"] is False  # app -> own gateway, on loopback
    nodes = {node["id"]: node for node in mesh.get("/api/v1/topology")["nodes"]}
    assert nodes["external"]["kind"] == "external"
    assert nodes["group:shop"]["gateways"] == {"live": 1, "stale": 0} and nodes["group:shop"]["health"] == "ok"
    assert nodes["service:storefront"]["group"] == "shop" and nodes["service:storefront"]["subsets"] == ["v1"]


def test_a_gateways_own_signals(mesh: Mesh) -> None:
    listing = mesh.get("/api/v1/gateways")
    catalog = next(item for item in listing if item["group"] == "catalog")
    assert mesh.call("shop", "catalog").status_code == 200
    expected = mesh.service("catalog")["totals"]["requests"] + 1
    mesh.wait_count("catalog", "requests", expected)

    def signals() -> dict[str, Any] | None:
        found: dict[str, Any] = mesh.get(f"/api/v1/gateways/{catalog['instance']}/signals", window="5m")
        return found if found["served"]["requests"] == expected else None

    found = wait_for(signals, 15.0, 0.1, what="the catalog gateway's served count")
    assert found["group"] == "catalog" and found["stale"] is False
    assert found["sent"]["requests"] >= 1  # its start-up check called payments through it
    latest = found["latest"]
    assert latest is not None and latest["rss"] > 10_000_000 and latest["cpu"] is not None and latest["cpu"] >= 0
    assert latest["connections"] >= 0 and latest["inflight"] >= 0 and latest["loop_lag_ms"] >= 0
    assert found["points"] and found["points"][-1]["t"] >= found["points"][0]["t"]
    assert mesh.api.get("/api/v1/gateways/nope/signals").status_code == 404


def test_the_api_checks_its_callers_and_parameters(mesh: Mesh) -> None:
    with mesh.dashboard.client() as anonymous:
        answer = anonymous.get("/api/v1/topology")
        assert answer.status_code == 401 and list(answer.json()) == ["error"]
    for window, status in (("5m", 200), ("1h", 200), ("6h", 200), ("90", 200), ("7h", 400), ("0s", 400), ("x", 400)):
        answer = mesh.api.get("/api/v1/topology", params={"window": window})
        assert answer.status_code == status, (window, answer.text)
        if status == 400:
            assert "window" in answer.json()["error"]
    missing = mesh.api.get("/api/v1/services/nope/signals")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    bad_edge = mesh.api.get("/api/v1/topology/edge", params={"source": "service:x", "destination": "group:y"})
    assert bad_edge.status_code == 400
    six_hours = mesh.get("/api/v1/services/catalog/signals", window="6h")
    assert six_hours["totals"]["requests"] == mesh.service("catalog")["totals"]["requests"]  # minute frames agree
    assert 0 < len(six_hours["points"]) <= 120
    with mesh.dashboard.client() as anonymous:
        paths = anonymous.get("/api/v1/openapi.json").json()["paths"]
    for path in ("/topology", "/topology/edge", "/services/{name}/signals", "/gateways/{instance}/signals"):
        operation = paths[f"/api/v1{path}"]["get"]
        assert operation["summary"] and {"200", "401", "503"} <= set(operation["responses"]), path
        names = {item.get("name") or item["$ref"].rsplit("/", 1)[1] for item in operation["parameters"]}
        assert "window" in names and all(f"{{{name}}}" not in path or name in names for name in ("name", "instance"))
    golden = asyncio.run_coroutine_threadsafe(mesh.dashboard.app.state.signals.services(300.0), mesh.dashboard.loop)
    services = golden.result(10)
    assert set(services) == {"storefront", "catalog", "payments"}
    assert services["catalog"]["rps"] > 0 and set(services["catalog"]["subsets"]) == {"v1", "v2"}
    assert set(services["catalog"]) == {"rps", "error_rate", "p99_ms", "subsets"}


def test_a_restarted_gateway_counts_from_zero_without_losing_or_doubling(mesh: Mesh) -> None:
    totals = mesh.service("catalog")["totals"]
    before = totals["requests"]
    for _ in range(5):
        assert mesh.call("shop", "catalog").status_code == 200
    mesh.wait_count("catalog", "requests", before + 5)
    old = mesh.gateways["catalog"]
    old.stop()
    config = yaml.safe_load(old.config_path.read_text())
    config["gateway"]["listen"] = {kind: f"{host}:{port}" for kind, (host, port) in old.addresses.items()}
    old.config_path.write_text(yaml.safe_dump(config))
    restarted = mesh.gateways["catalog"] = Gateway(old.config_path, [str(arg) for arg in old.proc.args[6:]])  # type: ignore[index]
    wait_ready(restarted)
    reached = 0
    for _ in range(8):
        reached += mesh.call("shop", "catalog").status_code == 200
    assert reached >= 1
    # The new process's counters start at 0 (fewer than before): all of them are new, none of the old count again.
    # (Its first heartbeat often has no series yet; tests/dashboard/test_stats.py covers the arithmetic of both.)
    found = mesh.wait_count("catalog", "requests", before + 5 + reached)
    assert found["totals"]["errors"] == totals["errors"]  # calls it missed while down failed at shop's gateway
