"""Rollout webhooks: the gate that must answer 2xx before a step, and the events sent as JSON.

Every call has a timeout (`TIMEOUT`), carries `x-meshgate-signature: sha256=<hex>` (HMAC-SHA256 of the body with the
dashboard's webhook secret, `--webhook-secret-file`) when a secret is set, and goes only to a public address: the
host is resolved first, and a loopback, link-local (which holds the cloud metadata services, 169.254.169.254 and
fd00:ec2::254), private, multicast or unspecified address is refused unless the dashboard was started with
`--webhook-allow HOST` for it. The request is then sent to the address that was checked (the name is kept for Host and
TLS), so a DNS answer that changes between the check and the call (rebinding) cannot reach an inner address.

Events never block a rollout: they are queued (at most `MAX_QUEUED`, the oldest dropped beyond) and sent one at a
time; a failed one is logged, not retried. Each is counted by outcome (the dashboard's
`meshgate_rollout_events_total`). A gate's answer is read up to `MAX_ANSWER` bytes, and the whole call, answer
included, ends after `TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from prometheus_client import Counter

log = logging.getLogger("meshgate.rollouts")

TIMEOUT = 5.0
MAX_QUEUED = 256
MAX_ANSWER = 4096  # bytes of a gate's answer kept for the decision log
SIGNATURE = "x-meshgate-signature"
METADATA = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("fd00:ec2::254"),
        ipaddress.ip_address("100.100.100.200"),
    }
)


class WebhookRefused(Exception):
    """The URL may not be called: `str(err)` is one line saying why."""


@dataclass(frozen=True, slots=True)
class Answer:
    ok: bool
    text: str  # one line: "answered 200", "answered 503: not yet", "timed out after 5 s", "refused: ..."


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _forbidden(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA:
        return "a cloud metadata address"
    for name in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(address, f"is_{name}"):
            return f"a {name.replace('_', '-')} address"
    return None


class Webhooks:
    """Sends rollout webhooks. `allow`: hosts (names or addresses) that may be internal, as `--webhook-allow`."""

    def __init__(
        self,
        secret: bytes | None = None,
        allow: Collection[str] = (),
        timeout: float = TIMEOUT,
        events: Counter | None = None,
    ) -> None:
        self.secret = secret
        self.allow = frozenset(host.lower().strip("[]") for host in allow)
        self.timeout = timeout
        self.client = httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)
        self.queue: deque[tuple[str, Mapping[str, Any]]] = deque()
        self.wakeup = asyncio.Event()
        # Events by outcome (sent, failed, dropped): the dashboard's meshgate_rollout_events_total
        self.events = events or Counter("rollout_events", "", ["outcome"], registry=None)

    async def resolve(self, url: str) -> tuple[str, str]:
        """The URL to call (its host replaced by the checked address) and the original host; raises WebhookRefused."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=self.timeout
                )
            except (OSError, TimeoutError) as err:
                raise WebhookRefused(f"cannot resolve {host}: {err}") from None
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        if not addresses:
            raise WebhookRefused(f"{host} has no address")
        address = addresses[0]
        if host.lower() not in self.allow and str(address) not in self.allow:
            for candidate in addresses:
                why = _forbidden(candidate)
                if why is not None:
                    raise WebhookRefused(f"{host} is {why} ({candidate}); allow it with --webhook-allow {host}")
        netloc = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
        return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), host

    async def post(self, url: str, payload: Mapping[str, Any]) -> Answer:
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        try:
            target, host = await self.resolve(url)
        except WebhookRefused as err:
            return Answer(False, f"refused: {err}")
        headers = {"content-type": "application/json", "host": urlsplit(url).netloc.rsplit("@", 1)[-1]}
        if self.secret is not None:
            headers[SIGNATURE] = sign(self.secret, body)
        try:
            status, text = await asyncio.wait_for(self._send(target, body, headers, host), self.timeout)
        except (httpx.TimeoutException, TimeoutError):
            return Answer(False, f"timed out after {self.timeout:g} s")
        except httpx.HTTPError as err:
            return Answer(False, f"failed: {type(err).__name__}: {str(err)[:200]}")
        line = f"answered {status}" + (f": {text[:200]}" if text else "")
        return Answer(200 <= status < 300, line)

    async def _send(self, target: str, body: bytes, headers: Mapping[str, str], host: str) -> tuple[int, str]:
        """The status and the first `MAX_ANSWER` bytes of the answer (the rest is never read)."""
        request = self.client.build_request(
            "POST", target, content=body, headers=headers, extensions={"sni_hostname": host}
        )
        response = await self.client.send(request, stream=True)
        try:
            kept = b""
            async for chunk in response.aiter_raw():
                kept += chunk
                if len(kept) >= MAX_ANSWER:
                    break
        finally:
            await response.aclose()
        return response.status_code, kept[:MAX_ANSWER].decode("utf-8", "replace").replace("\n", " ").strip()

    def event(self, url: str, payload: Mapping[str, Any]) -> None:
        """Queue an event for `url`; never waits."""
        if len(self.queue) >= MAX_QUEUED:
            self.queue.popleft()
            self.events.labels("dropped").inc()
        self.queue.append((url, payload))
        self.wakeup.set()

    async def run(self) -> None:
        """Send queued events until cancelled."""
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.queue:
                url, payload = self.queue.popleft()
                answer = await self.post(url, payload)
                self.events.labels("sent" if answer.ok else "failed").inc()
                if not answer.ok:
                    log.warning("rollout event to %s not delivered: %s", url, answer.text)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()
