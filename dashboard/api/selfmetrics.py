"""The dashboard's own metrics, on the registry it is given.

- `meshgate_dashboard_request_duration_seconds{route,method,code}`: API latency by route template and status.
- `meshgate_dashboard_store_duration_seconds{operation}`: store call latency (`TimedStore` wraps the store).
- `meshgate_dashboard_sync_watchers`: gateways waiting in a /sync long-poll.
- `meshgate_dashboard_auth_failures_total{via,answer}`: unknown or malformed bearer tokens (`via="token"`) and
  failed logins (`via="login"`), answered 401, or 429 once the client's address is over its budget
  (`dashboard.attempts`).
- `meshgate_dashboard_config_version`, `meshgate_dashboard_tokens{role}`, `meshgate_dashboard_gateways{state}`:
  read from the store when /metrics is scraped.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dashboard.rollout.spec import PHASES
from dashboard.store.model import (
    MAX_GATEWAYS_PER_GROUP,
    ROLES,
    AuditEntry,
    GatewayRecord,
    LogEntry,
    Revision,
    RolloutRecord,
    Store,
    TokenRecord,
)

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class DashboardMetrics:
    """The dashboard's metric families, registered once on `registry`.

    >>> metrics = DashboardMetrics(CollectorRegistry())
    >>> metrics.requests.labels("/api/v1/services", "GET", "200").observe(0.002)
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Histogram(
            "meshgate_dashboard_request_duration_seconds",
            "Dashboard HTTP request latency by route template, method and status code",
            ["route", "method", "code"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.store = Histogram(
            "meshgate_dashboard_store_duration_seconds",
            "Latency of calls to the config store",
            ["operation"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.watchers = Gauge(
            "meshgate_dashboard_sync_watchers", "Gateways waiting in a /sync long-poll", registry=registry
        )
        self.auth_failures = Counter(
            "meshgate_dashboard_auth_failures",
            "Unknown or malformed bearer tokens and failed logins, by answer (401, or 429 over the address's budget)",
            ["via", "answer"],
            registry=registry,
        )
        for via in ("token", "login"):  # every series from the first scrape, so rate() sees the first failure
            for answer in ("401", "429"):
                self.auth_failures.labels(via, answer)
        self.config_version = Gauge(
            "meshgate_dashboard_config_version", "The current config version", registry=registry
        )
        self.tokens = Gauge("meshgate_dashboard_tokens", "API tokens by role", ["role"], registry=registry)
        self.gateways = Gauge(
            "meshgate_dashboard_gateways", "Gateways known from heartbeats, live or stale", ["state"], registry=registry
        )
        self.rollout_phase = Gauge(
            "meshgate_rollout_phase",
            "1 for the phase a service's rollout (running or last ended) is in, 0 for the others",
            ["service", "phase"],
            registry=registry,
        )
        self.rollout_weight = Gauge(
            "meshgate_rollout_canary_weight", "The canary's weight in percent", ["service", "canary"], registry=registry
        )
        self.rollout_verdict = Gauge(
            "meshgate_rollout_verdict",
            "1 for the rollout's latest verdict (pass, hold, harm), 0 for the others",
            ["service", "verdict"],
            registry=registry,
        )
        self.rollout_events = Counter(
            "meshgate_rollout_events",
            "Rollout events for the events webhook, by outcome (sent, failed, dropped from a full queue)",
            ["outcome"],
            registry=registry,
        )
        self.rollout_evidence = Gauge(
            "meshgate_rollout_evidence",
            "The judge's evidence of harm (an e-value: rolled back at 1/alpha, 100 by default)",
            ["service"],
            registry=registry,
        )

    def rollouts(self, records: list[RolloutRecord]) -> None:
        """The rollout gauges, from the stored rollouts at scrape time."""
        metrics = self
        for gauge in (metrics.rollout_phase, metrics.rollout_weight, metrics.rollout_verdict, metrics.rollout_evidence):
            gauge.clear()  # a deleted service's rollout goes
        for record in records:
            data = record.data
            service = record.service
            for phase in PHASES:
                metrics.rollout_phase.labels(service, phase).set(data.get("phase") == phase)
            metrics.rollout_weight.labels(service, str(data.get("spec", {}).get("canary", ""))).set(
                data.get("weight", 0)
            )
            verdict = data.get("verdict") or {}
            for outcome in ("pass", "hold", "harm"):
                metrics.rollout_verdict.labels(service, outcome).set(verdict.get("outcome") == outcome)
            evidence = verdict.get("evidence")
            if isinstance(evidence, int | float):
                metrics.rollout_evidence.labels(service).set(evidence)


class RequestMetrics:
    """ASGI middleware: observes each request's latency under its route template (never the raw path)."""

    def __init__(self, app: ASGIApp, metrics: DashboardMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = template(scope.get("route"))
            self.metrics.requests.labels(route, scope["method"], str(status)).observe(time.perf_counter() - start)


def template(route: BaseRoute | None) -> str:
    return route.path if isinstance(route, Route) else "unmatched"


class TimedStore:
    """A `Store` that observes the latency of every call except the long wait for a change."""

    def __init__(self, store: Store, metrics: DashboardMetrics) -> None:
        self.inner = store
        self.histogram = metrics.store

    @asynccontextmanager
    async def _timed(self, operation: str) -> AsyncIterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.histogram.labels(operation).observe(time.perf_counter() - start)

    async def current(self) -> Revision:
        async with self._timed("current"):
            return await self.inner.current()

    async def get(self, version: int) -> Revision | None:
        async with self._timed("get"):
            return await self.inner.get(version)

    async def history(self, limit: int = 50, before: int | None = None) -> list[Revision]:
        async with self._timed("history"):
            return await self.inner.history(limit, before)

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
        async with self._timed("commit"):
            return await self.inner.commit(
                mesh, author=author, reason=reason, action=action, target=target, expect_version=expect_version
            )

    async def audit(self, limit: int = 100, before: int | None = None) -> list[AuditEntry]:
        async with self._timed("audit"):
            return await self.inner.audit(limit, before)

    async def record_audit(
        self, *, who: str, action: str, target: str, before: object, after: object, reason: str
    ) -> AuditEntry:
        async with self._timed("record_audit"):
            return await self.inner.record_audit(
                who=who, action=action, target=target, before=before, after=after, reason=reason
            )

    async def wait_for_change(self, after_version: int, timeout: float) -> Revision | None:
        return await self.inner.wait_for_change(after_version, timeout)

    async def add_token(self, record: TokenRecord) -> None:
        async with self._timed("add_token"):
            await self.inner.add_token(record)

    async def find_token(self, digest: str) -> TokenRecord | None:
        async with self._timed("find_token"):
            return await self.inner.find_token(digest)

    async def tokens(self) -> list[TokenRecord]:
        async with self._timed("tokens"):
            return await self.inner.tokens()

    async def put_gateway(self, record: GatewayRecord, max_per_group: int = MAX_GATEWAYS_PER_GROUP) -> None:
        async with self._timed("put_gateway"):
            await self.inner.put_gateway(record, max_per_group)

    async def gateways(self, stats: bool = False) -> list[GatewayRecord]:
        async with self._timed("gateways"):
            return await self.inner.gateways(stats)

    async def forget_gateways(self, before: float) -> int:
        async with self._timed("forget_gateways"):
            return await self.inner.forget_gateways(before)

    async def rollouts(self) -> list[RolloutRecord]:
        async with self._timed("rollouts"):
            return await self.inner.rollouts()

    async def get_rollout(self, service: str) -> RolloutRecord | None:
        async with self._timed("get_rollout"):
            return await self.inner.get_rollout(service)

    async def put_rollout(self, service: str, data: Mapping[str, Any], expect: int) -> RolloutRecord:
        async with self._timed("put_rollout"):
            return await self.inner.put_rollout(service, data, expect)

    async def delete_rollout(self, service: str) -> None:
        async with self._timed("delete_rollout"):
            await self.inner.delete_rollout(service)

    async def append_rollout_log(self, rollout_id: str, entries: Sequence[LogEntry]) -> None:
        async with self._timed("append_rollout_log"):
            await self.inner.append_rollout_log(rollout_id, entries)

    async def rollout_log(self, rollout_id: str, after: int = -1, limit: int = 1000) -> list[LogEntry]:
        async with self._timed("rollout_log"):
            return await self.inner.rollout_log(rollout_id, after, limit)

    async def forget_rollout_logs(self, keep: Collection[str]) -> int:
        async with self._timed("forget_rollout_logs"):
            return await self.inner.forget_rollout_logs(keep)

    async def lead(self, name: str, holder: str, ttl: float) -> bool:
        async with self._timed("lead"):
            return await self.inner.lead(name, holder, ttl)

    async def resign(self, name: str, holder: str) -> None:
        async with self._timed("resign"):
            await self.inner.resign(name, holder)

    async def close(self) -> None:
        await self.inner.close()


class MetricsEndpoint:
    """`GET /metrics`: Prometheus text. Counts that live in the store are read at scrape time, not kept in sync."""

    def __init__(self, metrics: DashboardMetrics, store: Store, stale_after: float) -> None:
        self.metrics = metrics
        self.store = store
        self.stale_after = stale_after

    async def endpoint(self, request: Request) -> Response:
        """---
        summary: The dashboard's own metrics (Prometheus text; no token needed, as for the gateways' /metrics)
        tags: [meta]
        security: []
        responses:
          "200": {description: Prometheus text exposition}
        """
        current = await self.store.current()
        tokens = await self.store.tokens()
        gateways = await self.store.gateways()
        now = time.time()
        self.metrics.config_version.set(current.version)
        for role in ROLES:
            self.metrics.tokens.labels(role).set(sum(token.role == role for token in tokens))
        stale = sum(now - record.seen > self.stale_after for record in gateways)
        self.metrics.gateways.labels("live").set(len(gateways) - stale)
        self.metrics.gateways.labels("stale").set(stale)
        self.metrics.rollouts(await self.store.rollouts())
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)
