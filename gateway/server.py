"""Listeners, the per-process runtime, config reload and graceful shutdown.

`Runtime` is the state one serving process keeps: the live `RouteTable` snapshot, the upstream pools and
endpoints (which outlive snapshots), open client connections, and the background tasks (sweeper, health
checks). `serve()` runs a whole gateway in one process; supervisor.py runs the same pieces split between a
supervisor (admin, reload) and N workers (data listeners on SO_REUSEPORT sockets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from gateway.accesslog import AccessLog
from gateway.admin import AdminState, Hops, admin_handler, requests_handler
from gateway.balancer import Endpoint
from gateway.config import Config, ConfigError
from gateway.deadlines import Deadlines
from gateway.discovery import Discovery
from gateway.health import HealthChecks
from gateway.otlp import TIMEOUT as EXPORT_TIMEOUT
from gateway.otlp import Exporter
from gateway.proxy import DownstreamProtocol, Listener
from gateway.routing import RouteTable, ServiceLoad
from gateway.telemetry import Metrics, Snapshot, snapshot
from gateway.tracing import HopRing, hop_to_dict
from gateway.units import Address
from gateway.upstream import Pool

log = logging.getLogger("meshgate.gateway")

SWEEP_INTERVAL = 0.5
# Idle upstream connections are closed well before common servers' own keep-alive timeouts (uvicorn and
# Node.js use 5 s), so a request is never written onto a connection the server is closing at that moment.
UPSTREAM_IDLE_TIMEOUT = 3.0
DATA_LISTENERS = ("inbound", "edge", "outbound")


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


class Runtime:
    """The serving state of one process. `apply()` swaps in a new snapshot; requests in flight keep theirs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.limits = config.gateway.limits
        self.table: RouteTable | None = None
        self.version = 0
        self.pools: dict[Address, Pool] = {}
        self.endpoints: dict[tuple[str, Address], Endpoint] = {}
        self.connections: set[DownstreamProtocol] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.health = HealthChecks(self)
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
        self.dashboard_handler = requests_handler(lambda request_id: self.mesh_lookup(request_id))
        self.peer_tls: ssl.SSLContext | None = None

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
                if conn.tunnel is not None:
                    continue  # an upgraded connection lives until either side closes it
                if conn.exchange is not None or conn.write_paused:
                    conn.check_progress(now, limits)
                if conn.closed:
                    continue
                parsing = conn.parsing
                if conn.in_head and parsing is not None and not parsing.method and not parsing.done:
                    if now - conn.head_start > limits.header_timeout:
                        conn.refuse(408, f"request headers not complete within {limits.header_timeout:g}s")
                elif conn.exchange is None:
                    limit = limits.idle_timeout if conn.parsing is not None else limits.header_timeout
                    if now - conn.idle_since > limit:
                        conn.close()
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
                conn.closing = True
                if conn.exchange is None:
                    conn.close()
            if not self.connections or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.transport.abort()
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


