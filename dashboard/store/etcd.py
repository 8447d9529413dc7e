"""`Store` on etcd, so that several dashboard replicas share one state: `open_store("etcd://host:port,...")`.

It speaks etcd's v3 HTTP/JSON gateway (`/v3/kv/range`, `/v3/kv/txn`, `/v3/lease/grant`, `/v3/watch`) through
gateway/etcd.py's client, so there is no gRPC dependency. Keys:

    /meshgate/version                  current config version N (absent: 0)
    /meshgate/revisions/<N, 20 digits> each revision as JSON, never rewritten
    /meshgate/audit-seq                id of the newest audit entry
    /meshgate/audit/<id, 20 digits>    each audit entry as JSON
    /meshgate/tokens/<sha256 digest>   API tokens
    /meshgate/gateways/<group>/<instance>        each gateway's last heartbeat, without its stats
    /meshgate/gateway-stats/<group>/<instance>   and its stats, read only by the golden-signal sampler
    /meshgate/rollouts/<service>       each service's rollout document (its revision is the key's mod_revision)
    /meshgate/rollout-log/<rollout ID>/<seq, 12 digits>   each rollout's log entries
    /meshgate/leases/<name>            the holder of a leader lease, attached to an etcd lease of its TTL

A commit reads both counters, then writes version N+1, revision N+1, the audit entry and its id in one txn that
compares both counters' mod_revision with what it read: when two replicas race, exactly one txn succeeds. The
loser re-reads, and raises `VersionConflict` if it was given `expect_version`. Dense numbering lets `history` and
`audit` read one key range instead of sorting the whole prefix. `wait_for_change` is woken by one watch stream on
`/meshgate/version` per store, so a commit through any replica wakes the waiters of every replica.

A rollout is written by a txn comparing its key's mod_revision with the one the writer read (0: absent); etcd's
revisions are never reused, so a writer holding a deleted rollout's revision fails against any later one. A leader
lease is taken by a txn that creates its key (create_revision == 0) under a fresh etcd lease, and renewed by a
keepalive of the etcd lease its key carries: when that lease expires etcd deletes the key, so a live key always
names the live holder. A renewal keeps the TTL the lease was granted with.

Gateway records carry no lease: the API forgets silent ones (`forget_gateways`) by the same rule on etcd and on
SQLite. Records that dashboards before 0.2 wrote under `/meshgate/gateways/<instance>` expire with their leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from dashboard.mesh import diff
from dashboard.store.model import (
    MAX_GATEWAYS_PER_GROUP,
    MAX_LOG_SEQ,
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
from gateway.etcd import ETCD_REQUEST_TIMEOUT, EtcdClient, EtcdError, b64, key_of, prefix_end, value_of
from gateway.units import Backoff, parse_address

log = logging.getLogger("meshgate.store")

_VERSION = "/meshgate/version"
_AUDIT_SEQ = "/meshgate/audit-seq"
_REVISIONS = "/meshgate/revisions/"
_AUDIT = "/meshgate/audit/"
_TOKENS = "/meshgate/tokens/"
_GATEWAYS = "/meshgate/gateways/"
_GATEWAY_STATS = "/meshgate/gateway-stats/"  # outside the range of _GATEWAYS: "-" sorts before "s"
_ROLLOUTS = "/meshgate/rollouts/"
_ROLLOUT_LOG = "/meshgate/rollout-log/"  # outside the range of _ROLLOUTS, as above
_LEASES = "/meshgate/leases/"
ATTEMPTS = 50  # commits retried after losing a race, before giving up
MAX_TRIM = 16  # gateway records one heartbeat deletes to make room in its group
_KV = dict[str, Any]


def _numbered(prefix: str, number: int) -> str:
    return f"{prefix}{number:020d}"  # fixed width: key order is numeric order


def _json(kv: _KV) -> Any:
    return json.loads(value_of(kv))


def _put(key: str, value: object, lease: str | None = None) -> _KV:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    request: _KV = {"key": b64(key), "value": b64(text)}
    if lease is not None:
        request["lease"] = lease
    return {"request_put": request}


def _delete(key: str) -> _KV:
    return {"request_delete_range": {"key": b64(key)}}


def _exists(key: str) -> _KV:
    return {"key": b64(key), "result": "GREATER", "target": "VERSION", "version": "0"}


def _unchanged(key: str, mod_revision: int) -> _KV:
    """A txn compare: `key` was not written since `mod_revision` (0: the key still does not exist)."""
    return {"key": b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(mod_revision)}


def _created_by_no_one(key: str) -> _KV:
    return {"key": b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}


def _read(key: str) -> _KV:
    return {"request_range": {"key": b64(key)}}


def _failure_read(response: _KV) -> _KV | None:
    """The key a failed txn read in its `failure` branch (`_read`), None if absent."""
    kvs: list[_KV] = response["responses"][0]["response_range"].get("kvs", [])
    return kvs[0] if kvs else None


def _text(kv: _KV) -> str:
    return value_of(kv).decode("utf-8", "replace")


def _rollout(kv: _KV) -> RolloutRecord:
    return RolloutRecord(key_of(kv).removeprefix(_ROLLOUTS), _json(kv), int(kv["mod_revision"]))


def _log_prefix(rollout_id: str) -> str:
    return f"{_ROLLOUT_LOG}{check_rollout_id(rollout_id)}/"


def _revision(data: Any) -> Revision:
    return Revision(data["version"], data["mesh"], data["author"], data["reason"], data["time"], tuple(data["diff"]))


def _deletes(name: str) -> list[_KV]:
    """The txn operations that delete a gateway's record and its stats; `name` is `GatewayRecord.key`."""
    return [_delete(_GATEWAYS + name), _delete(_GATEWAY_STATS + name)]


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("etcd watch stopped", exc_info=task.exception())


