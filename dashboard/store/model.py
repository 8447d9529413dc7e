"""Where the dashboard keeps its state: the versioned mesh document, the audit log, API tokens, gateways, and the
automated canary rollouts (each service's rollout document, each rollout's log, and the leader lease that lets one
dashboard replica drive them).

`Store` is the interface the API uses; `dashboard.store.sqlite` and `dashboard.store.etcd` implement it, and
`dashboard.store.open_store` picks one.

Every config change is a commit: a new `Revision` (version = previous + 1, never reused) holding the whole mesh and
a human diff, plus an `AuditEntry`, written atomically. `wait_for_change` is what a gateway's long-poll `sync`
waits on. Writes that are not config changes (tokens, joins) are audited through `record_audit`.

An audit entry's `before`/`after` hold the part of the mesh named by the commit's `target`, a path of names
separated by "/" (names never contain "/"): `services/catalog`, `services/catalog/subsets/v2`, `groups/shop`.
`mesh` (or "") means the whole document; a part that does not exist on one side is None.

A rollout document is written by compare-and-set on its `RolloutRecord.revision`, so two replicas (or a replica
and an operator) never overwrite each other's step; its log is keyed by sequence number, so a retried append
rewrites what it already wrote instead of repeating it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from dashboard.errors import DashboardError
from dashboard.mesh import EMPTY, Mesh
from gateway.config import _is_name  # the mesh's name rule (private there), as dashboard.mesh uses it

_T = TypeVar("_T")
DB_FILE = "mesh.db"
ROLES = ("operator", "viewer", "gateway")
MAX_GATEWAYS_PER_GROUP = 1024  # records a group keeps; a new gateway beyond that replaces the least recently heard
MAX_LOG_BATCH = 100  # log entries one append may hold: one etcd txn takes at most 128 operations
MAX_LOG_SEQ = 10**12 - 1  # log sequence numbers are 0..MAX_LOG_SEQ (etcd keys hold them as 12 digits)
LogEntry = tuple[int, dict[str, Any]]  # a rollout log entry: (sequence number, JSON object)
_LEASE_NAME = re.compile(r"[a-z0-9-]{1,64}")  # rollout IDs and lease names


class StoreError(DashboardError):
    """The store cannot be reached or used (etcd down, unreadable database). `str(err)` is one line."""

    status = 503
    headers = {"retry-after": "1"}

    @property
    def reason(self) -> str:
        return f"the config store is unavailable: {self}"


class VersionConflict(DashboardError):
    """A commit said which version it edits (`expect_version`, from If-Match) and that is no longer current."""

    status = 409

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"config version {expected} is not current (current is {current})")
        self.expected = expected
        self.current = current


class RolloutConflict(DashboardError):
    """A rollout write named a revision (`expect`, 0 for "none stored yet") that is not the stored one."""

    status = 409

    def __init__(self, service: str, expected: int, current: int) -> None:
        stored = f"revision {current} is stored" if current else "none is stored"
        super().__init__(f"the rollout of {service!r} is not at revision {expected} ({stored})")
        self.service = service
        self.expected = expected
        self.current = current


@dataclass(frozen=True, slots=True)
class Revision:
    """One version of the mesh. Version 0 is the empty mesh before the first commit."""

    version: int
    mesh: dict[str, Any]  # shared between readers: treat it as read-only
    author: str
    reason: str
    time: float
    diff: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One write: who did what to which target, the target before and after, and why. `version` is the config
    version a commit created, None for writes that are not config changes."""

    id: int
    time: float
    who: str
    action: str
    target: str
    before: object
    after: object
    reason: str
    version: int | None


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """An API token, kept only as its sha256 `digest`. `role` is one of `ROLES`; `group` is set for gateway
    join tokens, which may only obtain that group's identity."""

    id: str
    digest: str
    role: str
    group: str | None
    name: str
    created: float


