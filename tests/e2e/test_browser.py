"""The dashboard in a real browser: Playwright driving Debian's Chromium (`/usr/bin/chromium`, headless; no browser
is ever downloaded) against a real mesh on loopback: a `meshgate dashboard` process, three joined gateways with
mTLS between them, real upstreams, and steady traffic from a generator thread. Screenshots of the topology,
service and trace pages go to $MESHGATE_SCREENSHOTS (`MESHGATE_SCREENSHOTS=docs` refreshes the README's), else to
pytest's temporary directory, so a test run leaves the working tree as it was.

One mesh serves the whole module (starting it is most of the time); tests that change it run last.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from playwright.sync_api import Browser, Page, ViewportSize, sync_playwright

from dashboard.signals.topology import Thresholds
from dashboard.ui.charts import graph
from dashboard.ui.views import environment
from tests.conftest import ROOT, Gateway, wait_for
from tests.dashboard.test_views import thirty_services
from tests.e2e.mesh import Dashboard, joined_gateway, wait_ready
from tests.e2e.upstream_app import UpstreamServer

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wanted = os.environ.get("MESHGATE_SCREENSHOTS")
    return Path(wanted) if wanted else tmp_path_factory.mktemp("screenshots")


class Traffic:
    """Steady calls from shop's apps (to catalog and payments) and from catalog's (to payments, denied), until
    stopped; bounded in time so a stuck test cannot leave it running."""

    def __init__(self, gateways: dict[str, Gateway], limit: float = 300.0) -> None:
        self.gateways = gateways
        self.stop_event = threading.Event()
        self.calls = 0
        self.limit = limit
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        plan = [("shop", "catalog")] * 8 + [("shop", "payments"), ("catalog", "payments")]
        with httpx.Client(timeout=5) as client:
            while not self.stop_event.is_set() and time.monotonic() < deadline:
                group, service = plan[self.calls % len(plan)]
                with contextlib.suppress(httpx.HTTPError):  # a failed call shows on the topology, which is fine
                    client.get(self.gateways[group].url("outbound") + "/echo", headers={"host": service})
                self.calls += 1
                self.stop_event.wait(0.02)  # pacing (about 40 calls/s), not synchronisation

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)


class Mesh:
    def __init__(self, dashboard: Dashboard, gateways: dict[str, Gateway], traffic: Traffic) -> None:
        self.dashboard = dashboard
        self.gateways = gateways
        self.traffic = traffic

    def call(self, group: str, service: str, path: str = "/echo") -> httpx.Response:
        return httpx.get(self.gateways[group].url("outbound") + path, headers={"host": service}, timeout=10)


MESH: dict[str, Any] = {
    "groups": {"shop": ["storefront"], "catalog": ["catalog"], "payments": ["payments"]},
    "services": {
        "storefront": {"subsets": {"v1": {"endpoints": []}}},
        "catalog": {
            "subsets": {"v1": {"endpoints": []}, "v2": {"endpoints": []}},
            "routes": [{"name": "default", "split": {"v1": 100, "v2": 0}}],
        },
        "payments": {"subsets": {"v1": {"endpoints": []}}, "authorization": {"allow": ["shop"]}},
    },
}


@contextlib.contextmanager
def running_mesh(directory: Path, traffic_limit: float = 300.0, **config: Any) -> Iterator[Mesh]:
    """`MESH` on loopback: upstream servers, a dashboard seeded with it, a joined gateway per group (`config`: their
    gateway config, such as telemetry), and steady traffic; all stopped at the end."""
    upstreams = {name: UpstreamServer(name).start() for name in ("store", "v1", "v2", "pay")}
    document = yaml.safe_load(yaml.safe_dump(MESH))
    for service, subset, upstream in (
        ("storefront", "v1", "store"),
        ("catalog", "v1", "v1"),
        ("catalog", "v2", "v2"),
        ("payments", "v1", "pay"),
    ):
        document["services"][service]["subsets"][subset]["endpoints"] = [upstreams[upstream].address]
    (directory / "mesh.yaml").write_text(yaml.safe_dump(document))
    dashboard = Dashboard(directory / "dashboard", "--config", str(directory / "mesh.yaml"), "--signals-step", "1")
    gateways: dict[str, Gateway] = {}
    traffic: Traffic | None = None
    try:
        for group in ("shop", "catalog", "payments"):
            gateways[group] = joined_gateway(dashboard, directory, group, **config)
        wait_ready(*gateways.values())
        found = Mesh(dashboard, gateways, Traffic(gateways, limit=traffic_limit))
        traffic = found.traffic
        wait_for(lambda: found.call("shop", "catalog").status_code == 200, 20, what="shop reaches catalog")
        yield found
    finally:
        if traffic is not None:
            traffic.stop()
        for gateway in gateways.values():
            gateway.stop()
        dashboard.stop()
        for server in upstreams.values():
            server.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with running_mesh(tmp_path_factory.mktemp("browser")) as found:
        yield found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        raise AssertionError(f"{CHROMIUM} is missing: apt-get install -y chromium (browsers are never downloaded)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield launched
        launched.close()


@contextlib.contextmanager
def session(
    browser: Browser,
    dashboard: Dashboard,
    role: str = "operator",
    expected: str = "NONE",
    height: int = 900,
    width: int = 1400,
) -> Iterator[Page]:
    """A fresh browser context logged in through the login page with a new `role` token. Console errors fail the
    test, except those containing `expected`."""
    context = browser.new_context(viewport=ViewportSize(width=width, height=height))
    page = context.new_page()
    problems: list[str] = []
    page.on(
        "console",
        lambda message: (
            problems.append(message.text) if message.type == "error" and expected not in message.text else None
        ),
    )
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}"))
    try:
        token = dashboard.operator_token if role == "operator" else dashboard.token(role)
        page.goto(dashboard.url + "/topology")
        page.wait_for_url("**/login?next=%2Ftopology")
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_url("**/topology")
        yield page
        assert problems == [], problems  # no CSP violation, script error or alert() on any page
    finally:
        context.close()


def until(page: Page, expression: str, timeout: float, what: str) -> Any:
    """Poll a JavaScript expression from here until it is truthy. (Playwright's wait_for_function evaluates its
    predicate with eval inside the page, which the dashboard's Content-Security-Policy rightly refuses.)"""
    return wait_for(lambda: page.evaluate(expression), timeout, 0.1, what)


def swapped(page: Page, element_id: str, timeout: float = 15.0) -> None:
    """Wait until htmx has replaced the element with this id by a newer version of itself."""
    page.evaluate(f"document.getElementById({element_id!r}).dataset.old = '1'")
    until(page, f"!document.getElementById({element_id!r}).dataset.old", timeout, f"#{element_id} updated")


# Each edge label's plate and text rows, and each node's box, as the browser lays them out.
LABELS = """(() => {
  const box = element => { const r = element.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  return {
    labels: [...document.querySelectorAll('svg.topology .edge-tag')].map(tag => [
      tag.dataset.source + '>' + tag.dataset.destination,
      box(tag.querySelector('.edge-plate')),
      [...tag.querySelectorAll('text')].map(box)]),
    nodes: [...document.querySelectorAll('svg.topology .node rect')].map(box),
  };
})()"""


def assert_labels_clear(found: dict[str, Any], count: int) -> None:
    """Every label's text inside its plate; no two plates overlapping; no plate over a node's box."""

    def apart(a: list[float], b: list[float]) -> bool:
        return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]

    labels, nodes = found["labels"], found["nodes"]
    assert len(labels) == count and nodes
    for index, (edge, plate, texts) in enumerate(labels):
        assert plate[2] > plate[0] and plate[3] > plate[1] and texts, edge
        for text in texts:  # half a pixel for rounding
            assert plate[0] - 0.5 <= text[0] and text[2] <= plate[2] + 0.5, (edge, text, plate)
            assert plate[1] - 0.5 <= text[1] and text[3] <= plate[3] + 0.5, (edge, text, plate)
        for other, second, _ in labels[index + 1 :]:
            assert apart(plate, second), (edge, other)
        for node in nodes:
            assert apart(plate, node), (edge, node)


