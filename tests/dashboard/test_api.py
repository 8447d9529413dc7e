"""The operator API over real HTTP: a uvicorn-served dashboard on a SQLite store in tmp_path.

The weights contract (DESIGN.md, "Contracts") is checked status by status, and after every error the store is
shown to be unchanged: same version, same mesh, no new audit entry.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from dashboard.api.bodies import DRAIN_TIME, MAX_OPERATOR_REASON
from dashboard.attempts import FAILURE_BURST, FAILURE_REFILL
from dashboard.store.model import AuditEntry, Store
from tests.conftest import raw_request
from tests.dashboard.dashboards import Dashboard, mesh, running

WEIGHTS = "/api/v1/services/catalog/weights"
TWO_MIB = 2 << 20


@pytest.fixture
def operator(dash: Dashboard) -> Iterator[httpx.Client]:
    with dash.client(dash.token("operator", name="alice")) as client:
        yield client


@pytest.fixture
def viewer(dash: Dashboard) -> Iterator[httpx.Client]:
    with dash.client(dash.token("viewer", name="victor")) as client:
        yield client


def audit(dash: Dashboard) -> list[AuditEntry]:
    return dash.call(lambda: dash.store.audit(1000))


def state(dash: Dashboard) -> tuple[int, dict[str, Any], int]:
    """What must not change on an error: the version, the mesh and the number of audit entries."""
    current = dash.current()
    return current.version, current.mesh, len(audit(dash))


def assert_error(answer: httpx.Response, status: int, *fragments: str) -> str:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert list(body) == ["error"], body
    reason = body["error"]
    assert isinstance(reason, str) and reason and "\n" not in reason
    assert "Traceback" not in answer.text
    for fragment in fragments:
        assert fragment in reason, reason
    return reason


def weights_of(client: httpx.Client, service: str = "catalog") -> dict[str, int]:
    return cast(dict[str, int], client.get(f"/api/v1/services/{service}").json()["weights"])


# The weights contract


def test_weights_change_the_catch_all_split_and_return_the_new_version(dash: Dashboard, operator: httpx.Client) -> None:
    before = dash.current()
    answer = operator.put(WEIGHTS, json={"weights": {"v1": 50, "v2": 50}, "reason": "canary step"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"version": before.version + 1, "changed": True}
    assert answer.headers["etag"] == f'"{before.version + 1}"'
    assert weights_of(operator) == {"v1": 50, "v2": 50}
    routes = dash.current().mesh["services"]["catalog"]["routes"]
    assert routes[0]["split"] == {"v1": 0, "v2": 100}, "only the catch-all route changes"


def test_omitted_subsets_weigh_zero(dash: Dashboard, operator: httpx.Client) -> None:
    assert operator.put(WEIGHTS, json={"weights": {"v2": 100}}).status_code == 200
    assert weights_of(operator) == {"v1": 0, "v2": 100}


def test_the_same_weights_again_change_nothing(dash: Dashboard, operator: httpx.Client) -> None:
    before = state(dash)
    answer = operator.put(WEIGHTS, json={"weights": {"v1": 90, "v2": 10}})
    assert answer.status_code == 200
    assert answer.json() == {"version": before[0], "changed": False}
    assert state(dash) == before


def test_if_match_with_the_current_version_succeeds(dash: Dashboard, operator: httpx.Client) -> None:
    version = dash.current().version
    for header in (str(version), f'"{version + 1}"', f'W/"{version + 2}"', "*"):
        answer = operator.put(
            WEIGHTS, headers={"if-match": header}, json={"weights": {"v1": 80 - version, "v2": 20 + version}}
        )
        assert answer.status_code == 200, (header, answer.text)
        version = answer.json()["version"]
        assert dash.current().version == version


@pytest.mark.parametrize(
    ("weights", "fragment"),
    [
        pytest.param({"v1": 110, "v2": -10}, "v2", id="negative"),
        pytest.param({"v1": 50, "v2": 10}, "sum to 100", id="sum-below-100"),
        pytest.param({"v1": 95, "v2": 10}, "sum to 100", id="sum-above-100"),
        pytest.param({"v1": 90, "v3": 10}, "unknown subset", id="unknown-subset"),
        pytest.param({"v1": 90.0, "v2": 10}, "90.0", id="float"),
        pytest.param({"v1": 99.5, "v2": 0.5}, "99.5", id="fractional-float"),
        pytest.param({"v1": True, "v2": 99}, "True", id="boolean"),  # True would count as 1 and sum to 100
        pytest.param({"v1": "90", "v2": 10}, "'90'", id="string"),
        pytest.param({"v1": None, "v2": 100}, "None", id="null"),
        pytest.param([90, 10], "weights", id="list"),
        pytest.param(100, "weights", id="number"),
    ],
)
def test_invalid_weights_are_422_and_change_nothing(
    dash: Dashboard, operator: httpx.Client, weights: object, fragment: str
) -> None:
    before = state(dash)
    assert_error(operator.put(WEIGHTS, json={"weights": weights, "reason": "bad"}), 422, fragment)
    assert state(dash) == before


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param({}, "weights: required", id="missing-weights"),
        pytest.param({"weights": {"v1": 100}, "wieghts": 1}, "wieghts: unknown key", id="unknown-key"),
        pytest.param({"weights": {"v1": 100}, "reason": "x" * 501}, "reason", id="reason-too-long"),
        pytest.param({"weights": {"v1": 100}, "reason": "a\nb"}, "reason", id="reason-two-lines"),
        pytest.param({"weights": {"v1": 100}, "reason": 5}, "reason", id="reason-not-text"),
    ],
)
def test_invalid_bodies_are_422_and_change_nothing(
    dash: Dashboard, operator: httpx.Client, body: dict[str, Any], fragment: str
) -> None:
    before = state(dash)
    assert_error(operator.put(WEIGHTS, json=body), 422, fragment)
    assert state(dash) == before


def test_a_stale_if_match_is_409_and_changes_nothing(dash: Dashboard, operator: httpx.Client) -> None:
    stale = dash.current().version
    assert operator.put(WEIGHTS, json={"weights": {"v1": 80, "v2": 20}}).status_code == 200
    before = state(dash)
    answer = operator.put(WEIGHTS, headers={"if-match": str(stale)}, json={"weights": {"v1": 0, "v2": 100}})
    assert_error(answer, 409, str(stale), str(before[0]))
    assert state(dash) == before
    assert weights_of(operator) == {"v1": 80, "v2": 20}


def test_a_malformed_if_match_is_400_and_changes_nothing(dash: Dashboard, operator: httpx.Client) -> None:
    before = state(dash)
    answer = operator.put(WEIGHTS, headers={"if-match": "yesterday"}, json={"weights": {"v1": 0, "v2": 100}})
    assert_error(answer, 400, "If-Match")
    assert state(dash) == before


def test_a_2_mib_body_is_413_and_changes_nothing(dash: Dashboard, operator: httpx.Client) -> None:
    before = state(dash)
    padding = "x" * TWO_MIB
    answer = operator.put(WEIGHTS, json={"weights": {"v1": 0, "v2": 100}, "reason": padding})
    assert_error(answer, 413, "too large")
    assert state(dash) == before


def test_a_chunked_body_over_the_limit_is_413_and_changes_nothing(dash: Dashboard, operator: httpx.Client) -> None:
    """No Content-Length to refuse up front: the limit is counted as the body arrives."""
    before = state(dash)

    def chunks() -> Iterator[bytes]:
        yield b'{"weights": {"v1": 0, "v2": 100}, "reason": "'
        for _ in range(32):
            yield b"x" * (64 * 1024)
        yield b'"}'

    answer = operator.put(WEIGHTS, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in answer.request.headers
    assert_error(answer, 413, "too large")
    assert state(dash) == before


def send_all_then_read(dash: Dashboard, request: bytes) -> bytes:
    """Send the whole request before reading a byte, as simple clients do, then read to the end of the stream.
    A RST from the server (it closed with our bytes unread) raises ConnectionResetError or BrokenPipeError."""
    host, port = dash.url.removeprefix("http://").split(":")
    return raw_request((host, int(port)), request, timeout=10.0)


def head(length: int | None, *extra: bytes) -> bytes:
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return b"\r\n".join([b"PUT %s HTTP/1.1" % WEIGHTS.encode(), b"host: dashboard", framing, *extra, b"", b""])


def test_a_client_that_uploads_a_large_body_before_reading_reads_the_413(dash: Dashboard) -> None:
    """More than the socket buffers hold: without reading it, the dashboard would close on unread bytes (a RST)."""
    body = b"x" * (8 << 20)
    answer = send_all_then_read(dash, head(len(body)) + body)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"connection: close" in answer.lower() and b"too large" in answer


def test_a_chunked_body_over_the_limit_is_read_then_the_connection_closes(dash: Dashboard) -> None:
    """After the 413 the connection closes (the rest of a refused body is not read for ever to keep it alive)."""
    chunk = b"%x\r\n%s\r\n" % (1 << 16, b"x" * (1 << 16))
    token = b"authorization: Bearer %s" % dash.token("operator").encode()  # else a 401 comes before the body is read
    answer = send_all_then_read(dash, head(None, token) + chunk * 128 + b"0\r\n\r\n")  # 8 MiB
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"connection: close" in answer.lower()


@pytest.mark.parametrize("extra", [b"expect: 100-continue", b""], ids=["expect-100-continue", "too-large-to-drain"])
def test_a_body_that_will_not_come_or_cannot_be_drained_is_refused_at_once(dash: Dashboard, extra: bytes) -> None:
    """The client waits for 100 Continue (never sent), or declares more than the dashboard would ever read."""
    length = TWO_MIB if extra else 1 << 30
    started = time.monotonic()
    answer = send_all_then_read(dash, head(length, *filter(None, [extra])))
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"100 Continue" not in answer
    assert time.monotonic() - started < DRAIN_TIME, "answered without waiting for a body"


def test_no_token_is_401_and_changes_nothing(dash: Dashboard) -> None:
    before = state(dash)
    with dash.client() as anonymous:
        answer = anonymous.put(WEIGHTS, json={"weights": {"v1": 0, "v2": 100}})
    assert_error(answer, 401, "Bearer")
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert state(dash) == before


@pytest.mark.parametrize(
    "header",
    ["Bearer mgo_" + "A" * 43, "Bearer not-a-token", "Basic YWxpY2U6c2VjcmV0", "Bearer", "mgo_" + "A" * 43],
)
def test_an_unknown_or_malformed_credential_is_401_and_changes_nothing(dash: Dashboard, header: str) -> None:
    before = state(dash)
    with dash.client() as client:
        answer = client.put(WEIGHTS, headers={"authorization": header}, json={"weights": {"v1": 0, "v2": 100}})
    assert_error(answer, 401)
    assert state(dash) == before


def test_bad_tokens_from_one_address_get_429_and_a_valid_token_still_works(
    dash: Dashboard, operator: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Logged (never the token) and counted in /metrics; only failures are limited."""
    before = state(dash)
    guess = "mgo_" + "Z" * 43
    with dash.client(guess) as guesser:
        answers = [guesser.put(WEIGHTS, json={"weights": {"v1": 0, "v2": 100}}) for _ in range(FAILURE_BURST + 2)]
    assert [answer.status_code for answer in answers] == [401] * FAILURE_BURST + [429] * 2
    reason = assert_error(answers[-1], 429, "unknown token", "too many failed attempts from 127.0.0.1")
    assert answers[-1].headers["retry-after"] == str(int(FAILURE_REFILL)) and f"{int(FAILURE_REFILL)}s" in reason
    assert state(dash) == before
    assert operator.put(WEIGHTS, json={"weights": {"v1": 0, "v2": 100}}).status_code == 200, "from the same address"
    metrics = operator.get("/metrics").text
    assert f'meshgate_dashboard_auth_failures_total{{answer="401",via="token"}} {FAILURE_BURST}.0' in metrics
    assert 'meshgate_dashboard_auth_failures_total{answer="429",via="token"} 2.0' in metrics
    logged = [record.getMessage() for record in caplog.records if "failed token" in record.getMessage()]
    assert logged[0] == "failed token from 127.0.0.1: unknown token (PUT /api/v1/services/{name}/weights)"
    assert len(logged) == FAILURE_BURST + 1 and guess not in caplog.text and guess[4:] not in caplog.text


