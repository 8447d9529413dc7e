"""`Discovery` against real sources: dnsmasq (tests/dns.py) for A, AAAA and SRV records, and etcd (tests/etcd.py)
for leased keys. Each test publishes a config as a source would and reads what Discovery hands the runtime."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from prometheus_client import generate_latest

from gateway.admin import admin_handler
from gateway.config import Config
from gateway.discovery import Discovery
from gateway.etcd import EtcdClient, b64
from gateway.register import register
from gateway.runtime import AdminState, Peers
from gateway.telemetry import merge
from gateway.units import Address
from tests.dns import StartDns
from tests.etcd import EtcdServer

pytestmark = pytest.mark.anyio
PREFIX = "/meshgate/endpoints/catalog/v4/"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Subject:
    """A Discovery whose publications are recorded, as the runtime would receive them."""

    def __init__(self) -> None:
        self.published: list[tuple[Config, int]] = []
        self.state = AdminState(config=Config(), stats=lambda: merge([]), lookup=lambda request_id: [])
        self.tasks: set[asyncio.Task[Any]] = set()
        self.discovery = Discovery(self.state, self.apply, self.spawn, timeout=1.0)

    def apply(self, config: Config, version: int, peers: Peers | None) -> None:
        self.published.append((config, version))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def publish(self, subsets: dict[str, Any], version: int = 1, **discovery: list[str]) -> None:
        first = next(iter(subsets))
        services = {"catalog": {"subsets": subsets, "routes": [{"name": "default", "split": {first: 100}}]}}
        self.discovery.publish(Config.parse({"gateway": {"discovery": discovery}, "services": services}), version, None)

    def endpoints(self, subset: str = "v1") -> list[str]:
        service = self.published[-1][0].service("catalog")
        assert service is not None
        return [str(address) for address in next(s for s in service.subsets if s.name == subset).endpoints]

    def sample(self, name: str, **labels: str) -> float | None:
        return self.state.registry.get_sample_value(name, {"service": "catalog", "subset": "v1", **labels})


@pytest.fixture
async def subject() -> AsyncIterator[Subject]:
    made = Subject()
    yield made
    await made.discovery.close()
    assert all(task.done() for task in made.tasks), "a watch outlived Discovery.close()"


async def eventually(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(interval)
    return result


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "meshgate.discovery" and text in r.getMessage()]


# DNS


async def test_a_names_a_and_aaaa_records_are_its_endpoints(subject: Subject, dns_server: StartDns) -> None:
    dns = dns_server({"catalog.shop.test": ["127.0.0.2", "::1"], "v6.shop.test": ["::1"]})
    subsets = {"v1": {"dns": "catalog.shop.test:8080"}, "v2": {"dns": "v6.shop.test:9090"}}
    subject.publish(subsets, version=7, resolvers=[dns.address])
    await eventually(lambda: subject.endpoints() == ["127.0.0.2:8080", "[::1]:8080"], what="A and AAAA of v1")
    await eventually(lambda: subject.endpoints("v2") == ["[::1]:9090"], what="v2: AAAA only, no A records")
    assert {version for _, version in subject.published} == {7}, "found endpoints are applied as the same version"
    # What admin /config shows: the live endpoints, and still where they come from.
    live = subject.state.config.service("catalog")
    assert live is not None and live.subsets[0].dns == Address("catalog.shop.test", 8080)
    assert live.subsets[0].endpoints == (Address("127.0.0.2", 8080), Address("::1", 8080))
    assert subject.sample("meshgate_discovery_endpoints") == 2
    assert b'meshgate_discovery_errors_total{service="catalog",source="dns",subset="v1"} 0.0' in generate_latest(
        subject.state.registry
    )


async def test_srv_records_of_the_lowest_priority_and_their_targets(subject: Subject, dns_server: StartDns) -> None:
    srv = "_http._tcp.catalog.shop.test"
    dns = dns_server(
        {"a.shop.test": ["127.0.0.2"], "b.shop.test": ["127.0.0.3", "::1"], "backup.shop.test": ["127.0.0.4"]},
        srv=[f"{srv},a.shop.test,8080,10,90", f"{srv},b.shop.test,8081,10,10", f"{srv},backup.shop.test,9000,20"],
    )
    subject.publish({"v1": {"srv": srv}}, resolvers=[dns.address])
    wanted = ["127.0.0.2:8080", "127.0.0.3:8081", "[::1]:8081"]
    await eventually(lambda: subject.endpoints() == wanted, what="priority 10 targets, not the backup")
    dns.set_hosts({"a.shop.test": ["127.0.0.5"], "b.shop.test": ["127.0.0.3", "::1"], "backup.shop.test": []})
    wanted = ["127.0.0.3:8081", "127.0.0.5:8080", "[::1]:8081"]
    await eventually(lambda: subject.endpoints() == wanted, 5, what="a target's new address")


async def test_a_changed_record_is_picked_up_when_its_ttl_runs_out(subject: Subject, dns_server: StartDns) -> None:
    dns = dns_server({"catalog.shop.test": ["127.0.0.2"]})
    subject.publish({"v1": {"dns": "catalog.shop.test:8080"}}, resolvers=[dns.address])
    await eventually(lambda: subject.endpoints() == ["127.0.0.2:8080"])
    published = len(subject.published)
    asked = dns.queries("catalog.shop.test")
    await eventually(lambda: dns.queries("catalog.shop.test") >= asked + 4, 5, what="two more lookups (A, AAAA)")
    assert len(subject.published) == published, "an unchanged answer was published again"
    dns.set_hosts({"catalog.shop.test": ["127.0.0.3"]})
    started = time.monotonic()
    await eventually(lambda: subject.endpoints() == ["127.0.0.3:8080"], 5, 0.01, what="the new address")
    assert time.monotonic() - started < 1 + 1.0, "not re-resolved when the 1 s TTL ran out"
    assert len(subject.published) == published + 1


async def test_a_name_that_goes_away_empties_the_subset(
    subject: Subject, dns_server: StartDns, caplog: pytest.LogCaptureFixture
) -> None:
    dns = dns_server({"catalog.shop.test": ["127.0.0.2"]})
    subject.publish({"v1": {"dns": "catalog.shop.test:8080"}}, resolvers=[dns.address])
    await eventually(lambda: subject.endpoints() == ["127.0.0.2:8080"])
    dns.set_hosts({})  # NXDOMAIN: a headless Service scaled to zero
    await eventually(lambda: subject.endpoints() == [], 3, what="the subset emptied")
    dns.set_hosts({"catalog.shop.test": ["127.0.0.3"]})
    await eventually(lambda: subject.endpoints() == ["127.0.0.3:8080"], 5 + 2, what="asked again after 5 s")
    assert subject.sample("meshgate_discovery_errors_total", source="dns") == 0
    assert not warnings(caplog, "failed"), "an answer that the name does not exist is not a failure"


async def test_a_resolver_that_is_down_keeps_the_last_endpoints(
    subject: Subject, dns_server: StartDns, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "meshgate.discovery")
    dns = dns_server({"catalog.shop.test": ["127.0.0.2"]})
    subject.publish({"v1": {"dns": "catalog.shop.test:8080"}}, resolvers=[dns.address])
    await eventually(lambda: subject.endpoints() == ["127.0.0.2:8080"])
    dns.stop()

    def errors() -> float:
        return subject.sample("meshgate_discovery_errors_total", source="dns") or 0

    await eventually(lambda: errors() >= 2, 10, what="two failed lookups")
    assert subject.endpoints() == ["127.0.0.2:8080"]
    assert len(warnings(caplog, "failed")) == 1, "logged per retry, not once per outage"
    assert dns.start()
    dns.set_hosts({"catalog.shop.test": ["127.0.0.3"]})
    await eventually(lambda: subject.endpoints() == ["127.0.0.3:8080"], 35, what="the resolver back")
    assert len(warnings(caplog, "answers again")) == 1


async def test_a_changed_or_removed_source_stops_its_watch(subject: Subject, dns_server: StartDns) -> None:
    dns = dns_server({"one.shop.test": ["127.0.0.2"], "two.shop.test": ["127.0.0.3"]})
    subject.publish({"v1": {"dns": "one.shop.test:8080"}}, resolvers=[dns.address])
    await eventually(lambda: subject.endpoints() == ["127.0.0.2:8080"])
    first = subject.discovery.watches["catalog", "v1"].task
    subject.publish({"v1": {"dns": "two.shop.test:8080"}}, version=2, resolvers=[dns.address])
    await eventually(lambda: subject.endpoints() == ["127.0.0.3:8080"], what="the new name's address")
    assert first is not None and first.cancelled()
    second = subject.discovery.watches["catalog", "v1"].task
    subject.publish({"v1": {"endpoints": ["127.0.0.9:80"]}}, version=3)
    assert subject.endpoints() == ["127.0.0.9:80"] and not subject.discovery.watches
    await eventually(lambda: second is not None and second.cancelled(), what="the watch stopped")


async def test_ready_waits_for_each_subsets_first_answer(subject: Subject, dns_server: StartDns) -> None:
    """As Envoy warms a cluster: /ready stays 503 until every discovered subset has found endpoints or failed once
    (a failure must not hold readiness back for ever: the subset then serves what it has, nothing)."""
    ready = admin_handler(subject.state)
    subject.state.ready = True  # a config is loaded
    dns = dns_server({"catalog.shop.test": ["127.0.0.2"]})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # a DNS server that never answers
        silent.bind(("127.0.0.1", 0))
        quiet = f"127.0.0.1:{silent.getsockname()[1]}"
        subject.publish({"v1": {"dns": "catalog.shop.test:8080"}}, resolvers=[quiet])
        status, _, body = ready(b"GET", b"/ready", b"127.0.0.1", {})  # type: ignore[misc]
        assert (status, body) == (503, b"waiting for the first endpoints of catalog/v1 (dns catalog.shop.test:8080)\n")
        await eventually(lambda: subject.state.waiting() is None, 3, what="the first lookup to time out (1 s)")
        assert ready(b"GET", b"/ready", b"127.0.0.1", {})[:3:2] == (200, b"ready\n")  # type: ignore[index]
        assert subject.endpoints() == []
    subject.publish({"v1": {"dns": "catalog.shop.test:8080"}}, version=2, resolvers=[dns.address])
    assert subject.state.waiting() is not None, "a new source is waited for again"
    await eventually(lambda: subject.state.waiting() is None, what="dnsmasq's answer")
    assert subject.endpoints() == ["127.0.0.2:8080"]


# etcd


@pytest.fixture
async def etcd_client(etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    client = EtcdClient([etcd.client_url])
    yield client
    await client.aclose()


async def test_keys_under_the_prefix_are_the_endpoints(
    subject: Subject, etcd: EtcdServer, etcd_client: EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    await etcd_client.put(PREFIX + "127.0.0.2:8080", "")
    await etcd_client.put("/meshgate/endpoints/catalog/v40/127.0.0.9:80", "")  # another prefix
    subject.publish({"v1": {"etcd": PREFIX}}, etcd=[etcd.client_url])
    await eventually(lambda: subject.endpoints() == ["127.0.0.2:8080"], what="the key that was there (Range)")
    for name in ("[::1]:8081", "not-an-address", "127.0.0.3:0"):
        await etcd_client.put(PREFIX + name, "")
    await eventually(lambda: subject.endpoints() == ["127.0.0.2:8080", "[::1]:8081"], what="a new key (Watch)")
    await etcd_client.call("kv/deleterange", {"key": b64(PREFIX + "127.0.0.2:8080")})
    await eventually(lambda: subject.endpoints() == ["[::1]:8081"], what="a deleted key gone")
    await etcd_client.put(PREFIX + "127.0.0.4:8080", "")
    await eventually(lambda: subject.endpoints() == ["127.0.0.4:8080", "[::1]:8081"])
    ignored = warnings(caplog, "ignoring etcd key")
    assert len(ignored) == 2 and "not-an-address" in ignored[0] and "127.0.0.3:0" in ignored[1], ignored
    assert subject.sample("meshgate_discovery_endpoints") == 2


async def test_an_endpoint_goes_when_its_lease_ends(
    subject: Subject, etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    subject.publish({"v1": {"etcd": PREFIX}}, etcd=[etcd.client_url])
    short, revoked = await etcd_client.grant(2), await etcd_client.grant(60)
    await etcd_client.put(PREFIX + "127.0.0.2:8080", "", short)
    await etcd_client.put(PREFIX + "127.0.0.3:8080", "", revoked)
    await eventually(lambda: subject.endpoints() == ["127.0.0.2:8080", "127.0.0.3:8080"])
    started = time.monotonic()
    await etcd_client.revoke(revoked)
    await eventually(lambda: subject.endpoints() == ["127.0.0.2:8080"], 2, 0.01, what="the revoked lease's key gone")
    assert time.monotonic() - started < 1
    await eventually(lambda: subject.endpoints() == [], 8, what="the expired lease's key gone")


class Relay:
    """A TCP relay in front of etcd that a test can cut and restore: a network partition, as the watch sees it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, upstream_writer}
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass  # cut: the other pipe ends too
        finally:
            writer.close()
            self.writers.discard(writer)