def test_topology_shows_live_edges_and_keeps_focus_and_scroll_across_updates(
    browser: Browser, mesh: Mesh, screenshots: Path
) -> None:
    with session(browser, mesh.dashboard, height=500) as page:
        for node in ("group:shop", "group:catalog", "group:payments", "service:catalog", "service:payments"):
            assert page.locator(f'[data-node="{node}"]').count() == 1, node
        edge = '.edge[data-source="group:shop"][data-destination="service:catalog"]'
        until(page, f"(document.querySelector('{edge}') || {{dataset: {{rps: '0'}}}}).dataset.rps > 0", 30, "rates")
        label = '.edge-tag[data-source="group:shop"][data-destination="service:catalog"]'
        assert "mTLS" in (page.locator(label).text_content() or "")
        denied = '.edge-tag[data-source="group:catalog"][data-destination="service:payments"]'
        page.wait_for_selector(f"{denied} .edge-denied", timeout=20_000)
        until(page, "document.querySelectorAll('svg.topology .edge-tag').length === 3", 20, "three edges")
        assert_labels_clear(page.evaluate(LABELS), 3)
        # Select a node, focus it from the keyboard's point of view and scroll the page: the next updates keep both.
        page.click('[data-node="service:catalog"]')
        page.wait_for_selector("#details h3")
        assert page.url.endswith("node=service%3Acatalog")
        node_id = page.get_attribute('[data-node="service:catalog"]', "id")
        page.focus(f"#{node_id}")
        page.evaluate("window.scrollTo(0, 200)")
        scrolled = page.evaluate("window.scrollY")
        assert scrolled > 0
        for _ in range(2):
            swapped(page, "topology-live")
        assert page.evaluate("document.activeElement.id") == node_id
        assert page.evaluate("window.scrollY") == scrolled
        assert "selected" in (page.get_attribute(f"#{node_id}", "class") or "")
        page.evaluate("window.scrollTo(0, 0)")
        page.set_viewport_size({"width": 1400, "height": 900})
        screenshots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshots / "topology.png"), full_page=True)


