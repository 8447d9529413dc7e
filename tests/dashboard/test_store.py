"""The `Store` contract, run against SQLite and a real etcd (the `store` fixture is parametrized), plus what only
SQLite promises: its schema version, and that no acknowledged commit is lost when the process is SIGKILLed."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dashboard.store import (
    DB_FILE,
    GatewayRecord,
    SQLiteStore,
    Store,
    StoreError,
    TokenRecord,
    VersionConflict,
    open_store,
)
from gateway.config import ConfigError

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


def mesh(v2: int = 0, group: str = "shop") -> dict[str, Any]:
    subsets = {"v1": {"endpoints": ["127.0.0.1:9101"]}, "v2": {"endpoints": ["127.0.0.1:9103"]}}
    routes = [{"name": "default", "split": {"v1": 100 - v2, "v2": v2}}]
    return {"groups": {group: ["catalog"]}, "services": {"catalog": {"subsets": subsets, "routes": routes}}}


async def commit(store: Store, v2: int, expect_version: int | None = None, reason: str = "step") -> int:
    revision = await store.commit(
        mesh(v2),
        author="ops",
        reason=reason,
        action="set-weights",
        target="services/catalog/routes",
        expect_version=expect_version,
    )
    return revision.version


async def test_an_empty_store_is_at_version_zero(store: Store) -> None:
    current = await store.current()
    assert (current.version, current.mesh, current.diff) == (0, {"groups": {}, "services": {}}, ())
    assert await store.get(0) is None
    assert await store.get(1) is None
    assert await store.history() == []
    assert await store.audit() == []


async def test_commits_make_consecutive_versions_with_canonical_meshes_and_diffs(store: Store) -> None:
    first = await store.commit(mesh(0), author="alice", reason="seed", action="apply", target="mesh")
    second = await store.commit(mesh(10), author="bob", reason="canary", action="set-weights", target="mesh")
    assert (first.version, second.version) == (1, 2)
    assert first.diff == ('groups.shop: added (["catalog"])', "services.catalog: added")
    assert second.diff == (
        "services.catalog.routes[0].split.v1: 100 → 90",
        "services.catalog.routes[0].split.v2: 0 → 10",
    )
    assert second.mesh["services"]["catalog"]["lb"] == "ewma"  # stored canonical, defaults spelled out
    current = await store.current()
    assert current == second
    assert (current.author, current.reason) == ("bob", "canary")
    assert await store.get(1) == first
    assert time.time() - 60 < first.time <= second.time <= time.time()


async def test_an_invalid_mesh_is_refused_and_nothing_changes(store: Store) -> None:
    await commit(store, 10)
    bad = mesh(10)
    bad["services"]["catalog"]["routes"][0]["split"]["v2"] = 20
    with pytest.raises(ConfigError, match=r"services\.catalog\.routes\[0\]\.split: weights must sum to 100"):
        await store.commit(bad, author="ops", reason="", action="apply", target="mesh")
    assert (await store.current()).version == 1
    assert len(await store.audit()) == 1


async def test_history_pages_newest_first(store: Store) -> None:
    for step in range(1, 8):
        await commit(store, step * 10, reason=f"step {step}")
    history = await store.history()
    assert [revision.version for revision in history] == [7, 6, 5, 4, 3, 2, 1]
    assert history[0].reason == "step 7"
    assert [revision.version for revision in await store.history(limit=3)] == [7, 6, 5]
    assert [revision.version for revision in await store.history(limit=3, before=5)] == [4, 3, 2]
    assert [revision.version for revision in await store.history(limit=3, before=2)] == [1]
    assert [revision.version for revision in await store.history(limit=2, before=100)] == [7, 6]
    assert await store.history(limit=3, before=1) == []
    assert await store.history(limit=0) == []


async def test_a_stale_expect_version_is_a_conflict_and_changes_nothing(store: Store) -> None:
    assert await commit(store, 10, expect_version=0) == 1
    assert await commit(store, 20, expect_version=1) == 2
    with pytest.raises(VersionConflict, match=r"^config version 1 is not current \(current is 2\)$") as raised:
        await commit(store, 30, expect_version=1)
    assert (raised.value.expected, raised.value.current) == (1, 2)
    current = await store.current()
    assert current.version == 2
    assert current.mesh["services"]["catalog"]["routes"][0]["split"] == {"v1": 80, "v2": 20}
    assert [entry.version for entry in await store.audit()] == [2, 1]


async def test_audit_records_the_target_before_and_after(store: Store) -> None:
    await commit(store, 0)
    await commit(store, 25)
    token = await store.record_audit(
        who="ops", action="create-token", target="tokens/t1", before=None, after={"role": "viewer"}, reason="ci"
    )
    assert token.version is None
    entries = await store.audit()
    assert [entry.id for entry in entries] == [3, 2, 1]
    assert entries[0] == token
    weights = entries[1]
    assert (weights.who, weights.action, weights.version) == ("ops", "set-weights", 2)
    assert weights.target == "services/catalog/routes"
    assert weights.before == [{"name": "default", "split": {"v1": 100, "v2": 0}}]
    assert weights.after == [{"name": "default", "split": {"v1": 75, "v2": 25}}]
    assert (entries[2].before, entries[2].version) == (None, 1)  # the service did not exist before version 1
    assert [entry.id for entry in await store.audit(limit=1, before=3)] == [2]
    assert [entry.id for entry in await store.audit(limit=5, before=2)] == [1]


async def test_tokens_are_found_by_digest(store: Store) -> None:
    operator = TokenRecord("t1", "sha256:aa", "operator", None, "first operator", 1000.0)
    join = TokenRecord("t2", "sha256:bb", "gateway", "shop", "shop gateways", 2000.0)
    await store.add_token(join)
    await store.add_token(operator)
    assert await store.find_token("sha256:bb") == join
    assert await store.find_token("sha256:cc") is None
    assert await store.tokens() == [operator, join]
    with pytest.raises(ValueError, match="exists"):
        await store.add_token(TokenRecord("t3", "sha256:aa", "viewer", None, "dup", 3000.0))
    assert len(await store.tokens()) == 2


async def test_a_gateways_heartbeat_replaces_its_last_one(store: Store) -> None:
    first = GatewayRecord("b-instance", "shop", {"config_version": 1, "advertise": "127.0.0.1:15006"}, 100.0)
    other = GatewayRecord("a-instance", "catalog", {"config_version": 1}, 100.0)
    await store.put_gateway(first, ttl=30)
    await store.put_gateway(other, ttl=30)
    again = GatewayRecord("b-instance", "shop", {"config_version": 2, "advertise": "127.0.0.1:15006"}, 102.0)
    await store.put_gateway(again, ttl=30)
    assert await store.gateways() == [other, again]


async def test_wait_for_change_returns_at_once_when_already_newer(store: Store) -> None:
    await commit(store, 10)
    started = time.monotonic()
    revision = await store.wait_for_change(0, timeout=30)
    assert revision is not None and revision.version == 1
    assert time.monotonic() - started < 5


async def test_wait_for_change_wakes_on_a_commit(store: Store) -> None:
    await commit(store, 10)
    waiter = asyncio.ensure_future(store.wait_for_change(1, timeout=30))
    done, _ = await asyncio.wait({waiter}, timeout=0.2)
    assert not done, "returned although nothing changed"
    started = time.monotonic()
    await commit(store, 20)
    revision = await asyncio.wait_for(waiter, 10)
    assert revision is not None and revision.version == 2
    assert time.monotonic() - started < 5


async def test_wait_for_change_times_out_with_none(store: Store) -> None:
    await commit(store, 10)
    started = time.monotonic()
    assert await store.wait_for_change(1, timeout=0.3) is None
    assert 0.3 <= time.monotonic() - started < 5


async def test_a_reopened_store_has_everything(store_url: str) -> None:
    first = open_store(store_url)
    try:
        await commit(first, 10)
        await first.add_token(TokenRecord("t1", "sha256:aa", "viewer", None, "v", 1.0))
    finally:
        await first.close()
    with pytest.raises(StoreError, match="closed"):
        await first.current()
    second = open_store(store_url)
    try:
        assert (await second.current()).version == 1
        assert await second.find_token("sha256:aa") is not None
        assert len(await second.audit()) == 1
    finally:
        await second.close()


# SQLite only


async def test_sqlite_schema_is_versioned(tmp_path: Path) -> None:
    store = SQLiteStore.open(str(tmp_path))
    await store.close()
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match=r"schema version 99 is newer than this meshgate's \(1\)"):
        SQLiteStore.open(str(tmp_path))


def test_sqlite_refuses_a_directory_it_cannot_use(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open the store"):
        open_store(str(blocker))


CHILD = """
import asyncio, sys
from dashboard.store import open_store
from tests.dashboard.test_store import mesh

async def main():
    store = open_store(sys.argv[1])
    for step in range(1, 100000):
        revision = await store.commit(mesh(step % 101), author="child", reason=str(step), action="apply", target="mesh")
        print(revision.version, flush=True)

asyncio.run(main())
"""


async def test_sqlite_keeps_every_acknowledged_commit_through_sigkill(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, data], cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ}
    )
    assert child.stdout is not None
    acknowledged = []
    for line in child.stdout:  # each line is printed only after commit() returned
        acknowledged.append(int(line))
        if len(acknowledged) == 40:
            child.send_signal(signal.SIGKILL)  # mid-stream: it is committing the next version right now
            break
    acknowledged.extend(int(line) for line in child.stdout)  # acknowledged before the kill landed
    assert child.wait(10) == -signal.SIGKILL
    child.stdout.close()
    assert acknowledged == list(range(1, len(acknowledged) + 1))
    store = open_store(data)
    try:
        assert (await store.current()).version >= acknowledged[-1]
        for version in acknowledged:
            revision = await store.get(version)
            assert revision is not None, f"acknowledged version {version} was lost"
            assert revision.reason == str(version)
            assert revision.mesh["services"]["catalog"]["routes"][0]["split"]["v2"] == version % 101
    finally:
        await store.close()
