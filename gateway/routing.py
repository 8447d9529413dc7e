"""The route table: an immutable snapshot of services, routes, weighted splits and balancers. No I/O.

A `RouteTable` is built from a `Config` whenever the configuration changes and swapped in with one reference
assignment; requests in flight keep the table they started with. Lookup is: authority -> `ServiceRoutes`
(`RouteTable.lookup`), then path and headers -> `RouteEntry` (`ServiceRoutes.match`), then the entry's smooth
weighted split -> `SubsetTarget`, whose balancer picks an endpoint.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from random import random

from gateway.balancer import Balancer, Endpoint
from gateway.config import Config, Retries, Route, Service
from gateway.rpc import GRPC_RETRY_ON
from gateway.units import Address

EndpointFactory = Callable[[str, Address], Endpoint]

_HOST_CACHE_LIMIT = 4096  # bounded: a flood of random Host headers must not grow memory


class SmoothWeighted:
    """nginx's smooth weighted round robin: exact proportions, evenly interleaved, no random drift.

    >>> split = SmoothWeighted([90, 10])
    >>> [split.next() for _ in range(10)]
    [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    """

    __slots__ = ("weights", "current", "total")

    def __init__(self, weights: list[int]) -> None:
        self.weights = weights
        self.current = [0] * len(weights)
        self.total = sum(weights)

    def next(self) -> int:
        current, weights = self.current, self.weights
        best = 0
        for i, weight in enumerate(weights):
            current[i] += weight
            if current[i] > current[best]:
                best = i
        current[best] -= self.total
        return best


RETRY_WINDOW = 10.0  # seconds of requests and retries the retry budget looks back on (Linkerd's ttl)
MIN_RETRIES_PER_SECOND = 10  # retries the budget always allows, however few requests came (Linkerd's default)


class ServiceLoad:
    """Requests of one service in flight and waiting for a connection, and the retry budget's counts. Shared by
    every snapshot that names the service, so breakers, retry budgets and the in-flight gauge also count requests
    still finishing on an older snapshot.

    The retry budget is Finagle's and Linkerd's: over the last RETRY_WINDOW seconds, retries may number `ratio`
    of the requests plus MIN_RETRIES_PER_SECOND a second. A burst of failures (an endpoint dying under load)
    is retried whole, while an overload is amplified by at most that ratio.

    >>> load.requests += 1                      # per request, on the hot path
    >>> load.tick()                             # every `tick` seconds, from the sweep
    >>> if load.may_retry(0.2): load.retries += 1
    """

    __slots__ = ("active", "pending", "requests", "retries", "window")

    def __init__(self, tick: float = 0.5) -> None:
        self.active = 0
        self.pending = 0
        self.requests = 0
        self.retries = 0
        self.window: deque[tuple[int, int]] = deque([(0, 0)], maxlen=max(1, round(RETRY_WINDOW / tick)))

    def tick(self) -> None:
        self.window.append((self.requests, self.retries))

    def may_retry(self, ratio: float) -> bool:
        requests, retries = self.window[0]  # the counts as they were up to RETRY_WINDOW ago
        allowance = ratio * (self.requests - requests) + MIN_RETRIES_PER_SECOND * RETRY_WINDOW
        return self.retries - retries < allowance


IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
# What `RetryPolicy.decide` answers.
RETRY, NO_RETRY, BUDGET_EXHAUSTED = "retry", "no", "budget"


class RetryPolicy:
    """Whether a failed try is tried again, and after how long: a service's `retries` and its retry budget.

    Pure but for the budget, which counts the service's requests and retries (`ServiceLoad`). The exchange asks
    `condition(status)` of a response and `decide(...)` of any failure, and counts the retry when it makes one.

    >>> policy.condition(503)                    # "gateway-error" with the default `retries.on`
    >>> policy.decide("gateway-error", tries=1, method=b"GET", replayable=True, nothing_sent=False, time_left=2.0)
    'retry'
    """

    __slots__ = ("attempts", "on", "statuses", "budget", "load")

    def __init__(self, retries: Retries, load: ServiceLoad) -> None:
        self.attempts = retries.attempts
        self.on = retries.on
        self.statuses = retries.statuses
        self.budget = retries.budget
        self.load = load

    def condition(self, status: int) -> str:
        """The `retries.on` condition a response status satisfies, or "" when it is not retryable."""
        on = self.on
        if status >= 500 and "5xx" in on:
            return "5xx"
        if status in (502, 503, 504) and "gateway-error" in on:
            return "gateway-error"
        if status in self.statuses and "retriable-status" in on:
            return "retriable-status"
        return ""

    def decide(
        self, condition: str, tries: int, method: bytes, replayable: bool, nothing_sent: bool, time_left: float
    ) -> str:
        """RETRY, NO_RETRY, or BUDGET_EXHAUSTED (a retry the rules allow, refused by the budget).

        `tries`: tries so far, not counting connect failovers. A request that may have reached the upstream is
        retried only when its method is idempotent and its body is still held (`replayable`)."""
        if not condition or tries > self.attempts or condition not in self.on:
            return NO_RETRY
        if not nothing_sent and not ((method in IDEMPOTENT or condition in GRPC_RETRY_ON) and replayable):
            return NO_RETRY
        if time_left <= 0:
            return NO_RETRY
        return RETRY if self.load.may_retry(self.budget) else BUDGET_EXHAUSTED

    @staticmethod
    def backoff(tries: int, rand: Callable[[], float] = random) -> float:
        """Seconds before retry number `tries` (1, 2, ...): full jitter over 25 ms doubling, at most 250 ms."""
        return rand() * min(0.25, 0.025 * (1 << (tries - 1)))


class SubsetTarget:
    __slots__ = ("service", "name", "balancer", "protocol", "h2")

    def __init__(self, service: ServiceRoutes, name: str, balancer: Balancer, protocol: str = "http1") -> None:
        self.service = service
        self.name = name
        self.balancer = balancer
        self.protocol = protocol  # what its endpoints speak: http1, h2c or grpc
        self.h2 = protocol != "http1"


class RouteEntry:
    __slots__ = ("name", "path_prefix", "headers", "targets", "_split", "_only")

    def __init__(self, route: Route, subsets: Mapping[str, SubsetTarget]) -> None:
        self.name = route.name
        self.path_prefix = route.match.path_prefix.encode() if route.match else b"/"
        self.headers = tuple((k.encode(), v.encode()) for k, v in route.match.headers) if route.match else ()
        weighted = [(subsets[name], weight) for name, weight in route.split if weight > 0]
        self.targets = tuple(target for target, _ in weighted)
        self._split = SmoothWeighted([weight for _, weight in weighted])
        self._only = self.targets[0] if len(self.targets) == 1 else None

    def matches(self, path: bytes, headers: Mapping[bytes, bytes]) -> bool:
        if not path.startswith(self.path_prefix):
            return False
        return all(headers.get(name) == value for name, value in self.headers)

    def pick(self) -> SubsetTarget:
        if self._only is not None:
            return self._only
        return self.targets[self._split.next()]


class ServiceRoutes:
    """One service of the snapshot: its config, subsets and ordered routes."""

    __slots__ = ("name", "load", "retry", "config", "subsets", "routes", "_catch_all", "needs_headers", "remote")

    def __init__(self, service: Service, endpoint: EndpointFactory, load: ServiceLoad, remote: bool = False) -> None:
        self.name = service.name
        self.load = load
        self.retry = RetryPolicy(service.retries, load)
        self.remote = remote  # owned by another group: reached through its gateways, from the outbound listener only
        self.config = service
        self.subsets = {
            subset.name: SubsetTarget(
                self,
                subset.name,
                Balancer(
                    [endpoint(service.name, address) for address in subset.endpoints],
                    service.lb.policy,
                    service.outlier,
                    service.lb.hash_header,
                ),
                subset.protocol or service.protocol,
            )
            for subset in service.subsets
        }
        self.routes = tuple(RouteEntry(route, self.subsets) for route in service.routes)
        self._catch_all = self.routes[-1] if len(self.routes) == 1 and not self.routes[-1].headers else None
        self.needs_headers = any(route.headers for route in self.routes)

    def match(self, path: bytes, headers: Mapping[bytes, bytes]) -> RouteEntry | None:
        if self._catch_all is not None and path.startswith(self._catch_all.path_prefix):
            return self._catch_all
        for route in self.routes:
            if route.matches(path, headers):
                return route
        return None


class RouteTable:
    """An immutable routing snapshot.

    >>> table = RouteTable(config, registry.endpoint)
    >>> service = table.lookup(b"catalog:8080")
    >>> target = service.match(b"/items", {}).pick()
    """

    def __init__(
        self,
        config: Config,
        endpoint: EndpointFactory,
        version: int = 0,
        load: Callable[[str], ServiceLoad] = lambda name: ServiceLoad(),
        remote: frozenset[str] = frozenset(),
    ) -> None:
        self.config = config
        self.version = version
        self.services = {
            service.name: ServiceRoutes(service, endpoint, load(service.name), service.name in remote)
            for service in config.services
        }
        self._hosts: dict[bytes, ServiceRoutes | None] = {}

    def lookup(self, authority: bytes) -> ServiceRoutes | None:
        """The service an authority names: `catalog`, `catalog:80` or `catalog.<anything>` (a DNS first label)."""
        try:
            return self._hosts[authority]
        except KeyError:
            pass
        host = authority.rsplit(b":", 1)[0] if not authority.endswith(b"]") else authority
        name = host.lower().decode("ascii", "replace")
        service = self.services.get(name) or self.services.get(name.split(".", 1)[0])
        if len(self._hosts) >= _HOST_CACHE_LIMIT:
            self._hosts.clear()
        self._hosts[authority] = service
        return service
