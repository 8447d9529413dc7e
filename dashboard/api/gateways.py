"""The gateway side of the API: /ca, /join, /sync, /heartbeat, and what operators read about gateways and groups.

A gateway's *view* is what its group needs to serve: the full specs of the services it owns, and for every service
another group owns, that group and the advertise addresses of its live gateways. The view's hash is its etag, so
/sync answers 304 exactly when nothing this group sees changed, and a change elsewhere in the mesh does not wake
it. /sync long-polls on three things at once: a config commit (`Store.wait_for_change`, which an etcd store also
fires for commits made through another dashboard), a heartbeat that changes some group's live addresses (here),
and a tick of one heartbeat interval, which notices gateways going stale and heartbeats another replica took.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive

from dashboard.api.auth import GATEWAY, READ, Auth, check_group
from dashboard.api.bodies import JoinBody, convert_body, read_json
from dashboard.api.heartbeats import Heartbeat
from dashboard.api.operator import json_response
from dashboard.api.selfmetrics import DashboardMetrics
from dashboard.errors import HEADERS, ApiError
from dashboard.identity import IdentityError, MeshCA
from dashboard.settings import Settings
from dashboard.store.model import ChangeSignal, GatewayRecord, Store
from gateway.config import STREAM_TIMEOUTS

DEFAULT_WAIT = 30.0
MAX_HEARD = 4096  # instances remembered to notice membership changes; stale ones are dropped past this
FORGET_EVERY = 60.0  # seconds between looks for gateways silent for longer than Settings.forget_after

log = logging.getLogger("meshgate.dashboard")


def live_addresses(
    records: list[GatewayRecord], now: float, stale_after: float, since: float = 0.0
) -> dict[str, list[str]]:
    """Each group's live gateways' advertise addresses, sorted.

    Heartbeats missed before `since` (when this dashboard started) don't count: gateways kept serving while the
    dashboard was away, and routing must not forget them in the seconds before they heartbeat again.
    """
    live: dict[str, set[str]] = {}
    for record in records:
        advertise = record.data.get("advertise")
        if isinstance(advertise, str) and now - max(record.seen, since) <= stale_after:
            live.setdefault(record.group, set()).add(advertise)
    return {group: sorted(addresses) for group, addresses in live.items()}


def group_view(mesh: Mapping[str, Any], group: str, live: Mapping[str, list[str]]) -> dict[str, Any]:
    groups: Mapping[str, list[str]] = mesh["groups"]
    services = {name: mesh["services"][name] for name in groups.get(group, ())}
    remote = {
        name: {"group": owner, "gateways": list(live.get(owner, ())), **_stream_timeouts(mesh["services"][name])}
        for owner, members in groups.items()
        if owner != group
        for name in members
    }
    return {"services": services, "remote": remote}


def _stream_timeouts(service: Mapping[str, Any]) -> dict[str, Any]:
    """The timeouts a caller's gateway must apply to another group's service too: an HTTP/2 stream's idle and
    total time are the service's, at every hop, or the caller's hop would cut it by its own defaults."""
    timeouts = service.get("timeouts") or {}
    kept = {key: timeouts[key] for key in STREAM_TIMEOUTS if key in timeouts}
    return {"timeouts": kept} if kept else {}


def etag_of(view: Mapping[str, Any]) -> str:
    encoded = json.dumps(view, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:32]


async def first_of(*waits: Awaitable[object], timeout: float) -> None:
    """Wait until one of `waits` finishes or `timeout` passes, then cancel the rest; re-raise a failure.

    The tasks live only inside this call (cancelled and awaited before it returns), so none can leak or fail
    unnoticed, which is what the spawn() rule guards against.
    """
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error


def _group_of(data: object) -> object:
    return data.get("group") if isinstance(data, dict) else None


async def disconnected(receive: Receive) -> None:
    """Returns when the client goes away (the request body, if any, has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class GatewayApi:
    """The endpoints gateways call, plus /gateways and /groups for operators."""

    def __init__(self, settings: Settings, store: Store, auth: Auth, metrics: DashboardMetrics) -> None:
        self.settings = settings
        self.ca: MeshCA = settings.ca
        self.store = store
        self.auth = auth
        self.metrics = metrics
        self.membership = ChangeSignal()  # fired when a heartbeat changes some group's live addresses
        self._heard: dict[str, tuple[object, float]] | None = None  # GatewayRecord.key -> (advertise, seen)
        self.started = time.time()
        self._forget_at = 0.0  # when silent gateways are next looked for

    def routes(self) -> list[Route]:
        prefix = "/api/v1"
        return [
            Route(f"{prefix}/ca", self.get_ca, methods=["GET"]),
            Route(f"{prefix}/join", self.join, methods=["POST"]),
            Route(f"{prefix}/sync", self.sync, methods=["GET"]),
            Route(f"{prefix}/heartbeat", self.heartbeat, methods=["POST"]),
            Route(f"{prefix}/gateways", self.gateways, methods=["GET"]),
            Route(f"{prefix}/groups", self.groups, methods=["GET"]),
        ]

    async def get_ca(self, request: Request) -> Response:
        """---
        summary: The mesh root CA, its pin (kubeadm's sha256 of the SubjectPublicKeyInfo) and the trust domain
        tags: [gateways]
        security: []
        responses:
          "200": {description: "`{ca, ca_hash, trust_domain}`"}
        """
        return json_response(
            {"ca": self.ca.root_pem.decode(), "ca_hash": self.ca.ca_hash, "trust_domain": self.ca.trust_domain}
        )

    async def join(self, request: Request) -> Response:
        """---
        summary: Exchange a CSR for the group's X.509-SVID (also how a gateway renews it)
        tags: [gateways]
        requestBody:
          required: true
          content: {application/json: {schema: {$ref: "#/components/schemas/JoinBody"}}}
        responses:
          "200": {description: "`{certificate, ca, spiffe_id, not_after}`: leaf + intermediate PEM, root PEM"}
          "400": {$ref: "#/components/responses/Error"}
          "403": {$ref: "#/components/responses/Error"}
          "413": {$ref: "#/components/responses/Error"}
          "422": {$ref: "#/components/responses/Error"}
        """
        principal = await self.auth.require(request, GATEWAY)
        data = await read_json(request)
        check_group(principal, _group_of(data))  # another group's token is 403 whatever else is wrong
        body = convert_body(data, JoinBody)
        group = body.group
        try:
            issued = self.ca.sign_csr(body.csr.encode(), group, self.settings.cert_lifetime)
        except IdentityError as err:  # which field was wrong, for the one-line reason
            raise ApiError(422, f"csr: {err}") from None
        issued_record = {"spiffe_id": issued.spiffe_id, "serial": f"{issued.serial:x}", "not_after": issued.not_after}
        await self.store.record_audit(
            who=principal.who,
            action="identity.issue",
            target=f"groups/{group}",
            before=None,
            after=issued_record,
            reason="gateway join or renewal",
        )
        answer = {
            "certificate": issued.chain_pem.decode(),
            "ca": self.ca.root_pem.decode(),
            "spiffe_id": issued.spiffe_id,
            "not_after": issued.not_after,
        }
        return json_response(answer)

    async def sync(self, request: Request) -> Response:
        """---
        summary: Long-poll for this group's view of the mesh
        description: >-
          Answers at once when the view's etag differs from `after`, else waits up to `wait` seconds (at most the
          dashboard's `--sync-hold`) for a change and answers 304 with no body if none came. A 304 is the normal
          answer to a quiet spell: ask again at once.
        tags: [gateways]
        parameters:
          - {name: after, in: query, schema: {type: string}, description: the etag the gateway has}
          - {name: wait, in: query, schema: {type: number, minimum: 0, maximum: 60, default: 30}}
        responses:
          "200": {description: "`{etag, version, group, services, remote: {service: {group, gateways}}}`"}
          "304": {description: nothing this group sees changed within `wait`}
          "400": {$ref: "#/components/responses/Error"}
          "403": {$ref: "#/components/responses/Error"}
          "503": {$ref: "#/components/responses/Error"}
        """
        principal = await self.auth.require_gateway(request, request.query_params.get("group"))
        assert principal.group is not None  # every gateway token has one
        after = request.query_params.get("after", "").removeprefix("W/").strip('"')
        wait = self._wait_param(request)
        await self.forget_silent(time.time())
        if self.settings.stopping.is_set():
            # Long-polls waiting when shutdown began got their 304; one asked again now would get another at once,
            # and again: a stopping dashboard is unavailable, so gateways probe until it (or its successor) is back.
            raise ApiError(503, "the dashboard is shutting down", {"connection": "close", "retry-after": "1"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        gone = False
        self.metrics.watchers.inc()
        try:
            while True:
                membership = self.membership.event  # before reading: a heartbeat in between still wakes us
                revision = await self.store.current()
                records = await self.store.gateways()
                live = live_addresses(records, time.time(), self.settings.stale_after, self.started)
                view = group_view(revision.mesh, principal.group, live)
                etag = etag_of(view)
                if etag != after:
                    answer = {"etag": etag, "version": revision.version, "group": principal.group, **view}
                    return json_response(answer, headers={"etag": f'"{etag}"'})
                remaining = deadline - loop.time()
                if remaining <= 0 or gone or self.settings.stopping.is_set():
                    return Response(status_code=304, headers={**HEADERS, "etag": f'"{etag}"'})
                await first_of(
                    self.store.wait_for_change(revision.version, remaining),
                    membership.wait(),
                    self.settings.stopping.wait(),
                    disconnected(request.receive),
                    timeout=min(remaining, self.settings.heartbeat_interval),
                )
                gone = await request.is_disconnected()
        finally:
            self.metrics.watchers.dec()

    def _wait_param(self, request: Request) -> float:
        """How long to hold this long-poll: `wait` (refused beyond `max_wait`), cut to `sync_hold`."""
        text = request.query_params.get("wait")
        if text is None:
            return min(DEFAULT_WAIT, self.settings.max_wait, self.settings.sync_hold)
        try:
            wait = float(text)
        except ValueError:
            wait = -1.0
        if not 0 <= wait <= self.settings.max_wait:  # also refuses nan and inf
            raise ApiError(400, f"wait: expected seconds from 0 to {self.settings.max_wait:g}, got {text!r}")
        return min(wait, self.settings.sync_hold)

    async def heartbeat(self, request: Request) -> Response:
        """---
        summary: Report that a gateway is alive, what it serves and its stats
        tags: [gateways]
        requestBody:
          required: true
          content: {application/json: {schema: {$ref: "#/components/schemas/Heartbeat"}}}
        responses:
          "200": {description: "`{interval}`: seconds until the next heartbeat is due"}
          "400": {$ref: "#/components/responses/Error"}
          "403": {$ref: "#/components/responses/Error"}
          "413": {$ref: "#/components/responses/Error"}
          "422": {$ref: "#/components/responses/Error"}
        """
        principal = await self.auth.require(request, GATEWAY)
        data = await read_json(request)
        check_group(principal, _group_of(data))  # another group's token is 403 whatever else is wrong
        now = time.time()
        record = convert_body(data, Heartbeat).record(now)  # the known fields, each within its limit; the rest dropped
        heard = self._heard if self._heard is not None else await self._heard_before()  # before this one is stored
        await self.store.put_gateway(record)
        await self.forget_silent(now)
        stale_after = self.settings.stale_after
        if len(heard) > MAX_HEARD:  # instances of restarted gateways never come back
            heard = self._heard = {key: last for key, last in heard.items() if now - last[1] <= stale_after}
        advertise = record.data["advertise"]
        previous = heard.get(record.key)
        heard[record.key] = (advertise, now)
        if previous is None or previous[0] != advertise or now - previous[1] > stale_after:
            self.membership.notify()  # a new, moved or returning gateway: other groups' views change
        return json_response({"interval": self.settings.heartbeat_interval})

    async def _heard_before(self) -> dict[str, tuple[object, float]]:
        """What the store says was heard before this dashboard started, as /sync counts it live (from our start):
        after a restart, a gateway's first heartbeat is no news, so a fleet heartbeating again does not wake every
        long-poll once per gateway (N gateways, N wakeups of N watchers)."""
        records = await self.store.gateways()
        self._heard = {r.key: (r.data.get("advertise"), max(r.seen, self.started)) for r in records}
        return self._heard

    async def forget_silent(self, now: float) -> None:
        """Remove the gateways silent for `forget_after`, counted from this dashboard's start if later (its own
        downtime does not count against them). Looked for at most every FORGET_EVERY seconds, when a gateway calls
        or the list is read; until then a silent gateway is listed as stale."""
        cutoff = now - self.settings.forget_after
        if now < self._forget_at or cutoff < self.started:
            return
        self._forget_at = now + min(FORGET_EVERY, self.settings.forget_after)
        if forgotten := await self.store.forget_gateways(cutoff):
            log.info("forgot %d gateway(s) silent for more than %gs", forgotten, self.settings.forget_after)

    async def gateways(self, request: Request) -> Response:
        """---
        summary: Every gateway heard from, with its version, config in sync or not, heartbeat and certificate
        tags: [gateways]
        responses:
          "200":
            description: >-
              `[{instance, group, spiffe_id, meshgate_version, config_version, in_sync, last_heartbeat, stale,
              cert_not_after, advertise, listeners, uptime}]`
          "403": {$ref: "#/components/responses/Error"}
        """
        await self.auth.require(request, READ)
        return json_response(await self.describe_all())

    async def describe_all(self) -> list[dict[str, object]]:
        """Every gateway heard from, as `GET /gateways` lists them (the gateways page shows the same)."""
        await self.forget_silent(time.time())
        records = await self.store.gateways()
        current = await self.store.current()
        now = time.time()
        live = live_addresses(records, now, self.settings.stale_after, self.started)
        etags: dict[str, str] = {}
        listing = []
        for record in sorted(records, key=lambda record: (record.group, record.instance)):
            if record.group not in etags:
                etags[record.group] = etag_of(group_view(current.mesh, record.group, live))
            listing.append(self._describe(record, now, current.version, etags[record.group]))
        return listing

    def _describe(self, record: GatewayRecord, now: float, version: int, etag: str) -> dict[str, object]:
        data = record.data
        started = data.get("started")
        # The etag says exactly which view it applied; gateways that send none are judged by version.
        in_sync = data["etag"] == etag if data.get("etag") else data.get("config_version") == version
        return {
            "instance": record.instance,
            "group": record.group,
            "spiffe_id": f"spiffe://{self.ca.trust_domain}/group/{record.group}",
            "meshgate_version": data.get("meshgate_version"),
            "config_version": data.get("config_version"),
            "in_sync": in_sync,
            "last_heartbeat": record.seen,
            "stale": now - record.seen > self.settings.stale_after,
            "cert_not_after": data.get("cert_not_after"),
            "advertise": data.get("advertise"),
            "listeners": data.get("listeners", {}),
            "uptime": now - started if isinstance(started, int | float) and not isinstance(started, bool) else None,
        }

    async def groups(self, request: Request) -> Response:
        """---
        summary: Groups, the services each owns, and how many of its gateways are live or stale
        tags: [gateways]
        responses:
          "200": {description: "`[{name, services, gateways: {live, stale}}]`"}
          "403": {$ref: "#/components/responses/Error"}
        """
        await self.auth.require(request, READ)
        current = await self.store.current()
        records = await self.store.gateways()
        now = time.time()
        members: dict[str, list[str]] = dict(current.mesh["groups"])
        counts: dict[str, dict[str, int]] = {}
        for record in records:
            members.setdefault(record.group, [])
            state = "stale" if now - record.seen > self.settings.stale_after else "live"
            counts.setdefault(record.group, {"live": 0, "stale": 0})[state] += 1
        listing = [
            {"name": name, "services": services, "gateways": counts.get(name, {"live": 0, "stale": 0})}
            for name, services in sorted(members.items())
        ]
        return json_response(listing)
