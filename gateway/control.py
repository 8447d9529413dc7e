"""Joining a mesh: identity from the control server, config by long-poll watch, heartbeats, a last-good cache.

A joined gateway (`meshgate gateway --control URL --group G --token T`) keeps three loops running:
- `watch`: `GET /api/v1/sync?after=<etag>` long-polls; each answer is validated into a `Config` (the local
  `gateway:` section plus the services this group owns, plus one synthetic service per service owned elsewhere,
  whose endpoints are that group's gateways) and swapped in like a reload. The answer is cached on disk, so a
  restart while the dashboard is down serves the last good config.
- `ControlSource._identity`: a fresh key and CSR at about half the life the certificate had when it came (never
  more often than every 5 s); the key never leaves the gateway. The new certificate is loaded into the same SSL
  contexts, so open connections are untouched.
- `heartbeat`: who this gateway is, what it applied, and its golden signals, so the dashboard can draw the
  topology and tell in-sync from behind.
A 304 from the long-poll is the normal answer to a quiet spell, not a failure. While the dashboard is unreachable
the loops probe every 0.5 s (jittered) for the outage's first 2 minutes, so a restarted dashboard is back in use
within about a second, then back off with full jitter up to 30 s (`outage_backoff`); nothing here is on the
request path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import re
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from importlib.metadata import version as package_version
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway import tls
from gateway.config import Config, ConfigError
from gateway.runtime import AdminState, Peers, Publish, Spawn
from gateway.telemetry import Code, Moved, Snapshot, first_attempts
from gateway.units import Address, Backoff, format_duration, is_loopback, is_wildcard, parse_address, write_private

log = logging.getLogger("meshgate.control")

SYNC_WAIT = 30.0  # the server holds a sync request this long when nothing changed, then answers 304
REQUEST_TIMEOUT = 10.0
# A connect to the dashboard takes a round trip or two; where packets are silently dropped, fail it soon, so
# outage probes stay about PROBE_INTERVAL apart rather than REQUEST_TIMEOUT.
CONNECT_TIMEOUT = 2.0
# The dashboard unreachable: try again every PROBE_INTERVAL (±50 %) for the outage's first YOUNG_OUTAGE, so a
# restarted dashboard is seen within about a second; after that back off exponentially up to BACKOFF_MAX.
PROBE_INTERVAL = 0.5
YOUNG_OUTAGE = 120.0
BACKOFF_MAX = 30.0  # also the wait after a refusal (token, CA pin), which retrying sooner would not change
_CA_HASH = re.compile(r"sha256:[0-9a-f]{64}")  # what `tls.spki_hash` makes
HEARTBEAT_INTERVAL = 2.0
HEARTBEAT_BOUNDS = (0.5, 60.0)  # an interval the dashboard asks for is clamped to this: never a busy loop
RENEW_MARGIN = 60.0  # at start, a certificate with less life left than this is renewed before anything else
# The caller's hop to another group only picks one of its gateways and retries connect failures (docs/design.md,
# "Division of work"): the owner's gateway splits, balances, retries and ejects, so retries never multiply.
_PEER_TIMEOUTS = {"connect": "1s", "per_try": "60s", "request": "60s"}
_PEER_POLICY: dict[str, object] = {
    "lb": "least_request",  # spread over replicas; latency-aware picking is the owner's job, per endpoint
    "retries": {"attempts": 2, "on": ["connect-failure"]},
    "timeouts": _PEER_TIMEOUTS,
    "outlier": {"consecutive_5xx": 1_000_000},  # the owner's 5xx say nothing about its gateway
}


class ControlError(Exception):
    """The control server cannot be used as configured (bad URL, CA hash mismatch, refused token)."""


@dataclass(frozen=True, slots=True)
class JoinSettings:
    """How this gateway joins: the dashboard URL, its group and join token, and where it keeps its state.

    The token and the CA pin may come from files (`--token-file`, `--ca`), read by `read_secrets()` at start
    only: `check()` looks at the flags alone, so a command line can be checked before its secrets are provisioned.
    """

    url: str
    group: str
    token: str  # empty while `token_file` is still to be read
    data_dir: str
    ca_hash: str | None = None
    gateway: dict[str, Any] | None = None  # the local `gateway:` section (listeners, limits, telemetry)
    source: str = "<control>"  # for error messages: the local file, if any
    base_dir: str | None = None
    token_file: str | None = None
    ca_file: str | None = None  # the mesh root certificate, pinned by its hash like --ca-hash

    def check(self) -> None:
        """Refuse what would send the join token or hop records in plaintext beyond loopback, and flags that
        contradict each other."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ControlError(f"--control: expected an http(s) URL of the dashboard, got {self.url!r}")
        if self.token and self.token_file:
            raise ControlError("--token-file: give the join token once, not also with --token")
        if not self.token and not self.token_file:
            raise ControlError("--control needs a join token: --token T, --token-file FILE or $MESHGATE_JOIN_TOKEN")
        if self.ca_hash is not None and self.ca_file is not None:
            raise ControlError("--ca: pin the mesh CA once, with --ca FILE or with --ca-hash, not both")
        if self.ca_hash is not None and not _CA_HASH.fullmatch(self.ca_hash):
            raise ControlError(f"--ca-hash: expected sha256: and 64 lowercase hex digits, got {self.ca_hash!r}")
        if not is_loopback(parts.hostname):
            if parts.scheme != "https":
                raise ControlError(f"--control {self.url}: beyond loopback the dashboard must be reached over https")
            if self.ca_hash is None and self.ca_file is None:
                raise ControlError(
                    f"--control {self.url}: beyond loopback, pin the mesh CA with --ca FILE or --ca-hash sha256:..."
                )

    def read_secrets(self) -> JoinSettings:
        """These settings with the token read from `token_file` and the CA file turned into its hash."""
        token, ca_hash = self.token, self.ca_hash
        if self.token_file is not None:
            token = _read(self.token_file, "--token-file").decode("utf-8", "replace").strip()
            if not token:
                raise ControlError(f"--token-file {self.token_file}: the file is empty")
        if self.ca_file is not None:
            try:
                ca_hash = tls.spki_hash(_read(self.ca_file, "--ca"))
            except ValueError:
                raise ControlError(f"--ca {self.ca_file}: not a PEM certificate") from None
        return replace(self, token=token, ca_hash=ca_hash, token_file=None, ca_file=None)


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ControlError(f"{flag} {path}: {exc.strerror or exc}") from None


