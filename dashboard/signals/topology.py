"""The mesh as a graph: nodes (external clients, groups, services with their subsets, unknown) and edges from real
traffic, with health colours from `Thresholds`, and a deterministic layered layout for server-side SVG.

`build(mesh, traffic, gateways, ...)` is pure: the mesh document says which groups and services exist and who owns
what, `Traffic` (`history`) gives each (source, destination, subset)'s counts over the window, and the
gateways' heartbeats say which groups are live and which have an edge listener. The answer is the
`GET /api/v1/topology` document:

    {"nodes": [{id, kind: external|group|service|unknown, name, group?, subsets?, health, ...}],
     "edges": [{source, destination, rps, error_rate, p50_ms, p99_ms, mtls, denied}]}

Node ids are `external`, `group:<name>`, `service:<name>`, `unknown:source` (callers without a mesh identity) and
`unknown:destination` (requests that matched no service); mesh names cannot contain ":", so ids never collide.

`layout(topology)` gives each node's centre, in layers left to right (external and unknown callers, then groups,
then services, then unrouted), each layer ordered by the barycentre of its neighbours so edges cross little and
centred vertically. Boxes are `node_size(node)`: a row per line of `node_lines` (the name, then `subset weight%`
per subset), `CHAR_WIDTH` per character, never smaller than MIN_WIDTH × MIN_HEIGHT.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dashboard.mesh import Mesh
from dashboard.signals.history import Key, Totals, Traffic
from dashboard.store.model import GatewayRecord

EXTERNAL, UNKNOWN_SOURCE, UNKNOWN_DESTINATION = "external", "unknown:source", "unknown:destination"
HEALTH = ("ok", "warn", "bad")

# Layout, in SVG user units (px at 100 %): rows of 12 px monospace text (7.2 px wide; CHAR_WIDTH leaves room).
CHAR_WIDTH = 7.5
ROW = 18.0
PADDING = 10.0
MIN_WIDTH, MIN_HEIGHT = 150.0, 46.0  # so a fixed-size box of at most this fits in every node's place
GAP_X = 140.0  # between layers: room for edges and their labels
GAP_Y = 22.0
MARGIN = 20.0
_LAYERS = {"external": 0, "unknown:source": 0, "group": 1, "service": 2, "unknown:destination": 3}


@dataclass(frozen=True)
class Thresholds:
    """When a node turns amber (`warn`) or red (`bad`): its failure share (5xx, and gRPC calls whose code is in the
    service's `grpc.failure_codes`) or its p99 above the limits.

    >>> Thresholds().health(error_rate=0.02, p99_ms=40.0)
    'warn'
    """

    error_warn: float = 0.01
    error_bad: float = 0.05
    p99_warn_ms: float = 250.0
    p99_bad_ms: float = 1000.0

    def __post_init__(self) -> None:
        if not 0 <= self.error_warn <= self.error_bad <= 1:
            raise ValueError(
                f"error-rate thresholds: expected 0 <= warn <= bad <= 1, got {self.error_warn}, {self.error_bad}"
            )
        if not 0 <= self.p99_warn_ms <= self.p99_bad_ms:
            raise ValueError(f"p99 thresholds: expected 0 <= warn <= bad, got {self.p99_warn_ms}, {self.p99_bad_ms}")

    def health(self, error_rate: float | None, p99_ms: float | None) -> str:
        errors, p99 = error_rate or 0.0, p99_ms or 0.0
        if errors > self.error_bad or p99 > self.p99_bad_ms:
            return "bad"
        if errors > self.error_warn or p99 > self.p99_warn_ms:
            return "warn"
        return "ok"


def source_node(source: str) -> str:
    if source == "external":
        return EXTERNAL
    return UNKNOWN_SOURCE if source == "unknown" else f"group:{source}"


def destination_node(destination: str) -> str:
    return UNKNOWN_DESTINATION if destination == "unknown" else f"service:{destination}"


def edge(source: str, destination: str, totals: Totals, owners: Mapping[str, str]) -> dict[str, object]:
    """One edge of the contract: exactly these keys. `mtls`: the caller is a mesh group whose gateway crossed to the
    owner's over mTLS; a call a group's own gateway serves (it owns the service) never leaves the host."""
    signals = totals.summary()
    local = owners.get(destination.removeprefix("service:")) == source.removeprefix("group:")
    return {
        "source": source,
        "destination": destination,
        "rps": signals["rps"],
        "error_rate": signals["error_rate"],
        "p50_ms": signals["p50_ms"],
        "p99_ms": signals["p99_ms"],
        "mtls": source.startswith("group:") and not local,
        "denied": signals["denied"],
    }


def _liveness(gateways: Iterable[GatewayRecord], now: float, stale_after: float) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for record in gateways:
        state = "stale" if now - record.seen > stale_after else "live"
        counts.setdefault(record.group, {"live": 0, "stale": 0})[state] += 1
    return counts


def _signals(totals: Totals | None) -> dict[str, object]:
    if totals is None:
        return {"rps": 0.0, "error_rate": None, "p50_ms": None, "p99_ms": None}
    summary = totals.summary()
    return {key: summary[key] for key in ("rps", "error_rate", "p50_ms", "p99_ms")}


def build(
    mesh: Mesh,
    traffic: Traffic,
    gateways: Sequence[GatewayRecord],
    *,
    now: float,
    stale_after: float,
    thresholds: Thresholds,
) -> dict[str, Any]:
    """The topology document for `traffic`'s window (see the module docstring)."""
    live = _liveness(gateways, now, stale_after)
    owners = {service: group for group, services in mesh.groups for service in services}
    by_edge = traffic.grouped(lambda key: (source_node(key[0]), destination_node(key[1])))
    by_service = traffic.grouped(lambda key: key[1])
    by_subset = traffic.grouped(lambda key: (key[1], key[2]))
    nodes: dict[str, dict[str, Any]] = {}

    def group_node(name: str) -> None:
        counts = live.get(name, {"live": 0, "stale": 0})
        health = "bad" if not counts["live"] else "warn" if counts["stale"] else "ok"
        nodes[f"group:{name}"] = {
            "id": f"group:{name}",
            "kind": "group",
            "name": name,
            "health": health,
            "gateways": counts,
        }

    for name in sorted({name for name, _ in mesh.groups} | set(live)):
        group_node(name)
    edge_listener = any(
        "edge" in (record.data.get("listeners") or {}) for record in gateways if now - record.seen <= stale_after
    )
    if edge_listener:
        nodes[EXTERNAL] = _plain(EXTERNAL, "external", "external clients")
    for source, destination in by_edge:
        if source == EXTERNAL:
            nodes.setdefault(EXTERNAL, _plain(EXTERNAL, "external", "external clients"))
        elif source == UNKNOWN_SOURCE:
            nodes.setdefault(UNKNOWN_SOURCE, _plain(UNKNOWN_SOURCE, "unknown", "unknown"))
        elif source not in nodes:
            group_node(source.removeprefix("group:"))
        if destination == UNKNOWN_DESTINATION:
            nodes.setdefault(UNKNOWN_DESTINATION, _plain(UNKNOWN_DESTINATION, "unknown", "unknown"))
    configured = {service.name: service for service in mesh.services}
    for name in sorted(set(configured) | {name for name in by_service if name != "unknown"}):
        service = configured.get(name)
        totals = by_service.get(name)
        weights = dict(service.routes[-1].split) if service is not None else {}
        subset_names = [subset.name for subset in service.subsets] if service is not None else []
        subset_names += sorted({subset for (dest, subset) in by_subset if dest == name and subset} - set(subset_names))
        owner = owners.get(name)
        signals = _signals(totals)
        health = thresholds.health(totals.error_rate, totals.quantile_ms(0.99)) if totals is not None else "ok"
        if owner is not None and not live.get(owner, {}).get("live"):
            health = "bad"  # no live gateway serves it
        nodes[f"service:{name}"] = {
            "id": f"service:{name}",
            "kind": "service",
            "name": name,
            "group": owner,
            "subsets": subset_names,
            "weights": weights,
            "health": health,
            **signals,
        }
    edges = [edge(source, destination, totals, owners) for (source, destination), totals in sorted(by_edge.items())]
    return {"window": traffic.window, "nodes": sorted(nodes.values(), key=lambda node: node["id"]), "edges": edges}


def _plain(node_id: str, kind: str, name: str) -> dict[str, Any]:
    return {"id": node_id, "kind": kind, "name": name, "health": "ok"}


# Layout


def node_lines(node: Mapping[str, Any]) -> list[str]:
    """The text rows a node's box holds: its name, then `subset weight%` per subset."""
    lines = [str(node["name"])]
    weights = node.get("weights") or {}
    for subset in node.get("subsets") or ():
        weight = weights.get(subset)
        lines.append(f"{subset} {weight}%" if weight is not None else str(subset))
    return lines


def node_size(node: Mapping[str, Any]) -> tuple[float, float]:
    """The width and height of a node's box: room for `node_lines` in rows of `ROW`, `CHAR_WIDTH` per character."""
    lines = node_lines(node)
    width = max(MIN_WIDTH, 2 * PADDING + CHAR_WIDTH * max(len(line) for line in lines))
    return width, max(MIN_HEIGHT, 2 * PADDING + ROW * len(lines))


def _layer(node: Mapping[str, Any]) -> int:
    return _LAYERS.get(node["id"], _LAYERS.get(node["kind"], 2))


def _order(layers: list[list[str]], neighbours: Mapping[str, set[str]]) -> None:
    """Barycentre ordering, one sweep right then one left: each node sits near the mean place of its neighbours in
    the layers already placed. Ties keep the previous order (sorted ids at first), so the result is deterministic."""

    def sweep(sequence: Sequence[int], reference: Callable[[int], Iterable[int]]) -> None:
        for index in sequence:
            ranks = {  # a node's place in its own layer, from 0 to 1, so layers of different sizes compare
                node: (rank + 0.5) / len(layers[other])
                for other in reference(index)
                for rank, node in enumerate(layers[other])
            }
            keys = {}
            for rank, node in enumerate(layers[index]):
                placed = [ranks[other] for other in neighbours.get(node, ()) if other in ranks]
                # fsum: exactly rounded, so the order of the set (which varies with hashing) never decides a tie
                keys[node] = (math.fsum(placed) / len(placed) if placed else math.inf, rank)
            layers[index].sort(key=keys.__getitem__)

    count = len(layers)
    sweep(range(1, count), lambda index: range(index))
    sweep(range(count - 2, -1, -1), lambda index: range(index + 1, count))


def layout(topology: Mapping[str, Any], lanes: Mapping[str, float] | None = None) -> dict[str, tuple[float, float]]:
    """The centre of each node's box (`node_size`), layered left to right; no two boxes overlap, nor do boxes of
    at most MIN_WIDTH × MIN_HEIGHT drawn around the same centres. Layers are GAP_X apart, or more where `lanes`
    says a node needs a wider gap before its layer (room for the labels of the edges it receives).

    >>> positions = layout(build(mesh, traffic, gateways, now=now, stale_after=6.0, thresholds=Thresholds()))
    >>> positions["external"][0] < positions["group:shop"][0] < positions["service:catalog"][0]
    True
    """
    nodes = {node["id"]: node for node in topology["nodes"]}
    numbered: dict[int, list[str]] = {}
    for node_id in sorted(nodes):
        numbered.setdefault(_layer(nodes[node_id]), []).append(node_id)
    layers = [numbered[index] for index in sorted(numbered)]
    neighbours: dict[str, set[str]] = {}
    for item in topology["edges"]:
        neighbours.setdefault(item["source"], set()).add(item["destination"])
        neighbours.setdefault(item["destination"], set()).add(item["source"])
    for node in nodes.values():  # a service sits near the group that owns it when nothing calls it
        if node["kind"] == "service" and node.get("group") and f"group:{node['group']}" in nodes:
            neighbours.setdefault(node["id"], set()).add(f"group:{node['group']}")
            neighbours.setdefault(f"group:{node['group']}", set()).add(node["id"])
    _order(layers, neighbours)
    sizes = {node_id: node_size(node) for node_id, node in nodes.items()}
    heights = [sum(sizes[node][1] for node in layer) + GAP_Y * (len(layer) - 1) for layer in layers]
    tallest = max(heights, default=0.0)
    positions: dict[str, tuple[float, float]] = {}
    lanes = lanes or {}
    x = MARGIN
    for index, (layer, height) in enumerate(zip(layers, heights, strict=True)):
        if index:
            x += max([GAP_X, *(lanes.get(node, 0.0) for node in layer)])
        y = MARGIN + (tallest - height) / 2
        column = max(sizes[node][0] for node in layer)
        for node_id in layer:
            positions[node_id] = (x + column / 2, y + sizes[node_id][1] / 2)
            y += sizes[node_id][1] + GAP_Y
        x += column
    return positions


def canvas_size(topology: Mapping[str, Any], positions: Mapping[str, tuple[float, float]]) -> tuple[float, float]:
    """The width and height an SVG needs to show every box with a margin."""
    width = height = 0.0
    for node in topology["nodes"]:
        x, y = positions[node["id"]]
        w, h = node_size(node)
        width, height = max(width, x + w / 2), max(height, y + h / 2)
    return width + MARGIN, height + MARGIN


def edge_key(key: Key) -> tuple[str, str]:
    """The (source node, destination node) a traffic key is drawn as."""
    return source_node(key[0]), destination_node(key[1])
