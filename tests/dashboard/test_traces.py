"""Trace lookup with real parts: a uvicorn dashboard with its span store, two gateways joined to it (real processes,
certificates from its mesh CA) in front of a real upstream, and the dashboard asking the gateways' rings over mTLS
with its own identity.

Covers: an unsampled request found in both gateways' rings; a sampled one merged with its stored spans (each hop
once, with what the ring and the store say) and with the application's own span in the same trace, by request ID
and by trace ID; gateways that cannot be reached or do not prove their group listed, not fatal; and `--jaeger`.

Jaeger cannot be installed on this machine, so the `--jaeger` tests run against `tests/dashboard/jaeger_stub.py`:
a real HTTP server serving the two endpoints of Jaeger's documented query API that the dashboard reads
(`/api/traces` search and `/api/traces/{traceID}`), in Jaeger's JSON model.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from dashboard.api.traces import merge
from dashboard.spans.store import DB_FILE, SpanStore, span_dict
from dashboard.store.model import GatewayRecord
from tests.conftest import Gateway, listeners, wait_for
from tests.dashboard.dashboards import Dashboard, running
from tests.dashboard.jaeger_stub import JaegerStub, jaeger_span, jaeger_trace
from tests.dashboard.otlp_requests import app_span, export, new_span_id, new_trace_id, post
from tests.e2e.mesh import wait_ready
from tests.e2e.servers import blackhole_address, refusing_address
from tests.e2e.upstream_app import UpstreamServer


@dataclass
class Mesh:
    dash: Dashboard
    spans: SpanStore
    gateways: dict[str, Gateway]
    upstream: UpstreamServer
    viewer: httpx.Client

    def call(self, **headers: str) -> httpx.Response:
        """What an app of group shop does: call catalog through its own gateway's outbound listener."""
        url = self.gateways["shop"].url("outbound") + "/echo"
        return httpx.get(url, headers={"host": "catalog", **headers}, timeout=10)

    def inbound(self, group: str) -> str:
        host, port = self.gateways[group].inbound
        return f"{host}:{port}"

    def lookup(self, request_id: str) -> httpx.Response:
        return self.viewer.get("/api/v1/traces", params={"request_id": request_id})


def joined(dash: Dashboard, directory: Path, group: str) -> Gateway:
    """A gateway of `group` joined to `dash`, exporting spans to it (sampled only when the caller says so)."""
    tracing = {"endpoint": f"{dash.url}/v1/traces", "sampling": 0.0}
    section = {"listen": listeners(), "telemetry": {"access_log": "off", "tracing": tracing}}
    path = directory / f"gateway-{group}.yaml"
    path.write_text(yaml.safe_dump({"gateway": section}))
    token = dash.token("gateway", group)
    data = directory / f"gateway-{group}-data"
    return Gateway(path, ["--control", dash.url, "--group", group, "--token", token, "--data", str(data)])


@pytest.fixture(scope="module")
def ring_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    directory = tmp_path_factory.mktemp("traces")
    upstream = UpstreamServer("v1").start()
    spans = SpanStore(str(directory / "data" / DB_FILE))
    gateways: dict[str, Gateway] = {}
    try:
        with running(directory / "data", spans=spans) as dash, dash.client(dash.token("viewer")) as viewer:
            dash.seed(
                {
                    "groups": {"shop": [], "catalog": ["catalog"]},
                    "services": {"catalog": {"subsets": {"v1": {"endpoints": [upstream.address]}}}},
                }
            )
            try:
                for group in ("shop", "catalog"):
                    gateways[group] = joined(dash, directory, group)
                wait_ready(*gateways.values())
                mesh = Mesh(dash, spans, gateways, upstream, viewer)
                wait_for(lambda: mesh.call().status_code == 200, 20, what="shop reaches catalog")
                yield mesh
            finally:
                for gateway in gateways.values():
                    gateway.stop()
    finally:
        asyncio.run(spans.close())
        upstream.stop()