def test_a_viewer_cannot_write_403_and_changes_nothing(dash: Dashboard, viewer: httpx.Client) -> None:
    before = state(dash)
    assert_error(viewer.put(WEIGHTS, json={"weights": {"v1": 0, "v2": 100}}), 403, "operator", "victor")
    assert state(dash) == before
    assert viewer.get("/api/v1/services").status_code == 200, "but a viewer reads"


def test_a_gateway_token_cannot_write_403_and_changes_nothing(dash: Dashboard) -> None:
    before = state(dash)
    with dash.client(dash.token("gateway", group="shop")) as gateway:
        assert_error(gateway.put(WEIGHTS, json={"weights": {"v1": 0, "v2": 100}}), 403, "operator")
    assert state(dash) == before


def test_an_unknown_service_is_404_and_changes_nothing(dash: Dashboard, operator: httpx.Client) -> None:
    before = state(dash)
    assert_error(operator.put("/api/v1/services/search/weights", json={"weights": {"v1": 100}}), 404, "search")
    assert state(dash) == before


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"{not json", 400),
        (b"", 400),
        (b"\xff\xfe", 400),
        (b"[1, 2]", 422),
        (b"[" * 100_000, 400),
        (b'{"weights": {"v1": NaN, "v2": 100}}', 400),
        (b'{"weights": {"v1": ' + b"1" * 5000 + b"}}", 400),
    ],
    ids=["syntax", "empty", "not-utf8", "array", "deeply-nested", "nan", "huge-integer"],
)
def test_bodies_that_are_not_a_json_object_are_refused(
    dash: Dashboard, operator: httpx.Client, content: bytes, status: int
) -> None:
    before = state(dash)
    assert_error(operator.put(WEIGHTS, content=content, headers={"content-type": "application/json"}), status)
    assert state(dash) == before


