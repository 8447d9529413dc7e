"""What the control server's HTTP side is built from: `Settings`, handed to `create_app` by its caller."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dashboard.signals.topology import Thresholds

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from dashboard.identity import MeshCA
    from dashboard.spans.store import SpanStore
    from dashboard.store.model import Store

MAX_BODY = 1 << 20  # bytes; larger request bodies get 413
MAX_SPAN_BATCH = 16 << 20  # bytes; an OTLP batch from a gateway (2048 spans with long paths) fits
HEARTBEAT_INTERVAL = 2.0  # seconds between a gateway's heartbeats; stale after STALE_AFTER of them missed
STALE_AFTER = 3
FORGET_AFTER = 3600.0  # seconds of silence (counted from the dashboard's start if later) before a gateway is dropped
MAX_WAIT = 60.0  # the longest /sync long-poll a gateway may ask for
SYNC_HOLD = MAX_WAIT  # the longest the dashboard holds one before answering 304: as long as asked (30 s, gateways)
CERT_LIFETIME = 24 * 3600.0  # seconds a gateway certificate lives; gateways renew at about half-life
SIGNALS_STEP = 5.0  # seconds between golden-signal samples of the gateways' heartbeats (dashboard/signals/history.py)
PROMETHEUS_SCRAPE_INTERVAL = 15.0  # Prometheus's own default; rates need at least two scrapes in a window
ROLLOUT_TICK = HEARTBEAT_INTERVAL  # seconds between a rollout driver's ticks: one heartbeat


@dataclass(frozen=True)
class Settings:
    """Everything the app uses, injected: nothing lives in module globals, so tests build as many apps as they like.

    >>> settings = Settings(store=open_store(str(tmp)), ca=MeshCA.load_or_create(str(tmp / "ca"), "meshgate.local"),
    ...                     registry=CollectorRegistry())
    >>> app = create_app(settings)

    `stopping` is set when the server begins a graceful shutdown, so that long-polls answer at once instead of
    holding their connections open until the shutdown deadline.
    """

    store: Store
    ca: MeshCA
    registry: CollectorRegistry
    trust_domain: str = "meshgate.local"
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    forget_after: float = FORGET_AFTER  # a stale gateway is listed (as stale) until then, then removed from the store
    cert_lifetime: float = CERT_LIFETIME
    max_body: int = MAX_BODY
    max_wait: float = MAX_WAIT
    sync_hold: float = SYNC_HOLD  # `--sync-hold`: shorter behind a proxy that cuts idle connections sooner
    spans: SpanStore | None = None  # the span store (owned by the caller, like `store`); None: POST /v1/traces 404s
    jaeger: str | None = None  # Jaeger's query URL: sampled traces are looked up there instead of in `spans`
    stopping: asyncio.Event = field(default_factory=asyncio.Event, compare=False)
    # Golden signals (dashboard/signals/): the embedded history's sampling step, the health colours'
    # thresholds, and Prometheus to read them from instead (with the scrape interval it uses).
    signals_step: float = SIGNALS_STEP
    health: Thresholds = Thresholds()
    prometheus: str | None = None
    prometheus_scrape_interval: float = PROMETHEUS_SCRAPE_INTERVAL
    # Rollouts (dashboard/rollout/): seconds between the driver's ticks, and the webhooks' HMAC secret and the
    # internal hosts they may call (`--webhook-secret-file`, `--webhook-allow`).
    rollout_tick: float = ROLLOUT_TICK
    webhook_secret: bytes | None = field(default=None, repr=False)
    webhook_allow: tuple[str, ...] = ()

    @property
    def stale_after(self) -> float:
        """Seconds without a heartbeat after which a gateway counts as stale."""
        return STALE_AFTER * self.heartbeat_interval
