"""The state one serving process keeps, shared by the layers that handle requests and those that feed them.

`Runtime` holds the live `RouteTable` snapshot, the upstream pools and endpoints (which outlive snapshots), the
open client connections, the telemetry sinks and the background tasks (sweeper, health checks). `apply()` swaps
in a new snapshot; requests in flight keep theirs. `AdminState` is what the admin endpoints report, `Peers` what
joining a mesh adds, and `Publish`/`Spawn` how config sources hand over configs and start tasks.

Layers above (exchange, proxy, admin; the config sources and the server) import this module; it imports only the
layers below (docs/architecture.md). The client connections it sweeps and drains are seen through `Connection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.accesslog import AccessLog
from gateway.balancer import Endpoint
from gateway.config import Config, Limits
from gateway.deadlines import Deadlines
from gateway.exporter import EXPORT_TIMEOUT, Exporter
from gateway.health import HealthChecks
from gateway.hops import HopRing, hop_to_dict
from gateway.routing import RouteTable, ServiceLoad
from gateway.telemetry import PAGE_SIZE, ZERO_BASED, Metrics, Snapshot, SnapshotCollector
from gateway.units import Address
from gateway.upstream import Pool

log = logging.getLogger("meshgate.gateway")

SWEEP_INTERVAL = 0.5
# Idle upstream connections are closed well before common servers' own keep-alive timeouts (uvicorn and
# Node.js use 5 s), so a request is never written onto a connection the server is closing at that moment.
UPSTREAM_IDLE_TIMEOUT = 3.0

LocalAnswer = tuple[int, str, bytes]
# (method, target, peer, headers by lower-case name): headers for content negotiation (OpenMetrics on /metrics)
LocalHandler = Callable[[bytes, bytes, bytes, dict[bytes, bytes]], LocalAnswer | Awaitable[LocalAnswer]]


class Connection(Protocol):
    """A client connection as the runtime sees it (proxy.DownstreamProtocol)."""

    @property
    def kind(self) -> str:
        """The listener it arrived on: inbound, edge, outbound, admin or metrics."""
        ...

    def sweep(self, now: float, limits: Limits) -> None:
        """Enforce the header, body, send and idle timeouts (`Runtime.sweep`, twice a second)."""
        ...

    def drain(self) -> None:
        """Shutting down: close now if idle, else after the request in flight."""
        ...

    def abort(self) -> None: ...


Hops = list[dict[str, Any]]


@dataclass(slots=True)
class AdminState:
    """What the admin endpoints report: the live config, its version, the last reload's outcome, the golden
    signals (`stats`) and the recent hop records (`lookup`) of this process or of all workers."""

    config: Config
    stats: Callable[[], Snapshot]
    lookup: Callable[[bytes], Hops | Awaitable[Hops]]
    version: int = 0
    ready: bool = False  # a config is loaded (and, joined, a certificate)
    last_reload: str = "ok"
    # What else keeps /ready at 503, or None: discovery's first answers, as Envoy warms a cluster before serving.
    waiting: Callable[[], str | None] = lambda: None
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=False))

    def __post_init__(self) -> None:
        self.registry.register(_StateCollector(self))
        self.registry.register(SnapshotCollector(lambda: self.stats()))


class _StateCollector(Collector):
    def __init__(self, state: AdminState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("meshgate_config_version", "Version of the live gateway config", self.state.version)
        yield GaugeMetricFamily(
            "meshgate_config_last_reload_success",
            "1 if the last config reload was applied, 0 if it was rejected",
            1 if self.state.last_reload == "ok" else 0,
        )


@dataclass(frozen=True, slots=True)
class Peers:
    """Joined to a mesh: the services other groups own, and their gateways' addresses with the SPIFFE ID each
    must prove."""

    services: frozenset[str] = frozenset()
    addresses: Mapping[Address, str] = field(default_factory=dict)
    trust_domain: str | None = None  # peers' SPIFFE IDs must be in it; None (standalone): the CA file decides
    ca_pem: bytes = b""  # the mesh CA: span export to the dashboard over HTTPS trusts it besides the system's
    # Span export to the dashboard itself carries the join token (control.export_headers); to others, nothing.
    export_headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    def export_verify(self) -> ssl.SSLContext | bool:
        """How span export checks its collector: the system's CAs, plus the mesh CA when joined."""
        if not self.ca_pem:
            return True
        context = ssl.create_default_context()
        context.load_verify_locations(cadata=self.ca_pem.decode("ascii"))
        return context

    @property
    def dashboard_id(self) -> str | None:
        """The dashboard's SPIFFE ID: the one identity whose connections may look up hop records."""
        return f"spiffe://{self.trust_domain}/dashboard" if self.trust_domain else None


