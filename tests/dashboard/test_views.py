"""The UI's pages and htmx partials over HTTP against a real dashboard (uvicorn on loopback, SQLite, the real
`SignalsApi` sampling heartbeats put in its store): login redirects, security headers, canary controls through
the API's commit path, the change timeline and its revert, viewers, escaping, and the SVG geometry."""

from __future__ import annotations

import asyncio
import html
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dashboard.errors import ApiError
from dashboard.mesh import Mesh
from dashboard.signals import topology as topo
from dashboard.signals.history import FIRST_BUCKET, REQUESTS, WIDTH, Traffic, classify
from dashboard.spans.store import SpanStore
from dashboard.store.model import GatewayRecord
from dashboard.ui.charts import ARROW_ROOM, fmt, graph, line_chart, waterfall
from dashboard.ui.views import local_path, weights_from_form
from tests.dashboard.dashboards import Dashboard, running
from tests.dashboard.otlp_requests import app_span, export, hop_span, new_span_id, new_trace_id, post
from tests.dashboard.test_sessions import login

XSS = "<script>alert(1)</script>"
THRESHOLDS = topo.Thresholds()
PAGES = ("/topology", "/services", "/services/catalog", "/traces", "/gateways")


@pytest.fixture
def operator(dash: Dashboard) -> Iterator[tuple[httpx.Client, str]]:
    with dash.client() as client:
        yield client, login(client, dash.token("operator"))


@pytest.fixture
def viewer(dash: Dashboard) -> Iterator[tuple[httpx.Client, str]]:
    with dash.client() as client:
        yield client, login(client, dash.token("viewer"))


def series(reporter: str, source: str, destination: str, subset: str, codes: dict[int, int]) -> dict[str, Any]:
    buckets = [0] * 17
    buckets[6] = sum(codes.values())  # all between 5 and 10 ms
    return {
        "labels": [reporter, source, destination, subset, "default"],
        "codes": {str(code): count for code, count in codes.items()},
        "buckets": buckets,
        "sum": 0.007 * sum(codes.values()),
    }


def heartbeat(dash: Dashboard, group: str, traffic: list[dict[str, Any]], **fields: Any) -> str:
    """A gateway's heartbeat put straight into the store, then one sample of the golden signals."""
    instance: str = fields.pop("instance", str(uuid.uuid4()))
    data = {
        "instance": instance,
        "group": group,
        "meshgate_version": "0.1.0",
        "config_version": dash.current().version,
        "started": time.time(),  # started after the dashboard: everything it counted is new traffic
        "advertise": "127.0.0.1:15006",
        "listeners": {"inbound": "127.0.0.1:15006"},
        "cert_not_after": time.time() + 86400,
        "stats": {
            "series": traffic,
            "counters": [],
            "gauges": [["meshgate_inflight_requests", ["catalog"], 3]],
            "loop_lag": 0.002,
            "cpu": 0.25,
            "rss": 52_000_000,
        },
        **fields,
    }
    record = GatewayRecord(instance, group, data, time.time())
    dash.call(lambda: dash.store.put_gateway(record))
    dash.call(lambda: dash.app.state.signals.source.sample())
    return instance


def live_traffic(dash: Dashboard) -> None:
    """web calls catalog (v1 and v2, a few 5xx), and calls shop-owned catalog denied once; shop serves it."""
    heartbeat(
        dash,
        "shop",
        [
            series("destination", "web", "catalog", "v1", {200: 900, 503: 12}),
            series("destination", "web", "catalog", "v2", {200: 100}),
            series("destination", "external", "catalog", "", {403: 4}),
        ],
    )
    heartbeat(dash, "web", [series("source", "web", "catalog", "catalog", {200: 1000, 503: 12})])


def weights(dash: Dashboard) -> dict[str, int]:
    return dict(dash.current().mesh["services"]["catalog"]["routes"][-1]["split"])


def htmx(csrf: str) -> dict[str, str]:
    return {"hx-request": "true", "x-csrf-token": csrf}


# Access and hardening


