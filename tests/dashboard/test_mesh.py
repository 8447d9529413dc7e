from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from dashboard.mesh import EMPTY, Mesh, NotFound, diff
from gateway.config import ConfigError


def catalog(v2: int = 10) -> dict[str, Any]:
    return {
        "subsets": {"v1": {"endpoints": ["127.0.0.1:9101", "127.0.0.1:9102"]}, "v2": {"endpoints": ["127.0.0.1:9103"]}},
        "routes": [
            {"name": "canary-header", "match": {"headers": {"x-canary": "always"}}, "split": {"v2": 100}},
            {"name": "default", "split": {"v1": 100 - v2, "v2": v2}},
        ],
    }


def shop(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "groups": {"shop": ["frontend"], "catalog": ["catalog"]},
        "services": {"frontend": {"subsets": {"v1": {"endpoints": ["127.0.0.1:9001"]}}}, "catalog": catalog()},
    }
    data.update(changes)
    return data


def error(data: object) -> str:
    with pytest.raises(ConfigError) as raised:
        Mesh.parse(data, source="mesh.yaml")
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_parse_round_trips_through_the_canonical_dict() -> None:
    mesh = Mesh.parse(shop())
    data = mesh.to_dict()
    assert list(data) == ["groups", "services"]
    assert data["groups"] == {"shop": ["frontend"], "catalog": ["catalog"]}
    # Canonical: defaults spelled out, the implicit catch-all route of a one-subset service made explicit.
    assert data["services"]["frontend"]["routes"] == [{"name": "default", "split": {"v1": 100}}]
    assert data["services"]["catalog"]["routes"][0]["split"] == {"v1": 0, "v2": 100}
    assert data["services"]["catalog"]["lb"] == "ewma"
    assert Mesh.parse(data) == mesh
    assert Mesh.parse(copy.deepcopy(EMPTY)).to_dict() == EMPTY


def test_groups_and_services_lookups() -> None:
    mesh = Mesh.parse(shop(groups={"shop": ["frontend", "catalog"], "edge": []}))
    assert mesh.group_of("catalog") == "shop"
    assert [service.name for service in mesh.services_of("shop")] == ["frontend", "catalog"]
    assert mesh.services_of("edge") == ()
    assert mesh.services_of("nobody") == ()
    assert mesh.service("nope") is None
    with pytest.raises(NotFound, match=r"^services\.nope: no such service$"):
        mesh.group_of("nope")


def test_service_errors_use_the_gateway_rules_and_format() -> None:
    bad = shop()
    bad["services"]["catalog"]["routes"][1]["split"] = {"v1": 100, "v2": 10}
    assert error(bad) == "mesh.yaml: services.catalog.routes[1].split: weights must sum to 100, got 110"
    bad = shop()
    bad["services"]["catalog"]["lb"] = "random"
    assert error(bad).startswith("mesh.yaml: services.catalog.lb: expected ewma, least_request")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (["groups"], "mesh.yaml: expected a mapping with the keys groups and services, got ['groups']"),
        (shop(gateway={}), "mesh.yaml: gateway: unknown key (expected one of: groups, services)"),
        (shop(groups=["shop"]), "mesh.yaml: groups: expected a mapping from each group to the services it owns"),
        (shop(groups={"Shop": ["frontend", "catalog"]}), "mesh.yaml: groups: expected a name of lowercase letters"),
        (shop(groups={"shop": "frontend"}), "mesh.yaml: groups.shop: expected a list of service names, got 'frontend'"),
        (
            shop(groups={"shop": ["frontend", "search"], "catalog": ["catalog"]}),
            "mesh.yaml: groups.shop[1]: expected a service defined under services (frontend, catalog), got 'search'",
        ),
        (
            shop(groups={"shop": ["frontend", "catalog"], "catalog": ["catalog"]}),
            "mesh.yaml: groups.catalog[0]: expected a service not owned yet (groups.shop), got 'catalog'",
        ),
        (
            shop(groups={"shop": ["frontend"]}),
            "mesh.yaml: services.catalog: expected a group that owns it (list it under groups)",
        ),
    ],
)
def test_group_errors_name_the_field_and_value(data: object, expected: str) -> None:
    assert error(data).startswith(expected)