@dataclass(frozen=True, slots=True)
class GatewayRecord:
    """A gateway's last heartbeat: `data` is what the dashboard keeps of its body (`dashboard.api.heartbeats`), `seen`
    when it arrived. A gateway is known by its group and instance together (`key`), so a join token of one group
    never reaches another group's records. Its `stats` (the golden-signal numbers, the bulk of a heartbeat) are
    stored apart and read only when asked for: /sync reads every record each time it wakes and needs none of them.
    """

    instance: str
    group: str
    data: dict[str, Any]
    seen: float

    @property
    def key(self) -> str:
        return f"{self.group}/{self.instance}"  # names never contain "/"


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    """A service's rollout, running or the last one ended: `data` is its JSON document (dashboard.rollout owns
    its shape), `revision` the store's compare-and-set token for it (> 0)."""

    service: str
    data: dict[str, Any]
    revision: int


class Store(Protocol):
    """The dashboard's state, shared by every replica that opens the same store. Methods are coroutines.

    >>> async def canary(store: Store) -> int:
    ...     current = await store.current()
    ...     mesh = Mesh.parse(current.mesh).with_weights("catalog", {"v1": 90, "v2": 10})
    ...     revision = await store.commit(mesh.to_dict(), author="ops", reason="canary", action="set-weights",
    ...                                   target="services/catalog", expect_version=current.version)
    ...     return revision.version
    """

    async def current(self) -> Revision: ...

    async def get(self, version: int) -> Revision | None: ...

    async def history(self, limit: int = 50, before: int | None = None) -> list[Revision]:
        """Newest first, versions below `before` when given."""
        ...

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
        """Validate `mesh` and store it as version current+1 with its diff and an audit entry, atomically, then
        wake waiters. Raises `VersionConflict` if `expect_version` is given and not current, `ConfigError` if
        the mesh is invalid."""
        ...

    async def audit(self, limit: int = 100, before: int | None = None) -> list[AuditEntry]:
        """Newest first, ids below `before` when given."""
        ...

    async def record_audit(
        self, *, who: str, action: str, target: str, before: object, after: object, reason: str
    ) -> AuditEntry: ...

    async def wait_for_change(self, after_version: int, timeout: float) -> Revision | None:
        """The current revision as soon as its version is above `after_version`; None after `timeout` seconds."""
        ...

    async def add_token(self, record: TokenRecord) -> None:
        """Raises `ValueError` if a token with that digest exists."""
        ...

    async def find_token(self, digest: str) -> TokenRecord | None: ...

    async def tokens(self) -> list[TokenRecord]: ...

    async def put_gateway(self, record: GatewayRecord, max_per_group: int = MAX_GATEWAYS_PER_GROUP) -> None:
        """Store `record` in place of the one with its group and instance. A group keeps at most `max_per_group`:
        a new gateway beyond that replaces the one of its group heard from least recently."""
        ...

    async def gateways(self, stats: bool = False) -> list[GatewayRecord]:
        """Every gateway on record, by group and instance (the API decides staleness from `seen`); with `stats`,
        each record's data also holds the `stats` of its heartbeat."""
        ...

    async def forget_gateways(self, before: float) -> int:
        """Delete the records of gateways last heard from before `before`; how many went."""
        ...

    async def rollouts(self) -> list[RolloutRecord]:
        """Every stored rollout, sorted by service."""
        ...

    async def get_rollout(self, service: str) -> RolloutRecord | None: ...

    async def put_rollout(self, service: str, data: Mapping[str, Any], expect: int) -> RolloutRecord:
        """Store `data` as the service's rollout, atomically, if the stored revision is `expect` (0: if none is
        stored); the new record. Raises `RolloutConflict` otherwise, and `ValueError` for a bad service name."""
        ...

    async def delete_rollout(self, service: str) -> None:
        """Forget the service's rollout (as when the service is deleted); nothing happens if none is stored."""
        ...

    async def append_rollout_log(self, rollout_id: str, entries: Sequence[LogEntry]) -> None:
        """Store `entries` (at most `MAX_LOG_BATCH`) in the log of rollout `rollout_id`, atomically. An entry
        whose sequence number is stored replaces it, so a retried append is idempotent. Raises `ValueError` for
        a bad ID, sequence number or entry."""
        ...

    async def rollout_log(self, rollout_id: str, after: int = -1, limit: int = 1000) -> list[LogEntry]:
        """The log's entries numbered above `after`, ascending, at most `limit`."""
        ...

    async def forget_rollout_logs(self, keep: Collection[str]) -> int:
        """Delete the log of every rollout ID not in `keep`; how many IDs went."""
        ...

    async def lead(self, name: str, holder: str, ttl: float) -> bool:
        """Whether `holder` holds the lease `name` for the next `ttl` seconds: taken when free or expired, renewed
        when `holder` holds it, False while another holder's lease is live. Call it again well within `ttl`."""
        ...

    async def resign(self, name: str, holder: str) -> None:
        """Give the lease `name` up now if `holder` holds it, so another replica can take it at once."""
        ...

    async def close(self) -> None: ...


