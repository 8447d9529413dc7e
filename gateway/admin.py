"""The admin listener's endpoints (loopback only): /healthz, /ready, /config and /metrics.

Admin requests go through the same HTTP engine as proxied ones (limits, request IDs), but a `Listener` with a
local handler answers them instead of forwarding. The metrics listener serves /metrics only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.config import Config

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(slots=True)
class AdminState:
    """What the admin endpoints report: the live config, its version and the last reload's outcome."""

    config: Config
    version: int = 0
    ready: bool = False
    last_reload: str = "ok"
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        self.registry.register(_StateCollector(self))


class _StateCollector(Collector):
    def __init__(self, state: AdminState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("meshgate_config_version", "Version of the live gateway config", self.state.version)
        yield GaugeMetricFamily(
            "meshgate_config_last_reload_success",
            "1 if the last config reload was applied, 0 if it was rejected",
            1 if self.state.last_reload == "ok" else 0,
        )


def admin_handler(state: AdminState, metrics_only: bool = False):  # type: ignore[no-untyped-def]
    def handle(method: bytes, target: bytes) -> tuple[int, str, bytes]:
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, TEXT, b"admin endpoints are read-only: use GET\n"
        if path == b"/metrics":
            return 200, PROMETHEUS, generate_latest(state.registry)
        if metrics_only:
            return 404, TEXT, b"this listener serves /metrics only\n"
        if path == b"/healthz":
            return 200, TEXT, b"ok\n"
        if path == b"/ready":
            return (200, TEXT, b"ready\n") if state.ready else (503, TEXT, b"no config loaded yet\n")
        if path == b"/config":
            body = {"version": state.version, "last_reload": state.last_reload, "config": state.config.to_dict()}
            return 200, JSON, json.dumps(body, indent=2).encode() + b"\n"
        return 404, TEXT, b"unknown admin path; try /healthz /ready /config /metrics\n"

    return handle