def test_with_weights_changes_only_the_catch_all_split() -> None:
    mesh = Mesh.parse(shop())
    changed = mesh.with_weights("catalog", {"v2": 100})  # omitted subsets weigh 0
    service = changed.service("catalog")
    assert service is not None
    assert service.routes[-1].split == (("v1", 0), ("v2", 100))
    assert service.routes[0] == mesh.services[1].routes[0]
    assert mesh.services[1].routes[-1].split == (("v1", 90), ("v2", 10))  # the original is untouched


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"v1": 90, "v2": 20}, "split: weights must sum to 100, got 110"),
        ({"v1": True, "v2": 99}, "split.v1: expected an integer >= 0, got True"),
        ({"v1": 90.0, "v2": 10}, "split.v1: expected an integer >= 0, got 90.0"),
        ({"v1": 110, "v2": -10}, "split.v2: expected an integer >= 0, got -10"),
        ({"v1": 90, "v3": 10}, "split.v3: unknown subset (expected one of: v1, v2)"),
        ({"v1": "90", "v2": 10}, "split.v1: expected an integer >= 0, got '90'"),
        ([90, 10], "split: expected a mapping, got [90, 10]"),
    ],
)
def test_with_weights_rejects_bad_weights(weights: object, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Mesh.parse(shop(), source="request").with_weights("catalog", weights)
    assert str(raised.value) == f"request: services.catalog.routes[1].{expected}"


def test_with_weights_on_an_unknown_service() -> None:
    with pytest.raises(NotFound, match=r"^services\.search: no such service$"):
        Mesh.parse(shop()).with_weights("search", {"v1": 100})


def test_with_service_creates_replaces_and_moves_between_groups() -> None:
    mesh = Mesh.parse(shop())
    spec = {"subsets": {"v1": {"endpoints": ["127.0.0.1:9201"]}}}
    created = mesh.with_service("search", "discovery", spec)
    assert created.group_of("search") == "discovery"
    assert created.to_dict()["services"]["search"]["subsets"] == {"v1": {"endpoints": ["127.0.0.1:9201"]}}
    moved = created.with_service("catalog", "shop", catalog(v2=50))
    assert moved.to_dict()["groups"] == {"shop": ["frontend", "catalog"], "catalog": [], "discovery": ["search"]}
    assert moved.to_dict()["services"]["catalog"]["routes"][1]["split"] == {"v1": 50, "v2": 50}
    with pytest.raises(ConfigError, match=r"^<mesh>: services\.search\.subsets: expected at least one subset"):
        mesh.with_service("search", "discovery", {"subsets": {}})
    with pytest.raises(ConfigError, match=r"^<mesh>: services: expected a name .*, got 'Search'$"):
        mesh.with_service("Search", "discovery", spec)
    with pytest.raises(ConfigError, match=r"^<mesh>: groups: expected a name .*, got 'Discovery'$"):
        mesh.with_service("search", "Discovery", spec)


def test_without_service_keeps_its_group() -> None:
    mesh = Mesh.parse(shop()).without_service("catalog")
    assert mesh.to_dict()["groups"] == {"shop": ["frontend"], "catalog": []}
    assert mesh.service("catalog") is None
    with pytest.raises(NotFound):
        mesh.without_service("catalog")


def test_subsets_are_created_replaced_and_deleted_once_they_carry_no_traffic() -> None:
    mesh = Mesh.parse(shop())
    added = mesh.with_subset("catalog", "v3", {"endpoints": ["127.0.0.1:9104"]})
    assert added.services[1].routes[-1].split == (("v1", 90), ("v2", 10), ("v3", 0))
    replaced = added.with_subset("catalog", "v3", {"endpoints": []})
    assert replaced.to_dict()["services"]["catalog"]["subsets"]["v3"] == {"endpoints": []}
    removed = replaced.without_subset("catalog", "v3")
    assert removed == mesh
    with pytest.raises(ConfigError) as raised:
        mesh.without_subset("catalog", "v2")  # the canary-header route sends it everything
    assert str(raised.value) == (
        "<mesh>: services.catalog.routes[0].split.v2: expected weight 0 before deleting subset v2, got 100"
    )
    with pytest.raises(ConfigError, match=r"services\.catalog\.subsets\.v3\.endpoints\[0\]: expected host:port"):
        mesh.with_subset("catalog", "v3", {"endpoints": ["nowhere"]})
    with pytest.raises(NotFound, match=r"^services\.catalog\.subsets\.v9: no such subset$"):
        mesh.without_subset("catalog", "v9")


def test_endpoints_are_added_and_removed_by_canonical_address() -> None:
    mesh = Mesh.parse(shop())
    added = mesh.with_endpoint("catalog", "v2", "[::1]:9104")
    assert added.to_dict()["services"]["catalog"]["subsets"]["v2"]["endpoints"] == ["127.0.0.1:9103", "[::1]:9104"]
    assert added.without_endpoint("catalog", "v2", "[::1]:09104") == mesh
    with pytest.raises(ConfigError, match=r"subsets\.v2\.endpoints\[1\]: expected each endpoint once"):
        mesh.with_endpoint("catalog", "v2", "127.0.0.1:9103")
    with pytest.raises(NotFound, match=r"^services\.catalog\.subsets\.v2\.endpoints: no endpoint 127\.0\.0\.1:1$"):
        mesh.without_endpoint("catalog", "v2", "127.0.0.1:1")
    with pytest.raises(NotFound):
        mesh.without_endpoint("catalog", "v2", "not an address")


def test_with_routes_replaces_the_route_list() -> None:
    mesh = Mesh.parse(shop())
    routes = [{"name": "all", "split": {"v1": 50, "v2": 50}}]
    assert mesh.with_routes("catalog", routes).services[1].routes[0].split == (("v1", 50), ("v2", 50))
    with pytest.raises(ConfigError, match=r"routes\[0\]\.match: required on every route but the last"):
        mesh.with_routes("catalog", [{"name": "a", "split": {"v1": 100}}, {"name": "b", "split": {"v2": 100}}])


def test_load_reads_yaml_with_the_config_error_style(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("groups:\n  shop: [frontend]\nservices:\n  frontend:\n    subsets: {v1: {}}\n")
    assert Mesh.load(str(path)).group_of("frontend") == "shop"
    path.write_text("groups:\n  shop: [frontend\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line \d+, column \d+: invalid YAML"):
        Mesh.load(str(path))
    with pytest.raises(ConfigError, match=r"cannot read the file"):
        Mesh.load(str(tmp_path / "missing.yaml"))


def test_diff_names_each_changed_leaf() -> None:
    before = Mesh.parse(shop()).to_dict()
    after = Mesh.parse(shop()).with_weights("catalog", {"v1": 50, "v2": 50}).to_dict()
    assert diff(before, after) == [
        "services.catalog.routes[1].split.v1: 90 → 50",
        "services.catalog.routes[1].split.v2: 10 → 50",
    ]
    assert diff(before, before) == []
    grown = Mesh.parse(after).with_service("search", "discovery", {"subsets": {"v1": {}}}).to_dict()
    assert diff(after, grown) == ['groups.discovery: added (["search"])', "services.search: added"]
    assert diff(grown, after) == ['groups.discovery: removed (["search"])', "services.search: removed"]
    endpoint = Mesh.parse(after).with_endpoint("catalog", "v2", "127.0.0.1:9104").to_dict()
    assert diff(after, endpoint) == [
        'services.catalog.subsets.v2.endpoints: ["127.0.0.1:9103"] → ["127.0.0.1:9103", "127.0.0.1:9104"]'
    ]
    routes = [{"name": "all", "split": {"v1": 100}}]
    assert diff(after, Mesh.parse(after).with_routes("catalog", routes).to_dict()) == [
        "services.catalog.routes[0].name: canary-header → all",
        "services.catalog.routes[0].match: removed",
        "services.catalog.routes[0].split.v1: 0 → 100",
        "services.catalog.routes[0].split.v2: 100 → 0",
        "services.catalog.routes[1]: removed",
    ]
