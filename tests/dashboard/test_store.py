"""The `Store` contract, run against SQLite and a real etcd (the `store` fixture is parametrized), plus what only
SQLite promises: its schema version, and that no acknowledged commit is lost when the process is SIGKILLed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dashboard.datadir import sqlite_files
from dashboard.store import open_store
from dashboard.store.model import DB_FILE, GatewayRecord, Store, StoreError, TokenRecord, VersionConflict
from dashboard.store.sqlite import _SCHEMA, SQLiteStore
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
    await store.put_gateway(first)
    await store.put_gateway(other)
    again = GatewayRecord("b-instance", "shop", {"config_version": 2, "advertise": "127.0.0.1:15006"}, 102.0)
    await store.put_gateway(again)
    assert await store.gateways() == [other, again]


async def test_one_instance_id_in_two_groups_is_two_gateways(store: Store) -> None:
    """A join token of one group can never overwrite a gateway of another: records are keyed by both."""
    shop = GatewayRecord("same-id", "shop", {"advertise": "10.0.0.1:15006"}, 100.0)
    await store.put_gateway(shop)
    claimed = GatewayRecord("same-id", "web", {"advertise": "10.6.6.6:15006"}, 101.0)
    await store.put_gateway(claimed)
    assert await store.gateways() == [shop, claimed]


async def test_stats_are_stored_apart_and_read_only_when_asked_for(store: Store) -> None:
    stats = {"series": [{"labels": ["source", "shop", "catalog", "v1", "default"]}], "cpu": 1.5}
    await store.put_gateway(GatewayRecord("gw", "shop", {"config_version": 3, "stats": stats}, 100.0))
    assert await store.gateways() == [GatewayRecord("gw", "shop", {"config_version": 3}, 100.0)]
    assert await store.gateways(stats=True) == [
        GatewayRecord("gw", "shop", {"config_version": 3, "stats": stats}, 100.0)
    ]
    await store.put_gateway(GatewayRecord("gw", "shop", {"config_version": 4}, 102.0))
    assert await store.gateways(stats=True) == [GatewayRecord("gw", "shop", {"config_version": 4}, 102.0)]


async def test_a_group_keeps_at_most_max_per_group_gateways(store: Store) -> None:
    """A new gateway beyond the limit replaces the one of its group heard from least recently; other groups and
    gateways already on record are untouched."""
    for index in range(3):
        await store.put_gateway(GatewayRecord(f"shop-{index}", "shop", {}, 100.0 + index), max_per_group=3)
    await store.put_gateway(GatewayRecord("web-0", "web", {}, 50.0), max_per_group=3)
    await store.put_gateway(GatewayRecord("shop-1", "shop", {}, 110.0), max_per_group=3)  # known: nothing goes
    assert [record.instance for record in await store.gateways()] == ["shop-0", "shop-1", "shop-2", "web-0"]
    await store.put_gateway(GatewayRecord("shop-3", "shop", {"stats": {"cpu": 1}}, 111.0), max_per_group=3)
    assert [record.key for record in await store.gateways(stats=True)] == [
        "shop/shop-1",
        "shop/shop-2",
        "shop/shop-3",
        "web/web-0",
    ]


async def test_forget_gateways_removes_those_heard_before_a_time(store: Store) -> None:
    for index, seen in enumerate((100.0, 200.0, 300.0)):
        await store.put_gateway(GatewayRecord(f"gw-{index}", "shop", {"stats": {"cpu": index}}, seen))
    assert await store.forget_gateways(250.0) == 2
    assert await store.gateways(stats=True) == [GatewayRecord("gw-2", "shop", {"stats": {"cpu": 2}}, 300.0)]
    assert await store.forget_gateways(250.0) == 0


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
        assert conn.execute("PRAGMA user_version").fetchone() == (3,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match=r"schema version 99 is newer than this meshgate's \(3\)"):
        SQLiteStore.open(str(tmp_path))


async def test_sqlite_keeps_gateways_of_schema_1_with_only_the_known_fields(tmp_path: Path) -> None:
    """Records of a dashboard before 0.2 were keyed by instance and kept whole bodies: they survive the upgrade
    (routing needs them until the gateways heartbeat again), without the fields no reader knows."""
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        conn.executescript(_SCHEMA[0] + "PRAGMA user_version = 1;")
        known = {"advertise": "10.0.0.1:15006", "listeners": {"inbound": "10.0.0.1:15006"}, "config_version": 2}
        body = {"instance": "gw", "group": "shop", **known, "junk": "x" * 100_000, "stats": {"cpu": 1.5}}
        conn.execute("INSERT INTO gateways VALUES ('gw', 'shop', ?, 100.0)", (json.dumps(body),))
        odd = {"listeners": "none", "stats": "none"}
        conn.execute("INSERT INTO gateways VALUES ('odd', 'web', ?, 90.0)", (json.dumps(odd),))
    conn.close()
    store = SQLiteStore.open(str(tmp_path))
    try:
        [gateway, other] = await store.gateways(stats=True)
        assert gateway.key == "shop/gw" and gateway.seen == 100.0
        assert {key: value for key, value in gateway.data.items() if value is not None} == {
            **known,
            "stats": {"cpu": 1.5},
        }
        assert other.key == "web/odd" and other.data["listeners"] == {} and "stats" not in other.data
        await store.put_gateway(GatewayRecord("gw", "web", {}, 101.0))  # (group, instance) is the key now
        assert len(await store.gateways()) == 3
    finally:
        await store.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_sqlite_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """The directory 0700 and the database with its -wal and -shm 0600, not what the usual umask (022) gives."""
    data = tmp_path / "data"
    umask = os.umask(0o022)
    try:
        store = SQLiteStore.open(str(data))
        try:
            await commit(store, 10)
            modes = {name: mode(data / name) for name in sqlite_files(DB_FILE)}  # while open: all three exist
        finally:
            await store.close()
    finally:
        os.umask(umask)
    assert modes == dict.fromkeys(sqlite_files(DB_FILE), 0o600)
    assert mode(data) == 0o700


async def test_sqlite_tightens_a_directory_and_files_others_could_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As an older meshgate left them: the data directory 0755, the database 0644."""
    data = tmp_path / "data"
    await (SQLiteStore.open(str(data))).close()
    data.chmod(0o755)
    (data / DB_FILE).chmod(0o644)
    store = SQLiteStore.open(str(data))
    await store.close()
    assert mode(data) == 0o700 and mode(data / DB_FILE) == 0o600
    assert f"{data / DB_FILE}: mode 0644 let other users in; changed to 0600" in caplog.text
    assert f"{data}: mode 0755 let other users in; changed to 0700" in caplog.text


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