def test_pages_send_people_without_a_session_to_the_login_page(dash: Dashboard) -> None:
    with dash.client() as client:
        for path in PAGES:
            answer = client.get(path)
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login?next=%2F"), path
        shown = {"hx-request": "true", "hx-current-url": f"{dash.url}/services/catalog?window=1h"}
        polled = client.get("/ui/services/catalog?window=1h", headers=shown)
        assert polled.status_code == 401  # the session ended: htmx takes the browser to the login page
        assert polled.headers["hx-redirect"] == "/login?next=%2Fservices%2Fcatalog%3Fwindow%3D1h"
        assert client.get("/services?window=6h").headers["location"] == "/login?next=%2Fservices%3Fwindow%3D6h"
        assert client.get("/").headers["location"] == "/topology"
    with dash.client(dash.token("viewer")) as bearer:  # a bearer token works for pages too (curl, scripts)
        assert bearer.get("/services/catalog").status_code == 200


def test_every_answer_has_the_security_headers_and_pages_no_inline_script_or_style(
    dash: Dashboard, operator: tuple[httpx.Client, str]
) -> None:
    client, _ = operator
    live_traffic(dash)
    answers = [client.get(path) for path in (*PAGES, "/login", "/ui/topology?node=service:catalog")]
    answers += [client.get("/api/v1/services"), client.get("/static/app.css"), client.get("/no/such/page")]
    for answer in answers:
        headers = answer.headers
        assert "default-src 'self'" in headers["content-security-policy"], answer.url
        assert "'unsafe-inline'" not in headers["content-security-policy"]
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "same-origin"
    for answer in answers[:7]:
        html = answer.text
        assert answer.headers["content-type"].startswith("text/html") and answer.headers["cache-control"] == "no-store"
        scripts = re.findall(r"<script\b[^>]*>", html)
        assert all(" src=" in tag for tag in scripts), scripts
        assert "<style" not in html and not re.search(r"\sstyle=", html), answer.url
        assert not re.search(r"\son[a-z]+=", html), answer.url  # no inline event handlers
        assert "https://" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    page = answers[0].text
    assert '<script src="/static/vendor/htmx-2.0.11.min.js" defer></script>' in page
    assert client.get("/static/vendor/htmx-2.0.11.min.js").headers["content-type"].startswith("text/javascript")


def test_pages_stay_out_of_the_openapi_document(dash: Dashboard) -> None:
    with dash.client() as client:
        paths = client.get("/api/v1/openapi.json").json()["paths"]
    assert "/api/v1/services/{name}/weights" in paths
    assert not any(path.startswith(("/topology", "/services/{name}/weights", "/login", "/ui/")) for path in paths)


def test_local_path_and_form_weights() -> None:
    assert local_path("/services/catalog?window=1h") == "/services/catalog?window=1h"
    for bad in (None, "", "//evil", "/\\evil", "http://evil", "/x\r\nSet-Cookie: a=b"):
        assert local_path(bad) == "/topology"
    assert weights_from_form({"percent": "25", "primary": "v1", "canary": "v2"}, ["v1", "v2"]) == {"v1": 75, "v2": 25}
    assert weights_from_form({"w.v1": "60", "w.v2": " 40 ", "w.v3": ""}, ["v1", "v2", "v3"]) == {"v1": 60, "v2": 40}
    assert weights_from_form({"w.v1": "ten"}, ["v1"]) == {"v1": "ten"}  # left for the mesh rules to refuse
    for fields in (
        {"percent": "101", "primary": "v1", "canary": "v2"},
        {"percent": "5", "primary": "v1", "canary": "v1"},
    ):
        with pytest.raises(ApiError) as refused:
            weights_from_form(fields, ["v1", "v2"])
        assert refused.value.status == 422


# Canary controls