def mesh_config(
    settings: JoinSettings, payload: dict[str, Any], trust_domain: str, ca_pem: bytes = b""
) -> tuple[Config, Peers]:
    """A sync answer as a gateway config, plus the services other groups own and where their gateways are."""
    services = dict(payload.get("services") or {})
    remote: set[str] = set()
    peers: dict[Address, str] = {}
    for name, owner in (payload.get("remote") or {}).items():
        if name in services:
            continue  # owned here: the local spec wins
        group = str(owner["group"])
        gateways = [str(address) for address in owner.get("gateways", ())]
        for text in gateways:
            peers[parse_address(text)] = f"spiffe://{trust_domain}/group/{group}"
        # The owner's stream timeouts (config.STREAM_TIMEOUTS) hold at this hop too; the rest is the peer policy.
        timeouts = {**_PEER_TIMEOUTS, **(owner.get("timeouts") or {})}
        services[name] = {"subsets": {group: {"endpoints": gateways}}, **_PEER_POLICY, "timeouts": timeouts}
        remote.add(name)
    gateway = {**(settings.gateway or {}), "group": settings.group}
    telemetry = dict(gateway.get("telemetry") or {})
    tracing = dict(telemetry.get("tracing") or {})
    # Joined, sampled spans go to the dashboard's receiver unless the file names another endpoint (or null).
    tracing.setdefault("endpoint", settings.url.rstrip("/") + "/v1/traces")
    gateway["telemetry"] = {**telemetry, "tracing": tracing}
    source = f"{settings.url} config version {payload.get('version')}"
    config = Config.parse({"gateway": gateway, "services": services}, source=source, base_dir=settings.base_dir)
    headers = export_headers(settings, config.gateway.telemetry.tracing.endpoint)
    return config, Peers(frozenset(remote), peers, trust_domain, ca_pem, headers)


def export_headers(settings: JoinSettings, endpoint: str | None) -> dict[str, str]:
    """The join token, for span export to the dashboard itself (the scheme, host and port of `--control`), which
    then takes the spans as this group's hops. Nothing for any other collector: it must never see the token."""
    if endpoint is None or _origin(endpoint) != _origin(settings.url):
        return {}
    return {"authorization": f"Bearer {settings.token}"}


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme)


