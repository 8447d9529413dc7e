"""The gateway's side of joining a mesh: a sync answer becomes a config and peers, pools to peer gateways follow
what each peer must prove, the retry schedule while the dashboard is away (on a fake clock), the stats a heartbeat
carries, and the watch loop against a real dashboard on loopback."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, cast

import pytest

from dashboard.api.bodies import convert_body
from dashboard.api.heartbeats import Heartbeat
from dashboard.identity import MeshCA
from dashboard.store.model import Revision, Store
from gateway import tls
from gateway.config import Config, ConfigError
from gateway.control import (
    BACKOFF_MAX,
    PROBE_INTERVAL,
    YOUNG_OUTAGE,
    ControlClient,
    Identity,
    JoinSettings,
    heartbeat_interval,
    mesh_config,
    outage_backoff,
    stats_json,
)
from gateway.runtime import Peers, Runtime
from gateway.telemetry import merge
from gateway.units import Address, Backoff
from tests.conftest import FakeClock, wait_until
from tests.dashboard.dashboards import Dashboard, mesh, running

SETTINGS = JoinSettings(url="http://127.0.0.1:9000", group="shop", token="t", data_dir="unused")
PAYLOAD = {
    "version": 7,
    "services": {"storefront": {"subsets": {"v1": {"endpoints": ["127.0.0.1:9101"]}}}},
    "remote": {
        "catalog": {"group": "catalog", "gateways": ["127.0.0.1:16006", "127.0.0.1:17006"]},
        "payments": {"group": "payments", "gateways": [], "timeouts": {"stream_idle": "15m"}},
        "storefront": {"group": "elsewhere", "gateways": ["127.0.0.1:1"]},
    },
}


def test_other_groups_services_become_services_on_their_gateways() -> None:
    config, peers = mesh_config(SETTINGS, PAYLOAD, "example.org")
    assert config.gateway.group == "shop"
    catalog = config.service("catalog")
    assert catalog is not None
    assert [(s.name, [str(a) for a in s.endpoints]) for s in catalog.subsets] == [
        ("catalog", ["127.0.0.1:16006", "127.0.0.1:17006"])
    ]
    # The caller's hop only picks a replica and retries connect failures; the owner does the rest.
    assert catalog.retries.on == frozenset({"connect-failure"})
    assert str(catalog.lb) == "least_request"
    assert peers.services == frozenset({"catalog", "payments"})  # storefront is owned here: the local spec wins
    assert peers.addresses == {
        Address("127.0.0.1", 16006): "spiffe://example.org/group/catalog",
        Address("127.0.0.1", 17006): "spiffe://example.org/group/catalog",
    }
    assert peers.trust_domain == "example.org"
    payments = config.service("payments")
    assert payments is not None and payments.subsets[0].endpoints == ()  # no live gateway: 503, not "unknown"
    # An HTTP/2 stream's timeouts are the owner's at this hop too; the rest of the peer policy stays.
    assert (payments.timeouts.stream_idle, payments.timeouts.per_try, catalog.timeouts.stream_idle) == (900, 60, 300)


def test_a_bad_sync_answer_names_the_dashboard_version_and_field() -> None:
    bad = {"version": 9, "services": {"storefront": {"subsets": {"v1": {"endpoints": ["nowhere"]}}}}}
    with pytest.raises(ConfigError, match=r"config version 9: services\.storefront\.subsets\.v1\.endpoints\[0\]"):
        mesh_config(SETTINGS, bad, "example.org")


def test_pools_to_peers_are_replaced_when_what_they_must_prove_changes() -> None:
    async def run() -> None:
        config, early = mesh_config(SETTINGS, PAYLOAD, "")  # the config came before our first certificate
        runtime = Runtime(config)
        runtime.apply(config, 1, early)
        address = Address("127.0.0.1", 16006)
        assert runtime.pools[address].peer_id == "spiffe:///group/catalog"
        config, later = mesh_config(SETTINGS, PAYLOAD, "example.org")
        runtime.apply(config, 2, later)
        assert runtime.pools[address].peer_id == "spiffe://example.org/group/catalog"
        table = runtime.table
        assert table is not None
        (endpoint, _) = table.services["catalog"].subsets["catalog"].balancer.endpoints
        assert endpoint.pool is runtime.pools[address]  # the live snapshot dials with the new expectation
        runtime.apply(Config.parse({"services": {}}), 3, Peers())
        assert address not in runtime.pools
        runtime.deadlines.close()

    asyncio.run(run())


def test_stats_travel_as_json() -> None:
    snapshot = merge([])
    snapshot["series"][("destination", "shop", "catalog", "v1", "default")] = ({200: 3, 503: 1}, [1, 2, 1], 0.25)
    snapshot["counters"][("meshgate_retries_total", "catalog")] = 2.0
    as_json = stats_json(snapshot)
    assert as_json["series"] == [
        {
            "labels": ["destination", "shop", "catalog", "v1", "default"],
            "codes": {"200": 3, "503": 1},
            "buckets": [1, 2, 1],
            "sum": 0.25,
        }
    ]
    assert as_json["counters"] == [["meshgate_retries_total", "catalog", 2.0]]


def test_a_certificate_is_timed_from_when_it_came_not_from_its_backdated_not_before(tmp_path: Path) -> None:
    ca = MeshCA.load_or_create(str(tmp_path / "ca"), "meshgate.local")
    key_pem, csr_pem = tls.new_key_and_csr()
    issued = ca.sign_csr(csr_pem, "shop", lifetime=20)
    identity = Identity(str(tmp_path / "gateway"))
    before = time.time()
    identity.save(key_pem, issued.chain_pem, ca.root_pem)
    assert before <= identity.received <= time.time()
    renew = tls.renew_at(identity.received, identity.not_after, 0.5)
    assert identity.received + 9 <= renew <= identity.received + 11  # not long past, as from notBefore
    # Loaded at a restart: it came when its file was written (this gateway, or its supervisor, wrote it).
    hour_ago = time.time() - 3600
    issued = ca.sign_csr(csr_pem, "shop", lifetime=86400, now=hour_ago)
    identity.save(key_pem, issued.chain_pem, ca.root_pem)
    os.utime(identity.cert_path, (hour_ago, hour_ago))
    restarted = Identity(str(tmp_path / "gateway"))
    assert restarted.load() and restarted.received == pytest.approx(hour_ago)
    later = time.time() + 3600  # a file from the future (the clock was set back) counts as received now
    os.utime(identity.cert_path, (later, later))
    assert restarted.load() and restarted.received <= time.time()


# Retrying while the dashboard is away


def test_an_outage_is_probed_every_half_second_for_two_minutes_then_backs_off_to_the_cap() -> None:
    clock = FakeClock()
    retry = outage_backoff(clock)
    young: list[float] = []
    while clock.now < 1000.0 + YOUNG_OUTAGE:  # the first two minutes of an outage
        young.append(retry.failed())
        clock.now += young[-1]
    assert (PROBE_INTERVAL, YOUNG_OUTAGE, BACKOFF_MAX) == (0.5, 120.0, 30.0)
    assert all(0.25 <= delay <= 0.75 for delay in young) and len(set(young)) > 100  # jittered, never growing
    assert 150 < len(young) < 500
    assert not retry.backing_off
    old = [retry.failed() for _ in range(30)]
    assert retry.backing_off and retry.elapsed() >= YOUNG_OUTAGE
    assert old[0] == PROBE_INTERVAL  # backing off starts where probing was, then doubles up to the cap
    assert all(PROBE_INTERVAL <= delay <= PROBE_INTERVAL * 2**n for n, delay in enumerate(old))
    assert all(delay <= BACKOFF_MAX for delay in old) and max(old[7:]) > 0.5 * BACKOFF_MAX
    retry.succeeded()  # reachable again: the next failure starts a new, young outage
    assert retry.elapsed() == 0.0 and 0.25 <= retry.failed() <= 0.75 and not retry.backing_off


def test_a_fleet_that_lost_the_dashboard_together_does_not_probe_in_step() -> None:
    clock = FakeClock()
    fleet = [outage_backoff(clock) for _ in range(1000)]
    firsts = sorted(retry.failed() for retry in fleet)
    # Spread over 0.25..0.75 s: no 50 ms slot holds more than a fifth of the fleet.
    slots = [sum(1 for delay in firsts if low <= delay < low + 0.05) for low in (0.25 + 0.05 * n for n in range(10))]
    assert firsts[0] >= 0.25 and firsts[-1] <= 0.75 and max(slots) < 200, slots


def test_without_a_young_phase_backoff_grows_from_the_first_failure() -> None:
    """Discovery's schedule: exponential from the first failure, reset by a success."""
    retry = Backoff(1.0, 30.0, clock=FakeClock())
    delays = [retry.failed() for _ in range(8)]
    assert delays[0] == 1.0 and all(1.0 <= delay <= min(30.0, 2.0**n) for n, delay in enumerate(delays))
    assert retry.failures == 8 and retry.backing_off
    retry.succeeded()
    assert retry.failed() == 1.0