def test_canary_buttons_go_through_the_api_commit_path(dash: Dashboard, operator: tuple[httpx.Client, str]) -> None:
    client, csrf = operator
    page = client.get("/services/catalog").text
    for button in ("canary-0", "canary-10", "canary-25", "canary-50", "canary-75", "canary-100", "promote", "rollback"):
        assert f'id="{button}"' in page
    form = {"percent": "50", "primary": "v1", "canary": "v2", "reason": "canary step"}
    answer = client.post("/services/catalog/weights", data=form, headers=htmx(csrf))
    assert answer.status_code == 200 and answer.headers["hx-trigger"] == "meshgate-changed"
    assert "v1 50 %, v2 50 % (config version 2)" in answer.text and 'class="flash ok"' in answer.text
    assert weights(dash) == {"v1": 50, "v2": 50}
    with dash.client(dash.token("viewer")) as api:
        entry = api.get("/api/v1/audit").json()[0]
    assert entry["action"] == "weights.set" and entry["target"] == "services/catalog/routes"
    assert entry["reason"] == "canary step" and "(session " in entry["who"] and entry["version"] == 2
    again = client.post("/services/catalog/weights", data=form, headers=htmx(csrf))
    assert "already has these weights" in again.text and dash.current().version == 2
    client.post("/services/catalog/weights", data={**form, "percent": "100"}, headers=htmx(csrf))  # promote
    assert weights(dash) == {"v1": 0, "v2": 100}
    live = client.get("/ui/services/catalog").text
    assert 'data-weight="100"' in live and 'id="weight-value-v2"' in live


def test_a_plain_form_post_without_javascript_redirects_back(
    dash: Dashboard, operator: tuple[httpx.Client, str]
) -> None:
    client, csrf = operator
    answer = client.post("/services/catalog/weights", data={"csrf": csrf, "w.v1": "80", "w.v2": "20"})
    assert answer.status_code == 303 and answer.headers["location"] == "/services/catalog"
    assert weights(dash) == {"v1": 80, "v2": 20}


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"w.v1": "60", "w.v2": "50"}, "sum to 100"),
        ({"w.v1": "ten", "w.v2": "90"}, "ten"),
        ({"w.v1": "-10", "w.v2": "110"}, "-10"),
        ({"percent": "150", "primary": "v1", "canary": "v2"}, "percent"),
        ({"percent": "50", "primary": "v1", "canary": "v9"}, "v9"),
        ({"w.v1": "100", "reason": "x" * 501}, "reason"),
    ],
)
def test_bad_weights_are_refused_with_the_apis_reason_and_change_nothing(
    dash: Dashboard, operator: tuple[httpx.Client, str], fields: dict[str, str], reason: str
) -> None:
    client, csrf = operator
    answer = client.post("/services/catalog/weights", data=fields, headers=htmx(csrf))
    assert answer.status_code == 422 and 'class="flash bad"' in answer.text and reason in answer.text
    assert dash.current().version == 1 and weights(dash) == {"v1": 90, "v2": 10}
    # The same body through the JSON API gets the same reason from the same rules.
    if "w.v1" in fields and "reason" not in fields:
        body = {"weights": weights_from_form(fields, ["v1", "v2"])}
        api = client.put("/api/v1/services/catalog/weights", json=body, headers={"x-csrf-token": csrf})
        assert api.status_code == 422 and api.json()["error"] in html.unescape(answer.text)


def test_unknown_services_are_404_pages(operator: tuple[httpx.Client, str]) -> None:
    client, csrf = operator
    page = client.get("/services/nope")
    assert page.status_code == 404 and "no such service" in page.text and "<h1>404</h1>" in page.text
    assert '<a href="/services"' in page.text, "an error page keeps the navigation"
    assert client.post("/services/nope/weights", data={"w.v1": "100"}, headers=htmx(csrf)).status_code == 404
    assert client.get("/topology?window=2d").status_code == 400


def test_a_page_that_does_not_exist_is_a_page_with_navigation_and_an_api_path_stays_json(
    dash: Dashboard, operator: tuple[httpx.Client, str]
) -> None:
    client, _ = operator
    browser = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    page = client.get("/no/such/page", headers=browser)
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert "no page at /no/such/page" in page.text and '<a href="/topology"' in page.text
    assert '<a href="/traces"' in page.text and "Log out" in page.text
    hostile = client.get("/<script>x</script>", headers=browser)
    assert hostile.status_code == 404 and "<script>x" not in hostile.text
    for path in ("/api/v1/nope", "/v1/nope", "/ui/nope", "/static/nope.css"):
        answer = client.get(path, headers=browser)
        assert answer.status_code == 404 and not answer.headers["content-type"].startswith("text/html"), path
    assert client.get("/no/such/page").json() == {"error": "not found"}  # not asking for HTML: the API's answer
    with dash.client() as anonymous:
        page = anonymous.get("/no/such/page", headers=browser)
    assert page.status_code == 404 and "Back to the topology" in page.text and "Log out" not in page.text


