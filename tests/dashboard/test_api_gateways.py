"""The gateway wire protocol over real HTTP: /ca, /join (real CSRs, real certificates), /sync long-polls,
heartbeats, and what operators read about gateways and groups. Long-poll tests run the poll in a thread and time
it; they wait on conditions with deadlines, never on sleeps."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from dashboard.api.gateways import group_view
from dashboard.api.heartbeats import MAX_HEARTBEAT, MAX_STATS_ENTRIES
from dashboard.store.model import GatewayRecord, Store
from gateway import tls
from tests.conftest import wait_for
from tests.dashboard.dashboards import Dashboard, running
from tests.dashboard.test_api import assert_error, audit, state

INTERVAL = 0.25  # heartbeat interval in these tests: a gateway is stale 0.75 s after its last heartbeat


@pytest.fixture
def dash(tmp_path: Path) -> Iterator[Dashboard]:
    with running(tmp_path / "data", heartbeat_interval=INTERVAL) as dashboard:
        dashboard.seed()
        yield dashboard


@pytest.fixture
def operator(dash: Dashboard) -> Iterator[httpx.Client]:
    with dash.client(dash.token("operator", name="alice")) as client:
        yield client


@pytest.fixture
def shop(dash: Dashboard) -> Iterator[httpx.Client]:
    """A gateway join token for group shop (owns catalog)."""
    with dash.client(dash.token("gateway", group="shop", name="shop-join"), timeout=70.0) as client:
        yield client


@pytest.fixture
def web(dash: Dashboard) -> Iterator[httpx.Client]:
    """A gateway join token for group web (owns frontend)."""
    with dash.client(dash.token("gateway", group="web", name="web-join"), timeout=70.0) as client:
        yield client


def heartbeat(client: httpx.Client, group: str, instance: str, /, **fields: Any) -> httpx.Response:
    body = {
        "instance": instance,
        "group": group,
        "meshgate_version": "0.1.0",
        "config_version": 1,
        "started": time.time() - 5,
        "advertise": None,
        "listeners": {"inbound": "127.0.0.1:15006"},
        "cert_not_after": time.time() + 86400,
        "stats": {"series": []},
        **fields,
    }
    return client.post("/api/v1/heartbeat", json=body)


class Poll:
    """A /sync request running in a thread; `result()` waits for it and says how long it took."""

    def __init__(self, client: httpx.Client, **params: str) -> None:
        self.answer: httpx.Response | None = None
        self.finished = 0.0
        self.thread = threading.Thread(target=self._run, args=(client, params), daemon=True)
        self.thread.start()

    def _run(self, client: httpx.Client, params: dict[str, str]) -> None:
        self.answer = client.get("/api/v1/sync", params=params)
        self.finished = time.monotonic()

    def result(self, timeout: float = 10.0) -> httpx.Response:
        self.thread.join(timeout)
        assert self.answer is not None, f"/sync did not answer within {timeout}s"
        return self.answer


def watchers(dash: Dashboard) -> float:
    with dash.client() as anonymous:
        for line in anonymous.get("/metrics").text.splitlines():
            if line.startswith("meshgate_dashboard_sync_watchers "):
                return float(line.split()[1])
    raise AssertionError("no watchers gauge")


def wait_for_watchers(dash: Dashboard, count: int) -> None:
    wait_for(lambda: watchers(dash) == count, 10, what=f"{count} /sync watchers")


# /ca and /join


def test_ca_needs_no_token_and_pins_the_root(dash: Dashboard) -> None:
    with dash.client() as anonymous:
        answer = anonymous.get("/api/v1/ca").json()
    assert answer["trust_domain"] == "meshgate.local"
    assert answer["ca"] == dash.ca.root_pem.decode()
    assert answer["ca_hash"] == tls.spki_hash(answer["ca"].encode()) == dash.ca.ca_hash


def test_join_issues_the_groups_spiffe_id_for_the_gateways_own_key(dash: Dashboard, shop: httpx.Client) -> None:
    key_pem, csr_pem = tls.new_key_and_csr()
    answer = shop.post("/api/v1/join", json={"group": "shop", "csr": csr_pem.decode()})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    chain = body["certificate"].encode()
    assert body["spiffe_id"] == "spiffe://meshgate.local/group/shop" == tls.spiffe_id_of(chain)
    assert body["ca"] == dash.ca.root_pem.decode()
    assert abs(body["not_after"] - tls.not_after(chain)) < 1
    leaf, intermediate = x509.load_pem_x509_certificates(chain)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert leaf.public_key() == csr.public_key(), "the certificate is for the key the gateway kept"
    assert leaf.issuer == intermediate.subject
    tls.mesh_client_context(chain, key_pem, body["ca"].encode())  # a usable identity: loads and matches the key
    entry = audit(dash)[0]
    assert entry.action == "identity.issue" and entry.who.startswith("shop-join (token ")
    assert entry.target == "groups/shop" and entry.after["spiffe_id"] == body["spiffe_id"]  # type: ignore[index]


def test_join_refuses_other_groups_bad_csrs_and_other_roles(dash: Dashboard, shop: httpx.Client) -> None:
    _, csr_pem = tls.new_key_and_csr()
    before = len(audit(dash))
    assert_error(shop.post("/api/v1/join", json={"group": "web", "csr": csr_pem.decode()}), 403, "shop", "web")
    assert_error(shop.post("/api/v1/join", json={"group": "shop", "csr": "not a csr"}), 422, "csr")
    assert_error(shop.post("/api/v1/join", json={"group": "shop"}), 422, "csr")
    with dash.client(dash.token("operator")) as operator, dash.client() as anonymous:
        assert_error(operator.post("/api/v1/join", json={"group": "shop", "csr": csr_pem.decode()}), 403, "gateway")
        assert_error(anonymous.post("/api/v1/join", json={"group": "shop", "csr": csr_pem.decode()}), 401)
    assert len(audit(dash)) == before, "refused joins issue nothing"


def test_a_gateway_token_reads_only_its_own_groups_view(dash: Dashboard, shop: httpx.Client) -> None:
    before = state(dash)
    assert_error(shop.get("/api/v1/sync", params={"group": "web"}), 403, "shop")
    assert_error(heartbeat(shop, "web", str(uuid.uuid4())), 403, "shop")
    assert_error(shop.get("/api/v1/config"), 403)
    assert_error(shop.put("/api/v1/config", json={"mesh": {}}), 403)
    with dash.client(dash.token("operator")) as operator:
        assert_error(operator.get("/api/v1/sync"), 403, "gateway")
    assert state(dash) == before


# /sync


def test_sync_answers_the_groups_services_and_the_owners_of_the_rest(shop: httpx.Client) -> None:
    answer = shop.get("/api/v1/sync")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["group"] == "shop" and body["version"] == 1
    assert list(body["services"]) == ["catalog"]
    assert body["services"]["catalog"]["routes"][-1]["split"] == {"v1": 90, "v2": 10}
    assert body["remote"] == {"frontend": {"group": "web", "gateways": [], "timeouts": {"stream_idle": "5m"}}}
    assert answer.headers["etag"] == f'"{body["etag"]}"'
    assert shop.get("/api/v1/sync", params={"group": "shop"}).json()["etag"] == body["etag"], "stable"


def test_sync_answers_304_after_wait_when_nothing_changed(shop: httpx.Client) -> None:
    etag = shop.get("/api/v1/sync").json()["etag"]
    started = time.monotonic()
    answer = shop.get("/api/v1/sync", params={"after": etag, "wait": "0.5"})
    elapsed = time.monotonic() - started
    assert answer.status_code == 304 and answer.content == b""
    assert 0.5 <= elapsed < 3.0, elapsed


def test_sync_wakes_within_a_second_of_a_weight_change(
    dash: Dashboard, shop: httpx.Client, operator: httpx.Client
) -> None:
    etag = shop.get("/api/v1/sync").json()["etag"]
    poll = Poll(shop, after=etag, wait="30")
    wait_for_watchers(dash, 1)
    changed = time.monotonic()
    assert operator.put("/api/v1/services/catalog/weights", json={"weights": {"v1": 50, "v2": 50}}).status_code == 200
    answer = poll.result()
    assert answer.status_code == 200, answer.text
    assert poll.finished - changed < 1.0, poll.finished - changed
    body = answer.json()
    assert body["etag"] != etag and body["version"] == 2
    assert body["services"]["catalog"]["routes"][-1]["split"] == {"v1": 50, "v2": 50}
    wait_for_watchers(dash, 0)


def test_a_change_to_another_groups_service_does_not_wake_the_group(
    shop: httpx.Client, web: httpx.Client, operator: httpx.Client
) -> None:
    shop_etag = shop.get("/api/v1/sync").json()["etag"]
    web_etag = web.get("/api/v1/sync").json()["etag"]
    shop_poll = Poll(shop, after=shop_etag, wait="1")
    web_poll = Poll(web, after=web_etag, wait="30")
    added = operator.post("/api/v1/services/frontend/subsets/v1/endpoints", json={"address": "127.0.0.1:9202"})
    assert added.status_code == 200
    assert web_poll.result().json()["services"]["frontend"]["subsets"]["v1"]["endpoints"][-1] == "127.0.0.1:9202"
    assert shop_poll.result().status_code == 304, "shop sees only who owns frontend, which did not change"


def test_sync_answers_at_once_when_the_dashboard_stops(tmp_path: Path) -> None:
    with running(tmp_path / "data") as dash, dash.client(dash.token("gateway", group="shop"), timeout=70) as shop:
        etag = shop.get("/api/v1/sync").json()["etag"]
        poll = Poll(shop, after=etag, wait="60")
        wait_for_watchers(dash, 1)
        stopping = time.monotonic()
        dash.stop()
        assert poll.result().status_code == 304
        assert poll.finished - stopping < 2.0


def test_a_sync_asked_while_the_dashboard_stops_is_a_503_that_closes_the_connection(
    dash: Dashboard, shop: httpx.Client
) -> None:
    """Polls waiting when shutdown began get their 304; one asked after that would get another at once, and again,
    in a loop as fast as the network. A 503 sends the gateway to its outage probes instead."""
    etag = shop.get("/api/v1/sync").json()["etag"]
    dash.loop.call_soon_threadsafe(dash.settings.stopping.set)  # what SIGTERM does first
    started = time.monotonic()
    answer = shop.get("/api/v1/sync", params={"after": etag, "wait": "30"})
    assert time.monotonic() - started < 2.0
    assert_error(answer, 503, "shutting down")
    assert answer.headers["connection"] == "close"


def test_sync_holds_at_most_sync_hold(tmp_path: Path) -> None:
    """`--sync-hold` cuts what a gateway asks for (30 s): tests run many quiet spells in seconds, and a proxy that
    closes idle connections sooner never cuts a long-poll."""
    with running(tmp_path / "data", sync_hold=0.3) as dash, dash.client(dash.token("gateway", group="shop")) as shop:
        dash.seed()
        etag = shop.get("/api/v1/sync").json()["etag"]
        started = time.monotonic()
        answer = shop.get("/api/v1/sync", params={"after": etag, "wait": "30"})
        elapsed = time.monotonic() - started
        assert answer.status_code == 304 and 0.3 <= elapsed < 3.0, (answer.status_code, elapsed)
        assert shop.get("/api/v1/sync", params={"after": etag, "wait": "61"}).status_code == 400, "still refused"


@pytest.mark.parametrize("wait", ["-1", "61", "soon", "nan", "inf"])
def test_sync_refuses_a_bad_wait(shop: httpx.Client, wait: str) -> None:
    assert_error(shop.get("/api/v1/sync", params={"wait": wait}), 400, "wait")


# Heartbeats, /gateways, /groups


def test_heartbeats_make_gateways_visible_in_sync_and_then_stale(
    dash: Dashboard, shop: httpx.Client, operator: httpx.Client
) -> None:
    instance = str(uuid.uuid4())
    sync = shop.get("/api/v1/sync").json()
    answer = heartbeat(shop, "shop", instance, etag=sync["etag"], config_version=sync["version"])
    assert answer.status_code == 200 and answer.json() == {"interval": INTERVAL}
    [gateway] = operator.get("/api/v1/gateways").json()
    assert gateway["instance"] == instance and gateway["group"] == "shop"
    assert gateway["spiffe_id"] == "spiffe://meshgate.local/group/shop"
    assert gateway["in_sync"] is True and gateway["stale"] is False
    assert gateway["meshgate_version"] == "0.1.0" and gateway["config_version"] == 1
    assert gateway["listeners"] == {"inbound": "127.0.0.1:15006"} and 4 < gateway["uptime"] < 60
    assert gateway["cert_not_after"] > time.time() and abs(gateway["last_heartbeat"] - time.time()) < 5

    operator.put("/api/v1/services/catalog/weights", json={"weights": {"v1": 0, "v2": 100}})
    heartbeat(shop, "shop", instance, etag=sync["etag"], config_version=sync["version"])
    [gateway] = operator.get("/api/v1/gateways").json()
    assert gateway["in_sync"] is False, "its group's view changed and it has not applied it"
    assert operator.get("/api/v1/groups").json()[0] == {
        "name": "shop",
        "services": ["catalog"],
        "gateways": {"live": 1, "stale": 0},
    }

    wait_for(lambda: operator.get("/api/v1/gateways").json()[0]["stale"], 5, what="the gateway to go stale")
    assert operator.get("/api/v1/groups").json()[0]["gateways"] == {"live": 0, "stale": 1}


def test_a_gateway_without_an_etag_is_judged_by_config_version(shop: httpx.Client, operator: httpx.Client) -> None:
    heartbeat(shop, "shop", str(uuid.uuid4()), config_version=1)
    assert operator.get("/api/v1/gateways").json()[0]["in_sync"] is True
    operator.put("/api/v1/services/catalog/weights", json={"weights": {"v1": 0, "v2": 100}})
    assert operator.get("/api/v1/gateways").json()[0]["in_sync"] is False


def test_remote_lists_live_gateways_of_the_owner_and_drops_stale_ones(
    dash: Dashboard, shop: httpx.Client, web: httpx.Client
) -> None:
    etag = shop.get("/api/v1/sync").json()["etag"]
    poll = Poll(shop, after=etag, wait="30")
    wait_for_watchers(dash, 1)
    joined = time.monotonic()
    assert heartbeat(web, "web", str(uuid.uuid4()), advertise="127.0.0.1:16006").status_code == 200
    answer = poll.result()
    assert poll.finished - joined < 1.0, "a new gateway wakes the other groups' long-polls"
    body = answer.json()
    assert body["remote"]["frontend"] == {
        "group": "web",
        "gateways": ["127.0.0.1:16006"],
        "timeouts": {"stream_idle": "5m"},  # the service's stream timeouts hold at the caller's hop too
    }

    # No more heartbeats: the gateway is stale 3 intervals after the last one, noticed within one more interval.
    gone = Poll(shop, after=body["etag"], wait="30")
    answer = gone.result()
    assert answer.json()["remote"]["frontend"]["gateways"] == [], "a stale gateway is no longer a peer"
    assert joined + 3 * INTERVAL <= gone.finished < joined + 4 * INTERVAL + 1.0


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"instance": "gw-1"}, "instance"),
        ({"config_version": "1"}, "config_version"),
        ({"config_version": True}, "config_version"),
        ({"advertise": "0.0.0.0:15006"}, "advertise"),
        ({"advertise": "nowhere"}, "advertise"),
        ({"advertise": "127.0.0.1:0"}, "advertise"),
        ({"listeners": ["inbound"]}, "listeners"),
        ({"started": "yesterday"}, "started"),
        ({"meshgate_version": "x" * 65}, "meshgate_version"),
        ({"instance": ["5f0e8b7e-0000-4000-8000-000000000000"]}, "instance"),
        ({"advertise": "a" * 300 + ".example:15006"}, "advertise"),
        ({"listeners": {f"l{index}": "127.0.0.1:1" for index in range(17)}}, "listeners: expected at most 16"),
        ({"listeners": {"In Bound": "127.0.0.1:1"}}, "listeners"),
        ({"listeners": {"inbound": "x" * 301}}, "listeners"),
        ({"stats": []}, "stats"),
        ({"stats": {"series": [0] * (MAX_STATS_ENTRIES + 1)}}, "stats.series: expected a list of at most 4096"),
        ({"stats": {"gauges": {}}}, "stats.gauges"),
        ({"stats": {"cpu": "lots"}}, "stats.cpu"),
    ],
)
def test_malformed_heartbeats_are_422_and_store_nothing(
    shop: httpx.Client, operator: httpx.Client, fields: dict[str, Any], fragment: str
) -> None:
    assert_error(heartbeat(shop, "shop", str(uuid.uuid4()), **fields), 422, fragment)
    assert operator.get("/api/v1/gateways").json() == []


def test_heartbeats_accept_fields_from_newer_gateways(shop: httpx.Client, operator: httpx.Client) -> None:
    assert heartbeat(shop, "shop", str(uuid.uuid4()), topology={"edges": []}).status_code == 200
    assert len(operator.get("/api/v1/gateways").json()) == 1


def test_a_heartbeat_keeps_only_the_fields_the_dashboard_knows(dash: Dashboard, shop: httpx.Client) -> None:
    """Unknown fields, and unknown keys in `stats`, are dropped, not stored for every /sync to read again."""
    instance = str(uuid.uuid4())
    stats = {"series": [], "counters": [["meshgate_retries_total", "catalog", 1]], "gauges": [], "cpu": 0.5}
    junk = {"topology": {"edges": []}, "padding": "x" * 200_000}
    answer = heartbeat(
        shop, "shop", instance, advertise="127.0.0.1:15006", stats={**stats, "extra": "y" * 1000}, **junk
    )
    assert answer.status_code == 200
    [record] = dash.call(lambda: dash.store.gateways(stats=True))
    assert record.key == f"shop/{instance}"
    assert set(record.data) == {
        "meshgate_version",
        "config_version",
        "etag",
        "started",
        "cert_not_after",
        "advertise",
        "listeners",
        "stats",
    }
    assert record.data["stats"] == {**stats, "loop_lag": 0, "rss": 0}
    assert record.data["advertise"] == "127.0.0.1:15006" and record.data["listeners"] == {"inbound": "127.0.0.1:15006"}


def test_a_heartbeat_over_the_size_limit_is_413_and_stores_nothing(
    dash: Dashboard, shop: httpx.Client, operator: httpx.Client
) -> None:
    answer = heartbeat(shop, "shop", str(uuid.uuid4()), padding="x" * MAX_HEARTBEAT)
    assert_error(answer, 413, f"limit {MAX_HEARTBEAT} bytes")
    assert operator.get("/api/v1/gateways").json() == []


def test_a_join_token_of_one_group_cannot_touch_another_groups_gateway(
    dash: Dashboard, shop: httpx.Client, web: httpx.Client, operator: httpx.Client
) -> None:
    """web's token claims the instance id of a shop gateway: that makes a web gateway, and shop's stays as it was."""
    instance = str(uuid.uuid4())
    assert heartbeat(shop, "shop", instance, advertise="127.0.0.1:15006").status_code == 200
    assert heartbeat(web, "web", instance, advertise="127.0.0.1:16666").status_code == 200
    assert_error(heartbeat(web, "shop", instance, advertise="127.0.0.1:16666"), 403, "group 'web'")
    listed = {(item["group"], item["instance"]): item["advertise"] for item in operator.get("/api/v1/gateways").json()}
    assert listed == {("shop", instance): "127.0.0.1:15006", ("web", instance): "127.0.0.1:16666"}
    with dash.client(dash.token("gateway", group="web")) as other:
        remote = other.get("/api/v1/sync").json()["remote"]
    assert remote["catalog"] == {"group": "shop", "gateways": ["127.0.0.1:15006"], "timeouts": {"stream_idle": "5m"}}


FORGET_AFTER = 2.0  # seconds in the forgetting test


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
def test_gateways_silent_for_forget_after_are_removed(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """Counted from the dashboard's start if later: a gateway is not forgotten for the dashboard's own downtime."""
    store_url = request.getfixturevalue("etcd").url if backend == "etcd" else None
    with running(
        tmp_path / "data", store_url=store_url, heartbeat_interval=INTERVAL, forget_after=FORGET_AFTER
    ) as dash:
        dash.seed()
        silent = GatewayRecord(str(uuid.uuid4()), "shop", {"advertise": "127.0.0.1:15006"}, time.time() - 3600)
        dash.call(lambda: dash.store.put_gateway(silent))
        live = str(uuid.uuid4())
        with dash.client(dash.token("gateway", group="shop")) as shop, dash.client(dash.token("viewer")) as viewer:
            assert heartbeat(shop, "shop", live).status_code == 200
            listed = [item["instance"] for item in viewer.get("/api/v1/gateways").json()]
            assert sorted(listed) == sorted([silent.instance, live]), "the dashboard has just started"

            def forgotten() -> bool:
                heartbeat(shop, "shop", live)
                return [item["instance"] for item in viewer.get("/api/v1/gateways").json()] == [live]

            wait_for(forgotten, 10 * FORGET_AFTER, what="the silent gateway to be forgotten")
        assert [record.instance for record in dash.call(lambda: dash.store.gateways(stats=True))] == [live]


def test_etcd_replicas_wake_each_others_long_polls(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two dashboards on one etcd: a change made through one wakes a /sync waiting on the other."""
    etcd = request.getfixturevalue("etcd")
    with (
        running(tmp_path / "a", store_url=etcd.url) as first,
        running(tmp_path / "b", store_url=etcd.url) as second,
    ):
        first.seed()
        with (
            second.client(second.token("gateway", group="shop"), timeout=70) as shop,
            first.client(first.token("operator")) as operator,
        ):
            etag = shop.get("/api/v1/sync").json()["etag"]
            poll = Poll(shop, after=etag, wait="30")
            wait_for_watchers(second, 1)
            changed = time.monotonic()
            assert operator.put("/api/v1/services/catalog/weights", json={"weights": {"v2": 100}}).status_code == 200
            answer = poll.result()
            assert answer.status_code == 200 and poll.finished - changed < 1.0
            assert answer.json()["services"]["catalog"]["routes"][-1]["split"] == {"v1": 0, "v2": 100}


