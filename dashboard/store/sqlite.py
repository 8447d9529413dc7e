"""The SQLite `Store`: one file, `mesh.db`, in the dashboard's data directory, for a single dashboard.

Rollout revisions come from one counter (`rollout_revision`) shared by every service, so a revision is never
reused, not even by a rollout stored after its service's last one was deleted: a stale compare-and-set fails.
The leader lease is a row whose expiry is wall-clock time, in one transaction per call.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

from dashboard.datadir import private_directory, private_file
from dashboard.mesh import diff
from dashboard.store.model import (
    DB_FILE,
    MAX_GATEWAYS_PER_GROUP,
    AuditEntry,
    ChangeSignal,
    GatewayRecord,
    LogEntry,
    Revision,
    RolloutConflict,
    RolloutRecord,
    StoreError,
    TokenRecord,
    VersionConflict,
    canonical,
    check_lease,
    check_rollout_id,
    check_service,
    empty_revision,
    encode_document,
    encode_log,
    log_window,
    part,
    split_stats,
    wait_for_version,
)

_T = TypeVar("_T")


_SCHEMA = [
    # version 1
    """
    CREATE TABLE revisions (
        version INTEGER PRIMARY KEY, mesh TEXT NOT NULL, author TEXT NOT NULL, reason TEXT NOT NULL,
        time REAL NOT NULL, diff TEXT NOT NULL);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, who TEXT NOT NULL, action TEXT NOT NULL,
        target TEXT NOT NULL, before TEXT NOT NULL, after TEXT NOT NULL, reason TEXT NOT NULL, version INTEGER);
    CREATE TABLE tokens (
        digest TEXT PRIMARY KEY, id TEXT NOT NULL, role TEXT NOT NULL, grp TEXT, name TEXT NOT NULL,
        created REAL NOT NULL);
    CREATE TABLE gateways (instance TEXT PRIMARY KEY, grp TEXT NOT NULL, data TEXT NOT NULL, seen REAL NOT NULL);
    """,
    # version 2: gateways keyed by (group, instance), their stats apart; old records keep only the known fields
    """
    CREATE TABLE gateways_by_group (
        grp TEXT NOT NULL, instance TEXT NOT NULL, data TEXT NOT NULL, stats TEXT, seen REAL NOT NULL,
        PRIMARY KEY (grp, instance));
    INSERT OR REPLACE INTO gateways_by_group (grp, instance, data, stats, seen)
        SELECT grp, instance,
            json_object(
                'meshgate_version', json_extract(data, '$.meshgate_version'),
                'config_version', json_extract(data, '$.config_version'),
                'etag', json_extract(data, '$.etag'),
                'started', json_extract(data, '$.started'),
                'cert_not_after', json_extract(data, '$.cert_not_after'),
                'advertise', json_extract(data, '$.advertise'),
                'listeners', json(CASE json_type(data, '$.listeners') WHEN 'object'
                    THEN json_extract(data, '$.listeners') ELSE '{}' END)),
            CASE json_type(data, '$.stats') WHEN 'object' THEN json_extract(data, '$.stats') END,
            seen
        FROM gateways ORDER BY seen;
    DROP TABLE gateways;
    ALTER TABLE gateways_by_group RENAME TO gateways;
    CREATE INDEX gateways_seen ON gateways (seen);
    """,
    # version 3: automated rollouts, their logs, and the leader lease
    """
    CREATE TABLE rollouts (service TEXT PRIMARY KEY, data TEXT NOT NULL, revision INTEGER NOT NULL);
    CREATE TABLE rollout_revision (last INTEGER NOT NULL);
    INSERT INTO rollout_revision VALUES (0);
    CREATE TABLE rollout_log (
        rollout TEXT NOT NULL, seq INTEGER NOT NULL, entry TEXT NOT NULL, PRIMARY KEY (rollout, seq)) WITHOUT ROWID;
    CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL);
    """,
]
_REVISION = "SELECT version, mesh, author, reason, time, diff FROM revisions"
_AUDIT = "SELECT id, time, who, action, target, before, after, reason, version FROM audit"
_TOKEN = "SELECT id, digest, role, grp, name, created FROM tokens"


def _revision(row: tuple[Any, ...]) -> Revision:
    version, mesh, author, reason, when, lines = row
    return Revision(version, json.loads(mesh), author, reason, when, tuple(json.loads(lines)))


def _audit_entry(row: tuple[Any, ...]) -> AuditEntry:
    entry_id, when, who, action, target, before, after, reason, version = row
    return AuditEntry(entry_id, when, who, action, target, json.loads(before), json.loads(after), reason, version)


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class _Database:
    """The SQLite connection and every query. Runs only on `SQLiteStore`'s one worker thread."""

    def __init__(self, path: str) -> None:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), so a write never starts as a read
        # that cannot upgrade; busy_timeout covers another process (`meshgate dashboard token create`).
        private_file(path)
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")  # fsync the WAL on every commit: acknowledged means durable
        self._latest: Revision | None = None
        self._migrate(path)

    def _migrate(self, path: str) -> None:
        with self._transaction():
            (version,) = self.conn.execute("PRAGMA user_version").fetchone()
            if version > len(_SCHEMA):
                raise StoreError(f"{path}: schema version {version} is newer than this meshgate's ({len(_SCHEMA)})")
            for script in _SCHEMA[version:]:
                for statement in filter(str.strip, script.split(";")):
                    self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version = {len(_SCHEMA)}")

    def _transaction(self) -> _Transaction:
        return _Transaction(self.conn)

    def current(self) -> Revision:
        # Every waiter reads this after each commit: decode the mesh once per version, not once per waiter.
        (version,) = self.conn.execute("SELECT MAX(version) FROM revisions").fetchone()
        if version is None:
            return empty_revision()
        if self._latest is None or self._latest.version != version:
            self._latest = _revision(self.conn.execute(f"{_REVISION} WHERE version = ?", (version,)).fetchone())
        return self._latest

    def get(self, version: int) -> Revision | None:
        row = self.conn.execute(f"{_REVISION} WHERE version = ?", (version,)).fetchone()
        return None if row is None else _revision(row)

    def history(self, limit: int, before: int | None) -> list[Revision]:
        rows = self.conn.execute(
            f"{_REVISION} WHERE version < ? ORDER BY version DESC LIMIT ?", (_below(before), max(limit, 0))
        )
        return [_revision(row) for row in rows]

    def commit(
        self, mesh: dict[str, Any], author: str, reason: str, action: str, target: str, expect: int | None
    ) -> Revision:
        with self._transaction():
            previous = self.current()
            if expect is not None and expect != previous.version:
                raise VersionConflict(expect, previous.version)
            revision = Revision(
                previous.version + 1, mesh, author, reason, time.time(), tuple(diff(previous.mesh, mesh))
            )
            self.conn.execute(
                "INSERT INTO revisions VALUES (?, ?, ?, ?, ?, ?)",
                (revision.version, _dumps(mesh), author, reason, revision.time, _dumps(revision.diff)),
            )
            before, after = part(previous.mesh, target), part(mesh, target)
            self._insert_audit(
                AuditEntry(0, revision.time, author, action, target, before, after, reason, revision.version)
            )
        return revision

    def _insert_audit(self, entry: AuditEntry) -> AuditEntry:
        cursor = self.conn.execute(
            "INSERT INTO audit (time, who, action, target, before, after, reason, version)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.time,
                entry.who,
                entry.action,
                entry.target,
                _dumps(entry.before),
                _dumps(entry.after),
                entry.reason,
                entry.version,
            ),
        )
        assert cursor.lastrowid is not None  # set by every INSERT
        return replace(entry, id=cursor.lastrowid)

    def record_audit(
        self, who: str, action: str, target: str, before: object, after: object, reason: str
    ) -> AuditEntry:
        with self._transaction():
            return self._insert_audit(AuditEntry(0, time.time(), who, action, target, before, after, reason, None))

    def audit(self, limit: int, before: int | None) -> list[AuditEntry]:
        rows = self.conn.execute(f"{_AUDIT} WHERE id < ? ORDER BY id DESC LIMIT ?", (_below(before), max(limit, 0)))
        return [_audit_entry(row) for row in rows]

    def add_token(self, record: TokenRecord) -> None:
        try:
            with self._transaction():
                self.conn.execute(
                    "INSERT INTO tokens (id, digest, role, grp, name, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (record.id, record.digest, record.role, record.group, record.name, record.created),
                )
        except sqlite3.IntegrityError:
            raise ValueError(f"a token with digest {record.digest} exists") from None

    def find_token(self, digest: str) -> TokenRecord | None:
        row = self.conn.execute(f"{_TOKEN} WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else TokenRecord(*row)

    def tokens(self) -> list[TokenRecord]:
        return [TokenRecord(*row) for row in self.conn.execute(f"{_TOKEN} ORDER BY created, id")]

    def put_gateway(self, record: GatewayRecord, max_per_group: int) -> None:
        data, stats = split_stats(record.data)
        with self._transaction():
            known = "SELECT 1 FROM gateways WHERE grp = ? AND instance = ?"
            if self.conn.execute(known, (record.group, record.instance)).fetchone() is None:
                self.conn.execute(  # make room: all but the group's newest max_per_group - 1 go
                    "DELETE FROM gateways WHERE rowid IN"
                    " (SELECT rowid FROM gateways WHERE grp = ? ORDER BY seen DESC LIMIT -1 OFFSET ?)",
                    (record.group, max(0, max_per_group - 1)),
                )
            self.conn.execute(
                "INSERT OR REPLACE INTO gateways (grp, instance, data, stats, seen) VALUES (?, ?, ?, ?, ?)",
                (record.group, record.instance, _dumps(data), None if stats is None else _dumps(stats), record.seen),
            )

    def gateways(self, stats: bool) -> list[GatewayRecord]:
        columns = "instance, grp, data, seen, " + ("stats" if stats else "NULL")
        records = []
        for instance, group, text, seen, numbers in self.conn.execute(
            f"SELECT {columns} FROM gateways ORDER BY grp, instance"
        ):
            data = json.loads(text)
            if numbers is not None:
                data["stats"] = json.loads(numbers)
            records.append(GatewayRecord(instance, group, data, seen))
        return records

    def forget_gateways(self, before: float) -> int:
        with self._transaction():
            return self.conn.execute("DELETE FROM gateways WHERE seen < ?", (before,)).rowcount

    def rollouts(self) -> list[RolloutRecord]:
        rows = self.conn.execute("SELECT service, data, revision FROM rollouts ORDER BY service")
        return [RolloutRecord(service, json.loads(data), revision) for service, data, revision in rows]

    def get_rollout(self, service: str) -> RolloutRecord | None:
        row = self.conn.execute("SELECT data, revision FROM rollouts WHERE service = ?", (service,)).fetchone()
        return None if row is None else RolloutRecord(service, json.loads(row[0]), row[1])

    def put_rollout(self, service: str, text: str, expect: int) -> RolloutRecord:
        with self._transaction():
            row = self.conn.execute("SELECT revision FROM rollouts WHERE service = ?", (service,)).fetchone()
            current = 0 if row is None else row[0]
            if current != expect:
                raise RolloutConflict(service, expect, current)
            (revision,) = self.conn.execute("UPDATE rollout_revision SET last = last + 1 RETURNING last").fetchone()
            self.conn.execute("INSERT OR REPLACE INTO rollouts VALUES (?, ?, ?)", (service, text, revision))
        return RolloutRecord(service, json.loads(text), revision)

    def delete_rollout(self, service: str) -> None:
        with self._transaction():
            self.conn.execute("DELETE FROM rollouts WHERE service = ?", (service,))

    def append_rollout_log(self, rollout_id: str, entries: dict[int, str]) -> None:
        with self._transaction():
            self.conn.executemany(
                "INSERT OR REPLACE INTO rollout_log VALUES (?, ?, ?)",
                [(rollout_id, seq, text) for seq, text in entries.items()],
            )

    def rollout_log(self, rollout_id: str, after: int, limit: int) -> list[LogEntry]:
        rows = self.conn.execute(
            "SELECT seq, entry FROM rollout_log WHERE rollout = ? AND seq > ? ORDER BY seq LIMIT ?",
            (rollout_id, after, limit),
        )
        return [(seq, json.loads(entry)) for seq, entry in rows]

    def forget_rollout_logs(self, keep: frozenset[str]) -> int:
        with self._transaction():
            stored = [rollout for (rollout,) in self.conn.execute("SELECT DISTINCT rollout FROM rollout_log")]
            gone = [(rollout,) for rollout in stored if rollout not in keep]
            self.conn.executemany("DELETE FROM rollout_log WHERE rollout = ?", gone)
        return len(gone)

    def lead(self, name: str, holder: str, ttl: float) -> bool:
        with self._transaction():
            now = time.time()
            row = self.conn.execute("SELECT holder, expires FROM leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != holder and row[1] > now:
                return False
            self.conn.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", (name, holder, now + ttl))
        return True

    def resign(self, name: str, holder: str) -> None:
        with self._transaction():
            self.conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))