def bind_socket(address: Address, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((address.host, address.port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def listener_addresses(config: Config) -> dict[str, Address]:
    listen = config.gateway.listen
    found = {"inbound": listen.inbound, "outbound": listen.outbound, "admin": listen.admin}
    if listen.edge is not None:
        found["edge"] = listen.edge
    if listen.metrics is not None:
        found["metrics"] = listen.metrics
    return found


def server_tls(config: Config) -> ssl.SSLContext | None:
    """Inbound mTLS for a standalone gateway with a `tls` block: peers must present a cert from `ca`."""
    tls = config.gateway.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca)
    context.load_cert_chain(tls.cert, tls.key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def data_listener(kind: str, runtime: Runtime, tls: ssl.SSLContext | None) -> Listener:
    group = runtime.config.gateway.group
    if kind == "edge":  # trust follows `trusted_proxies` and `preserve_request_id`, decided per connection
        return Listener(kind, runtime, "external", reporter="destination")
    if kind == "outbound":
        return Listener(kind, runtime, group, trusted=True, reporter="source")
    return Listener(kind, runtime, "unknown", scheme=b"https" if tls else b"http", reporter="destination")


async def start_listener(
    listener: Listener, sock: socket.socket, tls: ssl.SSLContext | None = None
) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    if listener.reporter is not None:
        listener.runtime.listener_kinds.add(listener.kind)
    return await loop.create_server(lambda: DownstreamProtocol(listener, loop), sock=sock, backlog=1024, ssl=tls)


def describe(sockets: dict[str, socket.socket]) -> str:
    return " ".join(f"{kind}={format_sockname(sock)}" for kind, sock in sockets.items())


def format_sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConfigFile:
    """The config file a standalone gateway runs from; reloaded on SIGHUP and when it changes on disk."""

    def __init__(self, path: str, advertise: str | None = None) -> None:
        self.path = path
        self.advertise = advertise  # `--advertise`, which every reload keeps
        self.signature = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def changed(self) -> bool:
        signature = self._stat()
        if signature == self.signature:
            return False
        self.signature = signature
        return True

    def load(self) -> Config:
        self.signature = self._stat()
        return Config.load(self.path, self.advertise)


class Reloader:
    """Validates a changed config and hands it on; a bad file is logged and the last good config stays."""

    def __init__(self, source: ConfigFile, state: AdminState, publish: Callable[[Config, int], None]) -> None:
        self.source = source
        self.state = state
        self.publish = publish

    def reload(self, reason: str) -> None:
        try:
            config = self.source.load()
        except ConfigError as exc:
            self.state.last_reload = f"rejected: {exc}"
            log.error("config reload (%s) rejected, keeping version %d: %s", reason, self.state.version, exc)
            return
        live = self.state.config.gateway
        if (config.gateway.listen, config.gateway.tls) != (live.listen, live.tls):
            # Sockets and their TLS contexts are made once; report what is really serving, not the wish.
            log.warning("config reload (%s): gateway.listen and gateway.tls change only on restart; kept", reason)
            config = replace(config, gateway=replace(config.gateway, listen=live.listen, tls=live.tls))
        self.state.config = config
        self.state.version += 1
        self.state.last_reload = "ok"
        self.publish(config, self.state.version)
        log.info("config version %d applied (%s)", self.state.version, reason)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.source.changed():
                self.reload("file changed")


Publish = Callable[[Config, int, Peers | None], None]
Spawn = Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]


class Source(Protocol):
    """Where a gateway's config comes from: a file (standalone) or the control server (joined)."""

    server_tls: ssl.SSLContext | None  # the inbound listener's, made before any config arrives
    client_tls: ssl.SSLContext | None  # for dialing peer gateways

    def start(self, state: AdminState, publish: Publish, addresses: dict[str, Address], spawn: Spawn) -> None:
        """Publish the first config if there is one, and keep publishing changes (and `state.ready`)."""

    async def close(self) -> None: ...


class FileSource:
    """A standalone gateway's YAML file: reloaded on SIGHUP and when it changes on disk."""

    def __init__(self, path: str, config: Config, advertise: str | None = None) -> None:
        self.file = ConfigFile(path, advertise)
        self.server_tls = server_tls(config)
        self.client_tls: ssl.SSLContext | None = None  # standalone gateways dial no peers

    def start(self, state: AdminState, publish: Publish, addresses: dict[str, Address], spawn: Spawn) -> None:
        state.version = 1
        publish(state.config, state.version, None)
        state.ready = True
        reloader = Reloader(self.file, state, lambda config, version: publish(config, version, None))
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
        spawn(reloader.watch())

    async def close(self) -> None:
        pass


async def serve(config: Config, drain_timeout: float, source: Source) -> None:
    """Run a whole gateway in this process until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    runtime = Runtime(config)
    state = AdminState(config=config, stats=runtime.stats, lookup=runtime.lookup)
    sockets = {kind: bind_socket(address, reuse_port=False) for kind, address in listener_addresses(config).items()}
    runtime.peer_tls = source.client_tls
    addresses = {kind: Address(*sock.getsockname()[:2]) for kind, sock in sockets.items()}
    discovery = Discovery(state, runtime.apply, runtime.spawn)
    source.start(state, discovery.publish, addresses, runtime.spawn)
    servers = []
    for kind, sock in sockets.items():
        if kind in DATA_LISTENERS:
            tls = source.server_tls if kind == "inbound" else None
            servers.append(await start_listener(data_listener(kind, runtime, tls), sock, tls))
        else:
            local = admin_handler(state, metrics_only=kind == "metrics")
            servers.append(await start_listener(Listener(kind, runtime, "unknown", local=local), sock))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    runtime.start_background()
    log.info("meshgate gateway %s listening %s", config.gateway.group, describe(sockets))
    await stop.wait()
    log.info("draining %d connections (up to %gs)", len(runtime.connections), drain_timeout)
    await runtime.drain(servers, drain_timeout)
    await discovery.close()
    await source.close()
    log.info("stopped")
