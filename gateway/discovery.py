"""Endpoint discovery: subsets whose endpoints come from DNS records or from leased etcd keys.

A `Discovery` sits between the config source and the runtime. The source publishes a `Config` whose subsets may
be `discovered`; Discovery keeps that config and, for each discovered subset, a task watching its source and the
endpoints last found there. It publishes to the runtime the same config with every discovered subset's
`endpoints` filled in, under the source's version: again whenever the source publishes, and whenever a subset's
set of endpoints changes (an identical answer publishes nothing). The runtime's ordinary `apply` does the swap:
endpoints that stay keep their state, and the pool of a removed address is retired, so requests in flight there
finish on their connections while its idle connections close. That is the drain.

Sources, per subset:
- `dns: name:port`: the name's A and AAAA records, each address with the port given; asked again when the
  answer's TTL runs out (clamped to 1 s..30 s). This is how a Kubernetes headless Service or Consul DNS is read.
- `srv: name`: the SRV records with the lowest priority value (RFC 2782 failover); each target's addresses (from
  the answer's additional section when there, else asked for) with the record's port.
- `etcd: /prefix/`: the keys under the prefix, each named `<prefix><host:port>` (`meshgate register` writes them
  under a lease): one Range, then a Watch from the revision after it.
A name that does not exist (NXDOMAIN) or has no records empties the subset (a headless Service scaled to zero) and
is asked again after 5 s. A failure (timeout, SERVFAIL, refusal, etcd unreachable, a broken watch) keeps the last
endpoints and retries with backoff; it is logged when failing starts and when it stops, and counted in
`meshgate_discovery_errors_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.config import Config, Subset
from gateway.config import Discovery as DiscoverySection
from gateway.etcd import EtcdClient, EtcdError, key_of, prefix_end
from gateway.runtime import AdminState
from gateway.units import Address, Backoff, parse_address

if TYPE_CHECKING:
    from gateway.runtime import Peers, Publish, Spawn

log = logging.getLogger("meshgate.discovery")

QUERY_TIMEOUT = 5.0  # a DNS lookup (every server, every try) or an etcd request
TTL_MIN, TTL_MAX = 1.0, 30.0  # Docker's embedded DNS answers with TTL 600: a scale-out shows within 30 s
ABSENT_RETRY = 5.0  # a name without records is asked again after this long
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
SubsetKey = tuple[str, str]  # (service, subset)
Endpoints = frozenset[Address]
Lookup = Callable[[dns.asyncresolver.Resolver], Awaitable[tuple[Endpoints, float]]]


class DiscoveryError(Exception):
    """A lookup that got no answer to go by (timeout, SERVFAIL, refusal, etcd away): the last endpoints stay."""


@dataclass(frozen=True, slots=True)
class Target:
    """What one discovered subset watches; a subset whose target changes is watched anew."""

    kind: str  # dns, srv or etcd: the `source` label of meshgate_discovery_errors_total
    name: str  # the DNS name, the SRV name or the etcd key prefix
    port: int = 0  # dns: the endpoints' port
    resolvers: tuple[Address, ...] = ()  # dns, srv: empty for the system's (/etc/resolv.conf)
    etcd: tuple[str, ...] = ()
    label: str = ""  # Subset.source

    @classmethod
    def of(cls, subset: Subset, section: DiscoverySection) -> Target:
        label = str(subset.source)
        if subset.dns is not None:
            return cls("dns", subset.dns.host, subset.dns.port, resolvers=section.resolvers, label=label)
        if subset.srv is not None:
            return cls("srv", subset.srv, resolvers=section.resolvers, label=label)
        return cls("etcd", str(subset.etcd), etcd=section.etcd, label=label)

    def __str__(self) -> str:
        return self.label


class Discovery:
    """Fills the endpoints of discovered subsets into each config a source publishes, and publishes again when
    they change. `state.config` is then the filled config, the one serving, which admin /config shows.

    >>> discovery = Discovery(state, runtime.apply, runtime.spawn)  # doctest: +SKIP
    >>> source.start(state, discovery.publish, addresses, runtime.spawn)
    >>> ...
    >>> await discovery.close()
    """

    def __init__(self, state: AdminState, publish: Publish, spawn: Spawn, timeout: float = QUERY_TIMEOUT) -> None:
        self.state = state
        self.downstream = publish
        self.spawn = spawn
        self.timeout = timeout
        self.latest: tuple[Config, int, Peers | None] | None = None
        self.watches: dict[SubsetKey, Watch] = {}
        self.errors: dict[tuple[str, str, str], int] = {}  # (service, subset, kind): failed lookups
        state.registry.register(_DiscoveryCollector(self))
        state.waiting = self.warming

    def warming(self) -> str | None:
        """A subset whose source has not answered yet (found or failed), which keeps /ready at 503."""
        waiting = next((watch for watch in self.watches.values() if not watch.answered), None)
        return (
            None if waiting is None else f"the first endpoints of {waiting.key[0]}/{waiting.key[1]} ({waiting.target})"
        )

    def publish(self, config: Config, version: int, peers: Peers | None) -> None:
        """What the source calls instead of the runtime's `apply`."""
        self.latest = (config, version, peers)
        wanted = {
            (service.name, subset.name): Target.of(subset, config.gateway.discovery)
            for service in config.services
            for subset in service.subsets
            if subset.discovered
        }
        for key, watch in list(self.watches.items()):
            if wanted.get(key) != watch.target:
                watch.stop()
                del self.watches[key]
        for key, target in wanted.items():
            if key not in self.watches:
                self.watches[key] = self._watch(key, target)
        self._publish()

    def _watch(self, key: SubsetKey, target: Target) -> Watch:
        watch = Watch(self, key, target)
        if target.kind == "etcd" and not target.etcd:
            # A config from the dashboard cannot know this gateway's own section: not a reason to refuse it.
            log.error("%s uses %s, but gateway.discovery.etcd names no etcd endpoints: it stays empty", watch, target)
            watch.answered = True
        elif target.kind == "etcd":
            watch.task = self.spawn(watch_etcd(watch, self.timeout))
        else:
            lookup: Lookup = (
                partial(lookup_host, name=target.name, port=target.port)
                if target.kind == "dns"
                else partial(lookup_srv, name=target.name)
            )
            watch.task = self.spawn(watch_dns(watch, lookup, self.timeout))
        return watch

    def found(self, watch: Watch, endpoints: Endpoints) -> None:
        """A watch's latest answer: published if it changed the subset's endpoints."""
        if self.watches.get(watch.key) is not watch or endpoints == watch.endpoints:
            return
        added, removed = sorted(endpoints - watch.endpoints), sorted(watch.endpoints - endpoints)
        watch.endpoints = endpoints
        log.info(
            "%s: %d endpoints (added: %s; removed: %s)",
            watch,
            len(endpoints),
            " ".join(map(str, added)) or "none",
            " ".join(map(str, removed)) or "none",
        )
        self._publish()

    def failed(self, watch: Watch) -> None:
        key = (*watch.key, watch.target.kind)
        self.errors[key] = self.errors.get(key, 0) + 1

    def _publish(self) -> None:
        assert self.latest is not None, "watches exist only once a source has published"
        config, version, peers = self.latest
        filled = fill(config, {key: watch.endpoints for key, watch in self.watches.items()})
        self.state.config = filled
        self.downstream(filled, version, peers)

    async def close(self) -> None:
        tasks = [watch.task for watch in self.watches.values() if watch.task is not None]
        for watch in self.watches.values():
            watch.stop()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Watch:
    """One discovered subset: its target, its task, the endpoints found and whether lookups are failing."""

    def __init__(self, discovery: Discovery, key: SubsetKey, target: Target) -> None:
        self.discovery = discovery
        self.key = key
        self.target = target
        self.task: asyncio.Task[None] | None = None
        self.endpoints: Endpoints = frozenset()
        self.retry = Backoff(BACKOFF_MIN, BACKOFF_MAX)  # counts the failed lookups in a row
        self.answered = False  # found or failed at least once
        self.ignored: set[str] = set()  # etcd keys that name no endpoint, warned about once each

    def __str__(self) -> str:
        return f"discovery {self.key[0]}/{self.key[1]}"

    def found(self, endpoints: Endpoints) -> None:
        self.answered = True
        if self.retry.failures:
            log.info("%s: %s answers again", self, self.target)
            self.retry.succeeded()
        self.discovery.found(self, endpoints)

    def failed(self, reason: str) -> float:
        """Count a failed lookup, log it if it is the first in a row, and say how long to wait before the next."""
        self.answered = True
        if not self.retry.failures:
            kept = len(self.endpoints)
            log.warning("%s: %s failed (%s); keeping its %d endpoints and retrying", self, self.target, reason, kept)
        self.discovery.failed(self)
        return self.retry.failed()

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