# Services: create, edit, delete


SEARCH = {"subsets": {"v1": {"endpoints": ["127.0.0.1:9301"]}}}


def test_create_edit_and_delete_a_service(dash: Dashboard, operator: httpx.Client) -> None:
    answer = operator.put("/api/v1/services/search", json={"group": "find", "spec": SEARCH, "reason": "new"})
    assert answer.status_code == 200, answer.text
    detail = operator.get("/api/v1/services/search").json()
    assert detail["group"] == "find" and detail["subsets"] == {"v1": ["127.0.0.1:9301"]}
    assert detail["weights"] == {"v1": 100} and detail["version"] == answer.json()["version"]
    assert dash.current().mesh["groups"]["find"] == ["search"]

    subset = operator.put("/api/v1/services/search/subsets/v2", json={"endpoints": ["127.0.0.1:9302"]})
    assert subset.status_code == 200, subset.text
    assert weights_of(operator, "search") == {"v1": 100, "v2": 0}, "a new subset weighs 0"

    endpoint = "/api/v1/services/search/subsets/v2/endpoints"
    added = operator.post(endpoint, json={"address": "127.0.0.1:9303", "reason": "scale out"})
    assert added.json()["changed"] is True
    again = operator.post(endpoint, json={"address": "127.0.0.1:9303"})
    assert again.json() == {"version": added.json()["version"], "changed": False}, "adding twice changes nothing"
    assert operator.get("/api/v1/services/search").json()["subsets"]["v2"] == ["127.0.0.1:9302", "127.0.0.1:9303"]

    assert operator.delete(f"{endpoint}/127.0.0.1:9302", params={"reason": "drain"}).status_code == 200
    assert_error(operator.delete(f"{endpoint}/127.0.0.1:9399"), 404, "9399")
    assert operator.get("/api/v1/services/search").json()["subsets"]["v2"] == ["127.0.0.1:9303"]

    routes = [
        {"name": "beta", "match": {"headers": {"x-beta": "1"}}, "split": {"v2": 100}},
        {"name": "default", "split": {"v1": 70, "v2": 30}},
    ]
    assert operator.put("/api/v1/services/search/routes", json={"routes": routes}).status_code == 200
    stored = operator.get("/api/v1/services/search").json()["routes"]
    assert [route["name"] for route in stored] == ["beta", "default"]
    assert stored[0]["match"]["headers"] == {"x-beta": "1"} and stored[1]["split"] == {"v1": 70, "v2": 30}

    assert_error(operator.delete("/api/v1/services/search/subsets/v2"), 422, "weight 0")
    assert operator.put("/api/v1/services/search/routes", json={"routes": routes[1:]}).status_code == 200
    assert operator.put("/api/v1/services/search/weights", json={"weights": {"v1": 100}}).status_code == 200
    deleted = operator.request("DELETE", "/api/v1/services/search/subsets/v2", json={"reason": "v2 retired"})
    assert deleted.status_code == 200, deleted.text
    assert list(operator.get("/api/v1/services/search").json()["subsets"]) == ["v1"]

    assert operator.delete("/api/v1/services/search").status_code == 200
    assert_error(operator.get("/api/v1/services/search"), 404, "search")
    assert_error(operator.delete("/api/v1/services/search"), 404)
    assert "search" not in dash.current().mesh["services"]
    reasons = [entry.reason for entry in audit(dash)]
    assert {"new", "scale out", "drain", "v2 retired"} <= set(reasons)