def test_a_trace_is_found_by_the_request_id_a_client_got_back(browser: Browser, mesh: Mesh, screenshots: Path) -> None:
    answer = mesh.call("shop", "catalog", "/echo?from=browser-test")
    assert answer.status_code == 200
    request_id = answer.headers["x-request-id"]
    with session(browser, mesh.dashboard) as page:
        page.fill("#header-lookup", request_id)
        page.press("#header-lookup", "Enter")
        page.wait_for_selector("#waterfall")
        rows = page.locator("#waterfall tr.hop")
        groups = sorted(rows.nth(index).locator("td").nth(1).inner_text() for index in range(rows.count()))
        assert rows.count() == 2, groups  # the caller's gateway and the owner's, nothing missing, nothing twice
        assert groups[0].startswith("catalog") and groups[1].startswith("shop") and "catalog" in groups[1]
        assert page.locator("#request-id").inner_text() == request_id
        attributes = page.locator("#waterfall tr.span-attributes").nth(1)
        assert not attributes.is_visible()
        rows.nth(1).locator("summary").click()  # attributes on click, in a row of their own under the span
        assert attributes.locator("dl.attributes").is_visible()
        # The values take the table's width: a request ID (36 characters) stays on one line, as tall as its key.
        key = attributes.locator("xpath=.//dt[text()='request_id']")
        value = attributes.locator("xpath=.//dt[text()='request_id']/following-sibling::dd[1]")
        width = page.locator("#waterfall").bounding_box()
        value_box, key_box = value.bounding_box(), key.bounding_box()
        assert width is not None and value_box is not None and key_box is not None
        assert value_box["height"] <= key_box["height"] * 1.2 and value_box["width"] >= width["width"] / 2
        path = page.locator('#trace-path .edge.on-path[data-source="group:shop"][data-destination="service:catalog"]')
        assert path.count() == 1  # the request's path on the topology
        page.screenshot(path=str(screenshots / "trace.png"), full_page=True)