def fill(config: Config, found: Mapping[SubsetKey, Endpoints]) -> Config:
    """`config` with each discovered subset's `endpoints` set to what was found, sorted (its `dns`, `srv` or
    `etcd` stays, so the config still says where they came from)."""
    services = tuple(
        replace(
            service,
            subsets=tuple(
                replace(subset, endpoints=tuple(sorted(found.get((service.name, subset.name), ()))))
                if subset.discovered
                else subset
                for subset in service.subsets
            ),
        )
        for service in config.services
    )
    return replace(config, services=services)


# DNS


async def watch_dns(watch: Watch, lookup: Lookup, timeout: float) -> None:
    while True:
        try:
            endpoints, refresh = await lookup(resolver_for(watch.target.resolvers, timeout))
        except DiscoveryError as err:
            delay = watch.failed(str(err))
        else:
            watch.found(endpoints)
            delay = refresh
        await asyncio.sleep(delay)


def resolver_for(servers: tuple[Address, ...], timeout: float) -> dns.asyncresolver.Resolver:
    """The given DNS servers, or the system's. With the system's, relative names go through its search list, so
    `catalog.shop.svc` resolves in a Kubernetes pod as it does for the pod's apps."""
    try:
        if servers:
            resolver = dns.asyncresolver.Resolver(configure=False)  # config.py took IP addresses only
            resolver.nameservers = [dns.nameserver.Do53Nameserver(server.host, port=server.port) for server in servers]
        else:
            resolver = dns.asyncresolver.Resolver()  # reads /etc/resolv.conf (each lookup: it may change)
            resolver.use_search_by_default = True
    except dns.exception.DNSException as err:  # no usable /etc/resolv.conf
        raise DiscoveryError(str(err)) from None
    resolver.lifetime = timeout
    return resolver