def test_concurrent_edits_are_never_lost(dash: Dashboard) -> None:
    """Each edit is a read-modify-write; without If-Match a lost race is redone on the newer version."""
    token = dash.token("operator")
    addresses = [f"127.0.0.1:{9400 + index}" for index in range(8)]

    def add(address: str) -> int:
        with dash.client(token) as client:
            answer = client.post("/api/v1/services/catalog/subsets/v2/endpoints", json={"address": address})
            return answer.status_code

    with ThreadPoolExecutor(len(addresses)) as pool:
        statuses = list(pool.map(add, addresses))
    assert statuses == [200] * len(addresses)
    current = dash.current()
    assert current.version == 1 + len(addresses)
    endpoints = current.mesh["services"]["catalog"]["subsets"]["v2"]["endpoints"]
    assert endpoints[0] == "127.0.0.1:9103" and sorted(endpoints[1:]) == addresses


def test_concurrent_edits_through_two_replicas_are_never_lost(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two dashboards on one etcd: their commits race, and the loser redoes its edit on the winner's version."""
    etcd = request.getfixturevalue("etcd")
    with running(tmp_path / "a", store_url=etcd.url) as first, running(tmp_path / "b", store_url=etcd.url) as second:
        first.seed()
        tokens = [(first, first.token("operator")), (second, second.token("operator"))]
        addresses = [f"127.0.0.1:{9400 + index}" for index in range(8)]

        def add(index: int) -> int:
            replica, token = tokens[index % 2]
            with replica.client(token) as client:
                path = "/api/v1/services/catalog/subsets/v2/endpoints"
                return client.post(path, json={"address": addresses[index]}).status_code

        with ThreadPoolExecutor(len(addresses)) as pool:
            assert list(pool.map(add, range(len(addresses)))) == [200] * len(addresses)
        current = second.current()
        assert current.version == 1 + len(addresses)
        assert set(addresses) <= set(current.mesh["services"]["catalog"]["subsets"]["v2"]["endpoints"])


def test_moving_a_service_to_another_group(dash: Dashboard, operator: httpx.Client) -> None:
    spec = operator.get("/api/v1/services/frontend").json()["spec"]
    assert operator.put("/api/v1/services/frontend", json={"group": "shop", "spec": spec}).status_code == 200
    groups = dash.current().mesh["groups"]
    assert groups["shop"] == ["catalog", "frontend"] and groups["web"] == []


def test_list_services(dash: Dashboard, viewer: httpx.Client) -> None:
    answer = viewer.get("/api/v1/services").json()
    assert answer["version"] == dash.current().version
    catalog = next(service for service in answer["services"] if service["name"] == "catalog")
    assert catalog["group"] == "shop" and catalog["weights"] == {"v1": 90, "v2": 10}
    assert catalog["subsets"] == {"v1": ["127.0.0.1:9101", "127.0.0.1:9102"], "v2": ["127.0.0.1:9103"]}
    assert [route["name"] for route in catalog["routes"]] == ["canary-header", "default"]


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/api/v1/services/<script>", {"group": "shop", "spec": SEARCH}, "<script>"),
        ("/api/v1/services/Search", {"group": "shop", "spec": SEARCH}, "Search"),
        ("/api/v1/services/" + "a" * 64, {"group": "shop", "spec": SEARCH}, "max 63"),
        ("/api/v1/services/search", {"group": "<img src=x onerror=alert(1)>", "spec": SEARCH}, "<img"),
        ("/api/v1/services/search", {"group": "shop", "spec": {"subsets": {"<b>": {}}}}, "<b>"),
        ("/api/v1/services/catalog/subsets/<svg>", {"endpoints": []}, "<svg>"),
        ("/api/v1/services/search", {"group": "shop", "spec": {"subsets": {"v1": {"endpoints": ["<x>:80"]}}}}, "<x>"),
    ],
    ids=["script-name", "uppercase", "too-long", "group", "subset-in-spec", "subset-path", "endpoint"],
)
def test_hostile_names_are_422_and_nothing_is_stored(
    dash: Dashboard, operator: httpx.Client, path: str, body: dict[str, Any], fragment: str
) -> None:
    before = state(dash)
    answer = operator.put(path, json=body)
    reason = assert_error(answer, 422, fragment)
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "expected" in reason
    assert state(dash) == before