def test_an_unsampled_request_is_found_in_both_gateways_rings(ring_mesh: Mesh) -> None:
    answer = ring_mesh.call()
    assert answer.status_code == 200
    request_id = answer.headers["x-request-id"]
    found = ring_mesh.lookup(request_id)
    assert found.status_code == 200, found.text
    result = found.json()
    assert {(gateway["group"], gateway["address"]) for gateway in result["gateways_asked"]} == {
        ("shop", ring_mesh.inbound("shop")),
        ("catalog", ring_mesh.inbound("catalog")),
    }
    assert result["unreachable"] == [] and result["request_id"] == request_id
    caller, owner = result["spans"]
    assert [span["found_in"] for span in result["spans"]] == [["ring"], ["ring"]]  # sampling 0: never exported
    assert result["trace_id"] == caller["trace_id"] == owner["trace_id"]
    assert owner["parent_span_id"] == caller["span_id"]
    assert (caller["group"], caller["reporter"], caller["kind"], caller["destination"]) == (
        "shop",
        "source",
        "client",
        "catalog",
    )
    assert caller["endpoint"] == ring_mesh.inbound("catalog")  # shop's gateway called catalog's, over mTLS
    assert (owner["group"], owner["reporter"], owner["caller"], owner["subset"], owner["endpoint"]) == (
        "catalog",
        "destination",
        "shop",
        "v1",
        ring_mesh.upstream.address,
    )
    assert (owner["status"], owner["error"], owner["tries"], owner["method"], owner["path"]) == (
        200,
        None,
        1,
        "GET",
        "/echo",
    )
    assert owner["service"] == "meshgate-gateway-catalog" and owner["request_id"] == request_id
    assert owner["attributes"]["hop.bytes_out"] > 0 and owner["attributes"]["hop.flags"] == "-"


def test_a_sampled_request_merges_the_rings_with_its_stored_spans_once_per_span(ring_mesh: Mesh) -> None:
    trace_id, incoming = new_trace_id(), new_span_id()
    answer = ring_mesh.call(traceparent=f"00-{trace_id}-{incoming}-01")  # the caller sampled it: both hops export
    request_id = answer.headers["x-request-id"]
    upstream_parent = answer.json()["headers"]["traceparent"][0].split("-")[2]  # the owner's hop, as the app sees
    application = app_span(trace_id, new_span_id(), upstream_parent, name="load catalog")
    with ring_mesh.dash.client() as app:  # the application exports its own span (no request ID on it)
        assert post(app, export(application, service="catalog-app", group=None)).status_code == 200

    def merged() -> list[dict[str, Any]] | None:
        spans: list[dict[str, Any]] = ring_mesh.lookup(request_id).json().get("spans", [])
        complete = [span["found_in"] for span in spans] == [["ring", "store"], ["ring", "store"], ["store"]]
        return spans if complete else None

    caller, owner, own = wait_for(merged, 15, what="both hops exported and the app's span stored")
    assert caller["parent_span_id"] == incoming and owner["parent_span_id"] == caller["span_id"]
    assert own["parent_span_id"] == owner["span_id"] == upstream_parent
    assert (own["service"], own["name"], own["source"]) == ("catalog-app", "load catalog", "store")
    # One span per hop, with what each source knows: the store's attributes and the ring's byte counts.
    assert owner["source"] == "store" and owner["attributes"]["url.path"] == "/echo"
    # Each gateway exported with its join token: its stored spans are its group's hops (an unproven copy would
    # neither lead nor be merged: found_in would say "ring" alone).
    assert [span["unverified"] for span in (caller, owner, own)] == [None, None, None]
    assert (caller["group"], owner["group"]) == ("shop", "catalog")
    assert owner["attributes"]["hop.bytes_out"] > 0 and owner["subset"] == "v1"
    by_trace = ring_mesh.viewer.get(f"/api/v1/traces/{trace_id}")
    assert by_trace.status_code == 200, by_trace.text
    assert [span["found_in"] for span in by_trace.json()["spans"]] == [["ring", "store"]] * 2 + [["store"]]
    assert by_trace.json()["request_id"] == request_id and len(by_trace.json()["gateways_asked"]) == 2


