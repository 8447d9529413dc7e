"""The in-memory harness (tests/gateway/inmemory.py) is only as good as its likeness to the real thing: its
transport must follow the rules of uvloop's TCP transport that the gateway's failures depend on, checked here
against a real uvloop transport on a socket pair, step by step."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from gateway.config import Config
from gateway.units import Address
from tests.gateway.inmemory import CountingLoop, MemoryGateway, MemoryTransport
from tests.gateway.wiring import keepalive_pair

# Steps on a transport, and what each gives: a method's result, or the name of the exception it raised.
# "lost" waits until the protocol has been told the connection is lost.
CASES = {
    "write after write_eof": (["write_eof", "write", "close", "lost"], [None, "RuntimeError", None]),
    "write after close, before the loss is reported": (["close", "write", "lost"], [None, None]),
    "write and write_eof after the loss": (
        ["close", "lost", "write", "write_eof", "close", "abort"],
        [None, "RuntimeError", "RuntimeError", None, None],
    ),
    "reading": (
        ["is_reading", "pause_reading", "is_reading", "resume_reading", "is_reading", "close", "is_reading"],
        [True, None, False, None, True, None, False],
    ),
}


class Probe(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost = asyncio.Event()
        self.received: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


async def perform(steps: list[str], transport: asyncio.Transport, probe: Probe) -> list[object]:
    outcomes: list[object] = []
    for step in steps:
        if step == "lost":
            await asyncio.wait_for(probe.lost.wait(), 5)
            continue
        try:
            method = getattr(transport, step)
            outcomes.append(method(b"x") if step == "write" else method())
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    return outcomes


def on_uvloop(steps: list[str]) -> list[object]:
    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        probe = Probe()
        transport, _ = await loop.connect_accepted_socket(lambda: probe, ours)
        try:
            return await perform(steps, transport, probe)
        finally:
            transport.abort()
            theirs.close()

    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def in_memory(steps: list[str]) -> list[object]:
    loop = CountingLoop()

    async def main() -> list[object]:
        probe = Probe()
        transport = MemoryTransport(loop, probe, ("127.0.0.1", 40000), lambda data: None)
        probe.connection_made(transport)
        return await perform(steps, transport, probe)

    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


@pytest.mark.parametrize(("steps", "outcomes"), CASES.values(), ids=CASES.keys())
def test_memory_transport_behaves_as_uvloops(steps: list[str], outcomes: list[object]) -> None:
    assert on_uvloop(steps) == outcomes
    assert in_memory(steps) == outcomes


def test_what_arrives_while_paused_is_read_in_one_go_on_resume() -> None:
    loop = CountingLoop()

    async def main() -> list[bytes]:
        probe = Probe()
        transport = MemoryTransport(loop, probe, ("127.0.0.1", 40000), lambda data: None)
        transport.pause_reading()
        transport.feed(b"ab")
        transport.feed(b"cd")
        await loop.settle()
        assert probe.received == []
        transport.resume_reading()
        await loop.settle()
        return probe.received

    try:
        assert loop.run_until_complete(main()) == [b"abcd"]
    finally:
        loop.close()


def test_a_request_goes_through_and_back() -> None:
    run = MemoryGateway().run(b"POST /a?b HTTP/1.1\r\nHost: hello\r\nContent-Length: 2\r\n\r\nhi", step=3)
    (forwarded,) = run.upstream_requests
    assert (forwarded.method, forwarded.target, bytes(forwarded.body)) == (b"POST", b"/a?b", b"hi")
    assert forwarded.values(b"x-forwarded-for") == [b"127.0.0.1"]
    assert run.client_output.startswith(b"HTTP/1.1 200 ") and run.client_output.endswith(b"upstream 0")
    assert run.escaped == [] and run.client_closed is False and run.runtime.connections == set()


def test_the_keepalive_pair_carries_one_exchange_per_read_on_one_upstream_connection() -> None:
    """What bench/hotpath.py measures is a real exchange: forwarded, answered, relayed and recorded."""
    config = Config.parse({"services": {"bench": {"subsets": {"v1": {"endpoints": ["127.0.0.1:9"]}}}}})

    async def exchanges() -> None:
        downstream, upstream = keepalive_pair(config, asyncio.get_running_loop(), Address("127.0.0.1", 9))
        for n in range(1, 4):
            downstream.data_received(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            assert upstream.transport.written == n  # type: ignore[attr-defined]  # the request head, once
            assert downstream.transport.written == n  # type: ignore[attr-defined]  # the response, in one write
        runtime = downstream.runtime
        assert runtime.pools[Address("127.0.0.1", 9)].idle == [upstream]  # kept alive, back in its pool
        (series,) = runtime.metrics.series.values()
        assert dict(series.codes) == {200: 3}

    asyncio.run(exchanges())