def test_a_viewer_has_no_write_controls_and_is_refused_when_writing_anyway(browser: Browser, mesh: Mesh) -> None:
    with session(browser, mesh.dashboard, role="viewer", expected="status of 403") as page:
        page.goto(mesh.dashboard.url + "/services/catalog")
        page.wait_for_selector("#service-live")
        for control in ("#canary-50", "#promote", "#rollback", "#exact-weights", "#canary-form", "button[id^=revert]"):
            assert page.locator(control).count() == 0, control
        csrf = page.evaluate("JSON.parse(document.body.getAttribute('hx-headers'))['x-csrf-token']")
        status = page.evaluate(
            """async (csrf) => (await fetch('/services/catalog/weights', {method: 'POST',
                 headers: {'x-csrf-token': csrf, 'content-type': 'application/x-www-form-urlencoded'},
                 body: 'w.v1=0&w.v2=100'})).status""",
            csrf,
        )
        assert status == 403
    with mesh.dashboard.api() as api:
        assert api.get("/services/catalog").json()["weights"] == {"v1": 100, "v2": 0}


def test_canary_50_percent_moves_the_weights_and_then_the_traffic(
    browser: Browser, mesh: Mesh, screenshots: Path
) -> None:
    with session(browser, mesh.dashboard) as page:
        page.goto(mesh.dashboard.url + "/services/catalog")
        page.wait_for_selector('#weight-value-v2[data-weight="0"]')
        page.fill("#reason", "canary step: half the traffic to v2")
        assert page.get_attribute("#canary-0", "aria-pressed") == "true"  # the button of the live weight
        page.click("#canary-50")
        page.wait_for_selector("#flash .flash.ok")
        assert "v1 50 %, v2 50 %" in page.inner_text("#flash")
        assert page.input_value("#reason") == "", "the reason went with the change; the next must not reuse it"
        page.wait_for_selector('#weight-value-v2[data-weight="50"]', timeout=10_000)  # the live weights
        page.wait_for_selector('#canary-50[aria-pressed="true"]')
        assert page.get_attribute("#canary-0", "aria-pressed") == "false"
        assert page.input_value("#weight-v2") == "50"  # the exact-weights form follows too
        # The gateways apply it within a second; the measured split (last 15 s) follows as heartbeats arrive.
        until(page, "Number(document.getElementById('share-v2').dataset.share || 0) >= 0.3", 40, "v2 traffic")
        share = float(page.get_attribute("#share-v2", "data-share") or 0)
        assert 0.3 <= share <= 0.7
        assert page.locator("#change-2 q.reason-text").inner_text() == "canary step: half the traffic to v2"
        assert page.locator("#revert-2").count() == 1 and page.locator('a.marker[href="#change-2"]').count() == 6
        page.fill("#reason", "")
        page.locator("#reason").blur()
        page.screenshot(path=str(screenshots / "service.png"), full_page=True)
    with mesh.dashboard.api() as api:
        (entry, *_) = api.get("/audit").json()
        assert entry["action"] == "weights.set" and entry["version"] == 2 and "(session " in entry["who"]