def test_gateways_that_cannot_be_reached_or_do_not_prove_their_group_are_listed(ring_mesh: Mesh) -> None:
    request_id = ring_mesh.call().headers["x-request-id"]
    with refusing_address() as closed, blackhole_address() as hanging:
        # A record that says "payments" at catalog's address (catalog's gateway answers, as catalog), a shop
        # gateway that is gone, and one whose connects hang: all asked at once, each for at most 2 s.
        fakes = [("payments", ring_mesh.inbound("catalog")), ("shop", closed), ("web", hanging)]
        records = [_record(group, address, time.time()) for group, address in fakes]
        try:
            for record in records:
                _put(ring_mesh.dash, record)
            started = time.monotonic()
            found = ring_mesh.lookup(request_id)
            elapsed = time.monotonic() - started
        finally:
            for record in records:  # stale from now on: the other tests ask only the real gateways
                _put(ring_mesh.dash, GatewayRecord(record.instance, record.group, record.data, 0.0))
    assert found.status_code == 200, found.text
    assert 1.9 < elapsed < 3.5, elapsed
    result = found.json()
    assert [span["group"] for span in result["spans"]] == ["shop", "catalog"]  # the real gateways still answered
    assert len(result["gateways_asked"]) == 5
    problems = {problem["group"]: problem for problem in result["unreachable"]}
    assert set(problems) == {"payments", "shop", "web"}
    assert problems["payments"]["error"] == (
        "presented spiffe://meshgate.local/group/catalog, expected spiffe://meshgate.local/group/payments"
    )
    assert problems["shop"]["address"] == closed and "ConnectError" in problems["shop"]["error"]
    assert problems["web"]["error"] == "timed out" and problems["web"]["kind"] == "gateway"


def _put(dash: Dashboard, record: GatewayRecord) -> None:
    dash.call(lambda: dash.store.put_gateway(record))


def _record(group: str, address: str, seen: float) -> GatewayRecord:
    instance = str(uuid.uuid4())
    data = {
        "instance": instance,
        "group": group,
        "advertise": address,
        "listeners": {"inbound": address},
        "config_version": 0,
        "meshgate_version": "test",
        "started": seen,
        "stats": {"series": [], "counters": [], "gauges": []},
    }
    return GatewayRecord(instance, group, data, seen)


def test_an_unknown_request_id_is_404_after_asking_every_gateway(ring_mesh: Mesh) -> None:
    answer = ring_mesh.lookup("never-sent-1")
    assert answer.status_code == 404
    assert answer.json() == {"error": "no spans or hop records for request ID never-sent-1: asked 2 gateways"}


def test_with_jaeger_sampled_spans_come_from_jaeger_and_merge_with_the_rings(ring_mesh: Mesh) -> None:
    request_id = ring_mesh.call().headers["x-request-id"]
    caller, owner = ring_mesh.lookup(request_id).json()["spans"]
    jaeger = JaegerStub()
    try:
        # What Jaeger holds for this request: catalog's hop, as Jaeger stores a span it received over OTLP.
        span = jaeger_span(
            owner["trace_id"],
            owner["span_id"],
            caller["span_id"],
            "GET default",
            owner["start"],
            owner["duration_ms"],
            span__kind="server",
            meshgate__service="catalog",
            http__response__status_code=200,
            url__path="/echo",
            **{"guid:x-request-id": request_id},
        )
        jaeger.traces.append(jaeger_trace([span], {"p1": "meshgate-gateway-catalog"}))
        # A dashboard replica reading the same store and CA, configured with --jaeger.
        with (
            running(ring_mesh.dash.data, jaeger=jaeger.url) as replica,
            replica.client(replica.token("viewer")) as viewer,
        ):
            found = viewer.get("/api/v1/traces", params={"request_id": request_id})
        assert found.status_code == 200, found.text
        spans = found.json()["spans"]
        assert [(span["span_id"], span["source"], span["found_in"]) for span in spans] == [
            (caller["span_id"], "ring", ["ring"]),
            (owner["span_id"], "jaeger", ["jaeger", "ring"]),
        ]
        assert spans[1]["attributes"]["hop.bytes_out"] > 0 and spans[1]["group"] == "catalog"
        searches = [params for path, params in jaeger.queries if path == "/api/traces"]
        assert sorted(params["service"] for params in searches) == ["meshgate-gateway-catalog", "meshgate-gateway-shop"]
        assert {params["tags"] for params in searches} == {
            json.dumps({"guid:x-request-id": request_id}).replace(" ", "")
        }
    finally:
        jaeger.stop()