class Identity:
    """This gateway's mesh certificate, in the SSL contexts the inbound listener and peer pools use.

    The files live in the data directory (the key 0600), so a restart without the dashboard keeps its identity
    until the certificate expires.
    """

    def __init__(self, data_dir: str) -> None:
        self.key_path = os.path.join(data_dir, "key.pem")
        self.cert_path = os.path.join(data_dir, "cert.pem")
        self.ca_path = os.path.join(data_dir, "ca.pem")
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        self.server = tls.mesh_context(server=True)
        self.client = tls.mesh_context(server=False)
        self.client_h2 = tls.mesh_context(server=False, h2=True)  # multiplexed HTTP/2 to peers (h2client.py)
        self.received = 0.0  # when this certificate came from the dashboard (its file's time, when loaded)
        self.not_after = 0.0
        self.trust_domain = ""  # from our own SPIFFE ID; peers must be of the same trust domain
        self.ca_pem = b""  # the mesh CA, which also signs the dashboard's HTTPS certificate

    def load(self) -> bool:
        """Use the identity on disk (written by this gateway, or by its supervisor for a worker) if unexpired."""
        try:
            with open(self.key_path, "rb") as key, open(self.cert_path, "rb") as cert, open(self.ca_path, "rb") as ca:
                key_pem, chain_pem, ca_pem = key.read(), cert.read(), ca.read()
                written = os.fstat(cert.fileno()).st_mtime  # when this gateway (or its supervisor) received it
        except OSError:
            return False
        try:
            if tls.not_after(chain_pem) <= time.time():
                return False
            self._install(key_pem, chain_pem, ca_pem)
            self.received = min(written, time.time())  # not in the future, should the clock have been set back
        except (ValueError, ssl.SSLError) as exc:
            log.warning("ignoring the identity in %s: %s", os.path.dirname(self.key_path), exc)
            return False
        return True

    def save(self, key_pem: bytes, chain_pem: bytes, ca_pem: bytes) -> None:
        self._install(key_pem, chain_pem, ca_pem)  # first: a chain that does not load is never written
        self.received = time.time()
        write_private(self.key_path, key_pem)
        write_private(self.cert_path, chain_pem)
        write_private(self.ca_path, ca_pem)

    def _install(self, key_pem: bytes, chain_pem: bytes, ca_pem: bytes) -> None:
        for context in (self.server, self.client, self.client_h2):
            tls.install(context, chain_pem, key_pem, ca_pem)
        self.not_after = tls.not_after(chain_pem)
        self.trust_domain = tls.trust_domain_of(chain_pem)
        self.ca_pem = ca_pem

    @property
    def valid(self) -> bool:
        return self.not_after > time.time()


def _instance_id(data_dir: str) -> str:
    """This gateway's ID in the dashboard's list, kept in its data directory so a restart is not a new gateway."""
    path = os.path.join(data_dir, "instance")
    try:
        with open(path, encoding="ascii") as file:
            return str(uuid.UUID(file.read().strip()))
    except (OSError, ValueError):
        instance = str(uuid.uuid4())
        write_private(path, instance.encode())
        return instance


def http_codes(codes: dict[Code, int]) -> dict[str, int]:
    """Counts by HTTP status; a gRPC call counts under its HTTP status here, and under its code in "grpc"."""
    found: dict[str, int] = {}
    for code, count in codes.items():
        key = str(code if isinstance(code, int) else code[0])
        found[key] = found.get(key, 0) + count
    return found


def grpc_codes(codes: dict[Code, int]) -> dict[str, dict[str, int]]:
    """{"grpc": counts by grpc-status} for a series with gRPC calls, else nothing."""
    found: dict[str, int] = {}
    for code, count in codes.items():
        if isinstance(code, tuple):
            found[str(code[1])] = found.get(str(code[1]), 0) + count
    return {"grpc": found} if found else {}


def first_codes(codes: dict[Code, int], moved: Moved) -> dict[str, dict[str, int]]:
    """{"first": counts by the HTTP status of the first attempt, "first_grpc": by its grpc-status}, each only when
    it differs from the final counts ("codes", "grpc"): absent means the same, which keeps heartbeats small."""
    if not moved:
        return {}
    first = first_attempts(codes, moved)
    found: dict[str, dict[str, int]] = {}
    if (http := http_codes(first)) != http_codes(codes):
        found["first"] = http
    if (grpc := grpc_codes(first).get("grpc", {})) != grpc_codes(codes).get("grpc", {}):
        found["first_grpc"] = grpc
    return found