async def test_a_broken_watch_reads_everything_again(
    subject: Subject, etcd: EtcdServer, etcd_client: EtcdClient
) -> None:
    host, port = etcd.client_url.removeprefix("http://").split(":")
    relay = Relay((host, int(port)))
    await relay.start()
    try:
        await etcd_client.put(PREFIX + "127.0.0.2:8080", "")
        subject.publish({"v1": {"etcd": PREFIX}}, etcd=[f"http://127.0.0.1:{relay.port}"])
        await eventually(lambda: subject.endpoints() == ["127.0.0.2:8080"])
        await relay.cut()
        await etcd_client.put(PREFIX + "127.0.0.3:8080", "")
        await etcd_client.call("kv/deleterange", {"key": b64(PREFIX + "127.0.0.2:8080")})
        _, revision = await etcd_client.range(PREFIX)
        await etcd_client.call("kv/compaction", {"revision": str(revision)})  # the missed events are gone for good
        await eventually(lambda: (subject.sample("meshgate_discovery_errors_total", source="etcd") or 0) >= 1)
        assert subject.endpoints() == ["127.0.0.2:8080"], "the last endpoints stay while etcd is away"
        await relay.start()
        await eventually(lambda: subject.endpoints() == ["127.0.0.3:8080"], 10, what="a fresh Range after the outage")
    finally:
        await relay.cut()


