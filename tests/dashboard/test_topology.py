"""The topology document (nodes, the edge contract, health) and its layout, from hand-made traffic."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from typing import Any

import pytest

from dashboard.mesh import Mesh
from dashboard.signals.history import FIRST_BUCKET, REQUESTS, WIDTH, Key, Traffic, classify
from dashboard.signals.topology import MIN_HEIGHT, MIN_WIDTH, Thresholds, build, canvas_size, layout, node_size
from dashboard.store.model import GatewayRecord
from tests.conftest import ROOT

NOW = 10_000.0
EDGE_KEYS = {"source", "destination", "rps", "error_rate", "p50_ms", "p99_ms", "mtls", "denied"}


def counts(codes: dict[int, int], bucket: int = 5, subset: str = "v1") -> list[float]:
    """Counts of requests with these status codes, all in latency bucket `bucket` (5: 2.5-5 ms)."""
    values = [0.0] * WIDTH
    for code, n in codes.items():
        classify(code, subset, values, float(n))
    values[FIRST_BUCKET + bucket] = values[REQUESTS]
    return values


def gateway(group: str, seen: float = NOW - 1, **listeners: str) -> GatewayRecord:
    data = {"listeners": {"inbound": "127.0.0.1:1", **listeners}}
    return GatewayRecord(f"gw-{group}-{seen}", group, data, seen)


MESH = Mesh.parse(
    {
        "groups": {"shop": ["storefront"], "catalog": ["catalog"], "payments": ["payments"]},
        "services": {
            "storefront": {"subsets": {"v1": {"endpoints": []}}},
            "catalog": {
                "subsets": {"v1": {"endpoints": []}, "v2": {"endpoints": []}},
                "routes": [{"name": "default", "split": {"v1": 90, "v2": 10}}],
            },
            "payments": {"subsets": {"v1": {"endpoints": []}}, "authorization": {"allow": ["shop"]}},
        },
    }
)


def topology(traffic: dict[Key, list[float]], gateways: list[GatewayRecord] | None = None, **limits: float) -> Any:
    records = (
        gateways
        if gateways is not None
        else [gateway("shop", edge="127.0.0.1:2"), gateway("catalog"), gateway("payments")]
    )
    return build(
        MESH, Traffic(300.0, 100.0, traffic), records, now=NOW, stale_after=6.0, thresholds=Thresholds(**limits)
    )


def test_nodes_and_edges_follow_the_contract() -> None:
    found = topology(
        {
            ("shop", "catalog", "v1"): counts({200: 900}),
            ("shop", "catalog", "v2"): counts({200: 95, 503: 5}, bucket=9, subset="v2"),
            ("external", "storefront", "v1"): counts({200: 50}),
            ("catalog", "payments", ""): counts({403: 7}, bucket=0, subset=""),
            ("unknown", "unknown", ""): counts({404: 2}, subset=""),
            ("shop", "storefront", "v1"): counts({200: 10}),  # shop owns storefront: its own gateway serves it
        }
    )
    nodes = {node["id"]: node for node in found["nodes"]}
    assert set(nodes) == {
        "external",
        "group:shop",
        "group:catalog",
        "group:payments",
        "service:storefront",
        "service:catalog",
        "service:payments",
        "unknown:source",
        "unknown:destination",
    }
    assert {node["kind"] for node in found["nodes"]} == {"external", "group", "service", "unknown"}
    catalog = nodes["service:catalog"]
    assert catalog["group"] == "catalog" and catalog["subsets"] == ["v1", "v2"]
    assert catalog["weights"] == {"v1": 90, "v2": 10} and catalog["rps"] == 10.0
    assert all(set(item) == EDGE_KEYS for item in found["edges"])
    edges = {(item["source"], item["destination"]): item for item in found["edges"]}
    assert list(edges) == sorted(edges)
    shop = edges[("group:shop", "service:catalog")]
    assert shop["rps"] == 10.0 and shop["error_rate"] == 0.005 and shop["mtls"] is True and shop["denied"] == 0
    assert 2.5 <= shop["p50_ms"] <= 5.0 and 50.0 < shop["p99_ms"] <= 100.0  # v2's slow 5 % is in the tail
    external = edges[("external", "service:storefront")]
    assert external["mtls"] is False and external["rps"] == 0.5
    denied = edges[("group:catalog", "service:payments")]
    assert denied["denied"] == 7 and denied["error_rate"] == 0.0 and denied["mtls"] is True
    assert edges[("unknown:source", "unknown:destination")]["mtls"] is False
    assert edges[("group:shop", "service:storefront")]["mtls"] is False  # never left the host: no mTLS hop


def test_health_from_error_rate_latency_and_live_gateways() -> None:
    limits = Thresholds()
    assert limits.health(None, None) == "ok"
    assert limits.health(0.01, 250.0) == "ok"  # at the threshold is still fine: only above it warns
    assert limits.health(0.0101, 10.0) == "warn" and limits.health(0.0, 250.1) == "warn"
    assert limits.health(0.051, 10.0) == "bad" and limits.health(0.0, 1000.1) == "bad"
    with pytest.raises(ValueError):
        Thresholds(error_warn=0.2, error_bad=0.1)
    found = topology(
        {
            ("shop", "catalog", "v1"): counts({200: 97, 500: 3}),  # 3 % errors: warn
            ("shop", "storefront", "v1"): counts({200: 10}, bucket=13),  # p99 in 1-2.5 s: bad
            ("shop", "payments", "v1"): counts({200: 10}),
        },
        gateways=[gateway("shop"), gateway("catalog"), gateway("payments", seen=NOW - 60)],  # payments: stale
    )
    health = {node["id"]: node["health"] for node in found["nodes"]}
    assert health["service:catalog"] == "warn" and health["service:storefront"] == "bad"
    assert health["group:payments"] == "bad" and health["service:payments"] == "bad"  # nothing live serves it
    assert health["group:shop"] == "ok"
    assert "external" not in health  # no edge listener and no external traffic
    relaxed = topology({("shop", "catalog", "v1"): counts({200: 97, 500: 3})}, error_warn=0.05, error_bad=0.1)
    assert {node["id"]: node["health"] for node in relaxed["nodes"]}["service:catalog"] == "ok"


def test_traffic_to_a_service_or_from_a_group_not_in_the_config_still_shows() -> None:
    found = topology({("legacy", "old-search", "v3"): counts({200: 5})})
    nodes = {node["id"]: node for node in found["nodes"]}
    assert nodes["group:legacy"]["health"] == "bad"  # no gateway of it is live
    assert nodes["service:old-search"]["group"] is None and nodes["service:old-search"]["subsets"] == ["v3"]
    assert nodes["external"]["kind"] == "external"  # shop's gateway has an edge listener


# Layout


def big_topology(services: int = 30) -> dict[str, Any]:
    """`services` services in as many groups, each group calling the next two, plus external and unknown."""
    nodes: list[dict[str, Any]] = [{"id": "external", "kind": "external", "name": "external clients"}]
    edges: list[dict[str, Any]] = []
    for i in range(services):
        name = f"service-{i:02d}" if i % 7 else f"a-rather-long-service-name-number-{i:02d}"
        nodes.append({"id": f"group:team-{i:02d}", "kind": "group", "name": f"team-{i:02d}"})
        subsets = ["v1", "v2"] if i % 3 == 0 else ["v1"]
        nodes.append(
            {
                "id": f"service:{name}",
                "kind": "service",
                "name": name,
                "group": f"team-{i:02d}",
                "subsets": subsets,
                "weights": {"v1": 90, "v2": 10} if len(subsets) == 2 else {"v1": 100},
            }
        )
    names = [node["id"] for node in nodes if node["kind"] == "service"]
    for i in range(services):
        for target in (names[(i + 1) % services], names[(i + 2) % services]):
            edges.append({"source": f"group:team-{i:02d}", "destination": target})
    edges.append({"source": "external", "destination": names[0]})
    nodes += [
        {"id": "unknown:source", "kind": "unknown", "name": "unknown"},
        {"id": "unknown:destination", "kind": "unknown", "name": "unknown"},
    ]
    edges.append({"source": "unknown:source", "destination": "unknown:destination"})
    return {"nodes": nodes, "edges": edges}


def boxes(document: dict[str, Any], positions: dict[str, tuple[float, float]]) -> dict[str, tuple[float, ...]]:
    found: dict[str, tuple[float, ...]] = {}
    for node in document["nodes"]:
        (x, y), (w, h) = positions[node["id"]], node_size(node)
        found[node["id"]] = (x - w / 2, y - h / 2, x + w / 2, y + h / 2)
    return found


def test_thirty_services_lay_out_left_to_right_without_overlapping_boxes() -> None:
    document = big_topology(30)
    positions = layout(document)
    assert set(positions) == {node["id"] for node in document["nodes"]}
    placed = boxes(document, positions)
    for (a, box_a), (b, box_b) in itertools.combinations(placed.items(), 2):
        apart = box_a[2] <= box_b[0] or box_b[2] <= box_a[0] or box_a[3] <= box_b[1] or box_b[3] <= box_a[1]
        assert apart, (a, box_a, b, box_b)
    # Fixed-size boxes of the minimum size around the same centres do not overlap either.
    for (a, (xa, ya)), (b, (xb, yb)) in itertools.combinations(positions.items(), 2):
        assert abs(xa - xb) >= MIN_WIDTH or abs(ya - yb) >= MIN_HEIGHT, (a, b)
    x = {node_id: position[0] for node_id, position in positions.items()}
    assert (
        x["external"] == x["unknown:source"] < x["group:team-00"] < x["service:service-01"] < x["unknown:destination"]
    )
    assert len({x[f"group:team-{i:02d}"] for i in range(30)}) == 1  # one column per layer
    # The long names fit: every box is wide enough for its text.
    long = next(node for node in document["nodes"] if node["name"].startswith("a-rather-long"))
    assert node_size(long)[0] >= 7.2 * len(long["name"])
    width, height = canvas_size(document, positions)
    assert all(box[2] <= width and box[3] <= height and box[0] >= 0 and box[1] >= 0 for box in placed.values())


def test_the_layout_is_deterministic_whatever_the_input_order() -> None:
    document = big_topology(30)
    first = layout(document)
    shuffled = dict(document)
    for seed in range(3):
        rng = random.Random(seed)
        shuffled["nodes"] = rng.sample(document["nodes"], len(document["nodes"]))
        shuffled["edges"] = rng.sample(document["edges"], len(document["edges"]))
        assert layout(shuffled) == first


def crossings(calls: list[tuple[str, str]], y: dict[str, float]) -> int:
    return sum((y[g1] - y[g2]) * (y[s1] - y[s2]) < 0 for (g1, s1), (g2, s2) in itertools.combinations(calls, 2))


def test_callers_sit_near_what_they_call() -> None:
    """Barycentre ordering crosses far fewer edges than alphabetical order (9 crossings here; 2 after)."""
    nodes = [{"id": f"group:{g}", "kind": "group", "name": g} for g in ("a", "b", "c", "d")]
    nodes += [{"id": f"service:{s}", "kind": "service", "name": s} for s in ("w", "x", "y", "z")]
    calls = [("a", "y"), ("a", "z"), ("b", "w"), ("b", "x"), ("c", "y"), ("d", "w")]
    document = {"nodes": nodes, "edges": [{"source": f"group:{g}", "destination": f"service:{s}"} for g, s in calls]}
    positions = layout(document)
    y = {node_id.split(":")[1]: position[1] for node_id, position in positions.items()}
    alphabetical = {name: float(rank) for names in ("abcd", "wxyz") for rank, name in enumerate(names)}
    assert crossings(calls, alphabetical) == 9
    assert crossings(calls, y) <= 2


def test_an_empty_mesh_has_an_empty_layout() -> None:
    assert layout({"nodes": [], "edges": []}) == {}
    empty = build(Mesh(), Traffic(300.0, 0.0, {}), [], now=NOW, stale_after=6.0, thresholds=Thresholds())
    assert empty == {"window": 300.0, "nodes": [], "edges": []}


def test_the_layout_does_not_depend_on_hashing() -> None:
    """Set and dict order varies with PYTHONHASHSEED between processes; the layout must not."""
    script = (
        "import json; from tests.dashboard.test_topology import big_topology;"
        "from dashboard.signals.topology import layout;"
        "print(json.dumps(layout(big_topology(30)), sort_keys=True))"
    )
    answers = {
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in (1, 2, 3)
    }
    assert len(answers) == 1 and json.loads(answers.pop()) == {
        key: list(value) for key, value in layout(big_topology(30)).items()
    }