def test_text_from_operators_renders_as_text(browser: Browser, mesh: Mesh) -> None:
    with mesh.dashboard.api() as api:
        answer = api.put("/services/catalog/weights", json={"weights": {"v1": 60, "v2": 40}, "reason": XSS})
        assert answer.status_code == 200, answer.text
        version = answer.json()["version"]
    with session(browser, mesh.dashboard) as page:  # an alert() would be a "dialog" problem and fail the session
        page.goto(mesh.dashboard.url + "/services/catalog")
        assert page.locator(f"#change-{version} q.reason-text").inner_text() == XSS
        assert page.evaluate("[...document.scripts].every(script => script.src && !script.textContent)")
        swapped(page, "service-live")  # and again after a live update
        assert page.locator(f"#change-{version} q.reason-text").inner_text() == XSS


def test_thirty_services_no_two_node_labels_overlap(browser: Browser, tmp_path: Path) -> None:
    services: dict[str, Any] = {f"service-{index:02d}": {"subsets": {"v1": {"endpoints": []}}} for index in range(30)}
    groups = {
        f"team-{group}": [name for index, name in enumerate(services) if index % 6 == group] for group in range(6)
    }
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump({"groups": groups, "services": services}))
    dashboard = Dashboard(tmp_path / "dashboard", "--config", str(tmp_path / "mesh.yaml"))
    try:
        with session(browser, dashboard) as page:  # no gateways: the nodes come from the config
            labels = page.evaluate(
                """[...document.querySelectorAll('svg.topology text.node-label')].map(text => {
                     const r = text.getBoundingClientRect();
                     return [text.textContent, r.left, r.top, r.right, r.bottom]; })"""
            )
            boxes = page.evaluate(
                """[...document.querySelectorAll('svg.topology .node rect')].map(rect => {
                     const r = rect.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })"""
            )
    finally:
        dashboard.stop()
    assert len(labels) == 36 and len(boxes) == 36  # 30 services, 6 groups
    for index, (name, *a) in enumerate(labels):
        assert a[2] > a[0] and a[3] > a[1], name
        for other, *b in labels[index + 1 :]:
            apart = a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
            assert apart, (name, other)
        assert any(box[0] <= a[0] and a[2] <= box[2] and box[1] <= a[1] and a[3] <= box[3] for box in boxes), name


def test_thirty_services_with_traffic_no_edge_label_covers_another_or_a_box(browser: Browser) -> None:
    """The 30-service topology with an edge into every service, drawn by the dashboard's own templates and
    stylesheet (a dashboard process cannot be fed that traffic without 6 gateways)."""
    drawn = graph(thirty_services(), "", "", frozenset(), Thresholds())
    svg = environment().from_string('{% import "macros.html" as m %}{{ m.graph(g, "5m") }}').render(g=drawn)
    context = browser.new_context(viewport=ViewportSize(width=1400, height=900))
    try:
        page = context.new_page()
        page.set_content(f"<!doctype html><html><body><main>{svg}</main></body></html>")
        page.add_style_tag(path=str(ROOT / "static" / "app.css"))
        assert_labels_clear(page.evaluate(LABELS), 31)
    finally:
        context.close()


@pytest.mark.parametrize("width", [800, 1024])
def test_the_header_fits_a_narrow_window(browser: Browser, mesh: Mesh, width: int) -> None:
    """Every part of the header, "Log out" last, lies inside the window: it wraps rather than running off the edge."""
    with session(browser, mesh.dashboard, expected="404 (Not Found)", width=width) as page:
        page.goto(mesh.dashboard.url + "/services/catalog")
        for selector in (".top .brand", ".top nav", "#header-lookup", ".top .who .user", ".top .who button"):
            box = page.locator(selector).bounding_box()
            assert box is not None, selector
            assert box["x"] >= 0 and box["x"] + box["width"] <= width, (selector, box)
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        page.goto(mesh.dashboard.url + "/no/such/page")
        assert page.locator("h1").inner_text() == "404" and page.locator(".top nav a").count() == 4