async def test_an_etcd_subset_without_etcd_endpoints_stays_empty(
    subject: Subject, caplog: pytest.LogCaptureFixture
) -> None:
    subject.publish({"v1": {"etcd": PREFIX}})
    subject.publish({"v1": {"etcd": PREFIX}}, version=2)
    assert subject.endpoints() == [] and [version for _, version in subject.published] == [1, 2]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "catalog/v1" in errors[0] and "gateway.discovery.etcd" in errors[0], errors


# meshgate register (its command line and signals: tests/e2e/test_discovery.py)


async def test_register_lists_its_key_again_after_its_lease_expired(
    subject: Subject, etcd: EtcdServer, etcd_client: EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = etcd.client_url.removeprefix("http://").split(":")
    relay = Relay((host, int(port)))
    await relay.start()
    subject.publish({"v1": {"etcd": PREFIX}}, etcd=[etcd.client_url])
    stop = asyncio.Event()
    registering = subject.spawn(register(EtcdClient([f"http://127.0.0.1:{relay.port}"]), PREFIX + "[::1]:80", 2, stop))
    try:
        await eventually(lambda: subject.endpoints() == ["[::1]:80"], what="registered")
        await relay.cut()  # renewals fail: the lease runs out
        await eventually(lambda: subject.endpoints() == [], 8, what="the lease expired")
        await relay.start()
        await eventually(lambda: subject.endpoints() == ["[::1]:80"], 5, what="registered again")
        assert any("registering" in r.getMessage() and "again" in r.getMessage() for r in caplog.records)
        stop.set()
        assert await registering == 0
        await eventually(lambda: subject.endpoints() == [], 1, what="the lease revoked on stop")
    finally:
        stop.set()
        await relay.cut()
