"""Unit tests of the route table: smooth weighted splits, host lookup and route matching. No I/O."""

from __future__ import annotations

import random
import string
from collections import Counter
from typing import Any

import pytest

from gateway.balancer import Endpoint
from gateway.config import Config
from gateway.routing import RouteTable, ServiceRoutes, SmoothWeighted
from gateway.units import Address
from gateway.upstream import Pool

# Expected sequences, worked out by hand from nginx's smooth weighted round robin
# (ngx_http_upstream_get_peer): on every pick each peer's `current` grows by its weight, the peer with the
# largest `current` wins (the first one on a tie), and the winner's `current` drops by the total weight.
#
# [90, 10], total 100; `current` after adding the weights -> pick -> `current` after subtracting:
#   [ 90, 10] -> 0 -> [-10, 10]     [ 40, 60] -> 1 -> [ 40,-40]
#   [ 80, 20] -> 0 -> [-20, 20]     [130,-30] -> 0 -> [ 30,-30]
#   [ 70, 30] -> 0 -> [-30, 30]     [120,-20] -> 0 -> [ 20,-20]
#   [ 60, 40] -> 0 -> [-40, 40]     [110,-10] -> 0 -> [ 10,-10]
#   [ 50, 50] -> 0 (tie) -> [-50, 50]  [100,  0] -> 0 -> [  0,  0]   back to the start: period 10
NINETY_TEN = [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
# [50, 50]: [50,50] -> 0 (tie) -> [-50,50]; [0,100] -> 1 -> [0,0]; period 2
FIFTY_FIFTY = [0, 1]
# [70, 20, 10], total 100:
#   [ 70, 20, 10] -> 0 -> [-30, 20, 10]     [ 20, 20, 60] -> 2 -> [ 20, 20,-40]
#   [ 40, 40, 20] -> 0 (tie) -> [-60,40,20] [ 90, 40,-30] -> 0 -> [-10, 40,-30]
#   [ 10, 60, 30] -> 1 -> [ 10,-40, 30]     [ 60, 60,-20] -> 0 (tie) -> [-40,60,-20]
#   [ 80,-20, 40] -> 0 -> [-20,-20, 40]     [ 30, 80,-10] -> 1 -> [ 30,-20,-10]
#   [ 50,  0, 50] -> 0 (tie) -> [-50,0,50]  [100,  0,  0] -> 0 -> [  0,  0,  0]   period 10
SEVENTY_TWENTY_TEN = [0, 0, 1, 0, 0, 2, 0, 0, 1, 0]
# [0, 100]: [0,100] -> 1 -> [0,0], every time
ZERO_HUNDRED = [1]


@pytest.mark.parametrize(
    ("weights", "period"),
    [
        ([90, 10], NINETY_TEN),
        ([50, 50], FIFTY_FIFTY),
        ([70, 20, 10], SEVENTY_TWENTY_TEN),
        ([0, 100], ZERO_HUNDRED),
        ([100, 0], [0]),
    ],
)
def test_smooth_weighted_exact_sequence(weights: list[int], period: list[int]) -> None:
    split = SmoothWeighted(weights)
    picks = [split.next() for _ in range(20)]
    assert picks == (period * 20)[:20]


def test_smooth_weighted_interleaves_evenly() -> None:
    # 50/50 never picks the same subset twice in a row; 90/10 never picks the 10 % subset twice in a row
    split = SmoothWeighted([50, 50])
    picks = [split.next() for _ in range(100)]
    assert all(a != b for a, b in zip(picks, picks[1:], strict=False))
    split = SmoothWeighted([90, 10])
    picks = [split.next() for _ in range(100)]
    assert all(not (a == b == 1) for a, b in zip(picks, picks[1:], strict=False))


@pytest.mark.parametrize(
    "weights",
    [[90, 10], [50, 50], [70, 20, 10], [0, 100], [1, 99], [33, 33, 34], [5, 0, 15, 80], [25, 25, 25, 25]],
)
def test_smooth_weighted_exact_proportions_over_100_picks(weights: list[int]) -> None:
    split = SmoothWeighted(weights)
    for _ in range(3):  # every window of 100 consecutive picks from the start of a period is exact
        counts = Counter(split.next() for _ in range(100))
        assert [counts[i] for i in range(len(weights))] == weights


def test_smooth_weighted_exact_proportions_random_weights() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        n = rng.randint(1, 6)
        cuts = sorted(rng.randint(0, 100) for _ in range(n - 1))
        weights = [b - a for a, b in zip([0, *cuts], [*cuts, 100], strict=True)]
        split = SmoothWeighted(weights)
        counts = Counter(split.next() for _ in range(100))
        assert [counts[i] for i in range(n)] == weights, weights
        # the state returns to all zeros after one whole period, so the next period repeats exactly
        assert split.current == [0] * n


# RouteTable


class FakeEndpoints:
    """An endpoint factory that makes endpoints without I/O and remembers what it was asked for."""

    def __init__(self) -> None:
        self.made: list[tuple[str, Address]] = []

    def __call__(self, service: str, address: Address) -> Endpoint:
        self.made.append((service, address))
        return Endpoint(address, Pool(address))


CATALOG: dict[str, Any] = {
    "subsets": {
        "v1": {"endpoints": ["127.0.0.1:9101", "127.0.0.1:9102"]},
        "v2": {"endpoints": ["127.0.0.1:9103"]},
    },
    "routes": [
        {
            "name": "canary-header",
            "match": {"path_prefix": "/", "headers": {"X-Canary": "always"}},
            "split": {"v2": 100},
        },
        {"name": "api", "match": {"path_prefix": "/api/"}, "split": {"v1": 50, "v2": 50}},
        {"name": "beta", "match": {"path_prefix": "/api/beta", "headers": {"x-beta": "1"}}, "split": {"v2": 100}},
        {"name": "default", "split": {"v1": 90, "v2": 10}},
    ],
}


def make_table(services: dict[str, Any] | None = None) -> tuple[RouteTable, FakeEndpoints]:
    factory = FakeEndpoints()
    config = Config.parse({"services": services if services is not None else {"catalog": CATALOG}})
    return RouteTable(config, factory, version=7), factory


def test_table_builds_endpoints_through_the_factory() -> None:
    table, factory = make_table()
    assert table.version == 7
    assert sorted(factory.made) == [
        ("catalog", Address("127.0.0.1", 9101)),
        ("catalog", Address("127.0.0.1", 9102)),
        ("catalog", Address("127.0.0.1", 9103)),
    ]
    service = table.services["catalog"]
    assert [ep.address.port for ep in service.subsets["v1"].balancer.endpoints] == [9101, 9102]
    assert [ep.address.port for ep in service.subsets["v2"].balancer.endpoints] == [9103]


@pytest.mark.parametrize(
    "authority",
    [
        b"catalog",
        b"catalog:8080",
        b"catalog:80",
        b"catalog.ns.svc.cluster.local",
        b"catalog.ns.svc.cluster.local:15006",
        b"CATALOG",
        b"Catalog:8080",
        b"CaTaLoG.NS.svc.Cluster.Local",
    ],
)
def test_lookup_finds_the_service(authority: bytes) -> None:
    table, _ = make_table()
    found = table.lookup(authority)
    assert found is table.services["catalog"]
    assert table.lookup(authority) is found  # and again, from the cache


@pytest.mark.parametrize(
    "authority",
    [b"unknown", b"unknown:8080", b"shop.catalog", b"catalogue", b"cat", b"", b":8080", b"[::1]:8080", b"127.0.0.1"],
)
def test_lookup_unknown_host_is_none(authority: bytes) -> None:
    table, _ = make_table()
    assert table.lookup(authority) is None
    assert table.lookup(authority) is None


def test_lookup_several_services() -> None:
    one = {"subsets": {"v1": {"endpoints": ["127.0.0.1:9001"]}}}
    two = {"subsets": {"v1": {"endpoints": ["127.0.0.1:9002"]}}}
    table, _ = make_table({"catalog": CATALOG, "shop": one, "payments": two})
    assert table.lookup(b"shop:80") is table.services["shop"]
    assert table.lookup(b"payments.default.svc") is table.services["payments"]
    assert table.lookup(b"catalog") is table.services["catalog"]
    assert table.lookup(b"shop") is not table.lookup(b"payments")


def test_host_cache_stays_bounded_under_random_hosts() -> None:
    table, _ = make_table()
    rng = random.Random(42)
    for _ in range(10_000):
        host = "".join(rng.choices(string.ascii_lowercase + string.digits, k=12))
        assert table.lookup(f"{host}:{rng.randint(1, 65535)}".encode()) is None
    # The cache is private, but its size is the property under test: a flood of Host headers must not grow it.
    cache: dict[bytes, ServiceRoutes | None] = table._hosts
    assert 0 < len(cache) <= 4096
    # and lookups still work after the cache has been cleared and refilled
    assert table.lookup(b"catalog.ns:80") is table.services["catalog"]
    assert table.lookup(b"nope") is None


def route_name(service: ServiceRoutes, path: bytes, headers: dict[bytes, bytes] | None = None) -> str | None:
    route = service.match(path, headers or {})
    return None if route is None else route.name


def test_route_matching_first_match_wins() -> None:
    table, _ = make_table()
    service = table.services["catalog"]
    assert service.needs_headers
    # header route is first and matches any path
    assert route_name(service, b"/", {b"x-canary": b"always"}) == "canary-header"
    assert route_name(service, b"/api/items", {b"x-canary": b"always"}) == "canary-header"
    # exact value only
    assert route_name(service, b"/api/items", {b"x-canary": b"sometimes"}) == "api"
    assert route_name(service, b"/items", {b"x-canary": b"always "}) == "default"
    # path prefix
    assert route_name(service, b"/api/items") == "api"
    assert route_name(service, b"/api/") == "api"
    assert route_name(service, b"/api") == "default"  # the prefix is "/api/"
    assert route_name(service, b"/apiary") == "default"
    # a later, more specific route never wins over an earlier match
    assert route_name(service, b"/api/beta/x", {b"x-beta": b"1"}) == "api"
    # catch-all
    assert route_name(service, b"/") == "default"
    assert route_name(service, b"/anything/else?q=1") == "default"


def test_route_header_names_are_matched_lower_case() -> None:
    # config header names are lower-cased at parse time; the request side hands over lower-cased names
    table, _ = make_table()
    entry = table.services["catalog"].routes[0]
    assert entry.headers == ((b"x-canary", b"always"),)


def test_route_without_catch_all_path_matches_none() -> None:
    services = {
        "catalog": {
            "subsets": {"v1": {"endpoints": ["127.0.0.1:9101"]}, "v2": {"endpoints": ["127.0.0.1:9103"]}},
            "routes": [
                {"name": "v2-only", "match": {"path_prefix": "/v2/"}, "split": {"v2": 100}},
                {"name": "default", "split": {"v1": 100}},
            ],
        }
    }
    table, _ = make_table(services)
    service = table.services["catalog"]
    assert not service.needs_headers
    assert route_name(service, b"/v2/x") == "v2-only"
    assert route_name(service, b"/v1/x") == "default"


def test_single_route_service_is_a_catch_all() -> None:
    table, _ = make_table({"solo": {"subsets": {"v1": {"endpoints": ["127.0.0.1:9001"]}}}})
    service = table.services["solo"]
    for path in (b"/", b"/a", b"/a/b?c=d"):
        route = service.match(path, {})
        assert route is not None and route.name == "default"
        assert route.pick().name == "v1"


def test_route_split_picks_subsets_in_exact_proportion() -> None:
    table, _ = make_table()
    service = table.services["catalog"]
    default = service.match(b"/x", {})
    api = service.match(b"/api/x", {})
    canary = service.match(b"/x", {b"x-canary": b"always"})
    assert default is not None and api is not None and canary is not None
    assert Counter(default.pick().name for _ in range(100)) == {"v1": 90, "v2": 10}
    assert Counter(api.pick().name for _ in range(100)) == {"v1": 50, "v2": 50}
    assert Counter(canary.pick().name for _ in range(100)) == {"v2": 100}
    # the subsets picked are the service's own targets, with their balancers
    assert default.pick().service is service
    assert {target.name for target in default.targets} == {"v1", "v2"}


def test_zero_weight_subset_is_never_picked() -> None:
    services = {
        "catalog": {
            "subsets": {"v1": {"endpoints": ["127.0.0.1:9101"]}, "v2": {"endpoints": ["127.0.0.1:9103"]}},
            "routes": [{"name": "default", "split": {"v1": 0, "v2": 100}}],
        }
    }
    table, _ = make_table(services)
    route = table.services["catalog"].match(b"/", {})
    assert route is not None
    assert {route.pick().name for _ in range(50)} == {"v2"}


def test_each_snapshot_has_its_own_split_state() -> None:
    first, _ = make_table()
    second, _ = make_table()
    a = first.services["catalog"].match(b"/", {})
    b = second.services["catalog"].match(b"/", {})
    assert a is not None and b is not None
    assert [a.pick().name for _ in range(7)] == [b.pick().name for _ in range(7)]
    assert [t.name for t in (a.pick(), a.pick(), a.pick())] == ["v1", "v1", "v1"]  # picks 8..10 of 0000010000
