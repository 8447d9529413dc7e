"""Fixtures that start real processes and servers on 127.0.0.1 and wait until they are ready, and what the
end-to-end tests share: config builders, `wait_for`, and checks on the gateway's own replies."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import httpx
import psutil
import pytest
import yaml

from tests.dns import dns_server  # noqa: F401  (a fixture for every test directory)
from tests.e2e.servers import ScriptedUpstream, UpstreamProcess
from tests.e2e.upstream_app import UpstreamServer
from tests.e2e.wire import Wire
from tests.etcd import etcd, etcd_server  # noqa: F401  (fixtures for every test directory)

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening (.*)")

P = ParamSpec("P")
T = TypeVar("T")


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = "condition"
) -> None:
    """`wait_for` for async tests: poll `predicate` on the running loop until it is truthy, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class FakeClock:
    """A clock a test moves by hand (`clock.now += 5`), for code that takes a `clock` callable."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Gateway:
    """A `meshgate gateway` process; `addresses` come from its "listening" log line."""

    def __init__(self, config_path: Path, args: list[str]) -> None:
        self.config_path = config_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshgate.cli", "gateway", "--config", str(config_path), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(20):
            self.stop()
            raise AssertionError("gateway did not start:\n" + self.output())

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = LISTENING.search(line)
            if match and not self._listening.is_set():
                for item in match.group(1).split():
                    kind, _, address = item.partition("=")
                    host, _, port = address.rpartition(":")
                    self.addresses[kind] = (host.strip("[]"), int(port))
                self._listening.set()

    def output(self) -> str:
        return "".join(self.lines)

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        wait_for(lambda: text in self.output(), timeout, what=f"log line {text!r}")

    @property
    def inbound(self) -> tuple[str, int]:
        return self.addresses["inbound"]

    @property
    def admin(self) -> tuple[str, int]:
        return self.addresses["admin"]

    def url(self, kind: str = "inbound") -> str:
        host, port = self.addresses[kind]
        return f"http://{host}:{port}"

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


StartGateway = Callable[..., Gateway]
StartUpstream = Callable[[str], UpstreamServer]
Scripted = Callable[..., ScriptedUpstream]
Connect = Callable[..., Wire]
RenderConfig = Callable[[dict[str, Any]], bytes]


# Config builders


def listeners(*extra: str) -> dict[str, str]:
    """The inbound, outbound and admin listeners, plus `extra` kinds (edge, metrics), on ephemeral loopback ports."""
    return {kind: "127.0.0.1:0" for kind in ("inbound", "outbound", "admin", *extra)}


def gateway_config(services: dict[str, Any], **gateway: Any) -> dict[str, Any]:
    """A standalone config listening on ephemeral loopback ports, access log off."""
    section: dict[str, Any] = {"group": "test", "listen": listeners(), "telemetry": {"access_log": "off"}}
    section.update(gateway)
    return {"gateway": section, "services": services}


def service(*endpoints: str, **policy: Any) -> dict[str, Any]:
    """A service with one subset, `v1`, on `endpoints`."""
    return {"subsets": {"v1": {"endpoints": list(endpoints)}}, **policy}


def hello(*endpoints: str, **policy: Any) -> dict[str, Any]:
    """A services section with the one service `hello`."""
    return {"hello": service(*endpoints, **policy)}


# Fixtures


def stopped_after(start: Callable[P, T], stop: Callable[[T], object]) -> Iterator[Callable[P, T]]:
    """The body of a fixture that starts things: yields `start`, then stops everything it started."""
    started: list[T] = []

    def tracked(*args: P.args, **kwargs: P.kwargs) -> T:
        thing = start(*args, **kwargs)
        started.append(thing)
        return thing

    yield tracked
    for thing in started:
        stop(thing)


@pytest.fixture
def render_config() -> RenderConfig:
    """How `start_gateway` writes a config file; a module overrides this fixture to write them otherwise."""
    return lambda config: yaml.safe_dump(config).encode()


@pytest.fixture
def start_gateway(tmp_path: Path, render_config: RenderConfig) -> Iterator[StartGateway]:
    paths = (tmp_path / f"gateway-{n}.yaml" for n in itertools.count())

    def start(config: dict[str, Any], *args: str) -> Gateway:
        path = next(paths)
        path.write_bytes(render_config(config))
        return Gateway(path, list(args))

    yield from stopped_after(start, Gateway.stop)


@pytest.fixture
def start_upstream() -> Iterator[StartUpstream]:
    def start(name: str) -> UpstreamServer:
        return UpstreamServer(name).start()

    yield from stopped_after(start, UpstreamServer.stop)


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    """Start `ScriptedUpstream`s: `scripted()` answers by path, `scripted(handler, name="x")` through `handler`."""
    yield from stopped_after(ScriptedUpstream, ScriptedUpstream.stop)


@pytest.fixture
def upstream_processes() -> Iterator[Callable[..., UpstreamProcess]]:
    """Start upstreams in processes of their own (`upstream_processes("name")`), which a test may SIGKILL."""
    yield from stopped_after(UpstreamProcess, UpstreamProcess.stop)


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Open raw client connections (`Wire.connect(address, timeout, rcvbuf)`); all are closed after the test."""
    yield from stopped_after(Wire.connect, Wire.close)