# Jaeger alone: a dashboard without gateways, its mesh the default of tests/dashboard/dashboards.py (groups shop,
# owning catalog, and web, owning frontend).

TRACE64 = "00f067aa0ba902b7"  # Jaeger writes a 64-bit trace ID with 16 hex digits
NOW = time.time()


def _stored_in_jaeger() -> list[dict[str, Any]]:
    caller = jaeger_span(
        TRACE64,
        "1111111111111111",
        None,
        "GET default",
        NOW - 30,
        400,
        span__kind="client",
        meshgate__reporter="source",
        meshgate__source="web",
        meshgate__service="catalog",
        http__response__status_code=503,
        error=True,
        otel__status_code="ERROR",
        **{"guid:x-request-id": "req-jaeger", "error.type": "503"},
    )
    owner = jaeger_span(
        TRACE64,
        "2222222222222222",
        "1111111111111111",
        "GET default",
        NOW - 29.99,
        390,
        process="p2",
        span__kind="server",
        meshgate__reporter="destination",
        meshgate__source="web",
        meshgate__service="catalog",
        meshgate__subset="v2",
        meshgate__retries=2,
        http__response__status_code=503,
        **{"guid:x-request-id": "req-jaeger"},
    )
    fine = jaeger_span(
        "aa" * 16, "3333333333333333", None, "GET default", NOW - 10, 3, process="p2", http__response__status_code=200
    )
    fine["tags"].append({"key": "meshgate.service", "type": "string", "value": "catalog"})
    return [
        jaeger_trace([caller, owner], {"p1": "meshgate-gateway-web", "p2": "meshgate-gateway-shop"}),
        jaeger_trace([fine], {"p2": "meshgate-gateway-shop"}),
    ]


@pytest.fixture
def jaeger() -> Iterator[JaegerStub]:
    stub = JaegerStub()
    stub.traces.extend(_stored_in_jaeger())
    yield stub
    stub.stop()


@pytest.fixture
def jaeger_viewer(tmp_path: Path, jaeger: JaegerStub) -> Iterator[httpx.Client]:
    with running(tmp_path / "data", jaeger=jaeger.url) as dash, dash.client(dash.token("viewer")) as viewer:
        dash.seed()
        yield viewer


def test_jaeger_finds_a_request_by_its_tag_in_every_groups_gateway_service(
    jaeger: JaegerStub, jaeger_viewer: httpx.Client
) -> None:
    found = jaeger_viewer.get("/api/v1/traces", params={"request_id": "req-jaeger"})
    assert found.status_code == 200, found.text
    result = found.json()
    padded = TRACE64.rjust(32, "0")
    assert (result["trace_id"], result["gateways_asked"], result["unreachable"]) == (padded, [], [])
    caller, owner = result["spans"]
    assert (caller["parent_span_id"], owner["parent_span_id"]) == ("", "1111111111111111")
    assert (caller["service"], caller["group"], caller["kind"], caller["status"], caller["error"]) == (
        "meshgate-gateway-web",
        "web",
        "client",
        503,
        "503",
    )
    assert (owner["subset"], owner["tries"], owner["error"], owner["source"], owner["duration_ms"]) == (
        "v2",
        3,
        "503",
        "jaeger",
        390,
    )
    searches = [params for path, params in jaeger.queries if path == "/api/traces"]
    assert sorted(params["service"] for params in searches) == ["meshgate-gateway-shop", "meshgate-gateway-web"]
    assert all(json.loads(params["tags"]) == {"guid:x-request-id": "req-jaeger"} for params in searches)