def test_the_canary_button_of_the_live_weight_is_pressed(dash: Dashboard, operator: tuple[httpx.Client, str]) -> None:
    client, csrf = operator
    page = client.get("/services/catalog").text
    pressed = re.findall(r'id="(canary-\d+|promote|rollback)"[^>]*aria-pressed="true"', page)
    assert pressed == ["canary-10"]
    form = {"percent": "100", "primary": "v1", "canary": "v2"}
    client.post("/services/catalog/weights", data=form, headers=htmx(csrf))
    page = client.get("/services/catalog").text
    assert re.findall(r'id="(canary-\d+|promote|rollback)"[^>]*aria-pressed="true"', page) == ["canary-100", "promote"]
    assert "data-clear-reason" in page  # app.js empties the reason once a change went through


def test_the_timeline_marks_weight_changes_and_revert_restores_the_weights_before(
    dash: Dashboard, operator: tuple[httpx.Client, str]
) -> None:
    client, csrf = operator
    live_traffic(dash)
    client.post("/services/catalog/weights", data={"w.v1": "50", "w.v2": "50", "reason": "half"}, headers=htmx(csrf))
    page = client.get("/ui/services/catalog").text
    assert 'id="change-2"' in page and 'id="revert-2"' in page and "half" in page
    assert 'href="#change-2" class="marker"' in page  # the change on every chart of the window
    answer = client.post("/services/catalog/revert", data={"version": "2"}, headers=htmx(csrf))
    assert answer.status_code == 200 and "v1 90 %, v2 10 % (config version 3)" in answer.text
    assert weights(dash) == {"v1": 90, "v2": 10}
    assert dash.current().reason == "revert the weights change of version 2"
    page = client.get("/ui/services/catalog").text
    assert 'id="change-3"' in page and 'id="revert-3"' in page
    assert 'id="revert-2"' not in page  # its "before" is what the service has now
    assert client.post("/services/catalog/revert", data={"version": "99"}, headers=htmx(csrf)).status_code == 404


def test_a_viewer_gets_no_write_controls_and_403_when_writing_anyway(
    dash: Dashboard, operator: tuple[httpx.Client, str], viewer: tuple[httpx.Client, str]
) -> None:
    (client, csrf), (ops, ops_csrf) = viewer, operator
    ops.post("/services/catalog/weights", data={"w.v1": "50", "w.v2": "50"}, headers=htmx(ops_csrf))
    page = client.get("/services/catalog").text
    assert 'id="change-2"' in page  # the viewer sees the timeline ...
    for control in ('id="canary-50"', 'id="promote"', 'id="rollback"', 'id="exact-weights"', "revert-2", "hx-post"):
        assert control not in page  # ... but nothing to change it with
    for path, data in (
        ("/services/catalog/weights", {"percent": "0", "primary": "v1", "canary": "v2"}),
        ("/services/catalog/revert", {"version": "2"}),
    ):
        answer = client.post(path, data=data, headers=htmx(csrf))
        assert answer.status_code == 403 and "operator" in answer.text
    assert dash.current().version == 2


def test_data_from_gateways_and_operators_renders_as_text(dash: Dashboard, operator: tuple[httpx.Client, str]) -> None:
    client, csrf = operator
    heartbeat(dash, "shop", [], meshgate_version=XSS)
    client.post("/services/catalog/weights", data={"w.v1": "50", "w.v2": "50", "reason": XSS}, headers=htmx(csrf))
    for path in ("/gateways", "/services/catalog"):
        html = client.get(path).text
        assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html, path


# Topology and gateways


