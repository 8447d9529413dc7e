"""The gateway's Python cost per request, without sockets: `python bench/hotpath.py [--requests N]`.

A client connection and a pooled upstream connection are wired to in-memory transports (`keepalive_pair` in
tests/gateway/wiring.py, the wiring the unit tier's harness uses), so one loop iteration is
exactly the hot path's Python work for a keep-alive request: parse the request, route, pick, render and "write"
the upstream head, parse the response, relay it, record it (golden signals, the hop record in the ring of recent
requests). The kernel's share (system calls, loopback TCP) is measured by `bench/proxy.py`; this isolates what
code changes on the hot path can move, with far less noise.

    python bench/hotpath.py                      # CPU µs per request, median of 5 rounds
    python bench/hotpath.py --instructions       # instructions per request under valgrind (callgrind): two runs
                                                 # that differ only in their number of requests, robust to noise
                                                 # (a ring of 4,096 unless --ring, warmed up past its size)
    python bench/hotpath.py --memory             # bytes per hop record (tracemalloc while the default ring of
                                                 # 100,000 fills) and this process's peak RSS with a full ring
    python bench/hotpath.py --ring 0             # the same without the ring (telemetry.recent_requests)

`PYTHONPATH=/path/to/another/tree python bench/hotpath.py ...` measures another tree's gateway package.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # `tests.gateway.wiring`; PYTHONPATH still chooses the gateway package

import callgrind  # noqa: E402  # bench/, beside this script
import uvloop  # noqa: E402

from gateway.config import Config  # noqa: E402
from gateway.proxy import DownstreamProtocol  # noqa: E402
from gateway.units import Address  # noqa: E402
from gateway.upstream import UpstreamProtocol  # noqa: E402
from tests.gateway.wiring import keepalive_pair  # noqa: E402  # the in-memory wiring the unit tier uses

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"  # what wrk sends
PATH_REQUEST = b"GET /catalog/items/%d?view=full HTTP/1.1\r\nHost: bench\r\n\r\n"
BODY = b"a" * 200
RESPONSE = (  # what nginx answers
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 07:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
    % (len(BODY), BODY)
)


def build(loop: asyncio.AbstractEventLoop, ring: int | None = None) -> tuple[DownstreamProtocol, UpstreamProtocol]:
    telemetry: dict[str, Any] = {"access_log": "off"}
    if ring is not None:
        telemetry["recent_requests"] = ring
    config = Config.parse(
        {
            "gateway": {"telemetry": telemetry},
            "services": {"bench": {"subsets": {"v1": {"endpoints": ["127.0.0.1:9"]}}}},
        }
    )
    return keepalive_pair(config, loop, Address("127.0.0.1", 9))


async def measure(requests: int, ring: int | None = None, warmup: int = 1000) -> float:
    loop = asyncio.get_running_loop()
    downstream, upstream = build(loop, ring)
    for _ in range(warmup):
        downstream.data_received(REQUEST)
        upstream.data_received(RESPONSE)
    started = time.process_time()
    for _ in range(requests):
        downstream.data_received(REQUEST)  # one read from the client...
        upstream.data_received(RESPONSE)  # ...and, a loop iteration later, one from the upstream
    elapsed = time.process_time() - started
    assert downstream.transport.written >= requests, "responses were not written"  # type: ignore[attr-defined]
    assert upstream.transport.written >= requests, "requests were not forwarded"  # type: ignore[attr-defined]
    return elapsed / requests * 1e6 if requests else 0.0


# --- memory: what a hop record costs -----------------------------------------------------------------------------


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def memory(records: int) -> tuple[float, float]:
    """(Bytes per hop record while `records` fill the default ring, peak RSS in MB with the ring full and turning).

    The RSS comes first, from a run without tracemalloc (whose own bookkeeping would count); then a fresh gateway
    fills its ring under tracemalloc."""
    loop = asyncio.get_running_loop()
    downstream, upstream = build(loop)
    for n in range(2 * records):  # fill the ring, then forget as many records again
        downstream.data_received(PATH_REQUEST % n)  # distinct paths, as real ones mostly are
        upstream.data_received(RESPONSE)
    rss = peak_rss_mb()
    del downstream, upstream
    gc.collect()
    downstream, upstream = build(loop)
    for _ in range(1000):
        downstream.data_received(REQUEST)
        upstream.data_received(RESPONSE)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for n in range(records):
        downstream.data_received(PATH_REQUEST % n)
        upstream.data_received(RESPONSE)
    gc.collect()
    per_record = (tracemalloc.get_traced_memory()[0] - before) / records
    tracemalloc.stop()
    return per_record, rss


# --- instruction counts ------------------------------------------------------------------------------------------

RING_FOR_COUNTS = 4096  # small enough to fill quickly under valgrind; --ring 100000 for the default (~10 minutes)


def instructions(requests: int, ring: int | None) -> float:
    """Instructions per request under callgrind: the difference of two runs, over their difference in requests."""

    def count(n: int) -> int:
        args = ["--once", "--requests", str(n), "--warmup", str(warmup)]
        return callgrind.instructions(__file__, *args, *(["--ring", str(ring)] if ring is not None else []))

    # The ring is warmed past its size first, so that both runs see it full and forgetting (steady state).
    warmup = 1000 + (ring if ring is not None else 0)
    return (count(2 * requests) - count(requests)) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, help="per round (default 200,000), or per run under valgrind (16,384)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ring", type=int, help="telemetry.recent_requests (default: the config default)")
    parser.add_argument("--instructions", action="store_true", help="count instructions with valgrind instead")
    parser.add_argument("--memory", action="store_true", help="bytes per hop record and peak RSS instead")
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)  # one run, under valgrind
    parser.add_argument("--warmup", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.once:
        random.seed(0)  # the same ids in every run: instruction counts then differ only by the requests
        uvloop.run(measure(args.requests or 0, args.ring, args.warmup))
    elif args.memory:
        per_record, rss = uvloop.run(memory(100_000))
        print(f"hop records: {per_record:.0f} bytes each (tracemalloc, 100,000 requests into the default ring)")
        print(f"peak RSS of this process with the ring full: {rss:.1f} MB")
    elif args.instructions:
        requests, ring = args.requests or 16_384, RING_FOR_COUNTS if args.ring is None else args.ring
        per_request = instructions(requests, ring)
        print(f"hot path: {per_request:,.0f} instructions/request (callgrind, {requests} requests, ring of {ring})")
    else:
        results = sorted(uvloop.run(measure(args.requests or 200_000, args.ring)) for _ in range(args.rounds))
        print(f"hot path, Python only: {results[len(results) // 2]:.2f} us/request (median of {args.rounds})")


if __name__ == "__main__":
    main()
