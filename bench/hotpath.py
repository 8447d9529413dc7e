"""The gateway's Python cost per request, without sockets: `python bench/hotpath.py [--requests N]`.

A client connection and a pooled upstream connection are wired to in-memory transports, so one loop iteration is
exactly the hot path's Python work for a keep-alive request: parse the request, route, pick, render and "write"
the upstream head, parse the response, relay it. The kernel's share (system calls, loopback TCP) is measured by
`bench/proxy.py`; this isolates what code changes on the hot path can move, with far less noise.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import uvloop

from gateway.config import Config
from gateway.proxy import DownstreamProtocol
from gateway.server import Runtime, data_listener
from gateway.units import Address
from gateway.upstream import UpstreamProtocol

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"  # what wrk sends
BODY = b"a" * 200
RESPONSE = (  # what nginx answers
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 07:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
    % (len(BODY), BODY)
)


class MemoryTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self._reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        self._reading = True

    def close(self) -> None:
        pass


def build(loop: asyncio.AbstractEventLoop) -> tuple[DownstreamProtocol, UpstreamProtocol]:
    config = Config.parse(
        {
            "gateway": {"telemetry": {"access_log": "off"}},
            "services": {"bench": {"subsets": {"v1": {"endpoints": ["127.0.0.1:9"]}}}},
        }
    )
    runtime = Runtime(config)
    runtime.apply(config, 1)
    downstream = DownstreamProtocol(data_listener("inbound", runtime, None), loop)
    downstream.connection_made(MemoryTransport())
    pool = runtime.pools[Address("127.0.0.1", 9)]
    upstream = UpstreamProtocol(pool)
    upstream.connection_made(MemoryTransport())
    pool.release(upstream, loop.time())
    return downstream, upstream


async def measure(requests: int) -> float:
    loop = asyncio.get_running_loop()
    downstream, upstream = build(loop)
    for _ in range(1000):  # warm up
        downstream.data_received(REQUEST)
        upstream.data_received(RESPONSE)
    started = time.process_time()
    for _ in range(requests):
        downstream.data_received(REQUEST)  # one read from the client...
        upstream.data_received(RESPONSE)  # ...and, a loop iteration later, one from the upstream
    elapsed = time.process_time() - started
    assert downstream.transport.written >= requests, "responses were not written"  # type: ignore[attr-defined]
    assert upstream.transport.written >= requests, "requests were not forwarded"  # type: ignore[attr-defined]
    return elapsed / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = sorted(uvloop.run(measure(args.requests)) for _ in range(args.rounds))
    print(f"hot path, Python only: {results[len(results) // 2]:.2f} us/request (median of {args.rounds})")


if __name__ == "__main__":
    main()