# Against a real dashboard (in this process, over HTTP on loopback)


class NewerKeys:
    """The real store, except that version 2's catalog carries a key this gateway does not know: what a newer
    dashboard (which cannot run here) would serve. The dashboard itself refuses such a commit."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def current(self) -> Revision:
        revision = await self.store.current()
        if revision.version != 2:
            return revision
        mesh = copy.deepcopy(revision.mesh)
        mesh["services"]["catalog"]["newer_key"] = True
        return dataclasses.replace(revision, mesh=mesh)


def commit(dash: Dashboard, data: dict[str, Any]) -> None:
    dash.call(lambda: dash.store.commit(data, author="test", reason="test", action="config.apply", target="mesh"))


def sync_answers(dash: Dashboard, code: str) -> float:
    labels = {"route": "/api/v1/sync", "method": "GET", "code": code}
    return dash.settings.registry.get_sample_value("meshgate_dashboard_request_duration_seconds_count", labels) or 0.0


def test_quiet_long_polls_are_not_an_outage_and_a_refused_view_is_not_fetched_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The dashboard holds each long-poll 0.1 s (`--sync-hold`), so a second holds ten quiet spells: each 304 is
    asked again at once, with nothing logged and nothing backed off. A view this gateway refuses is fetched once:
    it long-polls on that view's etag, so the next change lands at once."""
    with (
        caplog.at_level(logging.DEBUG, "meshgate.control"),
        running(tmp_path / "dashboard", wrap=lambda store: cast(Store, NewerKeys(store)), sync_hold=0.1) as dash,
    ):
        dash.seed()
        settings = JoinSettings(dash.url, "shop", dash.token("gateway", group="shop"), str(tmp_path / "gateway"))
        applied: list[int] = []

        async def run() -> float:
            client = ControlClient(
                settings,
                Identity(settings.data_dir),
                lambda c, version, p: applied.append(version),
                dict,
                lambda: merge([]),
            )
            watch = asyncio.ensure_future(client.watch())
            try:
                await wait_until(lambda: applied == [1], what="version 1 applied")
                quiet = sync_answers(dash, "304")
                await wait_until(lambda: sync_answers(dash, "304") >= quiet + 30, 10, what="30 quiet long-polls")
                commit(dash, mesh())  # version 2, which this gateway refuses
                await wait_until(lambda: "rejected, keeping version 1" in caplog.text, what="version 2 refused")
                fetched = sync_answers(dash, "200")
                await asyncio.sleep(1.0)  # a quiet second (the scenario, not a synchronisation)
                assert sync_answers(dash, "200") == fetched, "the refused view was fetched again"
                changed = mesh()
                changed["services"]["catalog"]["routes"][-1]["split"] = {"v1": 50, "v2": 50}
                commit(dash, changed)
                started = time.monotonic()
                await wait_until(lambda: applied[-1] == 3, what="version 3 applied")
                return time.monotonic() - started
            finally:
                watch.cancel()
                await client.close()

        took = asyncio.run(run())
    assert applied == [1, 3] and took < 1.0, (applied, took)
    assert caplog.text.count("rejected, keeping version 1") == 1
    assert [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()] == [], (
        "a 304 taken for an outage"
    )


