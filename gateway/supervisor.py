"""`--workers N`: a supervisor process and N workers sharing the data listeners through SO_REUSEPORT.

The supervisor reserves the data ports (bound, never listening, so port 0 resolves once for everyone), starts
the workers, and owns what must exist once per gateway: the admin listener and the config source (reload on
SIGHUP and file changes, or the control-server watch, identity and heartbeats) with endpoint discovery behind it.
It hands each validated config, discovered endpoints filled in, to the workers over a pipe; each worker builds its
own snapshot. Limits, retry budgets and breakers are therefore per worker. A joined gateway's workers load the
certificate the supervisor keeps in the data directory, at start and whenever it is renewed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import socket
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import uvloop

from gateway.admin import admin_handler
from gateway.config import Config
from gateway.control import ControlSource, Identity
from gateway.discovery import Discovery
from gateway.proxy import Listener
from gateway.runtime import AdminState, Peers, Runtime
from gateway.server import (
    DATA_LISTENERS,
    bind_socket,
    data_listener,
    describe,
    edge_tls,
    listener_addresses,
    listener_tls,
    start_listener,
    watch_edge_tls,
)
from gateway.sources import Source, server_tls
from gateway.telemetry import Snapshot, merge
from gateway.units import Address

log = logging.getLogger("meshgate.supervisor")

READY_TIMEOUT = 30.0
STATS_INTERVAL = 1.0  # how stale a scrape of a multi-worker gateway may be
LOOKUP_TIMEOUT = 2.0


def supervise(config: Config, workers: int, drain_timeout: float, source: Source) -> None:
    uvloop.run(Supervisor(source, config, workers, drain_timeout).run())


@dataclass(slots=True)
class Worker:
    process: BaseProcess
    conn: Connection
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    def __init__(self, source: Source, config: Config, workers: int, drain_timeout: float) -> None:
        edge_tls(config)  # a certificate that does not load stops the start here, named, not in every worker
        self.source = source
        # Joined: workers load the identity the supervisor obtained from the files it keeps in the data directory.
        self.data_dir = source.settings.data_dir if isinstance(source, ControlSource) else None
        self.peers: Peers | None = None
        self.published: int | None = None  # the version of the last config published, None before the first
        self.runtime = Runtime(config)  # only for the admin listener's connections; it holds no routes
        self.state = AdminState(config=config, stats=self.stats, lookup=self.lookup)
        self.discovery = Discovery(self.state, self.broadcast, self.runtime.spawn)  # once, for every worker
        warming = self.state.waiting  # discovery's first answers
        self.state.waiting = lambda: self.starting() or warming()
        self.count = workers
        self.drain_timeout = drain_timeout
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[Worker] = []
        self.addresses: dict[str, Address] = {}
        self.stopping = False
        self.worker_stats: dict[int, Snapshot] = {}
        self.retired: Snapshot = merge([])  # the counters of workers that died and were replaced
        self.lookups: dict[int, tuple[asyncio.Future[None], list[dict[str, Any]], list[int]]] = {}
        self.tokens = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.state.config
        kinds = listener_addresses(config)
        # Bind everything before starting workers, so an address in use fails fast with nothing to clean up.
        reserved: dict[str, socket.socket] = {
            kind: bind_socket(kinds[kind], reuse_port=True) for kind in DATA_LISTENERS if kind in kinds
        }
        admin_sockets: dict[str, socket.socket] = {
            kind: bind_socket(kinds[kind], reuse_port=False) for kind in ("admin", "metrics") if kind in kinds
        }
        self.addresses = {kind: Address(*sock.getsockname()[:2]) for kind, sock in reserved.items()}
        admin_addresses = {kind: Address(*sock.getsockname()[:2]) for kind, sock in admin_sockets.items()}
        runtime = self.runtime
        servers = [
            await start_listener(
                Listener(kind, runtime, "unknown", local=admin_handler(self.state, metrics_only=kind == "metrics")),
                sock,
            )
            for kind, sock in admin_sockets.items()
        ]
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        try:
            # The source publishes its first config (if it has one yet) before any worker exists: workers start
            # from the current state, so none serves a moment without routes.
            if isinstance(self.source, ControlSource):
                self.source.identity_changed = self.broadcast_identity
            self.source.start(self.state, self.discovery.publish, {**self.addresses, **admin_addresses}, runtime.spawn)
            for _ in range(self.count):
                self.start_worker()
            await self.wait_ready()
            runtime.spawn(self.monitor())
            runtime.spawn(runtime.metrics.watch_loop_lag())
            log.info(
                "meshgate gateway %s (%d workers) listening %s",
                config.gateway.group,
                self.count,
                describe({**reserved, **admin_sockets}),
            )
            await stop.wait()
        finally:
            self.stopping = True
            await self.stop_workers()
            await runtime.drain(servers, 0.0)
            await self.discovery.close()
            await self.source.close()
            for sock in reserved.values():
                sock.close()
        log.info("stopped")

    def start_worker(self) -> None:
        parent, child = self.context.Pipe()
        process = self.context.Process(
            target=worker_main,
            args=(
                child,
                self.state.config,
                self.state.version,
                self.peers,
                self.addresses,
                self.drain_timeout,
                self.data_dir,
            ),
            name="meshgate-worker",
        )
        process.start()
        child.close()
        worker = Worker(process, parent)
        self.workers.append(worker)
        asyncio.get_running_loop().add_reader(parent.fileno(), self.on_message, worker)

    def on_message(self, worker: Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
            return
        kind = message[0]
        if kind == "ready":
            worker.ready.set()
        elif kind == "stats":
            self.worker_stats[worker.process.pid or 0] = message[1]
        elif kind == "lookup":  # a worker answering the dashboard needs every worker's records
            self.runtime.spawn(self.lookup_for(worker, message[1], message[2]))
        elif kind == "hops":
            pending = self.lookups.get(message[1])
            if pending is not None:
                future, found, waiting = pending
                found.extend(message[2])
                waiting[0] -= 1
                if waiting[0] == 0 and not future.done():
                    future.set_result(None)

    def starting(self) -> str | None:
        """What /ready waits for until a worker listens (the supervisor's own sockets do not), or None. A worker
        replaced later does not make the gateway unready: the others serve meanwhile."""
        if any(worker.ready.is_set() for worker in self.workers):
            return None
        return f"a worker to listen ({len(self.workers)} starting)"

    async def wait_ready(self) -> None:
        for worker in self.workers:
            try:
                await asyncio.wait_for(worker.ready.wait(), READY_TIMEOUT)
            except TimeoutError:
                raise SystemExit(f"meshgate: worker {worker.process.pid} did not start") from None

    def stats(self) -> Snapshot:
        return merge([self.runtime.stats(), self.retired, *self.worker_stats.values()])

    async def lookup(self, request_id: bytes) -> list[dict[str, Any]]:
        """Every worker's hop records for a request ID (each worker keeps its own ring)."""
        self.tokens += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        found: list[dict[str, Any]] = []
        self.lookups[self.tokens] = (future, found, [len(self.workers)])
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.conn.send(("lookup", self.tokens, request_id))
        with contextlib.suppress(TimeoutError):  # a worker that does not answer in time is left out
            await asyncio.wait_for(future, LOOKUP_TIMEOUT)
        del self.lookups[self.tokens]
        return sorted(found, key=lambda hop: hop["start"])

    async def lookup_for(self, worker: Worker, token: int, request_id: bytes) -> None:
        hops = await self.lookup(request_id)
        with contextlib.suppress(OSError):  # the worker is gone; so is the connection that asked
            worker.conn.send(("hops", token, hops))

    async def monitor(self) -> None:
        """Replace a worker that died, so the gateway keeps its capacity."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            for worker in list(self.workers):
                if not worker.process.is_alive() and not self.stopping:
                    log.error(
                        "worker %s exited with %s; starting a new one", worker.process.pid, worker.process.exitcode
                    )
                    self.workers.remove(worker)
                    last = self.worker_stats.pop(worker.process.pid or 0, None)
                    if last is not None:
                        # What it answered stays counted: counters must not go down (a reset reads as a burst).
                        self.retired = merge([self.retired, {**last, "gauges": {}, "loop_lag": 0.0, "rss": 0}])
                    loop.remove_reader(worker.conn.fileno())
                    worker.conn.close()
                    self.start_worker()

    def broadcast(self, config: Config, version: int, peers: Peers | None) -> None:
        self.state.config, self.state.version, self.peers, self.published = config, version, peers, version
        self.send(("config", config, version, peers))

    def broadcast_identity(self) -> None:
        """The supervisor renewed the certificate: every worker loads it into its own SSL contexts."""
        self.send(("identity",))

    def send(self, message: tuple[Any, ...]) -> None:
        for worker in self.workers:
            # A dead worker raises OSError; the monitor replaces it and the new one starts from the current state.
            with contextlib.suppress(OSError):
                worker.conn.send(message)

    async def stop_workers(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(OSError):  # already gone
                worker.conn.send(("drain",))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout + 5.0
        for worker in self.workers:
            await loop.run_in_executor(None, worker.process.join, max(0.0, deadline - loop.time()))
            if worker.process.is_alive():
                worker.process.kill()


def worker_main(conn: Connection, *start: Any) -> None:
    """A worker process: `start` is what `_worker` takes after the pipe (config, version, peers, addresses, drain
    timeout and, when joined, the data directory holding the identity)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the supervisor leads
    uvloop.run(_worker(conn, *start))


async def _worker(
    conn: Connection,
    config: Config,
    version: int | None,
    peers: Peers | None,
    addresses: dict[str, Address],
    drain: float,
    data: str | None,
) -> None:
    loop = asyncio.get_running_loop()
    runtime = Runtime(config)
    identity = Identity(data) if data is not None else None
    if identity is not None:
        identity.load()
        runtime.peer_tls, runtime.peer_tls_h2 = identity.client, identity.client_h2
    if version is not None:  # None: joined and still waiting for a first config, so answer 503 until one comes
        runtime.apply(config, version, peers)
    tls = identity.server if identity is not None else server_tls(config)
    edge = edge_tls(config)  # each worker its own contexts, reloaded by its own watcher
    if edge is not None:
        runtime.spawn(watch_edge_tls(edge))
    servers = []
    for kind, address in addresses.items():
        sock: socket.socket = bind_socket(address, reuse_port=True)
        context = listener_tls(kind, tls, edge)
        servers.append(await start_listener(data_listener(kind, runtime, context), sock, context))
    stop = asyncio.Event()
    asked: dict[int, asyncio.Future[list[dict[str, Any]]]] = {}
    tokens = itertools.count(1)

    async def mesh_lookup(request_id: bytes) -> list[dict[str, Any]]:
        """The dashboard asked this worker; the supervisor gathers every worker's records."""
        token = next(tokens)
        future = asked[token] = loop.create_future()
        try:
            conn.send(("lookup", token, request_id))
            return await asyncio.wait_for(future, LOOKUP_TIMEOUT * 2)
        except (OSError, TimeoutError):
            return runtime.lookup(request_id)  # the supervisor is busy or gone: this worker's records at least
        finally:
            del asked[token]

    runtime.mesh_lookup = mesh_lookup

    def on_message() -> None:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = ("drain",)  # the supervisor is gone: finish what is in flight and exit
        if message[0] == "hops":
            waiting = asked.get(message[1])
            if waiting is not None and not waiting.done():
                waiting.set_result(message[2])
        elif message[0] == "config":
            runtime.apply(message[1], message[2], message[3])
        elif message[0] == "identity" and identity is not None:
            identity.load()
        elif message[0] == "lookup":
            conn.send(("hops", message[1], runtime.lookup(message[2])))
        elif message[0] == "drain":
            loop.remove_reader(conn.fileno())
            stop.set()

    loop.add_reader(conn.fileno(), on_message)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    runtime.start_background()
    runtime.spawn(_push_stats(conn, runtime))
    conn.send(("ready", os.getpid()))
    await stop.wait()
    await runtime.drain(servers, drain)


async def _push_stats(conn: Connection, runtime: Runtime) -> None:
    """Send this worker's golden signals to the supervisor, which answers scrapes for the whole gateway."""
    while True:
        await asyncio.sleep(STATS_INTERVAL)
        with contextlib.suppress(OSError):  # the supervisor is gone; the pipe reader drains this worker
            conn.send(("stats", runtime.stats()))
