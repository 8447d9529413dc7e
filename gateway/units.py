"""Values written as text in config files: `host:port` addresses, durations, sizes and percentages.

Each `parse_*` raises ValueError with the reason; each `format_*` is its exact inverse, so a config written
back out (`Config.to_dict()`) reads the same. Also the one retry schedule (`backoff`, and `Backoff` for an outage
in two phases) that the control client and discovery share, and `write_private` for the files a gateway and
the dashboard keep (keys, certificates, cached config).
"""

from __future__ import annotations

import ipaddress
import math
import os
import random
import re
import time
from collections.abc import Callable
from decimal import Decimal
from typing import NamedTuple


class Address(NamedTuple):
    """A `host:port` pair. IPv6 hosts are kept without brackets.

    >>> str(parse_address("[::1]:80")), parse_address("127.0.0.1:9101").port
    ('[::1]:80', 9101)
    """

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_PORT = re.compile(r"[0-9]{1,5}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[-A-Za-z0-9_]{0,61}[A-Za-z0-9_])?")
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_DURATION = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h)?\s*")
_DURATION_UNITS = {"h": (3600, 1), "m": (60, 1), "s": (1, 1), "ms": (1, 1000)}  # (multiply, divide) for exactness
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(B|kB|KB|MB|GB|KiB|MiB|GiB)?\s*")
_SIZE_UNITS = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_PERCENT = re.compile(rf"\s*({_NUMBER})\s*%\s*")


def parse_address(text: str) -> Address:
    """Parse `host:port`: an IPv4 address, a hostname or a bracketed IPv6 address. Port 0 is allowed here."""
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise ValueError("missing host or port")
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise ValueError("port must be a number from 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not isinstance(_ip(host), ipaddress.IPv6Address):
            raise ValueError(f"invalid IPv6 address {host!r}")
    elif ":" in host:
        raise ValueError("IPv6 addresses need brackets, as in [::1]:80")
    elif not is_hostname(host):
        raise ValueError(f"invalid host {host!r}")
    return Address(host, int(port))


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_hostname(host: str) -> bool:
    labels = host.split(".")
    if all(label.isdigit() for label in labels):  # all-numeric must be a real IPv4 address, not a hostname
        return isinstance(_ip(host), ipaddress.IPv4Address)
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def is_ip(host: str) -> bool:
    return _ip(host) is not None


def is_wildcard(host: str) -> bool:
    return (ip := _ip(host)) is not None and ip.is_unspecified


def parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's IP address, or None for a name. An IPv4-mapped IPv6 address (::ffff:127.0.0.1, as a dual-stack
    socket reports an IPv4 peer) is its IPv4 address."""
    ip = _ip(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address: where plaintext and unpinned TLS are acceptable."""
    ip = parse_ip(host)
    return host == "localhost" or (ip is not None and ip.is_loopback)