def test_a_refused_heartbeat_is_said_once_with_the_dashboards_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A heartbeat the dashboard refuses (here: a token for another group) used to be dropped without a word, and
    the gateway just stayed stale in the dashboard's list."""
    with caplog.at_level(logging.INFO, "meshgate.control"), running(tmp_path / "dashboard") as dash:
        dash.seed()
        settings = JoinSettings(dash.url, "web", dash.token("gateway", group="shop"), str(tmp_path / "gateway"))
        labels = {"route": "/api/v1/heartbeat", "method": "POST", "code": "403"}

        def refused() -> float:
            value = dash.settings.registry.get_sample_value("meshgate_dashboard_request_duration_seconds_count", labels)
            return value or 0.0

        async def run() -> None:
            client = ControlClient(settings, Identity(settings.data_dir), lambda *_: None, dict, lambda: merge([]))
            client.interval = 0.05
            beating = asyncio.ensure_future(client.heartbeat())
            try:
                await wait_until(lambda: refused() >= 5, what="five refused heartbeats")
            finally:
                beating.cancel()
                await client.close()

        asyncio.run(run())
    said = [r.getMessage() for r in caplog.records if "refused this gateway's heartbeat" in r.getMessage()]
    assert len(said) == 1 and "HTTP 403" in said[0] and "shop" in said[0], said