Publish = Callable[[Config, int, Peers | None], None]
Spawn = Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]


class Runtime:
    """The serving state of one process. `apply()` swaps in a new snapshot; requests in flight keep theirs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.limits = config.gateway.limits
        self.table: RouteTable | None = None
        self.version = 0
        self.pools: dict[Address, Pool] = {}
        self.endpoints: dict[tuple[str, Address], Endpoint] = {}
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.health = HealthChecks(self.spawn, self.endpoints, self.invalidate_balancers)
        self.deadlines = Deadlines()
        self.metrics = Metrics()
        self.ring = HopRing(config.gateway.telemetry.recent_requests)
        self.sampling = config.gateway.telemetry.tracing.sampling
        self.access_log: AccessLog | None = None
        self.exporter: Exporter | None = None
        self.exporter_key: tuple[object, ...] = (None, b"", {})  # what the exporter was made for
        self.wall_offset = time.time() - time.monotonic()  # hop records carry wall-clock times
        self.telemetry_tasks: dict[int, asyncio.Task[Any]] = {}
        self.loads: dict[str, ServiceLoad] = {}
        self.listener_kinds: set[str] = set()  # the data listeners this process serves
        self.peers = Peers()
        # Hop records for the dashboard, over its mTLS connection to the inbound listener. A worker replaces
        # `mesh_lookup` with one that asks its supervisor, which asks every worker.
        self.mesh_lookup: Callable[[bytes], Hops | Awaitable[Hops]] = self.lookup
        self.peer_tls: ssl.SSLContext | None = None
        self.peer_tls_h2: ssl.SSLContext | None = None  # the same identity, offering ALPN h2 (h2client.py)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Start a background task, keep a reference until it ends, and log it if it fails."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    def configure_telemetry(self, config: Config) -> None:
        """Start, change or stop the access log and span export to match `config` (also on reload)."""
        telemetry = config.gateway.telemetry
        self.sampling = telemetry.tracing.sampling
        if telemetry.recent_requests != self.ring.size:
            self.ring = HopRing(telemetry.recent_requests)
        target = None if telemetry.access_log == "off" else telemetry.access_log
        if (self.access_log.target if self.access_log else None) != target:
            self.access_log, old_log = (AccessLog(target, self.metrics) if target else None), self.access_log
            self._restart(old_log, self.access_log)
        endpoint = telemetry.tracing.endpoint
        wanted = (endpoint, self.peers.ca_pem, self.peers.export_headers)
        if self.exporter_key != wanted:
            self.exporter_key = wanted
            verify, headers = self.peers.export_verify(), self.peers.export_headers
            self.exporter, old_exporter = (
                (Exporter(endpoint, config.gateway.group, self.metrics, verify, headers) if endpoint else None),
                self.exporter,
            )
            self._restart(old_exporter, self.exporter)

    def _restart(self, old: AccessLog | Exporter | None, new: AccessLog | Exporter | None) -> None:
        task = self.telemetry_tasks.pop(id(old), None) if old is not None else None
        if task is not None:
            task.cancel()
        if new is not None:
            self.telemetry_tasks[id(new)] = self.spawn(new.run())

    def apply(self, config: Config, version: int, peers: Peers | None = None) -> None:
        if peers is not None:
            self.peers = peers
            # A pool whose address became (or stopped being) a peer gateway, or whose peer must now prove another
            # identity (our trust domain arrives with our first certificate), is replaced with its endpoints.
            changed = {address for address, pool in self.pools.items() if pool.peer_id != peers.addresses.get(address)}
            for address in changed:
                self.pools.pop(address).close()
            for key in [key for key in self.endpoints if key[1] in changed]:
                del self.endpoints[key]
        self.configure_telemetry(config)
        table = RouteTable(config, self.endpoint, version, self.load, self.peers.services)
        self.config, self.table, self.version = config, table, version
        self.limits = config.gateway.limits
        live = {
            (name, ep.address)
            for name, svc in table.services.items()
            for sub in svc.subsets.values()
            for ep in sub.balancer.endpoints
        }
        for key in [key for key in self.endpoints if key not in live]:
            del self.endpoints[key]
        addresses = {address for _, address in live}
        for address in [address for address in self.pools if address not in addresses]:
            self.pools.pop(address).close()
        self.health.reconcile(table)

    def load(self, service: str) -> ServiceLoad:
        load = self.loads.get(service)
        if load is None:
            load = self.loads[service] = ServiceLoad(SWEEP_INTERVAL)
        return load

    def endpoint(self, service: str, address: Address) -> Endpoint:
        key = (service, address)
        endpoint = self.endpoints.get(key)
        if endpoint is None:
            pool = self.pools.get(address)
            if pool is None:
                peer_id = self.peers.addresses.get(address)
                pool = self.pools[address] = Pool(address, self.peer_tls if peer_id else None, peer_id)
            endpoint = self.endpoints[key] = Endpoint(address, pool)
        return endpoint

    def start_background(self) -> None:
        self.spawn(self.sweep())
        self.spawn(self.metrics.watch_loop_lag())

    def stats(self) -> Snapshot:
        return snapshot(self)

    def lookup(self, request_id: bytes) -> list[dict[str, Any]]:
        return [hop_to_dict(hop) for hop in self.ring.get(request_id)]

    def invalidate_balancers(self) -> None:
        if self.table is not None:
            for service in self.table.services.values():
                for subset in service.subsets.values():
                    subset.balancer.invalidate()

    async def sweep(self) -> None:
        """Enforce header, body, send and idle timeouts, expire idle upstream connections and move the retry
        budgets' window, twice a second.

        One periodic pass instead of a timer per connection keeps timers off the hot path.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = loop.time()
            limits = self.limits
            for conn in list(self.connections):
                conn.sweep(now, limits)
            for pool in self.pools.values():
                pool.expire(now - UPSTREAM_IDLE_TIMEOUT)
            for load in self.loads.values():
                load.tick()

    async def drain(self, servers: list[asyncio.AbstractServer], timeout: float) -> None:
        """Stop accepting, let requests in flight finish (up to `timeout`), then close everything."""
        for server in servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for conn in list(self.connections):
                conn.drain()
            if not self.connections or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        for pool in self.pools.values():
            pool.close()
        await self.health.close()
        self.deadlines.close()
        if self.exporter is not None:
            # One bounded last flush: shutdown must not wait on a collector's health.
            exporter_task = self.telemetry_tasks.pop(id(self.exporter), None)
            if exporter_task is not None:
                exporter_task.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.exporter.flush(), EXPORT_TIMEOUT)
            self.exporter.drop_queued()
        for task in list(self.tasks):
            task.cancel()