# History, versions, revert, audit


def test_history_lists_versions_newest_first_with_authors_reasons_and_diffs(
    dash: Dashboard, operator: httpx.Client, viewer: httpx.Client
) -> None:
    operator.put(WEIGHTS, json={"weights": {"v1": 50, "v2": 50}, "reason": "step 2"})
    operator.put(WEIGHTS, json={"weights": {"v2": 100}, "reason": "promote"})
    history = viewer.get("/api/v1/config/history").json()
    assert [entry["version"] for entry in history] == [3, 2, 1]
    assert [entry["reason"] for entry in history[:2]] == ["promote", "step 2"]
    assert history[0]["author"].startswith("alice (token ")
    assert history[0]["diff"] == [
        "services.catalog.routes[1].split.v1: 50 → 0",
        "services.catalog.routes[1].split.v2: 50 → 100",
    ]
    assert [entry["version"] for entry in viewer.get("/api/v1/config/history", params={"limit": 1}).json()] == [3]
    assert [entry["version"] for entry in viewer.get("/api/v1/config/history", params={"before": 3}).json()] == [2, 1]
    assert_error(viewer.get("/api/v1/config/history", params={"limit": "all"}), 400, "limit")
    assert_error(viewer.get("/api/v1/config/history", params={"limit": 0}), 400, "limit")
    assert_error(viewer.get("/api/v1/config/history", params={"before": "9" * 5000}), 400, "before")
    assert_error(viewer.get("/api/v1/audit", params={"before": "²"}), 400, "before")