@pytest.mark.parametrize(
    ("asked", "used"),
    [(2, 2.0), (0, 0.5), (-5, 0.5), (1e9, 60.0), (float("nan"), 2.0), ("soon", 2.0), (True, 2.0), (None, 2.0)],
)
def test_the_heartbeat_interval_a_dashboard_asks_for_is_bounded(asked: object, used: float) -> None:
    """A dashboard (or anything answering in its place) must not be able to put a gateway in a busy loop."""
    assert heartbeat_interval(asked) == used


def test_stats_carry_first_attempts_only_for_series_a_retry_changed(tmp_path: Path) -> None:
    """`first`/`first_grpc`: a series' requests by the HTTP status/gRPC code of their first attempt, sent only
    where that differs from `codes`/`grpc` (absent means the same: heartbeats stay small)."""
    retried, calm = ("destination", "shop", "catalog", "v2", "default"), ("destination", "shop", "catalog", "v1", "r")
    rpc, undone = ("source", "shop", "orders", "v1", "default"), ("source", "shop", "carts", "v1", "default")
    snapshot = merge([])
    snapshot["series"][retried] = ({200: 3, 503: 1}, [4], 0.1)
    snapshot["series"][calm] = ({200: 5}, [5], 0.1)
    snapshot["series"][rpc] = ({(200, 0): 2}, [2], 0.1)
    snapshot["series"][undone] = ({200: 1, 503: 1}, [2], 0.1)
    snapshot["moved"][retried] = {(503, 200): 1, (504, 200): 1}
    snapshot["moved"][rpc] = {((200, 14), (200, 0)): 1}  # UNAVAILABLE Trailers-Only, retried, OK: HTTP 200 both
    snapshot["moved"][undone] = {(503, 200): 1, (200, 503): 1}  # moves that cancel out
    items = {tuple(item["labels"]): item for item in stats_json(snapshot)["series"]}
    assert items[retried]["first"] == {"200": 1, "503": 2, "504": 1}
    assert items[rpc]["first_grpc"] == {"0": 1, "14": 1} and items[rpc]["grpc"] == {"0": 2}
    assert "first" not in items[rpc], "the HTTP statuses of the first attempts are the final ones"
    for key in (calm, undone):
        assert "first" not in items[key] and "first_grpc" not in items[key], key
    assert "first_grpc" not in items[retried]

    # What the dashboard keeps of the heartbeat carries them as sent.
    client = ControlClient(
        JoinSettings(SETTINGS.url, "shop", "t", str(tmp_path)),
        Identity(str(tmp_path)),
        lambda *_: None,
        dict,
        lambda: snapshot,
    )
    kept = convert_body(client.heartbeat_body(), Heartbeat).record(time.time()).data["stats"]["series"]
    assert {tuple(item["labels"]): item for item in kept} == items