def snapshot(runtime: Runtime) -> Snapshot:
    """Everything /metrics shows for this process, as plain (picklable) data."""
    metrics = runtime.metrics
    now = time.monotonic()
    gauges: dict[tuple[str, tuple[str, ...]], float] = {}

    def gauge(name: str, value: float, *labels: str) -> None:
        gauges[(name, labels)] = gauges.get((name, labels), 0) + value

    counters = dict(metrics.counters)
    for kind in runtime.listener_kinds:
        gauge("meshgate_open_connections", 0, kind)  # a quiet listener reads 0, not "no data"
    if runtime.table is not None:
        for service in runtime.table.services.values():
            gauge("meshgate_inflight_requests", service.load.active, service.name)
            gauge("meshgate_pending_requests", service.load.pending, service.name)
            for name in ZERO_BASED:
                counters.setdefault((name, service.name), 0)
            distinct = {id(ep): ep for subset in service.subsets.values() for ep in subset.balancer.endpoints}
            for endpoint in distinct.values():
                gauge("meshgate_upstream_connections_active", endpoint.active, service.name)
                gauge("meshgate_upstream_connections_idle", len(endpoint.pool.idle), service.name)
                gauge("meshgate_endpoints_ejected", endpoint.ejected_until > now, service.name)
                gauge("meshgate_endpoints_unhealthy", not endpoint.healthy, service.name)
    for (name, _), endpoint in runtime.endpoints.items():
        key = ("meshgate_outlier_ejections_total", name)
        counters[key] = counters.get(key, 0) + endpoint.ejections
    for conn in runtime.connections:
        gauge("meshgate_open_connections", 1, conn.kind)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * PAGE_SIZE
    return {
        "series": {key: (dict(s.codes), list(s.buckets), s.sum) for key, s in metrics.series.items()},
        "exemplars": {key: dict(s.exemplars) for key, s in metrics.series.items() if s.exemplars},
        "moved": {key: dict(s.moved) for key, s in metrics.series.items() if s.moved},
        "counters": counters,
        "gauges": gauges,
        "loop_lag": metrics.loop_lag,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss": rss,
    }
