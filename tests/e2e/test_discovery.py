"""Discovery in a running gateway: a `dns` subset behind a real dnsmasq and an `etcd` subset fed by `meshgate
register`, with a steady client that must see no failed request while endpoints come and go, and a slow request
that must finish on an endpoint after it was removed (the drain)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, Gateway, StartGateway, StartUpstream, gateway_config, wait_for
from tests.dns import StartDns
from tests.e2e.mesh import Dashboard, joined_gateway, wait_ready
from tests.e2e.upstream_app import UpstreamProtocol, UpstreamServer
from tests.etcd import EtcdServer, free_ports

PREFIX = "/meshgate/endpoints/hello/v1/"
NAME = "hello.shop.test"


class LoopbackUpstream(UpstreamServer):
    """An `upstream_app` on another loopback address: the addresses of one DNS name share the port given with it."""

    def __init__(self, name: str, host: str, port: int = 0) -> None:
        super().__init__(name, port)
        self.host = host

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _listen(self) -> None:
        self.server = await self.loop.create_server(lambda: UpstreamProtocol(self), self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]


@pytest.fixture
def pair() -> Iterator[tuple[LoopbackUpstream, LoopbackUpstream]]:
    """Upstreams `a` on 127.0.0.2 and `b` on 127.0.0.3, on one port."""
    a = LoopbackUpstream("a", "127.0.0.2")
    a.start()
    b = LoopbackUpstream("b", "127.0.0.3", a.port)
    b.start()
    yield a, b
    b.stop()
    a.stop()


def dns_gateway(start_gateway: StartGateway, resolver: str, port: int, *args: str) -> Gateway:
    hello = {"subsets": {"v1": {"dns": f"{NAME}:{port}"}}, "timeouts": {"per_try": "10s"}}  # room for a slow request
    return start_gateway(gateway_config({"hello": hello}, discovery={"resolvers": [resolver]}), *args)


def answer(gateway: Gateway, path: str = "/echo", timeout: float = 5.0) -> tuple[int, str | None]:
    """Status and answering upstream of one request, on a new connection (so each may land on another worker)."""
    response = httpx.get(gateway.url() + path, headers={"host": "hello"}, timeout=timeout)
    return response.status_code, response.headers.get("x-upstream")


class Steady:
    """A client sending one request after another on a keep-alive connection, recording what answered."""

    def __init__(self, gateway: Gateway) -> None:
        self.url = gateway.url() + "/echo"
        self.answers: list[tuple[int, str | None]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(headers={"host": "hello"}, timeout=5.0) as client:
            while not self.stopping.is_set():
                try:
                    response = client.get(self.url)
                    self.answers.append((response.status_code, response.headers.get("x-upstream")))
                except httpx.HTTPError as exc:
                    self.answers.append((0, repr(exc)))

    def stop(self) -> list[tuple[int, str | None]]:
        self.stopping.set()
        self.thread.join(10)
        return self.answers


class SlowRequest:
    """One request the upstream answers after `ms` milliseconds, sent from a thread."""

    def __init__(self, gateway: Gateway, ms: int) -> None:
        self.result: tuple[int, str | None] | None = None
        self.finished = 0.0
        self.thread = threading.Thread(target=self._run, args=(gateway, ms), daemon=True)
        self.thread.start()

    def _run(self, gateway: Gateway, ms: int) -> None:
        self.result = answer(gateway, f"/delay/{ms}", timeout=ms / 1000 + 10)
        self.finished = time.monotonic()

    def wait(self) -> tuple[int, str | None] | None:
        self.thread.join(20)
        return self.result


def test_traffic_follows_a_changed_record_and_the_removed_endpoint_drains(
    start_gateway: StartGateway, dns_server: StartDns, pair: tuple[LoopbackUpstream, LoopbackUpstream]
) -> None:
    a, b = pair
    dns = dns_server({NAME: ["127.0.0.2"]})
    gw = dns_gateway(start_gateway, dns.address, a.port)
    wait_for(lambda: answer(gw) == (200, "a"), what="traffic to the address the name has")
    slow = SlowRequest(gw, 2500)
    wait_for(lambda: a.requests >= 2, what="the slow request in flight on a")  # 1: the probe above
    steady = Steady(gw)
    wait_for(lambda: len(steady.answers) >= 10, what="the steady client going")
    dns.set_hosts({NAME: ["127.0.0.3"]})
    changed = time.monotonic()
    wait_for(lambda: steady.answers[-1][1] == "b", 1 + 2, 0.01, what="traffic moved to b within the TTL and slack")
    moved = time.monotonic() - changed
    count = len(steady.answers)
    wait_for(lambda: len(steady.answers) >= count + 50, what="more requests after the move")
    answers = steady.stop()
    assert {status for status, _ in answers} == {200}, [item for item in answers if item[0] != 200][:5]
    upstreams = [upstream for _, upstream in answers]
    first_b = upstreams.index("b")
    assert set(upstreams[:first_b]) == {"a"} and set(upstreams[first_b:]) == {"b"}, "a after b: two snapshots live"
    assert slow.wait() == (200, "a"), "the request in flight on the removed endpoint did not finish"
    assert slow.finished > changed + moved, "the slow request was not in flight across the change"
    # The retired pool closes the connection as the request ends (the idle sweep would take 3 s): the drain's end.
    wait_for(lambda: not a.open, 1, what="the retired pool's connections to a closed")
    config = httpx.get(gw.url("admin") + "/config", timeout=5).json()
    assert config["version"] == 1
    assert config["config"]["services"]["hello"]["subsets"]["v1"] == {
        "endpoints": [b.address],
        "dns": f"{NAME}:{a.port}",
    }


def test_a_name_without_records_empties_the_subset(
    start_gateway: StartGateway, dns_server: StartDns, pair: tuple[LoopbackUpstream, LoopbackUpstream]
) -> None:
    a, _ = pair
    dns = dns_server({NAME: ["127.0.0.2"]})
    gw = dns_gateway(start_gateway, dns.address, a.port)
    wait_for(lambda: answer(gw) == (200, "a"), what="traffic to a")
    dns.set_hosts({})
    wait_for(lambda: answer(gw)[0] == 503, 3, what="503: the subset has no endpoints")
    metrics = httpx.get(gw.url("admin") + "/metrics", timeout=5).text
    assert 'meshgate_discovery_endpoints{service="hello",subset="v1"} 0.0' in metrics
    assert 'meshgate_discovery_errors_total{service="hello",source="dns",subset="v1"} 0.0' in metrics


def test_workers_all_follow_the_supervisors_discovery(
    start_gateway: StartGateway, dns_server: StartDns, pair: tuple[LoopbackUpstream, LoopbackUpstream]
) -> None:
    a, _ = pair
    dns = dns_server({NAME: ["127.0.0.2"]})
    gw = dns_gateway(start_gateway, dns.address, a.port, "--workers", "2")
    wait_for(lambda: answer(gw) == (200, "a"), what="traffic to a")
    dns.set_hosts({NAME: ["127.0.0.3"]})
    wait_for(lambda: answer(gw) == (200, "b"), 3, what="traffic to b")
    # New connections spread over both workers: none may still route to a.
    assert {answer(gw) for _ in range(40)} == {(200, "b")}
    metrics = httpx.get(gw.url("admin") + "/metrics", timeout=5).text
    assert 'meshgate_discovery_endpoints{service="hello",subset="v1"} 1.0' in metrics
    assert gw.output().count("discovery hello/v1: 1 endpoints") == 2, "discovery ran more than once"


# etcd and `meshgate register`


class Register:
    """A `meshgate register` process."""

    def __init__(self, etcd: str, address: str, *args: str) -> None:
        command = ["register", "--etcd", etcd, "--prefix", PREFIX, "--address", address, *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshgate.cli", *command],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def finish(self, signum: int) -> tuple[int, str]:
        self.proc.send_signal(signum)
        _, stderr = self.proc.communicate(timeout=10)
        return self.proc.returncode, stderr


@pytest.fixture
def registers() -> Iterator[list[Register]]:
    started: list[Register] = []
    yield started
    for register in started:
        if register.proc.poll() is None:
            register.finish(signal.SIGKILL)


def test_register_lists_an_endpoint_until_it_stops_or_dies(
    start_gateway: StartGateway, start_upstream: StartUpstream, etcd: EtcdServer, registers: list[Register]
) -> None:
    app = start_upstream("app")
    subsets = {"v1": {"etcd": PREFIX}}
    gw = start_gateway(gateway_config({"hello": {"subsets": subsets}}, discovery={"etcd": [etcd.client_url]}))
    assert answer(gw)[0] == 503, "nothing registered yet"
    registers.append(Register(etcd.client_url, app.address, "--ttl", "2s"))
    wait_for(lambda: answer(gw) == (200, "app"), what="traffic to the registered endpoint")
    status, stderr = registers[0].finish(signal.SIGTERM)
    stopped = time.monotonic()
    assert status == 0 and "unregistered" in stderr, stderr
    wait_for(lambda: answer(gw)[0] == 503, 1, 0.01, what="the endpoint gone at once: its lease was revoked")
    assert time.monotonic() - stopped < 1
    registers.append(Register(etcd.client_url, app.address, "--ttl", "2s"))
    wait_for(lambda: answer(gw) == (200, "app"), what="registered again")
    registers[1].finish(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: answer(gw)[0] == 503, 2 + 3, 0.05, what="the endpoint gone when its lease expired")
    assert time.monotonic() - killed > 0.5, "gone before its lease could have expired"


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--etcd", "http://127.0.0.1:{dead}"], 1, "meshgate: etcd is unreachable: http://127.0.0.1:"),
        (["--etcd", "etcd://127.0.0.1:2379"], 2, "argument --etcd: expected an http:// or https:// URL"),
        (["--etcd", "http://127.0.0.1:{dead}", "--ttl", "500ms"], 2, "argument --ttl: expected at least 1s"),
    ],
)
def test_register_refuses_with_one_line(args: list[str], status: int, message: str) -> None:
    (dead,) = free_ports(1)
    command = [arg.format(dead=dead) for arg in args]
    done = subprocess.run(
        [sys.executable, "-m", "meshgate.cli", "register", "--prefix", PREFIX, "--address", "10.0.0.5:8080", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == status and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1].count(message) == 1


def test_a_joined_gateway_discovers_the_endpoints_its_dashboard_names(
    tmp_path: Path, dns_server: StartDns, pair: tuple[LoopbackUpstream, LoopbackUpstream]
) -> None:
    """The layout of compose/ and deploy/kubernetes: the dashboard's mesh names a DNS name, the owning group's
    gateway resolves it with the resolvers of its own `gateway:` section, and a call through another group's
    gateway follows the records; `/ready` and admin `/config` show the discovered endpoints."""
    a, b = pair
    dns = dns_server({NAME: ["127.0.0.2"]})
    mesh = {
        "groups": {"shop": [], "hello": ["hello"]},
        "services": {"hello": {"subsets": {"v1": {"dns": f"{NAME}:{a.port}"}}}},
    }
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(mesh))
    dashboard = Dashboard(tmp_path / "dashboard", "--config", str(tmp_path / "mesh.yaml"))
    shop = joined_gateway(dashboard, tmp_path, "shop")
    hello = joined_gateway(dashboard, tmp_path, "hello", discovery={"resolvers": [dns.address]})
    try:
        wait_ready(shop, hello)
        outbound = shop.url("outbound") + "/echo"

        def upstream() -> str | None:
            answer: str | None = httpx.get(outbound, headers={"host": "hello"}, timeout=5).headers.get("x-upstream")
            return answer

        wait_for(lambda: upstream() == "a", 15, what="shop reaches hello's discovered endpoint through the mesh")
        live = httpx.get(hello.url("admin") + "/config", timeout=5).json()["config"]["services"]["hello"]
        assert live["subsets"]["v1"] == {"endpoints": [a.address], "dns": f"{NAME}:{a.port}"}
        dns.set_hosts({NAME: ["127.0.0.3"]})
        wait_for(lambda: upstream() == "b", 5, what="the call following the changed record (TTL 1 s)")
    finally:
        for gateway in (shop, hello):
            gateway.stop()
        dashboard.stop()