def stats_json(snapshot: Snapshot) -> dict[str, Any]:
    """A metrics snapshot in JSON form (its dict keys are tuples), for the heartbeat."""
    moved = snapshot.get("moved", {})
    series = [
        {
            "labels": list(key),
            "codes": http_codes(codes),
            "buckets": buckets,
            "sum": s,
            **grpc_codes(codes),
            **first_codes(codes, moved.get(key, {})),
        }
        for key, (codes, buckets, s) in snapshot["series"].items()
    ]
    counters = [[*key, value] for key, value in snapshot["counters"].items()]
    gauges = [[name, list(labels), value] for (name, labels), value in snapshot["gauges"].items()]
    rest = {key: snapshot[key] for key in ("loop_lag", "cpu", "rss")}
    return {"series": series, "counters": counters, "gauges": gauges, **rest}


@dataclass(slots=True)
class Applied:
    """What the gateway serves now, as the heartbeat reports it."""

    version: int = 0
    etag: str = ""


class ControlClient:
    """The gateway's side of the control server. `publish(config, version, peers)` swaps a config in."""

    def __init__(
        self,
        settings: JoinSettings,
        identity: Identity,
        publish: Callable[[Config, int, Peers], None],
        status: Callable[[], dict[str, Any]],
        stats: Callable[[], Snapshot],
    ) -> None:
        self.settings = settings
        self.publish = publish
        self.status = status  # listeners and advertise address, for the heartbeat
        self.stats = stats
        self.identity = identity
        self.cache_path = os.path.join(settings.data_dir, "config.json")
        self.applied = Applied()
        self.payload: dict[str, Any] | None = None  # the last sync answer applied
        self.instance = _instance_id(settings.data_dir)
        self.started = time.time()
        self.client: httpx.AsyncClient | None = None
        self.interval = HEARTBEAT_INTERVAL

    @property
    def ready(self) -> bool:
        return self.payload is not None and self.identity.valid

    def load_cache(self) -> None:
        """Serve the last good config while the dashboard is away; a bad cache is ignored, not fatal."""
        self.identity.load()
        try:
            with open(self.cache_path, encoding="utf-8") as file:
                payload = json.load(file)
            self._apply(payload, cache=False)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
            log.warning("ignoring the cached config %s: %s", self.cache_path, exc)

    def _apply(self, payload: dict[str, Any], cache: bool) -> None:
        config, peers = mesh_config(self.settings, payload, self.identity.trust_domain, self.identity.ca_pem)
        version = int(payload["version"])
        self.payload = payload
        self.applied = Applied(version, str(payload.get("etag", "")))
        self.publish(config, version, peers)
        if cache:
            write_private(self.cache_path, json.dumps(payload).encode())

    async def connect(self) -> httpx.AsyncClient:
        """An HTTP client that trusts the dashboard: pinned by CA hash, or the system store for plain http."""
        if self.client is not None:
            return self.client
        headers = {"authorization": f"Bearer {self.settings.token}"}
        url = self.settings.url.rstrip("/")
        verify: ssl.SSLContext | bool = True
        if url.startswith("https:"):
            verify = ssl.create_default_context(cadata=(await self._trusted_ca(url)).decode())
        timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT)
        self.client = httpx.AsyncClient(base_url=url, headers=headers, verify=verify, timeout=timeout)
        return self.client

    async def _trusted_ca(self, url: str) -> bytes:
        """The mesh root, fetched unverified and then checked against --ca-hash (kubeadm's discovery)."""
        async with httpx.AsyncClient(verify=False, timeout=REQUEST_TIMEOUT) as bootstrap:  # noqa: S501 - pinned below
            answer = await bootstrap.get(f"{url}/api/v1/ca")
            answer.raise_for_status()
            ca_pem = str(answer.json()["ca"]).encode()
        got = tls.spki_hash(ca_pem)
        wanted = self.settings.ca_hash
        if wanted is not None and got != wanted:
            raise ControlError(
                f"the dashboard at {url} presents CA {got}, but the pinned CA (--ca-hash or --ca) is {wanted}"
            )
        return ca_pem

    async def join(self) -> None:
        """Obtain a certificate for this group: the key is made here and only the CSR is sent."""
        client = await self.connect()
        key_pem, csr_pem = tls.new_key_and_csr()
        answer = await client.post("/api/v1/join", json={"group": self.settings.group, "csr": csr_pem.decode()})
        if answer.status_code in (401, 403):
            raise ControlError(f"the dashboard refused the join token: {_reason(answer)}")
        answer.raise_for_status()
        body = answer.json()
        before = (self.identity.trust_domain, self.identity.ca_pem)
        self.identity.save(key_pem, str(body["certificate"]).encode(), str(body["ca"]).encode())
        if (self.identity.trust_domain, self.identity.ca_pem) != before and self.payload is not None:
            self._apply(self.payload, cache=False)  # peers' SPIFFE IDs and the CA to trust come with our identity
        log.info("mesh identity %s, valid until %s", body.get("spiffe_id"), _when(self.identity.not_after))

    async def join_until_done(self) -> None:
        retry = outage_backoff()
        while True:
            try:
                await self.join()
                return
            except ControlError as exc:  # refused token or CA mismatch: keep serving, keep asking, say why
                log.error("joining the mesh failed: %s", exc)
                await asyncio.sleep(BACKOFF_MAX)
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                await asyncio.sleep(_retry_after(retry, "joining the mesh failed", exc))

    async def watch(self) -> None:
        """Long-poll /sync and apply each new view. A 304 (nothing changed while the dashboard held the request) is
        the normal answer and asks again at once. After a failure the next request asks with wait=0, so reaching
        the dashboard again is noticed, logged and ends the outage at once, not after a quiet hold."""
        retry = outage_backoff()
        rejected = ""  # the etag of a view this gateway refused: wait for the next change instead of refetching it
        while True:
            try:
                payload = await self.sync(rejected or self.applied.etag, 0.0 if retry.failures else SYNC_WAIT)
            except ControlError as exc:
                log.error("config sync failed: %s", exc)
                await asyncio.sleep(BACKOFF_MAX)
                continue
            except (httpx.HTTPError, ValueError) as exc:
                what = f"control server unavailable, serving config version {self.applied.version}"
                await asyncio.sleep(_retry_after(retry, what, exc))
                continue
            if retry.failures:
                log.info("control server reachable again after %.1fs", retry.elapsed())
                retry.succeeded()
            if payload is None:
                continue
            try:
                self._apply(payload, cache=True)
            except (ConfigError, ValueError, KeyError, TypeError) as exc:
                # The dashboard validates what it stores; a config this gateway cannot take keeps the last good.
                log.error("config from the control server rejected, keeping version %d: %s", self.applied.version, exc)
                rejected = str(payload.get("etag") or "") if isinstance(payload, dict) else ""
                if not rejected:  # nothing to long-poll on: ask again later rather than in a loop
                    await asyncio.sleep(BACKOFF_MAX)
                continue
            rejected = ""
            log.info("config version %d applied (control server)", self.applied.version)

    async def sync(self, after: str, wait: float) -> Any:
        """One /sync request: the view (JSON) when it differs from `after`, None when the dashboard answered 304."""
        client = await self.connect()
        params = {"after": after, "wait": f"{wait:g}"}
        timeout = httpx.Timeout(wait + REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT)
        answer = await client.get("/api/v1/sync", params=params, timeout=timeout)
        if answer.status_code in (401, 403):
            raise ControlError(f"the dashboard refused the join token: {_reason(answer)}")
        if answer.status_code == 304:
            return None
        if answer.status_code != 200:
            raise httpx.HTTPStatusError(
                f"HTTP {answer.status_code}: {_reason(answer)}", request=answer.request, response=answer
            )
        return answer.json()

    async def heartbeat(self) -> None:
        refused = ""  # the reason the dashboard last refused a heartbeat with
        while True:
            try:
                client = await self.connect()
                answer = await client.post("/api/v1/heartbeat", json=self.heartbeat_body())
                if answer.status_code == 200:
                    self.interval = heartbeat_interval(answer.json().get("interval"))
                    refused = ""
                elif _reason(answer) != refused:  # said once, not every interval: the dashboard lists us as stale
                    refused = _reason(answer)
                    log.warning(
                        "the dashboard refused this gateway's heartbeat: HTTP %d: %s", answer.status_code, refused
                    )
            except (httpx.HTTPError, ValueError) as exc:
                log.debug("heartbeat failed: %s", _describe(exc))
            await asyncio.sleep(self.interval)

    def heartbeat_body(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "group": self.settings.group,
            "meshgate_version": package_version("meshgate"),
            "config_version": self.applied.version,
            "etag": self.applied.etag,
            "started": self.started,
            "cert_not_after": self.identity.not_after or None,
            **self.status(),
            "stats": stats_json(self.stats()),
        }

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