def parse_duration(text: str | int | float) -> float:
    """Seconds from `250ms`, `2s`, `1.5s`, `1m` or `1h`; a bare number is seconds. Raises ValueError."""
    if isinstance(text, bool):
        raise ValueError("a boolean is not a duration")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        match = _DURATION.fullmatch(text)
        if match is None:
            raise ValueError(f"not a duration: {text!r} (use 250ms, 2s, 1m or 1h)")
        multiply, divide = _DURATION_UNITS[match[2] or "s"]
        seconds = float(match[1]) * multiply / divide
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("a duration must be finite and not negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of `parse_duration`: 0.25 -> "250ms", 2.0 -> "2s", 60.0 -> "1m", 1.5 -> "1.5s"."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format duration {seconds!r}")
    if seconds == 0:
        return "0s"
    for unit in ("h", "m", "s") if seconds >= 1 else ("ms",):
        multiply, divide = _DURATION_UNITS[unit]
        count = seconds * divide / multiply
        if count.is_integer() and parse_duration(f"{int(count)}{unit}") == seconds:
            return f"{int(count)}{unit}"
    return f"{seconds!r}s"


def parse_size(text: str | int) -> int:
    """Bytes from `512`, `60KiB`, `1MiB` or `1KB` (= 1000). Raises ValueError."""
    if isinstance(text, bool):
        raise ValueError("a boolean is not a size")
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.fullmatch(text)
        if match is None:
            raise ValueError(f"not a size: {text!r} (use 512, 60KiB, 1MiB or 1KB)")
        exact = Decimal(match[1]) * _SIZE_UNITS[match[2] or "B"]
        if exact != exact.to_integral_value():
            raise ValueError(f"not a whole number of bytes: {text!r}")
        size = int(exact)
    if size < 0:
        raise ValueError("a size must not be negative")
    return size


def parse_percent(text: str | int | float) -> float:
    """A ratio from `20%` (-> 0.2). A bare number is already a ratio (0.2), as for tracing sampling.

    Either way the result lies in 0..1 (0%..100%), so `budget: 20` is an error rather than 2000%.
    """
    if isinstance(text, bool):
        raise ValueError("a boolean is not a percentage")
    if isinstance(text, int | float):
        ratio = float(text)
    else:
        match = _PERCENT.fullmatch(text)
        if match is None:
            raise ValueError(f"not a percentage: {text!r} (use 20%)")
        ratio = float(Decimal(match[1]) / 100)  # decimal, so that format_percent round-trips exactly
    if not 0 <= ratio <= 1:
        raise ValueError("a percentage must be from 0% to 100%")
    return ratio


def format_percent(ratio: float) -> str:
    """The inverse of `parse_percent`: 0.2 -> "20%", 0.125 -> "12.5%"."""
    return f"{(Decimal(repr(ratio)) * 100).normalize():f}%"  # exact decimals, so parsing gives `ratio` back


def backoff(attempt: int, low: float, high: float) -> float:
    """Seconds to wait before retry `attempt` (0 first): exponential from `low` up to `high`, with full jitter, so
    gateways that lost a dashboard or a discovery source together don't return together."""
    return random.uniform(low, min(high, low * 2 ** min(attempt, 16)))


class Backoff:
    """The delays between retries while something keeps failing, in two phases.

    While the failures in a row are young (the first `young` seconds since the first of them), the next try comes
    after `low` seconds ±50 %: a service back after a restart is seen again within about `low`. After that the
    delays grow as `backoff()` does, from `low` up to `high`, so a fleet facing a long outage neither hammers the
    service nor comes back to it in step. With `young=0` there is only the second phase. `clock` is injectable so
    tests can walk through an outage without waiting for it.

    >>> retry = Backoff(0.5, 30.0, young=120.0)
    >>> 0.25 <= retry.failed() <= 0.75  # a new outage: try again soon
    True
    >>> retry.succeeded()  # over: the next failure starts a new outage
    """

    def __init__(
        self, low: float, high: float, young: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.low, self.high, self.young = low, high, young
        self.clock = clock
        self.failures = 0  # in a row
        self.probes = 0  # of them, those while the outage was young
        self.since = 0.0  # the clock at the first of them

    def failed(self) -> float:
        """Count a failure and return the seconds to wait before the next try."""
        now = self.clock()
        if not self.failures:
            self.since = now
        self.failures += 1
        if now - self.since < self.young:
            self.probes += 1
            return random.uniform(self.low / 2, self.low * 1.5)
        return backoff(self.failures - self.probes - 1, self.low, self.high)

    def succeeded(self) -> None:
        self.failures = self.probes = 0

    @property
    def backing_off(self) -> bool:
        """The last failure was past the young phase, so the delays grow."""
        return self.failures > self.probes

    def elapsed(self) -> float:
        """Seconds since the first failure in a row (0 when not failing)."""
        return self.clock() - self.since if self.failures else 0.0


def write_private(path: str, data: bytes) -> None:
    """Write atomically, readable by this user only: a crash mid-write never leaves half a key or config."""
    temp = f"{path}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