def test_topology_shows_nodes_and_edges_with_rates_and_details_on_click(
    dash: Dashboard, operator: tuple[httpx.Client, str]
) -> None:
    client, _ = operator
    live_traffic(dash)
    page = client.get("/topology").text
    for node in ("group:web", "group:shop", "service:catalog", "service:frontend", "external"):
        assert f'data-node="{node}"' in page
    edge = re.search(
        r'<a id="edge-[0-9a-f]+" class="edge health-(\w+)[^"]*" data-source="group:web" '
        r'data-destination="service:catalog" data-rps="([0-9.e-]+)"',
        page,
    )
    assert edge is not None and float(edge[2]) > 0 and edge[1] == "warn"  # 12 of 1012 failed: over 1 %
    assert "mTLS · p99" in page and "4 denied" in page
    assert 'hx-trigger="every 2.0s"' in page and 'id="window-1h"' in page
    details = client.get("/ui/topology", params={"window": "5m", "node": "service:catalog"}).text
    assert 'class="node kind-service health-warn selected"' in details
    assert "<h3>v1</h3>" in details and "<h3>v2</h3>" in details and "requests / s" in details  # side by side
    assert 'hx-get="/ui/topology?window=5m&amp;node=service%3Acatalog' in details  # the poll keeps the selection
    group = client.get("/ui/topology", params={"node": "group:shop"}).text
    assert "event-loop lag" in group and "memory (RSS)" in group
    edge_details = client.get("/ui/topology", params={"edge": "group:web>service:catalog", "window": "1h"}).text
    assert "group:web → service:catalog" in edge_details and "all subsets" in edge_details
    assert 'id="window-1h" aria-current="true"' in client.get("/topology?window=1h").text


def test_the_service_page_shows_live_weights_and_the_measured_split(
    dash: Dashboard, operator: tuple[httpx.Client, str]
) -> None:
    client, _ = operator
    live_traffic(dash)
    page = client.get("/services/catalog").text
    share = {name: float(value) for name, value in re.findall(r'id="share-(\w+)" data-share="([0-9.]+)"', page)}
    assert share == {"v1": pytest.approx(0.901, abs=0.01), "v2": pytest.approx(0.099, abs=0.01)}
    assert 'data-weight="90"' in page and 'data-weight="10"' in page
    assert page.count('class="chart"') == 6  # rate, errors, latency for each subset
    ticks = re.findall(r'<text class="tick"[^>]*>([^<]*rps)</text>', page)
    assert len(ticks) == 6 and len(set(ticks)) == 3  # both subsets' rate charts on one scale, side by side


def test_the_gateways_page_shows_sync_heartbeat_certificate_and_saturation(
    dash: Dashboard, operator: tuple[httpx.Client, str]
) -> None:
    client, _ = operator
    instance = heartbeat(dash, "shop", [series("destination", "web", "catalog", "v1", {200: 10})])
    row = re.search(rf'<tr class="live" id="gateway-{instance}">(.*?)</tr>', client.get("/ui/gateways").text, re.S)
    assert row is not None
    cells = re.sub(r"<[^>]+>", " ", row[1])
    for text in ("shop", "0.1.0", "in sync", " ago", "in 24 h", "52 MB", "2 ms"):
        assert text in cells, (text, cells)


def test_without_golden_signals_configured_pages_say_so(tmp_path: Path) -> None:
    with running(tmp_path / "data") as dashboard, dashboard.client(dashboard.token("viewer")) as client:
        dashboard.seed()
        assert "No services yet" not in client.get("/topology").text
        assert "No stored traces" in client.get("/traces").text


# Geometry


def topology_of(mesh: dict[str, Any], traffic: dict[tuple[str, str, str], list[float]]) -> dict[str, Any]:
    return topo.build(
        Mesh.parse(mesh), Traffic(300.0, 300.0, traffic), [], now=time.time(), stale_after=6.0, thresholds=THRESHOLDS
    )


def thirty_services(everyone_calls_everything: bool = False) -> dict[str, Any]:
    """30 services with two subsets each, owned by 6 groups; each group calls the services it owns (or all 30),
    and external clients call service-00."""
    services = {
        f"service-{index:02d}": {
            "subsets": {"v1": {}, "v2": {}},
            "routes": [{"name": "default", "split": {"v1": 90, "v2": 10}}],
        }
        for index in range(30)
    }
    groups = {f"g{group}": [name for index, name in enumerate(services) if index % 6 == group] for group in range(6)}
    traffic = {
        (group, name, "v1"): requests(10.0 + index)
        for index, name in enumerate(services)
        for group in groups
        if everyone_calls_everything or name in groups[group]
    }
    traffic[("external", "service-00", "v1")] = requests(5.0)
    return topology_of({"groups": groups, "services": services}, traffic)