def empty_revision() -> Revision:
    return Revision(0, json.loads(json.dumps(EMPTY)), "", "", 0.0, ())


def canonical(mesh: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a mesh for a commit; raises `ConfigError`."""
    return Mesh.parse(mesh, source="mesh").to_dict()


def part(mesh: Mapping[str, Any], target: str) -> object:
    """The piece of `mesh` an audit entry records for `target` (see the module docstring)."""
    if target in ("", "mesh"):
        return mesh
    value: object = mesh
    for name in target.split("/"):
        if not isinstance(value, Mapping) or name not in value:
            return None
        value = value[name]
    return value


def split_stats(data: Mapping[str, Any]) -> tuple[dict[str, Any], object]:
    """A heartbeat's data without its `stats`, and the stats (None when it sent none): stored apart."""
    rest = dict(data)
    return rest, rest.pop("stats", None)


def check_service(service: str) -> str:
    if not _is_name(service):
        raise ValueError(f"not a service name: {service!r}")
    return service


def check_rollout_id(rollout_id: str) -> str:
    if not isinstance(rollout_id, str) or not _LEASE_NAME.fullmatch(rollout_id):
        raise ValueError(f"not a rollout ID ([a-z0-9-]{{1,64}}): {rollout_id!r}")
    return rollout_id


def check_lease(name: str, holder: str, ttl: float = 1.0) -> None:
    if not isinstance(name, str) or not _LEASE_NAME.fullmatch(name):
        raise ValueError(f"not a lease name ([a-z0-9-]{{1,64}}): {name!r}")
    if not isinstance(holder, str) or not holder:
        raise ValueError("a lease holder is a non-empty string")
    if not (isinstance(ttl, int | float) and math.isfinite(ttl) and ttl > 0):
        raise ValueError(f"a lease's ttl is a positive number of seconds, not {ttl!r}")


def encode_document(data: Mapping[str, Any]) -> str:
    """A rollout document or log entry as compact JSON; `ValueError` unless it is a JSON object."""
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a JSON object, not {type(data).__name__}")
    try:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"not JSON: {err}") from None


def log_window(after: int, limit: int) -> tuple[int, int]:
    """`rollout_log`'s bounds clamped to what can be stored: (-1..MAX_LOG_SEQ, 0..MAX_LOG_SEQ + 1)."""
    return max(-1, min(after, MAX_LOG_SEQ)), max(0, min(limit, MAX_LOG_SEQ + 1))


def encode_log(entries: Sequence[LogEntry]) -> dict[int, str]:
    """The entries of one append by sequence number, encoded; the last of repeated numbers wins, as it would
    if they came one call at a time."""
    if len(entries) > MAX_LOG_BATCH:
        raise ValueError(f"{len(entries)} log entries in one append (at most {MAX_LOG_BATCH})")
    encoded = {}
    for seq, entry in entries:
        if type(seq) is not int or not 0 <= seq <= MAX_LOG_SEQ:
            raise ValueError(f"a log sequence number is an integer in 0..{MAX_LOG_SEQ}, not {seq!r}")
        encoded[seq] = encode_document(entry)
    return encoded


class ChangeSignal:
    """Wakes every waiter at once: `notify` sets the event waiters hold and starts a new one."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    @property
    def event(self) -> asyncio.Event:
        return self._event


async def wait_for_version(
    current: Callable[[], Awaitable[Revision]], changes: ChangeSignal, after_version: int, timeout: float
) -> Revision | None:
    """`Store.wait_for_change` on top of `current()` and a signal that fires after every commit."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        event = changes.event  # taken before reading, so a commit in between still wakes us
        revision = await current()
        if revision.version > after_version:
            return revision
        remaining = deadline - loop.time()
        if remaining <= 0:
            return None
        with contextlib.suppress(TimeoutError):  # then one last read: the change may come from another process
            await asyncio.wait_for(event.wait(), remaining)
