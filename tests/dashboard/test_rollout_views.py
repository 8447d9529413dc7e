"""The service page's rollout panel over HTTP against a real dashboard (uvicorn on loopback, SQLite): the panel and
its decision log, the start form and the controls going through `Rollouts.start` and `Rollouts.act` (the API's
path), CSRF and role refusals, a viewer's page without forms, rollout changes on the timeline and the charts, and
hostile text rendered escaped. The driver's loop is not running here: a test ticks it (`Rollouts.step`) itself."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dashboard.rollout.driver import Rollouts
from dashboard.rollout.spec import Rollout
from dashboard.ui.views import rollout_from_form
from tests.dashboard.dashboards import Dashboard
from tests.dashboard.test_sessions import login
from tests.dashboard.test_views import XSS, htmx, live_traffic, weights

ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
START = {"canary": "v2", "primary": "v1", "steps": "5, 10, 25, 50", "interval": "60", "reason": "v2 canary"}


@pytest.fixture
def operator(dash: Dashboard) -> Iterator[tuple[httpx.Client, str]]:
    with dash.client() as client:
        yield client, login(client, dash.token("operator"))


@pytest.fixture
def viewer(dash: Dashboard) -> Iterator[tuple[httpx.Client, str]]:
    with dash.client() as client:
        yield client, login(client, dash.token("viewer"))


def driver(dash: Dashboard) -> Rollouts:
    rollouts: Rollouts = dash.app.state.rollouts
    return rollouts


def current(dash: Dashboard) -> Rollout:
    found = dash.call(lambda: driver(dash).get("catalog"))
    assert found is not None
    return found


def tick(dash: Dashboard) -> None:
    dash.call(driver(dash).step)


def start(client: httpx.Client, csrf: str, **fields: str) -> httpx.Response:
    return client.post("/services/catalog/rollout", data={**START, **fields}, headers=htmx(csrf))


def test_the_start_form_has_the_defaults_and_starts_a_rollout_through_the_driver(
    dash: Dashboard, operator: tuple[httpx.Client, str]
) -> None:
    client, csrf = operator
    page = client.get("/services/catalog").text
    assert 'id="rollout-none"' in page and 'id="rollout-start"' in page
    assert 'id="rollout-steps" value="5, 10, 25, 50"' in page and 'id="rollout-interval" value="60"' in page
    assert re.search(r'id="rollout-primary">.*?<option value="v1" selected>', page)  # most weight now (90)
    assert re.search(r'id="rollout-canary">.*?<option value="v2" selected>', page)
    answer = start(client, csrf, steps="10, 30", interval="30", approval="on")
    assert answer.status_code == 200 and answer.headers["hx-trigger"] == "meshgate-changed", answer.text
    assert 'class="flash ok"' in answer.text and "started" in answer.text
    rollout = current(dash)
    assert rollout.phase == "progressing" and rollout.spec.steps == (10, 30) and rollout.spec.interval == 30.0
    assert rollout.spec.approval and rollout.reason == "v2 canary" and "(session " in rollout.by
    assert weights(dash) == {"v1": 90, "v2": 10}
    panel = client.get("/ui/services/catalog/rollout").text
    assert 'data-phase="progressing"' in panel and 'data-weight="10"' in panel
    assert 'class="step-current" id="rollout-step-0"' in panel and 'id="rollout-step-2"' in panel  # 100: promotion
    assert "step 1 of 2: v2 to 10 %, judged against v1" in panel and "v2 canary" in panel
    assert re.search(r'id="decision-0" class="decision action-start"', panel)
    controls = client.get("/ui/services/catalog/rollout/controls").text
    for button in ("rollout-pause", "rollout-promote", "rollout-abort", "rollout-approve"):
        assert f'id="{button}"' in controls
    assert 'id="rollout-start"' not in controls and 'id="rollout-resume"' not in controls
    again = start(client, csrf)
    assert again.status_code == 409 and "already has a running rollout" in again.text


def test_pause_resume_promote_and_abort_go_through_the_driver_and_the_audit_log(
    dash: Dashboard, operator: tuple[httpx.Client, str]
) -> None:
    client, csrf = operator
    start(client, csrf)
    answer = client.post("/services/catalog/rollout/pause", data={"reason": "lunch"}, headers=htmx(csrf))
    assert answer.status_code == 200 and "paused" in answer.text and current(dash).phase == "paused"
    controls = client.get("/ui/services/catalog/rollout/controls").text
    assert 'id="rollout-resume"' in controls and 'id="rollout-pause"' not in controls
    assert 'id="rollout-approve"' not in controls  # no approval gate on this one
    refused = client.post("/services/catalog/rollout/approve", data={}, headers=htmx(csrf))
    assert refused.status_code == 409 and "no approval gate" in refused.text
    client.post("/services/catalog/rollout/resume", data={}, headers=htmx(csrf))
    assert current(dash).phase == "progressing"
    answer = client.post("/services/catalog/rollout/promote", data={"reason": "looks fine"}, headers=htmx(csrf))
    assert answer.status_code == 200 and current(dash).phase == "promoted"
    assert weights(dash) == {"v1": 0, "v2": 100}
    with dash.client(dash.token("viewer")) as api:
        audit = [entry for entry in api.get("/api/v1/audit").json() if entry["target"] == "services/catalog/rollout"]
    assert [entry["action"] for entry in audit] == [f"rollout.{a}" for a in ("promote", "resume", "pause", "start")]
    assert {entry["action"] for entry in audit} >= {"rollout.start"} and audit[0]["reason"] == "looks fine"
    finished = client.post("/services/catalog/rollout/abort", data={}, headers=htmx(csrf))
    assert finished.status_code == 409 and "no running rollout (the last one promoted)" in finished.text
    page = client.get("/services/catalog").text
    assert 'data-phase="promoted"' in page and 'id="rollout-start"' in page  # it ended: a new one may start
    assert 'class="step-done" id="rollout-step-4"' in page
    # A second one (v1 is the canary now), aborted: the primary back to 100 %.
    start(client, csrf, canary="v1", primary="v2")
    answer = client.post("/services/catalog/rollout/abort", data={"reason": "no"}, headers=htmx(csrf))
    assert answer.status_code == 200 and current(dash).phase == "aborted" and weights(dash) == {"v1": 0, "v2": 100}
    assert 'class="step-stopped" id="rollout-step-0"' in client.get("/ui/services/catalog/rollout").text
    unknown = client.post("/services/catalog/rollout/explode", data={}, headers=htmx(csrf))
    assert unknown.status_code == 404 and "no rollout action" in unknown.text


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"steps": "5, ten"}, "steps"),
        ({"steps": "50, 10"}, "rising"),
        ({"steps": "5, 150"}, "steps"),
        ({"interval": "soon"}, "interval"),
        ({"interval": "0.5"}, "interval"),
        ({"canary": "v9"}, "v9"),
        ({"canary": "v1", "primary": "v1"}, "must differ"),
        ({"reason": "x" * 501}, "reason"),
    ],
)
def test_a_bad_start_form_gets_one_line_and_starts_nothing(
    dash: Dashboard, operator: tuple[httpx.Client, str], fields: dict[str, str], reason: str
) -> None:
    client, csrf = operator
    answer = start(client, csrf, **fields)
    assert answer.status_code == 422, answer.text
    assert 'class="flash bad"' in answer.text and reason in answer.text and "Traceback" not in answer.text
    assert answer.text.count("<p") == 1  # one line, in the form's flash area
    assert dash.call(lambda: driver(dash).get("catalog")) is None and dash.current().version == 1


def test_the_form_becomes_the_apis_body() -> None:
    body = rollout_from_form({"canary": "v2", "steps": " 5,10 ; 20 ", "interval": "2.5", "approval": "on"})
    assert body.steps == [5, 10, 20] and body.interval == 2.5 and body.approval and body.primary is None
    blank = rollout_from_form({"canary": "v2", "steps": "", "interval": ""})
    assert blank.steps is None and blank.interval == 60.0 and not blank.approval


def test_writes_without_the_csrf_token_or_as_a_viewer_are_refused(
    dash: Dashboard, operator: tuple[httpx.Client, str], viewer: tuple[httpx.Client, str]
) -> None:
    (client, csrf), (watcher, watcher_csrf) = operator, viewer
    forged = client.post("/services/catalog/rollout", data=START, headers={"hx-request": "true"})
    assert forged.status_code == 403 and "CSRF" in forged.text
    wrong = client.post("/services/catalog/rollout", data={**START, "csrf": "x" * 43})
    assert wrong.status_code == 403
    assert dash.call(lambda: driver(dash).get("catalog")) is None
    start(client, csrf)
    forged = client.post("/services/catalog/rollout/abort", data={}, headers={"hx-request": "true"})
    assert forged.status_code == 403 and current(dash).phase == "progressing"
    for path in ("/services/catalog/rollout/abort", "/services/catalog/rollout"):
        answer = watcher.post(path, data=START, headers=htmx(watcher_csrf))
        assert answer.status_code == 403 and "operator" in answer.text
    assert current(dash).phase == "progressing"
    page = watcher.get("/services/catalog").text
    assert 'data-phase="progressing"' in page and 'id="decision-0"' in page  # the viewer sees the rollout ...
    for control in ("rollout-start", "rollout-pause", "rollout-abort", "rollout-promote", "rollout-controls"):
        assert f'id="{control}"' not in page, control  # ... but nothing to act with
    assert "hx-post" not in page


def test_a_plain_form_post_without_javascript_redirects_back(
    dash: Dashboard, operator: tuple[httpx.Client, str]
) -> None:
    client, csrf = operator
    answer = client.post("/services/catalog/rollout", data={**START, "csrf": csrf})
    assert answer.status_code == 303 and answer.headers["location"] == "/services/catalog#rollout"
    answer = client.post("/services/catalog/rollout/pause", data={"csrf": csrf})
    assert answer.status_code == 303 and current(dash).phase == "paused"


def test_a_manual_weight_change_pauses_the_rollout_and_the_panel_says_so(
    dash: Dashboard, operator: tuple[httpx.Client, str]
) -> None:
    client, csrf = operator
    start(client, csrf, interval="600")
    tick(dash)
    form = {"percent": "50", "primary": "v1", "canary": "v2", "reason": "hot fix"}
    assert client.post("/services/catalog/weights", data=form, headers=htmx(csrf)).status_code == 200
    tick(dash)
    assert current(dash).phase == "paused"
    panel = client.get("/ui/services/catalog/rollout?shown=" + f"{current(dash).id}.progressing")
    assert panel.headers["hx-trigger"] == "meshgate-rollout"  # the phase changed: the controls are fetched again
    text = panel.text
    assert 'data-phase="paused"' in text and "paused: the weights were changed by" in text and "hot fix" in text
    assert re.search(r'id="decision-\d+" class="decision action-pause"', text)
    same = client.get(f"/ui/services/catalog/rollout?shown={current(dash).id}.paused")
    assert "hx-trigger" not in same.headers


def test_rollout_changes_are_on_the_timeline_and_the_charts_and_never_revertible(
    dash: Dashboard, operator: tuple[httpx.Client, str]
) -> None:
    client, csrf = operator
    live_traffic(dash)
    start(client, csrf, reason="first try")
    client.post("/services/catalog/rollout/pause", data={"reason": "wait"}, headers=htmx(csrf))
    with dash.client(dash.token("viewer")) as api:
        entries = api.get("/api/v1/audit").json()
    audit = {entry["action"]: entry["id"] for entry in entries if entry["target"] == "services/catalog/rollout"}
    live = client.get("/ui/services/catalog").text
    for action in ("rollout.start", "rollout.pause"):
        entry = audit[action]
        assert f'id="rollout-event-{entry}"' in live, action
        assert f'href="#rollout-event-{entry}" class="marker rollout-marker"' in live  # a marker on the charts
    assert "first try" in live and "rollout pause" in live
    assert 'id="change-2"' in live  # the rollout's own weight commit, authored rollout:<id>, beside them
    assert f"rollout:{current(dash).id}" in live
    events = re.findall(r'<li id="rollout-event-\d+".*?</li>', live, re.S)
    assert len(events) == 2 and not any("<form" in event or "revert" in event for event in events)
    assert live.index(f'id="rollout-event-{audit["rollout.pause"]}"') < live.index('id="change-2"')  # newest first


def add_decision(dash: Dashboard, **entry: Any) -> None:
    rollout = current(dash)
    seq = rollout.ticks + entry.pop("seq_offset", 0)
    full = {"kind": "decision", "time": time.time(), "action": "hold", "phase": "holding", "weight": 5, **entry}
    dash.call(lambda: dash.store.append_rollout_log(rollout.id, [(seq, full)]))


def test_the_decision_log_links_examples_to_request_lookup_and_escapes_everything(
    dash: Dashboard, operator: tuple[httpx.Client, str], viewer: tuple[httpx.Client, str]
) -> None:
    client, csrf = operator
    start(client, csrf, reason=XSS)
    examples = [
        {"request_id": "req-bad-1", "error": True, "status": 503, "ms": 12.5},
        {"request_id": XSS, "error": False, "status": 200, "ms": 3.0},
    ]
    verdict = {"outcome": "harm", "sentence": f"worse: {XSS}", "needs": None}
    add_decision(dash, action="rollback", message=f"rolled back: {XSS}", examples=examples, verdict=verdict)
    for page in (client.get("/services/catalog").text, viewer[0].get("/ui/services/catalog/rollout").text):
        assert XSS not in page and ESCAPED in page
        assert '<a href="/traces?q=req-bad-1" class="request-link error"' in page  # request lookup, error marked
        assert 'href="/traces?q=%3Cscript%3Ealert%281%29%3C%2Fscript%3E" class="request-link"' in page
        assert re.search(r'class="decision action-rollback bad"', page)
    with dash.client(dash.token("viewer")) as api:  # the same lookup the link opens answers on this parameter
        assert api.get("/traces", params={"q": "req-bad-1"}).status_code in (200, 404)


def test_the_log_shows_the_newest_decisions_and_pages_back(dash: Dashboard, operator: tuple[httpx.Client, str]) -> None:
    client, csrf = operator
    start(client, csrf)
    for n in range(25):
        add_decision(dash, seq_offset=n, message=f"decision number {n}")
    panel = client.get("/ui/services/catalog/rollout").text
    shown = [int(seq) for seq in re.findall(r'id="decision-(\d+)"', panel)]
    assert len(shown) == 20 and shown == sorted(shown, reverse=True)
    assert "decision number 24" in panel and "decision number 4<" not in panel
    older = re.search(r'href="/services/catalog\?older=(\d+)#rollout-log" id="rollout-older"', panel)
    assert older is not None and int(older[1]) == shown[-1]
    page = client.get(f"/services/catalog?older={older[1]}").text
    rest = [int(seq) for seq in re.findall(r'id="decision-(\d+)"', page)]
    assert rest and max(rest) < shown[-1] and 'id="decision-0"' in page and 'id="rollout-older"' not in page
    assert client.get("/services/catalog?older=abc").status_code == 400