def test_jaeger_reads_a_trace_by_id_and_a_missing_one_is_404(jaeger: JaegerStub, jaeger_viewer: httpx.Client) -> None:
    for asked in (TRACE64, TRACE64.rjust(32, "0")):
        answer = jaeger_viewer.get(f"/api/v1/traces/{asked}")
        assert answer.status_code == 200, answer.text
        assert [span["span_id"] for span in answer.json()["spans"]] == ["1111111111111111", "2222222222222222"]
        assert answer.json()["request_id"] == "req-jaeger"
    assert ("/api/traces/" + TRACE64.rjust(32, "0"), {}) in jaeger.queries
    missing = jaeger_viewer.get(f"/api/v1/traces/{'bb' * 16}")
    assert missing.status_code == 404 and "asked 0 gateways" in missing.json()["error"]


def test_jaeger_lists_recent_traces_with_the_filters_mapped_to_its_query(
    jaeger: JaegerStub, jaeger_viewer: httpx.Client
) -> None:
    def listed(**params: str) -> list[str]:
        answer = jaeger_viewer.get("/api/v1/traces", params=params)
        assert answer.status_code == 200, answer.text
        return [line["trace_id"] for line in answer.json()["traces"]]

    padded, fine = TRACE64.rjust(32, "0"), "aa" * 16
    assert listed() == [fine, padded]  # newest first, from every group's gateway service
    assert listed(status="5xx") == [padded] == listed(status="error")
    assert listed(status="2xx") == [fine]
    jaeger.queries.clear()
    assert listed(service="catalog", min_duration_ms="100") == [padded]
    (query,) = jaeger.queries
    assert query[1]["service"] == "meshgate-gateway-shop"  # catalog's owner records every call to it
    assert json.loads(query[1]["tags"]) == {"meshgate.service": "catalog"}
    assert query[1]["minDuration"] == "100000us" and query[1]["limit"] == "50"
    line = jaeger_viewer.get("/api/v1/traces", params={"status": "error"}).json()["traces"][0]
    assert (line["request_id"], line["status"], line["error"], line["spans"], line["service"]) == (
        "req-jaeger",
        503,
        True,
        2,
        "meshgate-gateway-web",
    )
    assert line["duration_ms"] == pytest.approx(400, abs=1)


def test_when_jaeger_is_down_lookups_say_so_and_the_list_is_a_502(
    jaeger: JaegerStub, jaeger_viewer: httpx.Client
) -> None:
    jaeger.stop()
    answer = jaeger_viewer.get("/api/v1/traces", params={"request_id": "req-jaeger"})
    assert answer.status_code == 404
    assert f"could not ask jaeger ({jaeger.url}: Jaeger at {jaeger.url}:" in answer.json()["error"]
    listing = jaeger_viewer.get("/api/v1/traces")
    assert listing.status_code == 502 and listing.json()["error"].startswith(f"Jaeger at {jaeger.url}")


def test_a_proven_copy_of_a_span_leads_and_unproven_copies_add_nothing_to_it() -> None:
    """Anyone may post a span under a hop's IDs (the upstream application sees them in traceparent); the copy from
    the gateway's ring, or one its gateway sent, is the one shown, and a lone unproven span is shown as it is."""
    trace_id, hop_id, other_id = new_trace_id(), new_span_id(), new_span_id()
    start = time.time()
    ring = span_dict(trace_id=trace_id, span_id=hop_id, start=start, status=200, group="catalog", source="ring")
    forged = span_dict(
        trace_id=trace_id,
        span_id=hop_id,
        start=start,
        status=500,
        error="forged",
        tries=9,
        unverified="claims gateway group catalog but was sent by a loopback client without credentials",
        attributes={"forged": True},
        source="store",
    )
    lone = {**forged, "span_id": other_id, "start": start + 1}
    hop, alone = merge([forged, ring, lone])
    assert (hop["status"], hop["error"], hop["tries"], hop["unverified"]) == (200, None, None, None)
    assert hop["attributes"] == {} and hop["found_in"] == ["ring"] and hop["group"] == "catalog"
    assert alone == {**lone, "found_in": ["store"]}
