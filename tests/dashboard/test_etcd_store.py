"""What etcd adds over SQLite: several dashboard replicas (here, several `EtcdStore`s) on one real etcd share one
version sequence, wake each other's waiters, and share gateway records, which any replica can forget."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from dashboard.store import open_store
from dashboard.store.etcd import EtcdStore
from dashboard.store.model import GatewayRecord, StoreError, VersionConflict
from gateway.etcd import b64, key_of, prefix_end
from tests.conftest import wait_until
from tests.dashboard.test_store import mesh
from tests.etcd import EtcdServer, free_ports

pytestmark = pytest.mark.anyio
Replicas = Callable[[int], list[EtcdStore]]


@pytest.fixture
async def replicas(etcd: EtcdServer) -> AsyncIterator[Replicas]:
    """`replicas(n)`: n stores on the test's etcd, as n dashboard replicas would open it."""
    opened: list[EtcdStore] = []

    def open_replicas(count: int) -> list[EtcdStore]:
        stores = [EtcdStore.from_url(etcd.url) for _ in range(count)]
        opened.extend(stores)
        return stores

    yield open_replicas
    for store in opened:
        await store.close()


async def test_a_commit_through_one_replica_wakes_a_waiter_on_another(replicas: Replicas) -> None:
    writer, reader = replicas(2)
    waiter = asyncio.ensure_future(reader.wait_for_change(0, timeout=30))
    done, _ = await asyncio.wait({waiter}, timeout=0.3)
    assert not done, "returned although nothing changed"
    started = time.monotonic()
    await writer.commit(mesh(10), author="ops", reason="canary", action="apply", target="mesh")
    revision = await asyncio.wait_for(waiter, 10)
    assert revision is not None and revision.version == 1 and revision.reason == "canary"
    assert time.monotonic() - started < 5
    # The reader's watch stays open: the next commit wakes it too.
    waiter = asyncio.ensure_future(reader.wait_for_change(1, timeout=30))
    await writer.commit(mesh(20), author="ops", reason="step", action="apply", target="mesh")
    revision = await asyncio.wait_for(waiter, 10)
    assert revision is not None and revision.version == 2


async def test_concurrent_commits_never_share_a_version(replicas: Replicas) -> None:
    stores = replicas(3)
    per_store = 8

    async def commit_all(index: int, store: EtcdStore) -> list[int]:
        versions = []
        for step in range(per_store):
            reason = f"{index}-{step}"
            revision = await store.commit(mesh(step), author=f"r{index}", reason=reason, action="apply", target="mesh")
            versions.append(revision.version)
        return versions

    results = await asyncio.gather(*(commit_all(index, store) for index, store in enumerate(stores)))
    versions = sorted(version for result in results for version in result)
    assert versions == list(range(1, len(stores) * per_store + 1))
    history = await stores[0].history(limit=100)
    assert sorted(revision.reason for revision in history) == sorted(f"{i}-{s}" for i in range(3) for s in range(8))
    for result, index in zip(results, range(len(stores)), strict=True):
        for step, version in enumerate(result):  # each commit's version holds that commit's reason
            assert history[len(history) - version].reason == f"{index}-{step}"
    assert [entry.id for entry in await stores[1].audit(limit=100)] == list(range(len(versions), 0, -1))


async def test_racing_commits_on_one_expected_version_let_exactly_one_win(replicas: Replicas) -> None:
    stores = replicas(4)
    await stores[0].commit(mesh(0), author="ops", reason="seed", action="apply", target="mesh")

    async def attempt(store: EtcdStore, v2: int) -> int | None:
        try:
            revision = await store.commit(
                mesh(v2), author="ops", reason=str(v2), action="apply", target="mesh", expect_version=1
            )
        except VersionConflict:
            return None
        return revision.version

    results = await asyncio.gather(*(attempt(store, 10 * (index + 1)) for index, store in enumerate(stores)))
    assert sorted(results, key=lambda version: version or 0) == [None, None, None, 2]
    current = await stores[3].current()
    assert current.version == 2
    winner = results.index(2)
    assert current.reason == str(10 * (winner + 1))


def etcd_keys(etcd: EtcdServer, prefix: str) -> list[str]:
    body = {"key": b64(prefix), "range_end": b64(prefix_end(prefix)), "keys_only": True}
    answer = httpx.post(f"{etcd.client_url}/v3/kv/range", json=body, timeout=5.0).json()
    return [key_of(kv) for kv in answer.get("kvs", [])]