async def lookup_host(resolver: dns.asyncresolver.Resolver, name: str, port: int) -> tuple[Endpoints, float]:
    """The name's A and AAAA addresses with `port`, and when to ask again."""
    hosts, ttl = await _addresses(resolver, name)
    return frozenset(Address(host, port) for host in hosts), _refresh(ttl)


async def lookup_srv(resolver: dns.asyncresolver.Resolver, name: str) -> tuple[Endpoints, float]:
    """The endpoints of the SRV records with the lowest priority value, and when to ask again.

    Weights are not used: they only spread load among same-priority targets, which the subset's balancer does
    by its own measure (latency or requests in flight) once the targets are its endpoints.
    """
    answer = await _resolve(resolver, name, "SRV")
    if answer is None or answer.rrset is None:
        return frozenset(), ABSENT_RETRY
    records = [record for record in answer.rrset if record.target != dns.name.root]  # ".": none offered
    best = min((record.priority for record in records), default=0)
    endpoints: set[Address] = set()
    ttls = [answer.rrset.ttl]
    for record in (record for record in records if record.priority == best):
        hosts, ttl = _glue(answer.response, record.target) or await _addresses(resolver, record.target)
        endpoints.update(Address(host, record.port) for host in hosts)
        if ttl is not None:
            ttls.append(ttl)
    return frozenset(endpoints), _refresh(min(ttls) if endpoints else None)


async def _addresses(resolver: dns.asyncresolver.Resolver, name: str | dns.name.Name) -> tuple[set[str], int | None]:
    """A and AAAA addresses, and the lowest TTL among them (None when the name has none)."""
    answers = [await _resolve(resolver, name, rdtype) for rdtype in ("A", "AAAA")]
    rrsets = [answer.rrset for answer in answers if answer is not None and answer.rrset is not None]
    hosts = {record.address for rrset in rrsets for record in rrset}
    return hosts, min((rrset.ttl for rrset in rrsets), default=None)