def _below(before: int | None) -> int:
    return 2**62 if before is None else before


class _Transaction:
    """`BEGIN IMMEDIATE` ... `COMMIT`, or `ROLLBACK` when the block raises."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        self.conn.execute("ROLLBACK" if kind is not None else "COMMIT")


class SQLiteStore:
    """`Store` on one SQLite file (WAL, synchronous=FULL), used from one worker thread so that the event loop
    never blocks on disk. Waiters are woken in-process: run one dashboard per data directory.

    >>> store = SQLiteStore.open("/var/lib/meshgate")   # doctest: +SKIP
    """

    def __init__(self, executor: ThreadPoolExecutor, db: _Database) -> None:
        self._executor = executor
        self._db = db
        self._changes = ChangeSignal()
        self._closed = False

    @classmethod
    def open(cls, directory: str) -> SQLiteStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshgate-store")
        try:
            private_directory(directory)
            db = executor.submit(_Database, os.path.join(directory, DB_FILE)).result()
        except (OSError, sqlite3.Error) as err:
            executor.shutdown()
            raise StoreError(f"{os.path.join(directory, DB_FILE)}: cannot open the store: {err}") from None
        except BaseException:
            executor.shutdown()
            raise
        return cls(executor, db)

    async def _run(self, call: Callable[..., _T], *args: Any) -> _T:
        if self._closed:
            raise StoreError("the store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, partial(call, *args))
        except sqlite3.Error as err:
            raise StoreError(f"{DB_FILE}: {err}") from None

    async def current(self) -> Revision:
        return await self._run(self._db.current)

    async def get(self, version: int) -> Revision | None:
        return await self._run(self._db.get, version)

    async def history(self, limit: int = 50, before: int | None = None) -> list[Revision]:
        return await self._run(self._db.history, limit, before)

    async def commit(
        self,
        mesh: Mapping[str, Any],
        *,
        author: str,
        reason: str,
        action: str,
        target: str,
        expect_version: int | None = None,
    ) -> Revision:
        loop = asyncio.get_running_loop()
        data = canonical(mesh)

        def commit_and_notify() -> Revision:
            revision = self._db.commit(data, author, reason, action, target, expect_version)
            # From the worker thread, so waiters wake even if the committing request is cancelled meanwhile.
            loop.call_soon_threadsafe(self._changes.notify)
            return revision

        return await self._run(commit_and_notify)

    async def audit(self, limit: int = 100, before: int | None = None) -> list[AuditEntry]:
        return await self._run(self._db.audit, limit, before)

    async def record_audit(
        self, *, who: str, action: str, target: str, before: object, after: object, reason: str
    ) -> AuditEntry:
        return await self._run(self._db.record_audit, who, action, target, before, after, reason)

    async def wait_for_change(self, after_version: int, timeout: float) -> Revision | None:
        return await wait_for_version(self.current, self._changes, after_version, timeout)

    async def add_token(self, record: TokenRecord) -> None:
        await self._run(self._db.add_token, record)

    async def find_token(self, digest: str) -> TokenRecord | None:
        return await self._run(self._db.find_token, digest)

    async def tokens(self) -> list[TokenRecord]:
        return await self._run(self._db.tokens)

    async def put_gateway(self, record: GatewayRecord, max_per_group: int = MAX_GATEWAYS_PER_GROUP) -> None:
        await self._run(self._db.put_gateway, record, max_per_group)

    async def gateways(self, stats: bool = False) -> list[GatewayRecord]:
        return await self._run(self._db.gateways, stats)

    async def forget_gateways(self, before: float) -> int:
        return await self._run(self._db.forget_gateways, before)

    async def rollouts(self) -> list[RolloutRecord]:
        return await self._run(self._db.rollouts)

    async def get_rollout(self, service: str) -> RolloutRecord | None:
        return await self._run(self._db.get_rollout, check_service(service))

    async def put_rollout(self, service: str, data: Mapping[str, Any], expect: int) -> RolloutRecord:
        return await self._run(self._db.put_rollout, check_service(service), encode_document(data), expect)

    async def delete_rollout(self, service: str) -> None:
        await self._run(self._db.delete_rollout, check_service(service))

    async def append_rollout_log(self, rollout_id: str, entries: Sequence[LogEntry]) -> None:
        await self._run(self._db.append_rollout_log, check_rollout_id(rollout_id), encode_log(entries))

    async def rollout_log(self, rollout_id: str, after: int = -1, limit: int = 1000) -> list[LogEntry]:
        return await self._run(self._db.rollout_log, check_rollout_id(rollout_id), *log_window(after, limit))

    async def forget_rollout_logs(self, keep: Collection[str]) -> int:
        return await self._run(self._db.forget_rollout_logs, frozenset(keep))

    async def lead(self, name: str, holder: str, ttl: float) -> bool:
        check_lease(name, holder, ttl)
        return await self._run(self._db.lead, name, holder, ttl)

    async def resign(self, name: str, holder: str) -> None:
        check_lease(name, holder)
        await self._run(self._db.resign, name, holder)

    async def close(self) -> None:
        if self._closed:
            return
        await self._run(self._db.conn.close)
        self._closed = True
        self._executor.shutdown(wait=True)