class CountingStore:
    """The store, counting how often the gateway records are read (each /sync wakeup reads them once)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def gateways(self, stats: bool = False) -> list[GatewayRecord]:
        self.reads += 1
        return await self.store.gateways(stats=stats)


def test_a_fleet_heartbeating_again_after_a_restart_does_not_wake_every_long_poll(tmp_path: Path) -> None:
    """After a restart the dashboard knew nobody, so each gateway's first heartbeat woke every /sync watcher:
    with N gateways, N wakeups of N watchers in one heartbeat interval. Known gateways are no news."""
    fleet = [(str(uuid.uuid4()), f"127.0.0.1:{16000 + n}") for n in range(20)]
    with running(tmp_path / "data", heartbeat_interval=30.0) as before:
        before.seed()
        with before.client(before.token("gateway", group="web")) as web:
            for instance, address in fleet:
                assert heartbeat(web, "web", instance, advertise=address).status_code == 200
        shop_token = before.token("gateway", group="shop")
    counted: list[CountingStore] = []

    def counting(store: Store) -> Store:
        counted.append(CountingStore(store))
        return counted[-1]  # a Store by delegation

    after = Dashboard(tmp_path / "data", heartbeat_interval=30.0, wrap=counting)
    shop = after.client(shop_token, timeout=40)
    web = after.client(after.token("gateway", group="web"))
    try:
        etag = shop.get("/api/v1/sync").json()["etag"]
        poll = Poll(shop, after=etag, wait="30")  # long enough for the 21 heartbeats on a busy machine
        wait_for_watchers(after, 1)
        reads = counted[0].reads
        for instance, address in fleet:
            assert heartbeat(web, "web", instance, advertise=address).status_code == 200
        assert heartbeat(web, "web", str(uuid.uuid4()), advertise="127.0.0.1:17000").status_code == 200
        answer = poll.result(35)  # the one new gateway is news: shop's view of web changed
        assert answer.status_code == 200
        assert "127.0.0.1:17000" in str(answer.json())
        woken = counted[0].reads - reads
    finally:
        shop.close()
        web.close()
        after.stop()
    assert woken <= 3, f"{woken} reads of the gateway records for 21 heartbeats of which 1 was news"


def test_a_remote_service_carries_its_stream_timeouts_and_nothing_else_of_its_policy() -> None:
    """The caller's gateway applies an HTTP/2 stream's idle and total time of the owner's service, not its own
    defaults; the rest of the owner's policy (retries, splits, request timeout) stays the owner's business."""
    document = {
        "groups": {"shop": ["storefront"], "rpc": ["payments", "ledger"]},
        "services": {
            "storefront": {"subsets": {"v1": {"endpoints": ["127.0.0.1:9101"]}}},
            "payments": {
                "subsets": {"v1": {"endpoints": ["127.0.0.1:9102"]}},
                "timeouts": {"stream_idle": "15m", "max_stream_duration": "1h", "request": "2s"},
                "retries": {"attempts": 1},
            },
            "ledger": {"subsets": {"v1": {"endpoints": ["127.0.0.1:9103"]}}},
        },
    }
    view = group_view(document, "shop", {"rpc": ["127.0.0.1:16006"]})
    assert view["remote"]["payments"] == {
        "group": "rpc",
        "gateways": ["127.0.0.1:16006"],
        "timeouts": {"stream_idle": "15m", "max_stream_duration": "1h"},
    }
    assert view["remote"]["ledger"] == {"group": "rpc", "gateways": ["127.0.0.1:16006"]}  # none given: the defaults
