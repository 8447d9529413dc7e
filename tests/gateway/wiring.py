"""The bare wiring of the hot path without sockets, for `bench/hotpath.py` and the unit tier: a runtime, one client
connection and one pooled keep-alive upstream connection, on transports that only count writes.

It imports nothing beyond the gateway and asyncio (not h11, as inmemory.py does): the benchmark that uses it counts
instructions per request, and every module loaded besides the gateway's adds to what the garbage collector walks.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.config import Config
from gateway.proxy import DownstreamProtocol
from gateway.runtime import Runtime
from gateway.server import data_listener
from gateway.units import Address
from gateway.upstream import UpstreamProtocol

CLIENT_PEER = ("127.0.0.1", 40000)


class SinkTransport(asyncio.Transport):
    """A transport that only counts writes and keeps the reading flag: what `bench/hotpath.py` runs the gateway on,
    so that none of the harness's own buffering and delivery enters the gateway's cost per request. The caller
    feeds the protocol directly (`data_received`), one read at a time."""

    def __init__(self, peer: tuple[str, int] = CLIENT_PEER) -> None:
        super().__init__()
        self.written = 0
        self.peer = peer
        self._reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        self._reading = True

    def close(self) -> None:
        pass


def keepalive_pair(
    config: Config, loop: asyncio.AbstractEventLoop, address: Address
) -> tuple[DownstreamProtocol, UpstreamProtocol]:
    """A runtime serving `config`, one client connection on its inbound listener and one keep-alive upstream
    connection to `address` idle in its pool, both on `SinkTransport`s: a request fed to the client and a response
    fed to the upstream make one keep-alive exchange, the hot path and nothing else."""
    runtime = Runtime(config)
    runtime.apply(config, 1)
    downstream = DownstreamProtocol(data_listener("inbound", runtime, None), loop)
    downstream.connection_made(SinkTransport())
    pool = runtime.pools[address]
    upstream = UpstreamProtocol(pool)
    upstream.connection_made(SinkTransport((address.host, address.port)))
    pool.release(upstream, loop.time())
    return downstream, upstream
