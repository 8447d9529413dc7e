"""Endpoint state and the load-balancing policies.

An `Endpoint` is one upstream address of one service. It outlives config snapshots (an `EndpointRegistry`
hands the same object to every snapshot that names it), so its latency estimate, outlier-ejection history and
health survive reloads. A `Balancer` is built per subset and snapshot; `pick()` chooses among the endpoints that
are neither ejected nor failing health checks, falling back to all of them in panic mode.

Policies:
- `ewma`: peak-EWMA cost with power-of-two choices, as linkerd2-proxy does (the default);
- `least_request`: fewest requests in flight, power-of-two choices;
- `round_robin`;
- `hash`: Maglev consistent hashing on a request header.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Sequence
from random import random
from typing import TYPE_CHECKING

from gateway.config import Outlier
from gateway.units import Address

if TYPE_CHECKING:
    from gateway.upstream import Pool

DECAY_SECONDS = 10.0  # peak-EWMA decay window, linkerd2-proxy's default
DEFAULT_RTT = 0.03  # cost assumed for an endpoint with no observations yet
MAX_EJECTION = 300.0  # Envoy's max_ejection_time default
PANIC_THRESHOLD = 0.5  # below this share of available endpoints, balance across all (Envoy's default)
MAGLEV_TABLE_SIZE = 5003  # prime; fine for up to ~50 endpoints per subset


class Endpoint:
    """One upstream address of one service, with the state the balancer and outlier detector keep.

    >>> ep = Endpoint(Address("127.0.0.1", 9101), pool)
    >>> ep.active += 1; ...; ep.observe(0.002, now); ep.active -= 1
    """

    __slots__ = (
        "address",
        "name",
        "pool",
        "active",
        "cost",
        "stamp",
        "failures",
        "ejected_until",
        "ejections",
        "healthy",
    )

    def __init__(self, address: Address, pool: Pool) -> None:
        self.address = address
        self.name = str(address)
        self.pool = pool
        self.active = 0
        self.cost = DEFAULT_RTT
        self.stamp = 0.0
        self.failures = 0  # consecutive 5xx responses and connect failures
        self.ejected_until = 0.0
        self.ejections = 0
        self.healthy = True  # active health-check verdict

    def observe(self, rtt: float, now: float) -> None:
        """Feed one response time into the peak-sensitive moving average."""
        if rtt > self.cost:
            self.cost = rtt
        else:
            weight = math.exp(-(now - self.stamp) / DECAY_SECONDS)
            self.cost = self.cost * weight + rtt * (1.0 - weight)
        self.stamp = now

    def load(self, now: float) -> float:
        """The cost to send one more request here: the estimate decayed to `now`, times requests in flight.

        The estimate decays when read (as tower's PeakEwma does), so an endpoint that answered slowly once is
        tried again later instead of losing every comparison forever.
        """
        return self.cost * math.exp((self.stamp - now) / DECAY_SECONDS) * (self.active + 1)

    def available(self, now: float) -> bool:
        return self.healthy and self.ejected_until <= now


class Balancer:
    """Picks an endpoint of one subset. Mutable only in its ejection bookkeeping; rebuilt per snapshot."""

    __slots__ = ("endpoints", "outlier", "_pick", "_usable", "_recheck_at", "_rr", "_table", "hash_header")

    def __init__(self, endpoints: Sequence[Endpoint], policy: str, outlier: Outlier, hash_header: str | None) -> None:
        self.endpoints = tuple(endpoints)
        self.outlier = outlier
        self.hash_header = hash_header.encode() if hash_header else None
        self._usable: tuple[Endpoint, ...] = self.endpoints
        self._recheck_at = 0.0
        self._rr = 0
        self._table: list[int] = maglev_table(self.endpoints) if policy == "hash" else []
        self._pick = {
            "ewma": self._pick_ewma,
            "least_request": self._pick_least_request,
            "round_robin": self._pick_round_robin,
            "hash": self._pick_round_robin,  # used when the request carries no hash key
        }[policy]

    def pick(self, now: float, avoid: Endpoint | None = None, key: bytes | None = None) -> Endpoint | None:
        """An endpoint for the next try; `avoid` is the one the previous try failed on."""
        if now >= self._recheck_at:
            self._refresh(now)
        usable = self._usable
        if not usable:
            return None
        if key is not None and self._table:
            return self._pick_hashed(key, now, avoid)
        endpoint = self._pick(usable, now)
        if endpoint is avoid and len(usable) > 1:
            endpoint = usable[(usable.index(endpoint) + 1) % len(usable)]
        return endpoint

    def _refresh(self, now: float) -> None:
        usable = tuple(ep for ep in self.endpoints if ep.available(now))
        if len(usable) < PANIC_THRESHOLD * len(self.endpoints):
            usable = self.endpoints  # panic: too few left to carry the load; spread it over everyone
        self._usable = usable
        pending = [ep.ejected_until for ep in self.endpoints if ep.ejected_until > now]
        self._recheck_at = min(pending) if pending else math.inf

    def invalidate(self) -> None:
        self._recheck_at = 0.0

    def _pick_ewma(self, usable: tuple[Endpoint, ...], now: float) -> Endpoint:
        n = len(usable)
        if n == 1:
            return usable[0]
        a, b = _two_distinct(n)
        first, second = usable[a], usable[b]
        return first if first.load(now) <= second.load(now) else second

    def _pick_least_request(self, usable: tuple[Endpoint, ...], now: float) -> Endpoint:
        n = len(usable)
        if n == 1:
            return usable[0]
        a, b = _two_distinct(n)
        return usable[a] if usable[a].active <= usable[b].active else usable[b]

    def _pick_round_robin(self, usable: tuple[Endpoint, ...], now: float) -> Endpoint:
        self._rr += 1
        return usable[self._rr % len(usable)]

    def _pick_hashed(self, key: bytes, now: float, avoid: Endpoint | None) -> Endpoint | None:
        table, endpoints = self._table, self.endpoints
        slot = zlib.crc32(key) % len(table)
        # Walk the table from the key's slot: an unavailable endpoint's keys spread over the others, and
        # return home when it recovers.
        for step in range(len(table)):
            endpoint = endpoints[table[(slot + step) % len(table)]]
            if endpoint is not avoid and endpoint in self._usable:
                return endpoint
        return self._usable[0] if self._usable else None

    def pick_other(self, now: float, tried: list[Endpoint]) -> Endpoint | None:
        """An available endpoint not in `tried` (in panic mode, any endpoint not in it), by the policy."""
        if now >= self._recheck_at:
            self._refresh(now)
        left = tuple(endpoint for endpoint in self._usable if endpoint not in tried)
        return self._pick(left, now) if left else None

    def record(self, endpoint: Endpoint, failed: bool, now: float) -> None:
        """Passive outlier detection: count consecutive failures, eject when they reach the threshold."""
        if not failed:
            endpoint.failures = 0
            return
        endpoint.failures += 1
        if endpoint.failures >= self.outlier.consecutive_5xx:
            self.eject(endpoint, now)

    def eject(self, endpoint: Endpoint, now: float) -> None:
        """Take `endpoint` out of rotation for `base_ejection` times its ejections so far, unless it is out
        already or `max_ejected` of the subset are (at least one may always be)."""
        if endpoint.ejected_until > now:
            return
        ejected = sum(1 for ep in self.endpoints if ep.ejected_until > now)
        if ejected >= max(1, math.floor(self.outlier.max_ejected * len(self.endpoints))):
            return
        endpoint.ejections += 1
        endpoint.failures = 0
        endpoint.ejected_until = now + min(self.outlier.base_ejection * endpoint.ejections, MAX_EJECTION)
        self._recheck_at = 0.0


def _two_distinct(n: int) -> tuple[int, int]:
    a = int(random() * n)
    b = int(random() * (n - 1))
    return a, b + 1 if b >= a else b


def maglev_table(endpoints: Sequence[Endpoint], size: int = MAGLEV_TABLE_SIZE) -> list[int]:
    """Maglev's lookup table (Eisenbud et al., NSDI 2016): slot -> endpoint index, evenly and stably filled."""
    if not endpoints:
        return []
    prefs = []
    for endpoint in endpoints:
        digest = hashlib.blake2b(str(endpoint.address).encode(), digest_size=16).digest()
        offset = int.from_bytes(digest[:8], "big") % size
        skip = int.from_bytes(digest[8:], "big") % (size - 1) + 1
        prefs.append((offset, skip))
    table = [-1] * size
    nexts = [0] * len(endpoints)
    filled = 0
    while True:
        for i, (offset, skip) in enumerate(prefs):
            slot = (offset + nexts[i] * skip) % size
            while table[slot] >= 0:
                nexts[i] += 1
                slot = (offset + nexts[i] * skip) % size
            table[slot] = i
            nexts[i] += 1
            filled += 1
            if filled == size:
                return table