def three_groups() -> dict[str, Any]:
    """The browser tests' mesh: shop calls catalog and payments over mTLS, catalog's calls to payments are denied,
    shop calls its own storefront; and callers without a mesh identity call catalog (past the groups' layer)."""
    services = {
        "storefront": {"subsets": {"v1": {}}},
        "catalog": {"subsets": {"v1": {}, "v2": {}}, "routes": [{"name": "default", "split": {"v1": 100, "v2": 0}}]},
        "payments": {"subsets": {"v1": {}}, "authorization": {"allow": ["shop"]}},
    }
    groups = {"shop": ["storefront"], "catalog": ["catalog"], "payments": ["payments"]}
    traffic = {
        ("shop", "catalog", "v1"): requests(7050.0),
        ("shop", "payments", "v1"): requests(980.0, failed=3.0),
        ("catalog", "payments", ""): requests(26.0, denied=26.0),
        ("shop", "storefront", "v1"): requests(120.0),
        ("unknown", "catalog", "v1"): requests(4.0),
    }
    return topology_of({"groups": groups, "services": services}, traffic)


def requests(count: float, failed: float = 0.0, denied: float = 0.0) -> list[float]:
    """Traffic counts (`history`'s layout): `count` requests between 5 and 10 ms, some 5xx or denied."""
    values = [0.0] * WIDTH
    classify(200, "v1", values, count - failed - denied)
    classify(503, "v1", values, failed)
    classify(403, "", values, denied)
    values[FIRST_BUCKET + 6] = values[REQUESTS]
    return values


Box = tuple[float, float, float, float]


def apart(a: Box, b: Box) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def assert_labels_clear(drawn: dict[str, Any]) -> None:
    """No two edge labels' plates overlap, none covers a node's box, each holds its text and sits at the end of
    its edge, in the canvas."""
    boxes = {
        node["id"]: (node["x"], node["y"], node["x"] + node["w"], node["y"] + node["h"]) for node in drawn["nodes"]
    }
    plates = []
    for edge in drawn["edges"]:
        x, y, w, h = edge["plate"]
        plate = (x, y, x + w, y + h)
        assert min(x, y) >= 0 and plate[2] <= drawn["width"] and plate[3] <= drawn["height"], edge["key"]
        assert boxes[edge["source"]][2] < x and plate[2] <= boxes[edge["destination"]][0] - ARROW_ROOM, edge["key"]
        for baseline, _, text in edge["lines"]:  # 10.5 px monospace: 6.3 px a character, 9 px up and 3 down
            assert x < edge["lx"] - 6.3 * len(text) / 2 and edge["lx"] + 6.3 * len(text) / 2 < plate[2], text
            assert y <= baseline - 9 and baseline + 3 <= plate[3], text
        for node_id, box in boxes.items():
            assert apart(plate, box), (edge["key"], node_id)
        plates.append((edge["key"], plate))
    for index, (key, plate) in enumerate(plates):
        for other, second in plates[index + 1 :]:
            assert apart(plate, second), (key, other)


