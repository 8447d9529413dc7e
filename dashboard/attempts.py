"""Failed credentials, per client address: logged (never with the credential), counted, and limited.

Every unknown or malformed bearer token and every failed login is a failed attempt. Each address has a budget of
`burst` of them, given back at one every `refill` seconds (a token bucket); past it, the address's failed attempts
are answered 429 with `Retry-After` instead of 401. Only failures are limited: a credential is always checked
first, and a valid one works from any address, so operators behind one ingress (one address, as the dashboard
sees it) are never locked out by someone else's mistakes or guesses.

Each failure is logged with the address and the reason; while an address is over its budget only the first of its
429s is, so a flood does not fill the log, and `meshgate_dashboard_auth_failures_total{via, answer}` counts all.
At most `max_clients` addresses are tracked; past that, the one that failed least recently is dropped first.

The address is the TCP peer as uvicorn reports it (`request.client`): X-Forwarded-For counts only from a proxy on
127.0.0.1 (uvicorn's `forwarded_allow_ips`), never from a client elsewhere, which could write any address there.

>>> attempts = FailedAttempts(metrics.auth_failures)
>>> wait = attempts.failed("10.0.0.7", "token", "unknown token")   # 0: answer 401; else 429 with Retry-After
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Callable

from prometheus_client import Counter
from starlette.requests import Request

from gateway.units import parse_ip

log = logging.getLogger("meshgate.dashboard")

FAILURE_BURST = 10  # failed attempts an address may make at once
FAILURE_REFILL = 6.0  # seconds to give one back: 10 a minute, sustained
MAX_CLIENTS = 10_000  # addresses tracked at once


def client_address(request: Request) -> str:
    return client_key(request.client.host if request.client else "unknown")


def client_key(host: str) -> str:
    """What a client's failures are counted by: its IPv4 address, or its IPv6 /64, since one IPv6 host usually
    holds a whole /64 and could otherwise rotate addresses to escape the limit."""
    address = parse_ip(host)
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address) if address is not None else host


class FailedAttempts:
    """The failure budget of every client address. `failed()` counts one failure and says how to answer it."""

    def __init__(
        self,
        counter: Counter,
        *,
        burst: int = FAILURE_BURST,
        refill: float = FAILURE_REFILL,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counter = counter
        self.burst, self.refill, self.max_clients = burst, refill, max_clients
        self.clock = clock
        self._state: dict[str, tuple[float, float, bool]] = {}  # address -> (budget, when, refusing): oldest first

    def failed(self, address: str, via: str, reason: str) -> int:
        """Count a failed attempt (`via`: "token" or "login"): 0 when the address is within its budget (answer 401),
        else the whole seconds until it has budget again (answer 429 with that Retry-After)."""
        now = self.clock()
        left, when, refusing = self._state.pop(address, (float(self.burst), now, False))
        left = min(float(self.burst), left + (now - when) / self.refill)
        if left >= 1.0:
            left, refusing, wait = left - 1.0, False, 0
            log.warning("failed %s from %s: %s", via, address, reason)
        else:
            wait = math.ceil((1.0 - left) * self.refill)
            if not refusing:
                log.warning("failed %s from %s: %s; too many: answering 429 for %ds", via, address, reason, wait)
            refusing = True
        self._state[address] = (left, now, refusing)  # now the most recent
        if len(self._state) > self.max_clients:
            del self._state[next(iter(self._state))]
        self.counter.labels(via, "429" if wait else "401").inc()
        return wait