def test_a_version_can_be_read_and_reverted_to(dash: Dashboard, operator: httpx.Client) -> None:
    original = dash.current()
    operator.put(WEIGHTS, json={"weights": {"v1": 0, "v2": 100}, "reason": "promote"})
    version = operator.get(f"/api/v1/config/versions/{original.version}").json()
    assert version["mesh"] == original.mesh and version["version"] == original.version
    for missing in ("99", "9" * 5000, "²", "-1"):
        assert_error(operator.get(f"/api/v1/config/versions/{missing}"), 404, "no config version")

    answer = operator.post("/api/v1/config/revert", json={"version": original.version, "reason": "v2 is slow"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"version": 3, "changed": True}, "a revert is a new version"
    current = dash.current()
    assert current.version == 3 and current.mesh == original.mesh and current.reason == "v2 is slow"
    assert weights_of(operator) == {"v1": 90, "v2": 10}
    assert_error(operator.post("/api/v1/config/revert", json={"version": 42}), 404, "42")
    assert_error(operator.post("/api/v1/config/revert", json={"version": "1"}), 422, "version")
    assert_error(operator.post("/api/v1/config/revert", json={"version": True}), 422, "version")
    assert_error(operator.post("/api/v1/config/revert", json={"version": 2**64}), 422, "version")


def test_put_config_replaces_the_whole_mesh(dash: Dashboard, operator: httpx.Client, viewer: httpx.Client) -> None:
    data = mesh()
    data["groups"]["find"] = ["search"]
    data["services"]["search"] = SEARCH
    answer = operator.put("/api/v1/config", json={"mesh": data, "reason": "apply"})
    assert answer.status_code == 200, answer.text
    config = viewer.get("/api/v1/config")
    assert config.json()["version"] == answer.json()["version"] == 2
    assert config.headers["etag"] == '"2"'
    assert config.json()["mesh"]["groups"]["find"] == ["search"]
    before = state(dash)
    bad = mesh()
    bad["groups"]["shop"].append("nothing")
    assert_error(operator.put("/api/v1/config", json={"mesh": bad}), 422, "groups.shop[1]", "nothing")
    assert state(dash) == before


def test_audit_records_who_what_before_after_reason_and_version(dash: Dashboard, operator: httpx.Client) -> None:
    operator.put(WEIGHTS, json={"weights": {"v1": 60, "v2": 40}, "reason": "canary step"})
    operator.put("/api/v1/services/catalog/subsets/v3", json={"endpoints": ["127.0.0.1:9104"], "reason": "v3"})
    entries = operator.get("/api/v1/audit").json()
    subset, weights = entries[0], entries[1]
    assert weights["who"].startswith("alice (token ") and weights["action"] == "weights.set"
    assert weights["target"] == "services/catalog/routes" and weights["reason"] == "canary step"
    assert weights["before"][-1]["split"] == {"v1": 90, "v2": 10}
    assert weights["after"][-1]["split"] == {"v1": 60, "v2": 40}
    assert weights["version"] == 2 and isinstance(weights["time"], float)
    assert subset["target"] == "services/catalog/subsets/v3"
    assert subset["before"] is None and subset["after"] == {"endpoints": ["127.0.0.1:9104"]}
    assert [entry["id"] for entry in operator.get("/api/v1/audit", params={"limit": 1}).json()] == [subset["id"]]


def test_reads_need_a_viewer_or_operator(dash: Dashboard) -> None:
    paths = ["/api/v1/services", "/api/v1/services/catalog", "/api/v1/config", "/api/v1/config/history"]
    paths += ["/api/v1/config/versions/1", "/api/v1/audit", "/api/v1/groups", "/api/v1/gateways"]
    with dash.client() as anonymous, dash.client(dash.token("gateway", group="shop")) as gateway:
        for path in paths:
            assert_error(anonymous.get(path), 401)
            assert_error(gateway.get(path), 403, "viewer or operator")


# The HTTP surface


def test_unknown_paths_and_methods_are_json_errors(dash: Dashboard, operator: httpx.Client) -> None:
    assert_error(operator.get("/api/v1/nothing"), 404, "not found")
    assert_error(operator.post("/api/v1/services"), 405, "POST")


def test_an_unexpected_exception_is_a_one_line_500_and_a_logged_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenAudit:
        """The real store, except that reading the audit log fails unexpectedly."""

        def __init__(self, store: Store) -> None:
            self.store = store

        def __getattr__(self, name: str) -> Any:
            return getattr(self.store, name)

        async def audit(self, limit: int = 100, before: int | None = None) -> list[AuditEntry]:
            raise RuntimeError("boom: internal detail")

    broken = running(tmp_path / "data", wrap=lambda store: cast(Store, BrokenAudit(store)))
    with caplog.at_level(logging.ERROR), broken as dash, dash.client(dash.token("operator")) as client:
        answer = client.get("/api/v1/audit")
        assert client.get("/api/v1/services").status_code == 200, "the server keeps serving"
    reason = assert_error(answer, 500, "internal error")
    assert "boom" not in reason
    logged = [record for record in caplog.records if record.exc_info and "boom" in str(record.exc_info[1])]
    assert logged and "/api/v1/audit" in logged[0].getMessage()


def test_a_closed_store_is_503(dash: Dashboard, operator: httpx.Client) -> None:
    dash.call(dash.store.close)
    answer = operator.get("/api/v1/services")
    assert_error(answer, 503, "store")
    assert answer.headers["retry-after"] == "1"


def test_openapi_lists_every_route_and_method(dash: Dashboard) -> None:
    from starlette.routing import Route

    with dash.client() as anonymous:
        document = anonymous.get("/api/v1/openapi.json").json()
    assert document["openapi"].startswith("3.")
    parameters = document["components"]["parameters"]
    # Every API route is documented; the UI's pages and static files are not an API.
    api = ("/api/", "/v1/", "/metrics")
    routes = [route for route in dash.app.routes if isinstance(route, Route) and route.path.startswith(api)]
    assert len(routes) >= 20
    for route in routes:
        path = route.path
        assert path in document["paths"], path
        for method in route.methods or ():
            if method == "HEAD":
                continue
            operation = document["paths"][path][method.lower()]
            assert operation["summary"] and operation["responses"], (path, method)
            declared = {
                (parameters[p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p)["name"]
                for p in operation.get("parameters", [])
            }
            for name in ("name", "subset", "address", "version"):
                if "{" + name + "}" in path:
                    assert name in declared, (path, method, name)
    weights = document["paths"]["/api/v1/services/{name}/weights"]["put"]["responses"]
    assert {"200", "401", "403", "404", "409", "413", "422"} <= set(weights)


def test_metrics_label_requests_by_route_template(dash: Dashboard, operator: httpx.Client) -> None:
    operator.put(WEIGHTS, json={"weights": {"v1": 50, "v2": 50}})
    operator.put("/api/v1/services/nope/weights", json={"weights": {"v1": 100}})
    with dash.client() as anonymous:
        text = anonymous.get("/metrics").text
    route = 'route="/api/v1/services/{name}/weights"'
    assert f'meshgate_dashboard_request_duration_seconds_count{{code="200",method="PUT",{route}}} 1.0' in text
    assert f'meshgate_dashboard_request_duration_seconds_count{{code="404",method="PUT",{route}}} 1.0' in text
    assert "services/catalog" not in text and "services/nope" not in text
    assert 'meshgate_dashboard_store_duration_seconds_count{operation="commit"} 1.0' in text
    assert 'meshgate_dashboard_tokens{role="operator"} 1.0' in text
    assert "meshgate_dashboard_config_version 2.0" in text
    assert "meshgate_dashboard_sync_watchers 0.0" in text


def test_responses_are_not_cached_or_sniffed(dash: Dashboard, viewer: httpx.Client) -> None:
    answer = viewer.get("/api/v1/config")
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert json.loads(answer.content)["version"] == 1


def test_healthz_needs_no_token_and_fails_when_the_store_does(dash: Dashboard) -> None:
    with dash.client() as anonymous:  # probes carry no token, no cookie
        answer = anonymous.get("/healthz")
        assert (answer.status_code, answer.text) == (200, "ok\n")
        assert answer.headers["content-security-policy"]  # through the same middleware as every answer
        assert "/healthz" in anonymous.get("/api/v1/openapi.json").json()["paths"]
        dash.call(dash.store.close)
        down = anonymous.get("/healthz")
    assert down.status_code == 503
    assert down.text.count("\n") == 1 and "store" in down.text, down.text


def test_a_subset_may_name_where_its_endpoints_are_discovered(dash: Dashboard, operator: httpx.Client) -> None:
    path = "/api/v1/services/catalog/subsets/v3"
    answer = operator.put(path, json={"dns": "catalog-v3.shop.svc:8080", "reason": "headless Service"})
    assert answer.status_code == 200, answer.text
    assert dash.current().mesh["services"]["catalog"]["subsets"]["v3"] == {"dns": "catalog-v3.shop.svc:8080"}
    assert operator.put(path, json={"etcd": "/meshgate/endpoints/catalog/v3/"}).status_code == 200
    before = state(dash)
    assert_error(operator.put(path, json={"reason": "no source"}), 422, "expected one of: endpoints, dns, srv, etcd")
    two = {"endpoints": ["127.0.0.1:9104"], "srv": "_http._tcp.catalog"}
    assert_error(operator.put(path, json=two), 422, "services.catalog.subsets.v3.srv", "one source")
    assert_error(operator.put(path, json={"dns": "catalog-v3"}), 422, "subsets.v3.dns", "catalog-v3")
    assert state(dash) == before


def test_every_operation_the_document_says_needs_a_token_answers_401_without_one(dash: Dashboard) -> None:
    """The 401 response is added to the document once, by the builder: what it says must be what the API does."""
    filled = {"{name}": "catalog", "{subset}": "v1", "{address}": "127.0.0.1:9101", "{version}": "1"}
    with dash.client() as anonymous:
        document = anonymous.get("/api/v1/openapi.json").json()
        protected = [
            (path, method)
            for path, operations in document["paths"].items()
            for method, operation in operations.items()
            if operation.get("security") != []
            # span intake answers 404 first when the dashboard keeps no spans, as this one; with a span store its
            # 401 is tested in tests/dashboard/test_spans.py
            and path != "/v1/traces"
        ]
        assert len(protected) >= 20
        for path, method in protected:
            responses = document["paths"][path][method]["responses"]
            assert "401" in responses, (path, method)
            url = path
            for placeholder, value in filled.items():
                url = url.replace(placeholder, value)
            answer = anonymous.request(method.upper(), url, json={})
            assert answer.status_code == 401, (path, method, answer.status_code, answer.text)
            assert answer.headers["www-authenticate"].startswith("Bearer"), (path, method)


def test_the_schemas_carry_the_limits_the_bodies_enforce(dash: Dashboard) -> None:
    with dash.client() as anonymous:
        schemas = anonymous.get("/api/v1/openapi.json").json()["components"]["schemas"]
    weights = schemas["WeightsBody"]
    assert weights["properties"]["reason"]["maxLength"] == MAX_OPERATOR_REASON
    assert weights["properties"]["weights"]["additionalProperties"] == {"type": "integer", "minimum": 0}
    assert weights["required"] == ["weights"] and weights["additionalProperties"] is False