def test_graph_boxes_never_overlap_at_30_services() -> None:
    drawn = graph(thirty_services(), "", "", frozenset(), THRESHOLDS)
    assert len(drawn["nodes"]) == 30 + 6 + 1
    boxes = [(node["x"], node["y"], node["x"] + node["w"], node["y"] + node["h"]) for node in drawn["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert apart(a, b), (a, b)
        assert a[2] <= drawn["width"] and a[3] <= drawn["height"]
    assert len(drawn["edges"]) == 31 and all(edge["d"].startswith("M") for edge in drawn["edges"])
    assert all(edge["rps"] > 0 for edge in drawn["edges"])


@pytest.mark.parametrize(
    "document",
    [thirty_services, three_groups, lambda: thirty_services(everyone_calls_everything=True)],
    ids=["30 services", "3 groups", "6 groups call 30 services"],
)
def test_edge_labels_cover_no_box_and_no_other_label(document: Any) -> None:
    drawn = graph(document(), "", "", frozenset(), THRESHOLDS)
    assert drawn["edges"]
    assert_labels_clear(drawn)


def test_each_label_sits_on_its_own_edge() -> None:
    for drawn in (graph(document(), "", "", frozenset(), THRESHOLDS) for document in (thirty_services, three_groups)):
        boxes = {node["id"]: node for node in drawn["nodes"]}
        for edge in drawn["edges"]:  # the edge's straight run passes under the middle of its plate
            x, y, w, h = edge["plate"]
            start, end, run = edge["run"]
            assert start < x and x + w <= end and run == pytest.approx(y + h / 2, abs=0.1), edge["key"]
            assert f"{start:.1f},{run:.1f} L{end:.1f},{run:.1f}" in edge["d"], edge["key"]
            destination = boxes[edge["destination"]]
            if len([other for other in drawn["edges"] if other["destination"] == edge["destination"]]) == 1:
                assert edge["d"].endswith(f"L{destination['x']:.1f},{run:.1f}"), edge["key"]  # straight in
    denied = next(edge for edge in graph(three_groups(), "", "", frozenset(), THRESHOLDS)["edges"] if edge["denied"])
    assert [kind for _, kind, _ in denied["lines"]] == ["edge-label", "edge-label", "edge-denied"]
    assert denied["lines"][2][2] == "26 denied"


def test_an_edge_that_skips_a_layer_passes_between_its_boxes() -> None:
    drawn = graph(three_groups(), "", "", frozenset(), THRESHOLDS)
    groups = [node for node in drawn["nodes"] if node["kind"] == "group"]
    (edge,) = [edge for edge in drawn["edges"] if edge["source"] == "unknown:source"]
    # M start, C to the groups' layer, L straight through it (between two boxes), C to the label's run, ...
    assert re.fullmatch(r"M\S+ C\S+ \S+ \S+ L\S+ C\S+ \S+ \S+ L\S+ L\S+", edge["d"]), edge["d"]
    points = [(float(x), float(y)) for x, y in re.findall(r"([-\d.]+),([-\d.]+)", edge["d"])]
    (x1, y1), (x2, y2) = points[3], points[4]
    assert y1 == y2 and x1 <= min(node["x"] for node in groups)
    assert x2 >= max(node["x"] + node["w"] for node in groups)
    assert all(y1 < node["y"] or y1 > node["y"] + node["h"] for node in groups)


def test_line_charts_leave_gaps_and_place_markers_in_the_window() -> None:
    chart = line_chart(
        "rate",
        [("v1", [(0.0, 1.0), (5.0, None), (10.0, 3.0), (20.0, 4.0)]), ("v2", [])],
        start=0.0,
        end=20.0,
        unit="rps",
        markers=[(10.0, 7, "version 7"), (99.0, 8, "later")],
    )
    assert len(chart.lines[0].segments) == 2 and chart.lines[0].last == "4 rps"
    assert chart.lines[1].segments == () and not chart.empty
    assert [marker.version for marker in chart.markers] == [7]
    assert chart.y_ticks[-1][1] == "5 rps"  # the next round number above 4
    assert line_chart("x", [("a", [])], start=0, end=1, unit="%").empty
    assert fmt(0.0123, "%") == "1.23 %" and fmt(None, "ms") == "–" and fmt(52_000_000, "bytes") == "52 MB"


def test_waterfall_orders_parents_before_children_on_one_time_axis() -> None:
    spans = [
        {"span_id": "c", "parent_span_id": "b", "start": 100.003, "duration_ms": 1.0},
        {"span_id": "a", "parent_span_id": "", "start": 100.001, "duration_ms": 10.0},
        {"span_id": "b", "parent_span_id": "a", "start": 100.002, "duration_ms": 4.0},
        {"span_id": "orphan", "parent_span_id": "gone", "start": 100.009, "duration_ms": 1.0},
    ]
    rows = waterfall(spans)
    assert [(row.span["span_id"], row.depth) for row in rows] == [("a", 0), ("b", 1), ("c", 2), ("orphan", 0)]
    assert rows[0].x == 0 and rows[0].width == 1000 and rows[1].x == 100 and rows[1].duration_ms == 4.0
    assert rows[3].offset_ms == 8.0


# Traces


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[Dashboard]:
    """A dashboard with a real span store, fed through its own OTLP receiver."""
    spans = SpanStore(str(tmp_path / "data" / "spans.db"))
    try:
        with running(tmp_path / "data", spans=spans) as dashboard:
            dashboard.seed()
            yield dashboard
    finally:
        asyncio.run(spans.close())


def test_a_request_id_shows_its_waterfall_every_hop_and_its_path(traced: Dashboard) -> None:
    live_traffic(traced)
    trace, request_id = new_trace_id(), str(uuid.uuid4())
    caller, owner, app, retry = new_span_id(), new_span_id(), new_span_id(), new_span_id()
    start = time.time()
    exported = [
        export(
            hop_span(
                trace, caller, reporter="source", caller="web", request_id=request_id, start=start, duration_ms=9.0
            ),
            service="meshgate-gateway-web",
            group="web",
        ),
        export(
            hop_span(
                trace,
                owner,
                caller,
                caller="web",
                subset="v2",
                request_id=request_id,
                start=start + 0.001,
                duration_ms=7.0,
                retries=1,
                status=503,
                error="upstream_reset",
            ),
            group="shop",
        ),
        export(app_span(trace, app, owner, name=XSS), service="catalog-v2", group=None),
        export(
            hop_span(
                trace,
                retry,
                owner,
                reporter="source",
                caller="shop",
                service="payments",
                start=start + 0.002,
                duration_ms=2.0,
            ),
            group="shop",
        ),
    ]
    # Each hop from its own gateway, with its join token (only then is it that gateway's hop); the app's from loopback.
    for request, sender in zip(exported, ["web", "shop", None, "shop"], strict=True):
        with traced.client(traced.token("gateway", sender) if sender else None) as client:
            assert post(client, request).status_code == 200
    assert traced.settings.spans is not None and traced.settings.spans.wait_written(5)
    with traced.client() as client:
        login(client, traced.token("viewer"))
        page = client.get("/traces", params={"q": request_id})
        assert page.status_code == 200, page.text
        html_text = page.text
        rows = re.findall(r'<tr class="hop([^"]*)" data-span="([0-9a-f]+)"', html_text)
        assert [span for _, span in rows] == [caller, owner, app, retry]  # parents first, each hop once
        assert "failed" in rows[1][0] and "retried" in rows[1][0]
        assert "upstream_reset" in html_text and f'<code id="request-id">{request_id}</code>' in html_text
        assert XSS not in html_text and "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
        assert "depth-1" in html_text and "depth-2" in html_text and "attr.db.system" in html_text
        path = html_text[html_text.index('id="trace-path"') :]
        assert re.search(
            r'class="edge [^"]*on-path[^"]*" data-source="group:web" data-destination="service:catalog"', path
        )
        assert re.search(r'class="node [^"]*on-path[^"]*" data-node="service:catalog"', path)
        assert not re.search(r'class="node [^"]*on-path[^"]*" data-node="service:frontend"', path)
        by_trace = client.get("/traces", params={"q": trace})
        assert by_trace.status_code == 200 and by_trace.text.count('class="hop') == 4
        recent = client.get("/traces", params={"service": "catalog", "status": "error"}).text
        assert f'href="/traces?q={trace}"' in recent
        assert f'href="/traces?q={trace}"' not in client.get("/traces", params={"min_ms": "60000"}).text
        missing = client.get("/traces", params={"q": str(uuid.uuid4())})
        assert missing.status_code == 404 and "no spans or hop records" in missing.text
        bad = client.get("/traces", params={"q": "<b>not an id</b>"})
        assert bad.status_code == 404 and "request_id: expected" in bad.text and "<b>not" not in bad.text


def test_the_service_page_names_where_a_discovered_subset_finds_its_endpoints(
    dash: Dashboard, operator: tuple[httpx.Client, str]
) -> None:
    client, _ = operator
    with dash.client(dash.token("operator")) as api:
        answer = api.put("/api/v1/services/catalog/subsets/v2", json={"srv": "_http._tcp.catalog-v2.shop.svc"})
        assert answer.status_code == 200, answer.text
    page = client.get("/services/catalog").text
    cells = re.findall(r'<td class="endpoints">([^<]*)</td>', page)
    assert cells == ["127.0.0.1:9101, 127.0.0.1:9102", "srv _http._tcp.catalog-v2.shop.svc"], cells