async def test_a_gateway_forgotten_through_one_replica_is_gone_with_its_stats(
    replicas: Replicas, etcd: EtcdServer
) -> None:
    store, other = replicas(2)
    await store.put_gateway(GatewayRecord("old", "shop", {"stats": {"cpu": 1}}, 100.0))
    await store.put_gateway(GatewayRecord("new", "shop", {"stats": {"cpu": 2}}, 200.0))
    assert [record.instance for record in await other.gateways()] == ["new", "old"]
    assert await other.forget_gateways(150.0) == 1
    assert [record.key for record in await store.gateways(stats=True)] == ["shop/new"]
    assert etcd_keys(etcd, "/meshgate/gateway-stats/") == ["/meshgate/gateway-stats/shop/new"]


async def test_records_of_dashboards_before_0_2_are_listed_once(replicas: Replicas, etcd: EtcdServer) -> None:
    """They were keyed by instance alone, under a lease of a few seconds; until it ends, one gateway may have a
    record under each key: the newest is listed, and forgetting removes either."""
    (store,) = replicas(1)
    old = GatewayRecord("gw", "shop", {"advertise": "10.0.0.1:15006"}, 100.0)
    value = json.dumps({"instance": "gw", "group": "shop", "data": old.data, "seen": 100.0})
    httpx.post(f"{etcd.client_url}/v3/kv/put", json={"key": b64("/meshgate/gateways/gw"), "value": b64(value)})
    assert await store.gateways() == [old]
    new = GatewayRecord("gw", "shop", {"advertise": "10.0.0.1:15006"}, 101.0)
    await store.put_gateway(new)
    assert await store.gateways() == [new]
    assert await store.forget_gateways(100.5) == 1
    assert etcd_keys(etcd, "/meshgate/gateways/") == ["/meshgate/gateways/shop/gw"]


async def test_a_dead_endpoint_is_skipped(etcd: EtcdServer) -> None:
    (dead,) = free_ports(1)
    store = open_store(f"etcd://127.0.0.1:{dead},{etcd.url.removeprefix('etcd://')}")
    try:
        revision = await store.commit(mesh(0), author="ops", reason="", action="apply", target="mesh")
        assert revision.version == 1
    finally:
        await store.close()
    unreachable = open_store(f"etcd://127.0.0.1:{dead}")
    try:
        with pytest.raises(StoreError, match=r"^etcd is unreachable: http://127\.0\.0\.1:\d+: "):
            await unreachable.current()
    finally:
        await unreachable.close()


@pytest.mark.parametrize("url", ["etcd://", "etcd://localhost", "etcd://127.0.0.1:0", "etcd://a:1,,b:2"])
def test_a_bad_etcd_url_is_refused(url: str) -> None:
    with pytest.raises(StoreError, match=r"expected etcd://host:port\[,host:port\]"):
        open_store(url)


async def test_an_etcd_outage_is_logged_once_and_the_watch_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The watch retries about every second while the outage is young; it said so once a second before."""
    server = EtcdServer(tmp_path)
    store, writer = EtcdStore.from_url(server.url), EtcdStore.from_url(server.url)
    caplog.set_level(logging.INFO, logger="meshgate.store")
    try:
        assert server.wait_healthy(), server.log()
        await store.commit(mesh(10), author="ops", reason="first", action="apply", target="mesh")
        waiter = asyncio.ensure_future(store.wait_for_change(1, timeout=30))  # starts the watch
        await writer.commit(mesh(20), author="ops", reason="second", action="apply", target="mesh")
        assert (await asyncio.wait_for(waiter, 10)) is not None  # the watch carried the second commit (not the
        # waiter's own read at its timeout, 30 s away)
        server.stop()
        await wait_until(lambda: "etcd watch failed" in caplog.text, 15, what="the watch to notice")
        await asyncio.sleep(3.0)  # the outage itself: about three retries
        assert caplog.text.count("etcd watch failed") == 1, caplog.text
        server.restart()
        assert server.wait_healthy(), server.log()
        await wait_until(lambda: "etcd watch restored after" in caplog.text, 15, what="the watch to come back")
        waiter = asyncio.ensure_future(store.wait_for_change(2, timeout=30))
        await writer.commit(mesh(30), author="ops", reason="after", action="apply", target="mesh")
        revision = await asyncio.wait_for(waiter, 10)
        assert revision is not None and revision.version == 3
        assert caplog.text.count("etcd watch failed") == 1, caplog.text
    finally:
        await store.close()
        await writer.close()
        server.stop()
