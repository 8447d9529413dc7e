"""Where the dashboard keeps its state: the versioned mesh document, the audit log, API tokens and gateways.

`Store` is the interface the API uses; `dashboard.store.sqlite` and `dashboard.store.etcd` implement it, and
`dashboard.store.open_store` picks one.

Every config change is a commit: a new `Revision` (version = previous + 1, never reused) holding the whole mesh and
a human diff, plus an `AuditEntry`, written atomically. `wait_for_change` is what a gateway's long-poll `sync`
waits on. Writes that are not config changes (tokens, joins) are audited through `record_audit`.

An audit entry's `before`/`after` hold the part of the mesh named by the commit's `target`, a path of names
separated by "/" (names never contain "/"): `services/catalog`, `services/catalog/subsets/v2`, `groups/shop`.
`mesh` (or "") means the whole document; a part that does not exist on one side is None.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from dashboard.errors import DashboardError
from dashboard.mesh import EMPTY, Mesh

_T = TypeVar("_T")
DB_FILE = "mesh.db"
ROLES = ("operator", "viewer", "gateway")
MAX_GATEWAYS_PER_GROUP = 1024  # records a group keeps; a new gateway beyond that replaces the least recently heard


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