async def _resolve(
    resolver: dns.asyncresolver.Resolver, name: str | dns.name.Name, rdtype: str
) -> dns.resolver.Answer | None:
    """One query: its answer (`rrset` None when the name has no such records), None when the name does not
    exist (NXDOMAIN), or a DiscoveryError when there is no answer to go by."""
    try:
        return await resolver.resolve(name, rdtype, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return None
    except (dns.exception.DNSException, OSError) as err:  # timeouts; SERVFAIL or REFUSED from every server
        raise DiscoveryError(str(err) or type(err).__name__) from None


def _glue(response: dns.message.Message, target: dns.name.Name) -> tuple[set[str], int] | None:
    """A target's addresses from the additional section of the SRV answer, if the server sent them."""
    rrsets = [
        rrset
        for rrset in response.additional
        if rrset.name == target and rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
    ]
    if not rrsets:
        return None
    return {record.address for rrset in rrsets for record in rrset}, min(rrset.ttl for rrset in rrsets)


def _refresh(ttl: int | None) -> float:
    return ABSENT_RETRY if ttl is None else min(TTL_MAX, max(TTL_MIN, float(ttl)))


# etcd


async def watch_etcd(watch: Watch, timeout: float) -> None:
    etcd = EtcdClient(watch.target.etcd, timeout)
    try:
        while True:
            try:
                await _follow(watch, etcd)  # returns when the stream went idle: read everything again
            except EtcdError as err:
                await asyncio.sleep(watch.failed(str(err)))
    finally:
        await etcd.aclose()


async def _follow(watch: Watch, etcd: EtcdClient) -> None:
    """One Range over the prefix, then its Watch from the next revision: no change falls in between."""
    prefix = watch.target.name
    kvs, revision = await etcd.range(prefix, prefix_end(prefix), keys_only=True)
    keys = {key_of(kv) for kv in kvs}
    watch.found(frozenset(_endpoints(watch, keys)))
    created = False
    async for result in etcd.watch(prefix, prefix_end(prefix), revision + 1):
        if result.get("canceled"):
            raise EtcdError(f"etcd canceled the watch (compacted at revision {result.get('compact_revision')})")
        created = True
        events = result.get("events", [])
        for event in events:
            key = key_of(event["kv"])
            if event.get("type") == "DELETE":  # deleted, or its lease expired or was revoked
                keys.discard(key)
            else:
                keys.add(key)
        if events:
            watch.found(frozenset(_endpoints(watch, keys)))
    if not created:
        raise EtcdError("the watch stream closed before etcd created the watch")


def _endpoints(watch: Watch, keys: Iterable[str]) -> Iterator[Address]:
    for key in keys:
        suffix = key[len(watch.target.name) :]
        try:
            address = parse_address(suffix)
            if address.port >= 1:
                yield address
                continue
        except ValueError:
            pass  # warned about below
        if key not in watch.ignored:
            watch.ignored.add(key)
            log.warning("%s: ignoring etcd key %s: after the prefix, expected host:port, got %r", watch, key, suffix)


class _DiscoveryCollector(Collector):
    """Endpoints per discovered subset and failed lookups, in the supervisor's registry with --workers."""

    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery

    def collect(self) -> Iterator[Metric]:
        endpoints = GaugeMetricFamily(
            "meshgate_discovery_endpoints", "Endpoints a discovered subset has now", labels=("service", "subset")
        )
        errors = CounterMetricFamily(
            "meshgate_discovery_errors",
            "Failed lookups of a discovered subset's source (its last endpoints stay in use)",
            labels=("service", "subset", "source"),
        )
        for (service, subset), watch in sorted(self.discovery.watches.items()):
            endpoints.add_metric((service, subset), len(watch.endpoints))
            key = (service, subset, watch.target.kind)
            errors.add_metric(key, self.discovery.errors.get(key, 0))
        yield endpoints
        yield errors
