"""Listeners, and one whole gateway in one process: `serve()` until SIGTERM, then a graceful drain.

The state a process serves from is `runtime.Runtime`; its config comes from a `sources.Source`. supervisor.py
runs the same pieces split between a supervisor (admin, reload) and N workers (data listeners on SO_REUSEPORT
sockets).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl

from gateway.admin import admin_handler
from gateway.config import Config, ConfigError
from gateway.discovery import Discovery
from gateway.proxy import DownstreamProtocol, Listener
from gateway.runtime import AdminState, Runtime
from gateway.sources import Source
from gateway.tls import EdgeCertificates
from gateway.units import Address

EDGE_TLS_CHECK = 2.0  # seconds between looks at the edge certificates' files
log = logging.getLogger("meshgate.gateway")

DATA_LISTENERS = ("inbound", "edge", "outbound")


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


def data_listener(kind: str, runtime: Runtime, tls: ssl.SSLContext | None) -> Listener:
    """What a data listener is for. With TLS (the mTLS inbound, an edge with `edge_tls`) HTTP/2 is negotiated by
    ALPN; without it, taken with prior knowledge (h2c)."""
    group = runtime.config.gateway.group
    if kind == "edge":  # trust follows `trusted_proxies` and `preserve_request_id`, decided per connection
        return Listener(
            kind, runtime, "external", scheme=b"https" if tls else b"http", reporter="destination", h2c=not tls
        )
    if kind == "outbound":
        return Listener(kind, runtime, group, trusted=True, reporter="source", h2c=True)
    return Listener(kind, runtime, "unknown", scheme=b"https" if tls else b"http", reporter="destination", h2c=not tls)


def edge_tls(config: Config) -> EdgeCertificates | None:
    """The edge listener's certificates (`gateway.edge_tls`), or None for plain HTTP; a ConfigError names the file
    that does not load."""
    pairs = [(pair.cert, pair.key) for pair in config.gateway.edge_tls]
    if not pairs:
        return None
    try:
        return EdgeCertificates(pairs)
    except ValueError as exc:
        raise ConfigError(f"{config.source}: gateway.edge_tls: {exc}") from None


async def watch_edge_tls(edge: EdgeCertificates) -> None:
    """Reload edge certificates whose files changed (a renewal by certbot or cert-manager), every few seconds."""
    while True:
        await asyncio.sleep(EDGE_TLS_CHECK)
        for line in edge.check():
            (log.info if line.endswith("reloaded") else log.warning)("%s", line)


def listener_tls(kind: str, inbound: ssl.SSLContext | None, edge: EdgeCertificates | None) -> ssl.SSLContext | None:
    if kind == "inbound":
        return inbound
    return edge.context if kind == "edge" and edge is not None else None


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


async def serve(config: Config, drain_timeout: float, source: Source) -> None:
    """Run a whole gateway in this process until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    runtime = Runtime(config)
    state = AdminState(config=config, stats=runtime.stats, lookup=runtime.lookup)
    sockets = {kind: bind_socket(address, reuse_port=False) for kind, address in listener_addresses(config).items()}
    runtime.peer_tls, runtime.peer_tls_h2 = source.client_tls, source.client_tls_h2
    addresses = {kind: Address(*sock.getsockname()[:2]) for kind, sock in sockets.items()}
    discovery = Discovery(state, runtime.apply, runtime.spawn)
    source.start(state, discovery.publish, addresses, runtime.spawn)
    servers = []
    edge = edge_tls(config)
    if edge is not None:
        runtime.spawn(watch_edge_tls(edge))
    for kind, sock in sockets.items():
        if kind in DATA_LISTENERS:
            tls = listener_tls(kind, source.server_tls, edge)
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