def heartbeat_interval(value: object) -> float:
    """The interval the dashboard asked for, within HEARTBEAT_BOUNDS; the default for anything but a number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return HEARTBEAT_INTERVAL
    low, high = HEARTBEAT_BOUNDS
    return min(max(float(value), low), high)


def _reason(answer: httpx.Response) -> str:
    try:
        return str(answer.json()["error"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {answer.status_code}"


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def outage_backoff(clock: Callable[[], float] = time.monotonic) -> Backoff:
    """The retry schedule while the dashboard is unreachable: probes every PROBE_INTERVAL while the outage is young
    (a restarted dashboard is back in use within about a second), then backoff up to BACKOFF_MAX."""
    return Backoff(PROBE_INTERVAL, BACKOFF_MAX, YOUNG_OUTAGE, clock)


def _retry_after(retry: Backoff, what: str, exc: BaseException) -> float:
    """Count a failed try and return the delay before the next. Logged when the outage starts and when it starts
    backing off, not on every probe."""
    delay = retry.failed()
    if retry.failures == 1:
        log.warning(
            "%s (%s); retrying about every %gs for %s, then backing off up to %gs",
            what,
            _describe(exc),
            retry.low,
            format_duration(retry.young),
            retry.high,
        )
    elif retry.backing_off and retry.failures == retry.probes + 1:
        log.warning("%s for %.0fs (%s); now backing off up to %gs", what, retry.elapsed(), _describe(exc), retry.high)
    else:
        log.debug("%s (%s); retrying in %.1fs", what, _describe(exc), delay)
    return delay


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class _IdentityCollector(Collector):
    """The mesh certificate's expiry, so an alert fires before renewal has failed for half a lifetime."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "meshgate_certificate_expiry_timestamp_seconds",
            "When this gateway's mesh certificate expires (Unix time; 0 before it has one)",
            self.identity.not_after,
        )


