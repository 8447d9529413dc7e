"""What the control server's HTTP side is built from: `Settings`, handed to `create_app` by its caller."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from dashboard.identity import MeshCA
    from dashboard.store import Store

MAX_BODY = 1 << 20  # bytes; larger request bodies get 413
HEARTBEAT_INTERVAL = 2.0  # seconds between a gateway's heartbeats; stale after STALE_AFTER of them missed
STALE_AFTER = 3
MAX_WAIT = 60.0  # the longest /sync long-poll a gateway may ask for
CERT_LIFETIME = 24 * 3600.0  # seconds a gateway certificate lives; gateways renew at about half-life


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
    cert_lifetime: float = CERT_LIFETIME
    max_body: int = MAX_BODY
    max_wait: float = MAX_WAIT
    stopping: asyncio.Event = field(default_factory=asyncio.Event, compare=False)

    @property
    def stale_after(self) -> float:
        """Seconds without a heartbeat after which a gateway counts as stale."""
        return STALE_AFTER * self.heartbeat_interval
