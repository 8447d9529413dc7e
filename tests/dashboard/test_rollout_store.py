"""The rollout part of the `Store` contract, on SQLite and a real etcd (the `store` fixture is parametrized): rollout
documents by compare-and-set, rollout logs by sequence number, and the leader lease; plus the SQLite migration from
schema 2 and the etcd key layout."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from dashboard.api.selfmetrics import DashboardMetrics, TimedStore
from dashboard.store import open_store
from dashboard.store.etcd import EtcdStore
from dashboard.store.model import (
    DB_FILE,
    MAX_LOG_BATCH,
    MAX_LOG_SEQ,
    GatewayRecord,
    RolloutConflict,
    RolloutRecord,
    Store,
    TokenRecord,
)
from dashboard.store.sqlite import _SCHEMA, SQLiteStore
from tests.dashboard.test_etcd_store import etcd_keys
from tests.etcd import EtcdServer

pytestmark = pytest.mark.anyio


def rollout(step: int, state: str = "running") -> dict[str, Any]:
    return {"id": "catalog-1", "state": state, "step": step, "weights": {"v1": 100 - 10 * step, "v2": 10 * step}}


@pytest.fixture
async def other(store_url: str) -> AsyncIterator[Store]:
    """A second store on the same SQLite file or etcd, as another dashboard (or `meshgate` command) opens it."""
    opened = open_store(store_url)
    yield opened
    await opened.close()


# Rollout documents


async def test_a_rollout_is_created_once_then_updated_by_compare_and_set(store: Store, other: Store) -> None:
    first = await store.put_rollout("catalog", rollout(0), expect=0)
    assert first.service == "catalog" and first.data == rollout(0) and first.revision > 0
    assert await other.get_rollout("catalog") == first
    with pytest.raises(
        RolloutConflict,
        match=rf"^the rollout of 'catalog' is not at revision 0 \(revision "
        rf"{first.revision} is stored\)$",
    ) as raised:
        await other.put_rollout("catalog", rollout(5), expect=0)
    assert (raised.value.status, raised.value.expected, raised.value.current) == (409, 0, first.revision)
    second = await other.put_rollout("catalog", rollout(1), expect=first.revision)
    assert second.revision > first.revision and second.data == rollout(1)
    with pytest.raises(RolloutConflict, match=r"^the rollout of 'catalog' is not at revision \d+") as raised:
        await store.put_rollout("catalog", rollout(9), expect=first.revision)  # a stale writer
    assert raised.value.current == second.revision
    assert await store.get_rollout("catalog") == second
    with pytest.raises(RolloutConflict, match=r"\(none is stored\)$"):
        await store.put_rollout("reviews", rollout(0), expect=second.revision)
    assert await store.get_rollout("reviews") is None


async def test_rollouts_are_listed_by_service(store: Store) -> None:
    for service in ("reviews", "catalog", "cart", "catalog-v2"):
        await store.put_rollout(service, {"service": service}, expect=0)
    records = await store.rollouts()
    assert [record.service for record in records] == ["cart", "catalog", "catalog-v2", "reviews"]
    assert all(record.data == {"service": record.service} for record in records)
    assert len({record.revision for record in records}) == 4


async def test_racing_writers_on_one_revision_let_exactly_one_win(store: Store, other: Store) -> None:
    base = await store.put_rollout("catalog", rollout(0), expect=0)

    async def attempt(target: Store, step: int) -> RolloutRecord | None:
        try:
            return await target.put_rollout("catalog", rollout(step), expect=base.revision)
        except RolloutConflict:
            return None

    results = await asyncio.gather(*(attempt((store, other)[step % 2], step) for step in range(1, 7)))
    winners = [result for result in results if result is not None]
    assert len(winners) == 1, results
    assert await store.get_rollout("catalog") == winners[0]


async def test_a_deleted_rollout_is_gone_and_its_revisions_never_come_back(store: Store) -> None:
    """Else a writer still holding a revision of the deleted rollout could overwrite the new one."""
    old = [await store.put_rollout("catalog", rollout(0), expect=0)]
    for step in range(1, 4):
        old.append(await store.put_rollout("catalog", rollout(step), expect=old[-1].revision))
    kept = await store.put_rollout("reviews", rollout(1), expect=0)
    await store.delete_rollout("catalog")
    await store.delete_rollout("catalog")  # absent: no error
    assert await store.get_rollout("catalog") is None
    assert await store.rollouts() == [kept]
    new = [await store.put_rollout("catalog", rollout(0), expect=0)]
    for step in range(1, 6):
        new.append(await store.put_rollout("catalog", rollout(step), expect=new[-1].revision))
    revisions = [record.revision for record in old + new]
    assert len(set(revisions)) == len(revisions) and min(revisions) > 0
    assert revisions == sorted(revisions)
    for stale in old + new[:-1]:
        with pytest.raises(RolloutConflict):
            await store.put_rollout("catalog", rollout(9), expect=stale.revision)
    assert await store.get_rollout("catalog") == new[-1]


@pytest.mark.parametrize("service", ["", "a/b", "Catalog", "-catalog", "x" * 64, "catalog\n"])
async def test_a_bad_service_name_is_refused(store: Store, service: str) -> None:
    with pytest.raises(ValueError, match="not a service name"):
        await store.put_rollout(service, rollout(0), expect=0)
    with pytest.raises(ValueError, match="not a service name"):
        await store.get_rollout(service)
    with pytest.raises(ValueError, match="not a service name"):
        await store.delete_rollout(service)
    assert await store.rollouts() == []


@pytest.mark.parametrize("data", [[1, 2], {"x": float("nan")}, {"x": object()}, {1j: 2}])
async def test_a_document_that_is_not_a_json_object_is_refused(store: Store, data: Any) -> None:
    with pytest.raises(ValueError, match="JSON"):
        await store.put_rollout("catalog", data, expect=0)
    assert await store.rollouts() == []


# Rollout logs


def entry(seq: int, text: str = "") -> tuple[int, dict[str, Any]]:
    return seq, {"at": seq, "event": text or f"step {seq}"}


async def test_a_log_is_read_in_order_after_a_number_and_up_to_a_limit(store: Store) -> None:
    await store.append_rollout_log("catalog-1", [entry(2), entry(0), entry(10)])
    await store.append_rollout_log("catalog-1", [entry(1), entry(MAX_LOG_SEQ)])
    log = await store.rollout_log("catalog-1")
    assert [seq for seq, _ in log] == [0, 1, 2, 10, MAX_LOG_SEQ]  # numeric order, not text order
    assert log[3] == entry(10)
    assert await store.rollout_log("catalog-1", after=1) == [entry(2), entry(10), entry(MAX_LOG_SEQ)]
    assert await store.rollout_log("catalog-1", after=1, limit=2) == [entry(2), entry(10)]
    assert await store.rollout_log("catalog-1", limit=1) == [entry(0)]
    assert await store.rollout_log("catalog-1", after=MAX_LOG_SEQ) == []
    assert await store.rollout_log("catalog-1", after=10**15) == []
    assert await store.rollout_log("catalog-1", after=-50, limit=10**20) == log
    assert await store.rollout_log("catalog-1", limit=0) == []
    assert await store.rollout_log("catalog-1", limit=-1) == []
    assert await store.rollout_log("catalog-2") == []


async def test_an_appended_number_replaces_its_entry_so_a_retry_is_idempotent(store: Store) -> None:
    batch = [entry(0), entry(1), entry(2)]
    await store.append_rollout_log("r1", batch)
    await store.append_rollout_log("r1", batch)  # the retry of a write whose answer was lost
    assert await store.rollout_log("r1") == batch
    await store.append_rollout_log("r1", [entry(1, "first"), entry(3), entry(1, "second")])
    assert await store.rollout_log("r1") == [entry(0), entry(1, "second"), entry(2), entry(3)]
    await store.append_rollout_log("r1", [])
    assert len(await store.rollout_log("r1")) == 4


async def test_logs_of_ids_sharing_a_prefix_stay_apart(store: Store) -> None:
    for rollout_id in ("r", "r-1", "r0", "r1", "r10"):
        await store.append_rollout_log(rollout_id, [entry(0, rollout_id), entry(1, rollout_id)])
    for rollout_id in ("r", "r-1", "r0", "r1", "r10"):
        assert await store.rollout_log(rollout_id) == [entry(0, rollout_id), entry(1, rollout_id)]


@pytest.mark.parametrize(
    ("entries", "error"),
    [
        ([(-1, {})], "sequence number"),
        ([(MAX_LOG_SEQ + 1, {})], "sequence number"),
        ([("1", {})], "sequence number"),
        ([(True, {})], "sequence number"),
        ([(0, {}), (1, ["not", "an", "object"])], "JSON object"),
        ([(0, {"x": float("inf")})], "not JSON"),
        ([entry(seq) for seq in range(MAX_LOG_BATCH + 1)], "in one append"),
    ],
)
async def test_a_bad_log_append_stores_nothing(store: Store, entries: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        await store.append_rollout_log("r1", entries)
    assert await store.rollout_log("r1") == []


@pytest.mark.parametrize("rollout_id", ["", "R1", "r/1", "r_1", "r" * 65, "../r"])
async def test_a_bad_rollout_id_is_refused(store: Store, rollout_id: str) -> None:
    with pytest.raises(ValueError, match="not a rollout ID"):
        await store.append_rollout_log(rollout_id, [entry(0)])
    with pytest.raises(ValueError, match="not a rollout ID"):
        await store.rollout_log(rollout_id)


async def test_forget_rollout_logs_keeps_only_the_ids_named(store: Store) -> None:
    for rollout_id in ("a", "a-1", "a0", "b", "c"):
        await store.append_rollout_log(rollout_id, [entry(seq) for seq in range(3)])
    assert await store.forget_rollout_logs(keep={"a0", "c", "never-stored"}) == 3
    assert [len(await store.rollout_log(rollout_id)) for rollout_id in ("a", "a-1", "a0", "b", "c")] == [0, 0, 3, 0, 3]
    assert await store.forget_rollout_logs(keep=["a0", "c"]) == 0
    assert await store.forget_rollout_logs(keep=()) == 2
    assert await store.rollout_log("c") == []


async def test_replicas_forgetting_at_once_count_each_log_once(store: Store, other: Store) -> None:
    ids = [f"r{n}" for n in range(12)]
    for rollout_id in ids:
        await store.append_rollout_log(rollout_id, [entry(0)])
    counts = await asyncio.gather(store.forget_rollout_logs(keep=()), other.forget_rollout_logs(keep=()))
    assert sum(counts) == len(ids), counts
    assert [await other.rollout_log(rollout_id) for rollout_id in ids] == [[]] * len(ids)


# The leader lease


async def test_one_holder_leads_until_it_resigns(store: Store, other: Store) -> None:
    assert await store.lead("rollouts", "replica-a", ttl=30)
    assert not await other.lead("rollouts", "replica-b", ttl=30)
    assert await store.lead("rollouts", "replica-a", ttl=30)  # renewed
    assert await other.lead("canary-jobs", "replica-b", ttl=30)  # another name is another lease
    await other.resign("rollouts", "replica-b")  # not the holder: nothing happens
    assert not await other.lead("rollouts", "replica-b", ttl=30)
    await store.resign("rollouts", "replica-a")
    assert await other.lead("rollouts", "replica-b", ttl=30)
    assert not await store.lead("rollouts", "replica-a", ttl=30)
    await store.resign("rollouts", "replica-a")  # no longer held by it: nothing happens
    assert await other.lead("rollouts", "replica-b", ttl=30)


async def test_renewing_keeps_the_lease_past_its_ttl_and_expiry_hands_it_over(store: Store, other: Store) -> None:
    """TTL 1 s (etcd's shortest lease is about 2 s): renewed every 0.3 s for 4 s it never lapses; left alone, the
    other holder gets it within a few seconds."""
    assert await store.lead("rollouts", "replica-a", ttl=1)
    started = time.monotonic()
    renewed = started
    while time.monotonic() - started < 4.0:
        await asyncio.sleep(0.3)  # the renewal interval: time passing is what is under test
        assert not await other.lead("rollouts", "replica-b", ttl=1)  # first, so a lapse would go to the other
        renewed = time.monotonic()
        assert await store.lead("rollouts", "replica-a", ttl=1), "the holder lost a lease it kept renewing"
    deadline = renewed + 15.0
    while not await other.lead("rollouts", "replica-b", ttl=30):
        assert time.monotonic() < deadline, "the expired lease was never handed over"
        await asyncio.sleep(0.05)
    assert time.monotonic() - renewed >= 0.9, "taken before the holder's ttl was up"
    assert not await store.lead("rollouts", "replica-a", ttl=1)


@pytest.mark.parametrize(
    ("name", "holder", "ttl", "error"),
    [
        ("Rollouts", "a", 1.0, "lease name"),
        ("a/b", "a", 1.0, "lease name"),
        ("rollouts", "", 1.0, "holder"),
        ("rollouts", "a", 0.0, "ttl"),
        ("rollouts", "a", -1.0, "ttl"),
        ("rollouts", "a", float("inf"), "ttl"),
        ("rollouts", "a", float("nan"), "ttl"),
    ],
)
async def test_a_bad_lease_call_is_refused(store: Store, name: str, holder: str, ttl: float, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        await store.lead(name, holder, ttl)
    assert await store.lead("rollouts", "b", 30)  # nothing was taken


# TimedStore


async def test_timed_store_passes_every_rollout_call_through_and_times_it(store: Store) -> None:
    registry = CollectorRegistry()
    timed = TimedStore(store, DashboardMetrics(registry))
    record = await timed.put_rollout("catalog", rollout(0), expect=0)
    assert await timed.get_rollout("catalog") == record == await store.get_rollout("catalog")
    assert await timed.rollouts() == [record]
    await timed.delete_rollout("catalog")
    assert await store.get_rollout("catalog") is None
    await timed.append_rollout_log("r1", [entry(0), entry(1)])
    assert await timed.rollout_log("r1", after=0, limit=5) == [entry(1)]
    assert await timed.forget_rollout_logs(keep=set()) == 1
    assert await store.rollout_log("r1") == []
    assert await timed.lead("rollouts", "a", 30)
    await timed.resign("rollouts", "a")
    assert await store.lead("rollouts", "b", 30)
    operations = ["put_rollout", "get_rollout", "rollouts", "delete_rollout", "append_rollout_log", "rollout_log"]
    operations += ["forget_rollout_logs", "lead", "resign"]
    for operation in operations:
        count = registry.get_sample_value("meshgate_dashboard_store_duration_seconds_count", {"operation": operation})
        assert count == 1, operation


# SQLite only


async def test_sqlite_migrates_a_schema_2_database_and_keeps_its_data(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        conn.executescript(_SCHEMA[0] + _SCHEMA[1] + "PRAGMA user_version = 2;")
        conn.execute("INSERT INTO gateways VALUES ('shop', 'gw', '{\"config_version\": 1}', NULL, 100.0)")
        conn.execute("INSERT INTO tokens VALUES ('d1', 't1', 'viewer', NULL, 'ci', 5.0)")
    conn.close()
    store = SQLiteStore.open(str(tmp_path))
    try:
        assert await store.gateways() == [GatewayRecord("gw", "shop", {"config_version": 1}, 100.0)]
        assert await store.tokens() == [TokenRecord("t1", "d1", "viewer", None, "ci", 5.0)]
        assert await store.rollouts() == []
        record = await store.put_rollout("catalog", rollout(0), expect=0)
        assert record.revision == 1
        await store.append_rollout_log("r1", [entry(0)])
        assert await store.lead("rollouts", "a", 30)
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(_SCHEMA),) == (3,)
    conn.close()
    store = SQLiteStore.open(str(tmp_path))  # and reopening a schema 3 database changes nothing
    try:
        assert await store.get_rollout("catalog") == record
        assert await store.rollout_log("r1") == [entry(0)]
        assert not await store.lead("rollouts", "b", 30)
    finally:
        await store.close()


# etcd only


async def test_etcd_keeps_rollouts_logs_and_leases_under_their_keys(etcd: EtcdServer) -> None:
    store = EtcdStore.from_url(etcd.url)
    try:
        await store.put_rollout("catalog", rollout(0), expect=0)
        await store.append_rollout_log("catalog-1", [entry(7)])
        assert await store.lead("rollouts", "replica-a", ttl=30)
        assert etcd_keys(etcd, "/meshgate/rollouts/") == ["/meshgate/rollouts/catalog"]
        assert etcd_keys(etcd, "/meshgate/rollout-log/") == ["/meshgate/rollout-log/catalog-1/000000000007"]
        assert etcd_keys(etcd, "/meshgate/leases/") == ["/meshgate/leases/rollouts"]
        await store.resign("rollouts", "replica-a")
        assert etcd_keys(etcd, "/meshgate/leases/") == []
    finally:
        await store.close()