class ControlSource:
    """A joined gateway's config source for `server.serve()` and the supervisor: the control server, with the
    disk cache first. `identity_changed` tells worker processes to load a renewed certificate from disk."""

    def __init__(self, settings: JoinSettings) -> None:
        self.settings = settings
        self.client: ControlClient | None = None
        self.identity = Identity(settings.data_dir)
        self.server_tls: ssl.SSLContext | None = self.identity.server
        self.client_tls: ssl.SSLContext | None = self.identity.client
        self.client_tls_h2: ssl.SSLContext | None = self.identity.client_h2
        self.identity_changed: Callable[[], None] = lambda: None

    def start(self, state: AdminState, publish: Publish, addresses: dict[str, Address], spawn: Spawn) -> None:
        def apply(config: Config, version: int, peers: Peers) -> None:
            state.config, state.version = config, version
            publish(config, version, peers)
            state.ready = client.ready

        listen = state.config.gateway.listen
        advertise = listen.advertise or (None if is_wildcard(listen.inbound.host) else addresses.get("inbound"))
        status = {
            "advertise": str(advertise) if advertise else None,
            "listeners": {kind: str(address) for kind, address in addresses.items()},
        }
        client = self.client = ControlClient(self.settings, self.identity, apply, lambda: status, state.stats)
        client.load_cache()
        state.ready = client.ready
        state.registry.register(_IdentityCollector(self.identity))
        spawn(self._identity(client, state))
        spawn(client.watch())
        spawn(client.heartbeat())

    async def _identity(self, client: ControlClient, state: AdminState) -> None:
        """Join if the identity on disk is missing or nearly spent; then renew at about half the life a certificate
        had when it came (`tls.renew_at`: at most every 5 s), with jitter so a fleet started together does not renew
        together."""
        if client.identity.not_after - time.time() < RENEW_MARGIN:
            await client.join_until_done()
            self.identity_changed()
            state.ready = client.ready
        while True:
            renew = tls.renew_at(client.identity.received, client.identity.not_after, random.random())
            await asyncio.sleep(max(0.0, renew - time.time()))
            await client.join_until_done()
            self.identity_changed()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