class EtcdStore:
    """`Store` on an etcd cluster. Endpoints are tried in order while a connection cannot be made.

    >>> store = EtcdStore.from_url("etcd://10.0.0.5:2379,10.0.0.6:2379")   # doctest: +SKIP
    """

    def __init__(self, endpoints: list[str], timeout: float = ETCD_REQUEST_TIMEOUT) -> None:
        self._etcd = EtcdClient(endpoints, timeout)
        self._changes = ChangeSignal()
        self._watcher: asyncio.Task[None] | None = None
        self._watched_version: int | None = None
        self._latest: Revision | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> EtcdStore:
        endpoints = []
        for item in url.removeprefix("etcd://").rstrip("/").split(","):
            try:
                address = parse_address(item)
            except ValueError as err:
                raise StoreError(f"{url}: expected etcd://host:port[,host:port] ({err})") from None
            if address.port == 0:
                raise StoreError(f"{url}: expected etcd://host:port[,host:port] (port 0 in {item})")
            endpoints.append(f"http://{address}")
        return cls(endpoints)

    # etcd's API

    async def _call(self, path: str, body: _KV) -> _KV:
        if self._closed:
            raise StoreError("the store is closed")
        try:
            return await self._etcd.call(path, body)
        except EtcdError as err:
            raise StoreError(str(err)) from None

    async def _get(self, key: str) -> _KV | None:
        kvs: list[_KV] = (await self._call("kv/range", {"key": b64(key)})).get("kvs", [])
        return kvs[0] if kvs else None

    async def _range(self, start: str, end: str, limit: int = 0, keys_only: bool = False) -> list[_KV]:
        body = {"key": b64(start), "range_end": b64(end), "limit": str(limit), "keys_only": keys_only}
        kvs: list[_KV] = (await self._call("kv/range", body)).get("kvs", [])
        return kvs

    async def _txn(self, compare: list[_KV], success: list[_KV]) -> bool:
        response = await self._call("kv/txn", {"compare": compare, "success": success})
        return bool(response.get("succeeded"))

    async def _counter(self, key: str) -> tuple[int, int]:
        """A counter's value and mod_revision; (0, 0) while the key does not exist."""
        kv = await self._get(key)
        return (0, 0) if kv is None else (int(value_of(kv)), int(kv["mod_revision"]))

    async def _counters(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The version and the audit counters, read together (one txn without compares always succeeds)."""
        reads = [{"request_range": {"key": b64(key)}} for key in (_VERSION, _AUDIT_SEQ)]
        responses = (await self._call("kv/txn", {"success": reads})).get("responses", [])
        counters = []
        for response in responses:
            kvs = response["response_range"].get("kvs", [])
            counters.append((int(value_of(kvs[0])), int(kvs[0]["mod_revision"])) if kvs else (0, 0))
        return counters[0], counters[1]

    # Config versions

    async def current(self) -> Revision:
        version = (await self._counter(_VERSION))[0]
        if version == 0:
            return empty_revision()
        if self._latest is not None and self._latest.version == version:
            return self._latest  # revisions are never rewritten: every waiter needs only the version read
        revision = await self.get(version)
        if revision is None:
            raise StoreError(f"etcd: {_numbered(_REVISIONS, version)} is missing")
        self._latest = revision
        return revision

    async def get(self, version: int) -> Revision | None:
        kv = await self._get(_numbered(_REVISIONS, version)) if version > 0 else None
        return None if kv is None else _revision(_json(kv))

    async def history(self, limit: int = 50, before: int | None = None) -> list[Revision]:
        top = await self._top(_VERSION, before)
        if limit <= 0 or top <= 1:
            return []
        kvs = await self._range(_numbered(_REVISIONS, max(1, top - limit)), _numbered(_REVISIONS, top), limit)
        return [_revision(_json(kv)) for kv in reversed(kvs)]

    async def _top(self, counter: str, before: int | None) -> int:
        """One past the newest number to list: numbers are dense from 1, so a page is one key range."""
        newest = (await self._counter(counter))[0]
        return newest + 1 if before is None else max(1, min(before, newest + 1))

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
        data = canonical(mesh)
        for _ in range(ATTEMPTS):
            (version, version_mod), (audit_id, audit_mod) = await self._counters()
            if expect_version is not None and expect_version != version:
                raise VersionConflict(expect_version, version)
            previous = await self.get(version) if version else empty_revision()
            if previous is None:
                raise StoreError(f"etcd: {_numbered(_REVISIONS, version)} is missing")
            now = time.time()
            revision = Revision(version + 1, data, author, reason, now, tuple(diff(previous.mesh, data)))
            before, after = part(previous.mesh, target), part(data, target)
            entry = AuditEntry(audit_id + 1, now, author, action, target, before, after, reason, revision.version)
            writes = [
                _put(_VERSION, str(revision.version)),
                _put(_numbered(_REVISIONS, revision.version), dataclasses.asdict(revision)),
                _put(_AUDIT_SEQ, str(entry.id)),
                _put(_numbered(_AUDIT, entry.id), dataclasses.asdict(entry)),
            ]
            if await self._txn([_unchanged(_VERSION, version_mod), _unchanged(_AUDIT_SEQ, audit_mod)], writes):
                return revision
        raise StoreError(f"etcd: commit lost {ATTEMPTS} races in a row to other writers")

    async def wait_for_change(self, after_version: int, timeout: float) -> Revision | None:
        if self._watcher is None or self._watcher.done():
            # The store's one background task: a reference is kept, failures are logged, close() cancels it.
            self._watcher = asyncio.ensure_future(self._watch())
            self._watcher.add_done_callback(_log_failure)
        return await wait_for_version(self.current, self._changes, after_version, timeout)

    async def _watch(self) -> None:
        # Retried about every second while an outage is young, then backing off to 30 s; logged once an outage,
        # not once a retry. Waiters still time out and read the version themselves meanwhile.
        retry = Backoff(1.0, 30.0, young=120.0)
        while True:
            try:
                await self._watch_once(retry)
            except (EtcdError, StoreError, ValueError, KeyError) as err:
                if not retry.failures:
                    log.warning("etcd watch failed (%s); retrying", err)
                await asyncio.sleep(retry.failed())

    async def _watch_once(self, retry: Backoff) -> None:
        """Watch the version key from just after a read of it, so no commit falls in between."""
        response = await self._call("kv/range", {"key": b64(_VERSION)})
        if retry.failures:
            log.info("etcd watch restored after %.1fs", retry.elapsed())
            retry.succeeded()
        kvs = response.get("kvs", [])
        version = int(value_of(kvs[0])) if kvs else 0
        if version != self._watched_version:
            self._watched_version = version
            self._changes.notify()
        # The stream ends when idle (a dead connection is noticed) or canceled (compacted past the start revision):
        # either way the loop in `_watch` reads the version again and watches from there.
        async for result in self._etcd.watch(_VERSION, None, int(response["header"]["revision"]) + 1):
            for event in result.get("events", []):  # a DELETE (only in tests, wiping etcd) has no value: 0
                self._watched_version = int(value_of(event["kv"]) or 0)
                self._changes.notify()

    # Audit

    async def audit(self, limit: int = 100, before: int | None = None) -> list[AuditEntry]:
        top = await self._top(_AUDIT_SEQ, before)
        if limit <= 0 or top <= 1:
            return []
        kvs = await self._range(_numbered(_AUDIT, max(1, top - limit)), _numbered(_AUDIT, top), limit)
        return [AuditEntry(**_json(kv)) for kv in reversed(kvs)]

    async def record_audit(
        self, *, who: str, action: str, target: str, before: object, after: object, reason: str
    ) -> AuditEntry:
        for _ in range(ATTEMPTS):
            audit_id, audit_mod = await self._counter(_AUDIT_SEQ)
            entry = AuditEntry(audit_id + 1, time.time(), who, action, target, before, after, reason, None)
            writes = [_put(_AUDIT_SEQ, str(entry.id)), _put(_numbered(_AUDIT, entry.id), dataclasses.asdict(entry))]
            if await self._txn([_unchanged(_AUDIT_SEQ, audit_mod)], writes):
                return entry
        raise StoreError(f"etcd: audit entry lost {ATTEMPTS} races in a row to other writers")

    # Tokens and gateways

    async def add_token(self, record: TokenRecord) -> None:
        key = _TOKENS + record.digest
        if not await self._txn([_unchanged(key, 0)], [_put(key, dataclasses.asdict(record))]):
            raise ValueError(f"a token with digest {record.digest} exists")

    async def find_token(self, digest: str) -> TokenRecord | None:
        kv = await self._get(_TOKENS + digest)
        return None if kv is None else TokenRecord(**_json(kv))

    async def tokens(self) -> list[TokenRecord]:
        records = [TokenRecord(**_json(kv)) for kv in await self._range(_TOKENS, prefix_end(_TOKENS))]
        return sorted(records, key=lambda record: (record.created, record.id))

    async def put_gateway(self, record: GatewayRecord, max_per_group: int = MAX_GATEWAYS_PER_GROUP) -> None:
        data, stats = split_stats(record.data)
        key = _GATEWAYS + record.key
        writes = [
            _put(key, dataclasses.asdict(dataclasses.replace(record, data=data))),
            _delete(_GATEWAY_STATS + record.key) if stats is None else _put(_GATEWAY_STATS + record.key, stats),
        ]
        if await self._txn([_exists(key)], writes):
            return  # a gateway on record: one round trip
        group = f"{_GATEWAYS}{record.group}/"
        kvs = await self._range(group, prefix_end(group), keys_only=True)
        # Make room: the group's least recently written keys go. Replicas racing here may overshoot by a few, which
        # the next new gateway trims (a few at a time: a txn holds at most 128 operations).
        excess = min(MAX_TRIM, max(0, len(kvs) - max_per_group + 1))
        oldest = sorted(kvs, key=lambda kv: int(kv["mod_revision"]))[:excess]
        gone = [key_of(kv).removeprefix(_GATEWAYS) for kv in oldest]
        await self._txn([], [op for name in gone for op in _deletes(name)] + writes)

    async def gateways(self, stats: bool = False) -> list[GatewayRecord]:
        newest: dict[str, GatewayRecord] = {}
        for kv in await self._range(_GATEWAYS, prefix_end(_GATEWAYS)):
            record = GatewayRecord(**_json(kv))
            if record.key not in newest or newest[record.key].seen < record.seen:
                newest[record.key] = record  # a record of a dashboard before 0.2 may repeat one for its lease's life
        if stats:
            for kv in await self._range(_GATEWAY_STATS, prefix_end(_GATEWAY_STATS)):
                if (found := newest.get(key_of(kv).removeprefix(_GATEWAY_STATS))) is not None:
                    found.data["stats"] = _json(kv)
        return sorted(newest.values(), key=lambda record: (record.group, record.instance))

    async def forget_gateways(self, before: float) -> int:
        forgotten = 0
        for kv in await self._range(_GATEWAYS, prefix_end(_GATEWAYS)):
            name = key_of(kv).removeprefix(_GATEWAYS)
            # Unless a heartbeat rewrote it since this read.
            if _json(kv)["seen"] < before and await self._txn(
                [_unchanged(_GATEWAYS + name, int(kv["mod_revision"]))], _deletes(name)
            ):
                forgotten += 1
        return forgotten

    # Rollouts

    async def rollouts(self) -> list[RolloutRecord]:
        records = [_rollout(kv) for kv in await self._range(_ROLLOUTS, prefix_end(_ROLLOUTS))]
        return sorted(records, key=lambda record: record.service)

    async def get_rollout(self, service: str) -> RolloutRecord | None:
        kv = await self._get(_ROLLOUTS + check_service(service))
        return None if kv is None else _rollout(kv)

    async def put_rollout(self, service: str, data: Mapping[str, Any], expect: int) -> RolloutRecord:
        key = _ROLLOUTS + check_service(service)
        text = encode_document(data)
        # An absent key's mod_revision compares as 0, so expect=0 means "none stored".
        body = {"compare": [_unchanged(key, expect)], "success": [_put(key, text)], "failure": [_read(key)]}
        response = await self._call("kv/txn", body)
        if response.get("succeeded"):  # the txn's revision is the one its put gave the key
            return RolloutRecord(service, json.loads(text), int(response["header"]["revision"]))
        stored = _failure_read(response)
        raise RolloutConflict(service, expect, 0 if stored is None else int(stored["mod_revision"]))

    async def delete_rollout(self, service: str) -> None:
        await self._call("kv/deleterange", {"key": b64(_ROLLOUTS + check_service(service))})

    async def append_rollout_log(self, rollout_id: str, entries: Sequence[LogEntry]) -> None:
        prefix = _log_prefix(rollout_id)
        encoded = encode_log(entries)
        if encoded:
            await self._txn([], [_put(f"{prefix}{seq:012d}", text) for seq, text in encoded.items()])

    async def rollout_log(self, rollout_id: str, after: int = -1, limit: int = 1000) -> list[LogEntry]:
        prefix = _log_prefix(rollout_id)
        after, limit = log_window(after, limit)
        if limit == 0 or after == MAX_LOG_SEQ:  # (one more would be 13 digits, which sort before 12 nines)
            return []
        kvs = await self._range(f"{prefix}{after + 1:012d}", prefix_end(prefix), limit)
        return [(int(key_of(kv).removeprefix(prefix)), _json(kv)) for kv in kvs]

    async def forget_rollout_logs(self, keep: Collection[str]) -> int:
        # One key per rollout ID, skipping each ID's entries: reading every entry's key would cost far more.
        kept = frozenset(keep)
        gone = 0
        start = _ROLLOUT_LOG
        while kvs := await self._range(start, prefix_end(_ROLLOUT_LOG), limit=1, keys_only=True):
            rollout_id = key_of(kvs[0]).removeprefix(_ROLLOUT_LOG).split("/", 1)[0]
            prefix = f"{_ROLLOUT_LOG}{rollout_id}/"
            if rollout_id not in kept:
                body = {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}
                deleted = await self._call("kv/deleterange", body)
                gone += int(deleted.get("deleted", 0)) > 0  # 0: another replica forgot it meanwhile
            start = prefix_end(prefix)
        return gone

    # Leader lease

    async def lead(self, name: str, holder: str, ttl: float) -> bool:
        check_lease(name, holder, ttl)
        key = _LEASES + name
        kv = await self._get(key)
        if kv is not None:
            if _text(kv) != holder:
                return False  # the key outlives no lease: its holder's is live
            # Ours when read. A TTL of 0 means the lease expired since: another replica may lead now.
            answer = await self._call("lease/keepalive", {"ID": kv.get("lease", "0")})
            return int(answer.get("result", {}).get("TTL", 0)) > 0
        lease = str((await self._call("lease/grant", {"TTL": str(math.ceil(ttl))}))["ID"])
        body = {"compare": [_created_by_no_one(key)], "success": [_put(key, holder, lease)], "failure": [_read(key)]}
        response = await self._call("kv/txn", body)
        if response.get("succeeded"):
            return True
        await self._revoke(lease)
        stored = _failure_read(response)
        return stored is not None and _text(stored) == holder  # taken by a call of the same holder meanwhile

    async def resign(self, name: str, holder: str) -> None:
        check_lease(name, holder)
        key = _LEASES + name
        kv = await self._get(key)
        if kv is None or _text(kv) != holder:
            return
        # Revoking the lease deletes the key with it; if the lease expired since the read and another holder took
        # the key, that key is under the other holder's lease and stays.
        await self._revoke(kv.get("lease", "0"))

    async def _revoke(self, lease: str) -> None:
        if lease == "0":
            return
        with contextlib.suppress(StoreError):  # left alone, a lease ends at its TTL, and an expired one is gone
            await self._call("lease/revoke", {"ID": lease})

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._etcd.aclose()