@pytest.fixture
def hello_upstream(start_upstream: StartUpstream) -> UpstreamServer:
    return start_upstream("v1")


@pytest.fixture
def hello_gateway(start_gateway: StartGateway, hello_upstream: UpstreamServer) -> Gateway:
    """A gateway with the one service `hello`, on `hello_upstream`."""
    return start_gateway(gateway_config(hello(hello_upstream.address)))


@pytest.fixture
def edge_gateway(start_gateway: StartGateway, hello_upstream: UpstreamServer) -> Gateway:
    """`hello_gateway` with an edge listener too: every listener kind a request can arrive on."""
    return start_gateway(gateway_config(hello(hello_upstream.address), listen=listeners("edge")))


@pytest.fixture
def hello_wire(connect: Connect, hello_gateway: Gateway) -> Wire:
    """A raw connection to `hello_gateway`'s inbound listener."""
    return connect(hello_gateway.inbound)


# Checks and raw bytes


def assert_uuid4(value: str | None, where: object = "") -> None:
    """`value` is a canonical UUID4, as the gateway makes request IDs; `where` goes into the failure message."""
    assert value is not None, f"no x-request-id {where}"
    parsed = uuid.UUID(value)
    assert parsed.version == 4 and parsed.variant == uuid.RFC_4122, f"{value} {where}"
    assert str(parsed) == value, f"not a canonical UUID4: {value!r} {where}"


def is_one_line_reason(body: bytes) -> bool:
    """The body of a reply the gateway made itself."""
    return body.endswith(b"\n") and body.count(b"\n") == 1 and body.startswith(b"meshgate: ")


def raw_request(address: tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the peer sends until it closes (or `timeout`)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def hop_records(gateway: Gateway, request_id: str) -> list[dict[str, Any]]:
    """The gateway's hop records of `request_id`, from its admin `/requests/{id}` (none: an empty list)."""
    answer = httpx.get(gateway.url("admin") + "/requests/" + request_id, timeout=5, trust_env=False)
    return list(answer.json()["hops"]) if answer.status_code == 200 else []


def metric(gateway: Gateway | str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`, from the gateway's admin /metrics (a Gateway
    this test started, or the admin URL of one it did not)."""
    admin = gateway.url("admin") if isinstance(gateway, Gateway) else gateway
    text = httpx.get(admin + "/metrics", timeout=5, trust_env=False).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith((name + "{", name + " ")):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{key}="{wanted}"' in head for key, wanted in labels.items()):
            total += float(value)
    return total


def workers_of(gw: Gateway) -> list[psutil.Process]:
    """The supervisor's worker processes (multiprocessing spawn children, not its resource tracker)."""
    found = []
    for child in psutil.Process(gw.proc.pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found
