"""The gateway's side of joining a mesh, without sockets: a sync answer becomes a config and peers, and pools to
peer gateways follow what each peer must prove."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import Config, ConfigError
from gateway.control import JoinSettings, mesh_config, stats_json
from gateway.server import Peers, Runtime
from gateway.telemetry import merge
from gateway.units import Address

SETTINGS = JoinSettings(url="http://127.0.0.1:9000", group="shop", token="t", data_dir="unused")
PAYLOAD = {
    "version": 7,
    "services": {"storefront": {"subsets": {"v1": {"endpoints": ["127.0.0.1:9101"]}}}},
    "remote": {
        "catalog": {"group": "catalog", "gateways": ["127.0.0.1:16006", "127.0.0.1:17006"]},
        "payments": {"group": "payments", "gateways": []},
        "storefront": {"group": "elsewhere", "gateways": ["127.0.0.1:1"]},
    },
}


def test_other_groups_services_become_services_on_their_gateways() -> None:
    config, peers = mesh_config(SETTINGS, PAYLOAD, "example.org")
    assert config.gateway.group == "shop"
    catalog = config.service("catalog")
    assert catalog is not None
    assert [(s.name, [str(a) for a in s.endpoints]) for s in catalog.subsets] == [
        ("catalog", ["127.0.0.1:16006", "127.0.0.1:17006"])
    ]
    # The caller's hop only picks a replica and retries connect failures; the owner does the rest.
    assert catalog.retries.on == frozenset({"connect-failure"})
    assert str(catalog.lb) == "least_request"
    assert peers.services == frozenset({"catalog", "payments"})  # storefront is owned here: the local spec wins
    assert peers.addresses == {
        Address("127.0.0.1", 16006): "spiffe://example.org/group/catalog",
        Address("127.0.0.1", 17006): "spiffe://example.org/group/catalog",
    }
    assert peers.trust_domain == "example.org"
    payments = config.service("payments")
    assert payments is not None and payments.subsets[0].endpoints == ()  # no live gateway: 503, not "unknown"


def test_a_bad_sync_answer_names_the_dashboard_version_and_field() -> None:
    bad = {"version": 9, "services": {"storefront": {"subsets": {"v1": {"endpoints": ["nowhere"]}}}}}
    with pytest.raises(ConfigError, match=r"config version 9: services\.storefront\.subsets\.v1\.endpoints\[0\]"):
        mesh_config(SETTINGS, bad, "example.org")


def test_pools_to_peers_are_replaced_when_what_they_must_prove_changes() -> None:
    async def run() -> None:
        config, early = mesh_config(SETTINGS, PAYLOAD, "")  # the config came before our first certificate
        runtime = Runtime(config)
        runtime.apply(config, 1, early)
        address = Address("127.0.0.1", 16006)
        assert runtime.pools[address].peer_id == "spiffe:///group/catalog"
        config, later = mesh_config(SETTINGS, PAYLOAD, "example.org")
        runtime.apply(config, 2, later)
        assert runtime.pools[address].peer_id == "spiffe://example.org/group/catalog"
        table = runtime.table
        assert table is not None
        (endpoint, _) = table.services["catalog"].subsets["catalog"].balancer.endpoints
        assert endpoint.pool is runtime.pools[address]  # the live snapshot dials with the new expectation
        runtime.apply(Config.parse({"services": {}}), 3, Peers())
        assert address not in runtime.pools
        runtime.deadlines.close()

    asyncio.run(run())


def test_stats_travel_as_json() -> None:
    snapshot = merge([])
    snapshot["series"][("destination", "shop", "catalog", "v1", "default")] = ({200: 3, 503: 1}, [1, 2, 1], 0.25)
    snapshot["counters"][("meshgate_retries_total", "catalog")] = 2.0
    as_json = stats_json(snapshot)
    assert as_json["series"] == [
        {
            "labels": ["destination", "shop", "catalog", "v1", "default"],
            "codes": {"200": 3, "503": 1},
            "buckets": [1, 2, 1],
            "sum": 0.25,
        }
    ]
    assert as_json["counters"] == [["meshgate_retries_total", "catalog", 2.0]]
