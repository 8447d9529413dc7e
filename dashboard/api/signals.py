"""The golden-signal API (viewer or operator), over a `Signals` source: the embedded `Stats`, or Prometheus.

- `GET /api/v1/topology?window=5m`: nodes and edges (dashboard/signals/topology.py), for any window up to the source's
  reach (`5m`, `1h`, `6h`, or seconds).
- `GET /api/v1/topology/edge?source=ID&destination=ID&window=5m`: one edge over time, per subset side by side.
- `GET /api/v1/services/{name}/signals?window=5m`: a service's totals and chart points, per subset side by side, and
  its gRPC calls by status code (`grpc`: `{"OK": 1200, "UNAVAILABLE": 25}`, the codes seen; `{}` without gRPC).
- `GET /api/v1/gateways/{instance}/signals?window=5m`: what a gateway served and sent, and its saturation.

Pages call the same methods directly (`topology`, `edge`, `service`, `gateway`, `services`); `services(window)`
is what GET /api/v1/services adds to each service and subset. A point is `{t, rps, error_rate, denied, p50_ms,
p95_ms, p99_ms}` for the interval ending at `t` (Unix seconds); `rps` is null where there is no data yet. An error is
a 5xx, or a gRPC call whose status code is in the destination's `grpc.failure_codes`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dashboard.api.auth import READ, Auth
from dashboard.api.operator import json_response
from dashboard.errors import ApiError
from dashboard.mesh import Mesh
from dashboard.settings import Settings
from dashboard.signals.history import Key, Point, Signals, Stats, Totals, Traffic
from dashboard.signals.prometheus import PrometheusSignals
from dashboard.signals.topology import EXTERNAL, UNKNOWN_DESTINATION, UNKNOWN_SOURCE, Thresholds, build, layout
from dashboard.store.model import Revision, Store
from gateway.units import parse_duration

DEFAULT_WINDOW = 300.0
_CHART_NAMES = {"rps": "rate", "p50_ms": "p50", "p95_ms": "p95", "p99_ms": "p99"}


def signals_for(settings: Settings, store: Store) -> Signals:
    """Prometheus when `settings.prometheus` names one, else the embedded history sampled from `store`."""
    if settings.prometheus:
        return PrometheusSignals(settings.prometheus, store, settings.prometheus_scrape_interval)
    return Stats(store, settings.signals_step)


def parse_window(text: str | None, longest: float) -> float:
    if text is None:
        return min(DEFAULT_WINDOW, longest)
    try:
        window = parse_duration(text)
    except ValueError:
        window = -1.0
    if not 1 <= window <= longest:
        raise ApiError(400, f"window: expected a duration from 1s to {longest:g}s such as 5m, 1h or 300, got {text!r}")
    return window


def point(time: float, totals: Totals) -> dict[str, object]:
    summary = totals.summary()
    keys = ("error_rate", "denied", "p50_ms", "p95_ms", "p99_ms")
    return {"t": round(time, 3), "rps": summary["rps"], **{key: summary[key] for key in keys}}


def points(found: Iterable[Point], keep: Callable[[Key], bool]) -> list[dict[str, object]]:
    return [point(item.time, item.totals(keep)) for item in found]


def chart_series(found: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[float, float | None]]]:
    """Points as one (t, value) list per signal, for line charts: `rate`, `error_rate`, `p50`, `p95`, `p99`,
    `denied` (or the saturation names for gateway points)."""
    series: dict[str, list[tuple[float, float | None]]] = {}
    for item in found:
        for key, value in item.items():
            if key != "t":
                series.setdefault(_CHART_NAMES.get(key, key), []).append((item["t"], value))
    return series


def _label_of_source(node: str) -> str | None:
    if node == EXTERNAL:
        return "external"
    if node == UNKNOWN_SOURCE:
        return "unknown"
    return node.removeprefix("group:") if node.startswith("group:") else None


def _label_of_destination(node: str) -> str | None:
    if node == UNKNOWN_DESTINATION:
        return "unknown"
    return node.removeprefix("service:") if node.startswith("service:") else None


class SignalsApi:
    """The golden-signal endpoints and the methods pages call, over one `Signals` source.

    >>> api = SignalsApi.create(settings, store, auth)
    >>> spawn(api.source.run())                       # the server samples in the background
    >>> topology = await api.topology(300.0)
    >>> positions = api.layout(topology)              # node id -> centre of its box, for SVG
    """

    layout = staticmethod(layout)

    def __init__(
        self, source: Signals, store: Store, auth: Auth, *, stale_after: float, thresholds: Thresholds
    ) -> None:
        self.source = source
        self.store = store
        self.auth = auth
        self.stale_after = stale_after
        self.thresholds = thresholds
        self._parsed: tuple[int, Mesh] | None = None

    @classmethod
    def create(cls, settings: Settings, store: Store, auth: Auth) -> SignalsApi:
        source = signals_for(settings, store)
        return cls(source, store, auth, stale_after=settings.stale_after, thresholds=settings.health)

    def routes(self) -> list[Route]:
        prefix = "/api/v1"
        return [
            Route(f"{prefix}/topology", self.get_topology, methods=["GET"]),
            Route(f"{prefix}/topology/edge", self.get_edge, methods=["GET"]),
            Route(f"{prefix}/services/{{name}}/signals", self.get_service, methods=["GET"]),
            Route(f"{prefix}/gateways/{{instance}}/signals", self.get_gateway, methods=["GET"]),
        ]

    async def _mesh(self) -> tuple[Revision, Mesh]:
        revision = await self.store.current()
        if self._parsed is None or self._parsed[0] != revision.version:
            self._parsed = (revision.version, Mesh.parse(revision.mesh, source="mesh"))
        return revision, self._parsed[1]

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A window or name the source cannot take is a 400 (an unavailable source raises SignalsError: 503)."""
        try:
            yield
        except ValueError as exc:  # a window beyond the source's reach, or a label Prometheus must not see
            raise ApiError(400, str(exc)) from None

    async def _traffic(self, window: float) -> Traffic:
        with self._reading():
            return await self.source.traffic(window)

    async def _points(self, window: float, destination: str) -> list[Point]:
        with self._reading():
            return await self.source.points(window, destination)

    # What pages call (they raise ApiError like the endpoints)

    async def topology(self, window: float) -> dict[str, Any]:
        _, mesh = await self._mesh()
        traffic = await self._traffic(window)
        gateways = await self.store.gateways()
        return build(mesh, traffic, gateways, now=time.time(), stale_after=self.stale_after, thresholds=self.thresholds)

    async def services(self, window: float = DEFAULT_WINDOW) -> dict[str, dict[str, Any]]:
        """Per service: `{rps, error_rate, p99_ms, subsets: {subset: {rps, error_rate, p99_ms}}}` over `window`,
        for every configured service (rps 0 and nulls without traffic) and every destination seen."""
        _, mesh = await self._mesh()
        traffic = await self._traffic(window)
        by_service = traffic.grouped(lambda key: key[1])
        by_subset = traffic.grouped(lambda key: (key[1], key[2]))
        empty = Totals.of((), traffic.seconds)
        answer: dict[str, dict[str, Any]] = {}
        subsets_of = {service.name: [subset.name for subset in service.subsets] for service in mesh.services}
        for name in sorted(set(subsets_of) | set(by_service)):
            names = subsets_of.get(name, []) + sorted(
                {subset for dest, subset in by_subset if dest == name and subset} - set(subsets_of.get(name, []))
            )
            answer[name] = {
                **_golden(by_service.get(name, empty)),
                "subsets": {subset: _golden(by_subset.get((name, subset), empty)) for subset in names},
            }
        return answer

    async def service(self, name: str, window: float) -> dict[str, Any]:
        _, mesh = await self._mesh()
        service = mesh.service(name)
        traffic = await self._traffic(window)
        if service is None and not any(key[1] == name for key in traffic.counts):
            raise ApiError(404, f"services.{name}: no such service, and no traffic to it in the window")
        found = await self._points(window, name)
        names = [subset.name for subset in service.subsets] if service is not None else []
        names += sorted({key[2] for key in traffic.counts if key[1] == name and key[2]} - set(names))
        weights = dict(service.routes[-1].split) if service is not None else {}
        owners = {member: group for group, members in mesh.groups for member in members}
        callers = traffic.grouped(lambda key: key[0] if key[1] == name else "")
        totals = traffic.totals(lambda key: key[1] == name)
        return {
            "service": name,
            "group": owners.get(name),
            "window": window,
            "totals": totals.summary(),
            "grpc": totals.grpc_codes(),
            "points": points(found, lambda key: True),
            "subsets": {
                subset: {
                    "weight": weights.get(subset),
                    "totals": traffic.totals(_match(destination=name, subset=subset)).summary(),
                    "points": points(found, _match(subset=subset)),
                }
                for subset in names
            },
            "callers": {caller: totals.summary() for caller, totals in sorted(callers.items()) if caller},
        }

    async def edge(self, source: str, destination: str, window: float) -> dict[str, Any]:
        caller, callee = _label_of_source(source), _label_of_destination(destination)
        if caller is None or callee is None:
            raise ApiError(400, f"expected a source node and a service node, got {source!r} -> {destination!r}")
        traffic = await self._traffic(window)
        found = await self._points(window, callee)
        subsets = sorted({key[2] for key in traffic.counts if key[:2] == (caller, callee)})
        return {
            "source": source,
            "destination": destination,
            "window": window,
            "totals": traffic.totals(lambda key: key[:2] == (caller, callee)).summary(),
            "points": points(found, lambda key: key[0] == caller),
            "subsets": {subset: points(found, _match(source=caller, subset=subset)) for subset in subsets},
        }

    async def gateway(self, instance: str, window: float, group: str | None = None) -> dict[str, Any]:
        """One gateway's signals; `group` picks it when gateways of several groups claim one instance id."""
        records = [item for item in await self.store.gateways() if item.instance == instance]
        matching = [item for item in records if group in (None, item.group)]
        record = max(matching, key=lambda item: item.seen, default=None)
        if record is None:
            raise ApiError(404, f"no gateway {instance!r} has sent a heartbeat")
        with self._reading():
            found = await self.source.gateway(record, window)
        listed = [item.summary() for item in found.points]
        latest = next((item for item in reversed(found.points) if item.seconds > 0), None)
        return {
            "instance": instance,
            "group": record.group,
            "window": window,
            "stale": time.time() - record.seen > self.stale_after,
            "served": found.served.summary(),
            "sent": found.sent.summary(),
            "latest": latest.summary() if latest is not None else None,
            "points": listed,
        }

    # Endpoints

    async def _window(self, request: Request) -> float:
        await self.auth.require(request, READ)
        return parse_window(request.query_params.get("window"), self.source.max_window)

    async def get_topology(self, request: Request) -> Response:
        """---
        summary: The mesh as nodes and edges with golden signals over a window
        tags: [signals]
        parameters:
          - {name: window, in: query, schema: {type: string, default: 5m}, description: "5m, 1h, 6h or seconds"}
        responses:
          "200":
            description: >-
              `{window, nodes: [{id, kind, name, group?, subsets?, weights?, health, ...}], edges: [{source,
              destination, rps, error_rate, p50_ms, p99_ms, mtls, denied}]}`
          "400": {$ref: "#/components/responses/Error"}
          "403": {$ref: "#/components/responses/Error"}
          "503": {$ref: "#/components/responses/Error"}
        """
        window = await self._window(request)
        return json_response(await self.topology(window))

    async def get_edge(self, request: Request) -> Response:
        """---
        summary: One edge's golden signals over time, per subset side by side
        tags: [signals]
        parameters:
          - {name: source, in: query, required: true, schema: {type: string}, description: a node id}
          - {name: destination, in: query, required: true, schema: {type: string}, description: a node id}
          - {name: window, in: query, schema: {type: string, default: 5m}, description: "5m, 1h, 6h or seconds"}
        responses:
          "200": {description: "`{source, destination, window, totals, points, subsets: {subset: points}}`"}
          "400": {$ref: "#/components/responses/Error"}
          "403": {$ref: "#/components/responses/Error"}
          "503": {$ref: "#/components/responses/Error"}
        """
        window = await self._window(request)
        source, destination = request.query_params.get("source", ""), request.query_params.get("destination", "")
        return json_response(await self.edge(source, destination, window))

    async def get_service(self, request: Request) -> Response:
        """---
        summary: A service's golden signals over time, per subset side by side
        tags: [signals]
        parameters:
          - {$ref: "#/components/parameters/name"}
          - {name: window, in: query, schema: {type: string, default: 5m}, description: "5m, 1h, 6h or seconds"}
        responses:
          "200":
            description: >-
              `{service, group, window, totals, grpc, points, subsets: {subset: {weight, totals, points}}, callers}`;
              `grpc`: the window's gRPC calls by status code name, the codes seen (`{"OK": 1200, "UNAVAILABLE":
              25}`, `{}` for a service without gRPC calls); `totals.errors` counts 5xx answers and the calls whose
              code is in the service's `grpc.failure_codes`
          "400": {$ref: "#/components/responses/Error"}
          "403": {$ref: "#/components/responses/Error"}
          "404": {$ref: "#/components/responses/Error"}
          "503": {$ref: "#/components/responses/Error"}
        """
        window = await self._window(request)
        return json_response(await self.service(request.path_params["name"], window))

    async def get_gateway(self, request: Request) -> Response:
        """---
        summary: A gateway's own traffic (served and sent) and its saturation over time
        tags: [signals]
        parameters:
          - {name: instance, in: path, required: true, schema: {type: string}, description: the gateway's instance id}
          - {name: group, in: query, schema: {type: string}, description: "its group (default: the latest heard)"}
          - {name: window, in: query, schema: {type: string, default: 5m}, description: "5m, 1h, 6h or seconds"}
        responses:
          "200": {description: "`{instance, group, window, stale, served, sent, latest, points}`"}
          "400": {$ref: "#/components/responses/Error"}
          "403": {$ref: "#/components/responses/Error"}
          "404": {$ref: "#/components/responses/Error"}
          "503": {$ref: "#/components/responses/Error"}
        """
        window = await self._window(request)
        group = request.query_params.get("group")
        return json_response(await self.gateway(request.path_params["instance"], window, group))


def _match(
    source: str | None = None, destination: str | None = None, subset: str | None = None
) -> Callable[[Key], bool]:
    def keep(key: Key) -> bool:
        return all(want is None or have == want for have, want in zip(key, (source, destination, subset), strict=True))

    return keep


def _golden(totals: Totals) -> dict[str, object]:
    summary = totals.summary()
    return {"rps": summary["rps"] or 0.0, "error_rate": summary["error_rate"], "p99_ms": summary["p99_ms"]}
