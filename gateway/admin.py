"""The admin listener's endpoints (loopback only): /healthz, /ready, /config, /metrics, /requests/{id}.

Admin requests go through the same HTTP engine as proxied ones (limits, request IDs), but a `Listener` with a
local handler answers them instead of forwarding. The metrics listener serves /metrics and /ready (for kubelet
and compose probes, which cannot reach the loopback admin listener). Hop records hold
paths and hosts, so /requests/{id} answers loopback peers only. /metrics is Prometheus text, or OpenMetrics (with
exemplars on the latency buckets) when the scraper's Accept header asks for `application/openmetrics-text`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from urllib.parse import unquote_to_bytes

from prometheus_client import generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from gateway.runtime import AdminState, Hops, LocalAnswer, LocalHandler
from gateway.units import is_loopback

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def admin_handler(state: AdminState, metrics_only: bool = False) -> LocalHandler:
    def handle(
        method: bytes, target: bytes, peer: bytes, headers: dict[bytes, bytes]
    ) -> LocalAnswer | Awaitable[LocalAnswer]:
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, TEXT, b"admin endpoints are read-only: use GET\n"
        if path == b"/metrics":
            if wants_openmetrics(headers.get(b"accept", b"")):
                exposition: bytes = openmetrics.generate_latest(state.registry)  # type: ignore[no-untyped-call]
                return 200, OPENMETRICS, exposition
            return 200, PROMETHEUS, generate_latest(state.registry)
        if path == b"/ready":  # the metrics listener too: probes reach it, not the loopback admin listener
            if not state.ready:
                return 503, TEXT, b"no config loaded yet\n"
            if (waiting := state.waiting()) is not None:
                return 503, TEXT, f"waiting for {waiting}\n".encode()
            return 200, TEXT, b"ready\n"
        if metrics_only:
            return 404, TEXT, b"this listener serves /metrics and /ready only\n"
        if path == b"/healthz":
            return 200, TEXT, b"ok\n"
        if path == b"/config":
            body = {"version": state.version, "last_reload": state.last_reload, "config": state.config.to_dict()}
            return 200, JSON, json.dumps(body, indent=2).encode() + b"\n"
        if path.startswith(b"/requests/"):
            if not is_loopback(peer.decode("ascii", "replace")):
                return 403, TEXT, b"hop records are served to loopback clients only\n"
            return requests_answer(state.lookup, unquote_to_bytes(path[len(b"/requests/") :]))
        return 404, TEXT, b"unknown admin path; try /healthz /ready /config /metrics /requests/{id}\n"

    return handle


def requests_handler(lookup: Callable[[bytes], Hops | Awaitable[Hops]]) -> LocalHandler:
    """What the inbound listener answers on the dashboard's mTLS connections: `GET /requests/{id}` only."""

    def handle(
        method: bytes, target: bytes, peer: bytes, headers: dict[bytes, bytes]
    ) -> LocalAnswer | Awaitable[LocalAnswer]:
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD") or not path.startswith(b"/requests/"):
            return 404, TEXT, b"the dashboard's identity may only look up /requests/{id}\n"
        return requests_answer(lookup, unquote_to_bytes(path[len(b"/requests/") :]))

    return handle


def requests_answer(
    lookup: Callable[[bytes], Hops | Awaitable[Hops]], request_id: bytes
) -> LocalAnswer | Awaitable[LocalAnswer]:
    found = lookup(request_id)
    if isinstance(found, list):
        return _hops_answer(request_id, found)

    async def later() -> LocalAnswer:
        return _hops_answer(request_id, await found)

    return later()


def _hops_answer(request_id: bytes, hops: Hops) -> LocalAnswer:
    body = json.dumps({"request_id": request_id.decode("latin-1"), "hops": hops}, indent=1).encode() + b"\n"
    return (200 if hops else 404), JSON, body


def wants_openmetrics(accept: bytes) -> bool:
    """Whether an Accept header lists OpenMetrics text (not refused with q=0): Prometheus asks for it first."""
    for offer in accept.split(b","):
        media, *parameters = (part.strip() for part in offer.split(b";"))
        if media.lower() == b"application/openmetrics-text":
            return not any(p.replace(b" ", b"") in (b"q=0", b"q=0.0", b"q=0.00", b"q=0.000") for p in parameters)
    return False
