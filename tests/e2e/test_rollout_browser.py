"""The rollout panel in a real browser: Playwright driving Debian's Chromium against a real mesh on loopback (a
`meshgate dashboard` process running its rollout driver, three joined gateways, real upstreams and steady traffic,
as `tests/e2e/test_browser.py` starts them). An operator starts, pauses, resumes and promotes a rollout of catalog's
canary from the service page, starts another and aborts it; the decision log links the canary's example requests to
request lookup; a viewer sees the rollout and no control; a canary button pressed during a rollout pauses it, and
the page says why. Every wait polls the page with a deadline.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import unquote

import httpx
import pytest
from playwright.sync_api import Browser, Page

from tests.e2e.test_browser import Mesh, browser, running_mesh, session, until

pytestmark = pytest.mark.browser
__all__ = ["browser"]  # test_browser's fixture: one Chromium for this file
# Every trace exported, so each decision finds example requests from the canary at once (the default, 1 %, would
# leave a decision made seconds after the start with none).
TELEMETRY = {"access_log": "off", "tracing": {"sampling": 1.0}}

PHASE = "(document.getElementById('rollout-phase') || {dataset: {}}).dataset.phase"
ACTIVE = ("progressing", "holding")


def phase_is(page: Page, phases: tuple[str, ...], timeout: float = 30.0) -> str:
    wanted = "[" + ", ".join(f"'{name}'" for name in phases) + "]"
    found: str = until(page, f"{wanted}.includes({PHASE}) && {PHASE}", timeout, f"rollout phase in {phases}")
    return found


def visible(page: Page, selector: str, timeout: float = 15.0) -> None:
    """The element is on the page (the controls are fetched again when the phase changes)."""
    until(page, f"!!document.querySelector({selector!r})", timeout, f"{selector} shown")


def weight(page: Page, subset: str) -> str:
    return page.get_attribute(f"#weight-value-{subset}", "data-weight") or ""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """test_browser's mesh (catalog's v1 and v2 owned by group catalog, called from shop), every trace sampled."""
    with running_mesh(tmp_path_factory.mktemp("rollouts"), traffic_limit=600.0, telemetry=TELEMETRY) as found:
        yield found


def api(mesh: Mesh) -> httpx.Client:
    token = mesh.dashboard.operator_token
    return httpx.Client(base_url=mesh.dashboard.url, headers={"authorization": f"Bearer {token}"}, timeout=10)


def no_rollout_running(mesh: Mesh) -> None:
    """Each test starts from no running rollout of catalog, whichever ran before it (and in whatever order)."""
    with api(mesh) as client:
        found = client.get("/api/v1/services/catalog/rollout")
        if found.status_code == 200 and found.json()["active"]:
            client.post("/api/v1/services/catalog/rollout/abort", json={"reason": "test setup"}).raise_for_status()


@pytest.fixture(scope="module")
def operator_session(browser: Browser, mesh: Mesh) -> Iterator[Page]:
    with session(browser, mesh.dashboard) as page:
        yield page


@pytest.fixture
def operator_page(operator_session: Page, mesh: Mesh) -> Page:
    no_rollout_running(mesh)
    operator_session.goto(mesh.dashboard.url + "/services/catalog")
    return operator_session


def start_from_the_page(page: Page, canary: str, primary: str, interval: str, reason: str) -> None:
    visible(page, "#rollout-start")
    page.select_option("#rollout-canary", canary)
    page.select_option("#rollout-primary", primary)
    page.fill("#rollout-steps", "5, 10, 25, 50")
    page.fill("#rollout-interval", interval)
    page.fill("#rollout-start-reason", reason)
    page.click("#rollout-start-button")
    phase_is(page, ACTIVE)
    until(page, f"document.querySelector('#weight-value-{canary}').dataset.weight === '5'", 15, f"{canary} at 5 %")


def test_start_pause_resume_and_promote_with_request_lookup_links_in_the_log(operator_page: Page, mesh: Mesh) -> None:
    page = operator_page
    assert page.input_value("#rollout-steps") == "5, 10, 25, 50" and page.input_value("#rollout-interval") == "60"
    start_from_the_page(page, "v2", "v1", "2", "v2 canary from the browser")
    until(page, "document.querySelector('#rollout-flash .flash.ok') !== null", 10, "the start's answer")
    assert page.locator("#rollout-step-0.step-current").count() == 1
    assert "v2 canary from the browser" in (page.text_content("#rollout-started") or "")

    # The driver's own decisions (a hold for evidence, or a step) carry the canary's example requests.
    link = "#rollout-log a.request-link"
    until(page, f"document.querySelectorAll({link!r}).length > 0", 60, "a decision with example requests")
    href = page.get_attribute(link, "href") or ""
    assert re.fullmatch(r"/traces\?q=[0-9A-Za-z%._-]+", href), href
    lookup = page.context.new_page()
    try:
        answer = lookup.goto(mesh.dashboard.url + href)
        assert answer is not None and answer.status == 200, href  # request lookup finds that request
        assert unquote(href.split("=", 1)[1]) in (lookup.text_content("main") or "")
    finally:
        lookup.close()

    visible(page, "#rollout-pause")
    page.fill("#rollout-reason", "lunch")
    page.click("#rollout-pause")
    phase_is(page, ("paused",))
    visible(page, "#rollout-resume")
    assert page.locator("#rollout-pause").count() == 0
    assert "paused by" in (page.text_content("#rollout-message") or "")
    page.click("#rollout-resume")
    phase_is(page, ACTIVE)
    visible(page, "#rollout-pause")
    page.click("#rollout-promote")
    phase_is(page, ("promoted",))
    until(page, "document.querySelector('#weight-value-v2').dataset.weight === '100'", 15, "v2 at 100 %")
    assert "promoted v2 to 100 %" in (page.text_content("#rollout-message") or "")
    actions = page.eval_on_selector_all("#rollout-log td.action", "cells => cells.map(c => c.textContent)")
    assert actions[:3] == ["promote", "resume", "pause"] and actions[-1] == "start", actions

    # The timeline has the rollout's state changes beside its weight commits.
    events = page.eval_on_selector_all(".timeline li.rollout-event strong", "items => items.map(i => i.textContent)")
    assert {"rollout start", "rollout pause", "rollout resume", "rollout promote"} <= set(events), events
    assert page.locator(".chart-svg a.rollout-marker").count() > 0


def test_start_another_and_abort_puts_the_primary_back(operator_page: Page) -> None:
    page = operator_page
    start_from_the_page(page, "v1", "v2", "600", "try v1 again")
    visible(page, "#rollout-abort")
    page.fill("#rollout-reason", "not today")
    page.click("#rollout-abort")
    phase_is(page, ("aborted",))
    until(page, "document.querySelector('#weight-value-v2').dataset.weight === '100'", 15, "v2 back to 100 %")
    assert page.locator("#rollout-step-0.step-stopped").count() == 1
    assert "aborted by" in (page.text_content("#rollout-message") or "")


def test_a_viewer_sees_the_rollout_but_no_control(browser: Browser, mesh: Mesh) -> None:
    no_rollout_running(mesh)
    with api(mesh) as client:
        body = {"canary": "v2", "primary": "v1", "interval": 600, "reason": "for the viewer"}
        assert client.post("/api/v1/services/catalog/rollout", json=body).status_code == 201
    with session(browser, mesh.dashboard, role="viewer") as page:
        page.goto(mesh.dashboard.url + "/services/catalog")
        assert phase_is(page, ACTIVE)
        assert "for the viewer" in (page.text_content("#rollout-started") or "")
        assert page.locator("#rollout-log tr.decision").count() > 0
        for control in ("#rollout-controls", "#rollout-start", "#rollout-pause", "#rollout-abort", "#canary-form"):
            assert page.locator(control).count() == 0, control
        assert page.locator("#rollout button, #rollout form").count() == 0


def test_a_canary_button_during_a_rollout_pauses_it_and_the_page_says_so(operator_page: Page) -> None:
    page = operator_page
    start_from_the_page(page, "v2", "v1", "600", "watch the manual change")
    visible(page, "#rollout-pause")
    page.fill("#reason", "hot fix by hand")
    page.click("#canary-25")  # the canary form: v2 gets 25 %, behind the rollout's back
    phase_is(page, ("paused",), 30)
    message = page.text_content("#rollout-message") or ""
    assert "paused: the weights were changed by" in message and "hot fix by hand" in message, message
    visible(page, "#rollout-resume")
    assert page.locator("#rollout-log tr.action-pause").count() >= 1
    page.click("#rollout-abort")
    phase_is(page, ("aborted",))
