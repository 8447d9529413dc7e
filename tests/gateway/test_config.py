from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import (
    Config,
    ConfigError,
    Health,
    Listen,
    LoadBalancer,
    Retries,
    Route,
    RouteMatch,
)
from gateway.units import (
    Address,
    backoff,
    format_duration,
    format_percent,
    parse_address,
    parse_duration,
    parse_percent,
    parse_size,
)

# The example from DESIGN.md, "Configuration model", verbatim.
DESIGN_EXAMPLE = """\
gateway:
  group: catalog
  listen:
    inbound: 0.0.0.0:15006     # mesh port: mTLS when the gateway has an identity or a tls block
    edge: 0.0.0.0:8080         # optional: external clients (source=external)
    outbound: 127.0.0.1:15001  # local services call other services here (Host or absolute-form)
    admin: 127.0.0.1:15000     # /healthz /ready /config /metrics
    metrics: 0.0.0.0:15090     # optional: read-only /metrics for Prometheus
    advertise: 10.0.0.7:15006  # how peers reach inbound (defaults to inbound when not 0.0.0.0)
  tls: {cert: gw.pem, key: gw.key, ca: mesh-ca.pem}   # standalone mTLS; a joined gateway gets its own
  preserve_request_id: true    # edge only
  limits: {max_header_bytes: 60KiB, max_headers: 100, header_timeout: 10s, idle_timeout: 60s}
  telemetry:
    access_log: stdout         # off | stdout | path
    tracing: {endpoint: "http://127.0.0.1:9000/v1/traces", sampling: 0.01}
    recent_requests: 100000    # ring of compact hop records, looked up by request id
services:
  catalog:
    subsets:
      v1: {endpoints: ["127.0.0.1:9101", "127.0.0.1:9102"]}
      v2: {endpoints: ["127.0.0.1:9103"]}
    routes:                    # first match wins; the last route has no match (catch-all)
      - name: canary-header
        match: {path_prefix: /, headers: {x-canary: "always"}}
        split: {v2: 100}
      - name: default
        split: {v1: 90, v2: 10}
    lb: ewma                   # ewma | least_request | round_robin | hash(header:x-user)
    timeouts: {connect: 1s, per_try: 1s, request: 15s}
    retries: {attempts: 2, on: [connect-failure, reset, gateway-error], statuses: [], budget: 20%}
    health: {path: /healthz, interval: 5s, timeout: 1s, healthy: 2, unhealthy: 3}
    outlier: {consecutive_5xx: 5, base_ejection: 30s, max_ejected: 10%}
    limits: {max_requests: 1024, max_pending: 1024}
    authorization: {allow: ["*"]}        # source groups allowed to call; "*" = any mesh identity
"""

NAME_RULE = "a name of lowercase letters, digits, '-', '.' or '_' (starting and ending alphanumeric, max 63)"


@pytest.fixture
def design_file(tmp_path: Path) -> Path:
    for name in ("gw.pem", "gw.key", "mesh-ca.pem"):
        (tmp_path / name).write_text("PEM\n")
    path = tmp_path / "gw.yaml"
    path.write_text(DESIGN_EXAMPLE)
    return path


def two_subsets(**overrides: object) -> dict[str, object]:
    """A valid catalog service with subsets v1 and v2, with some keys replaced."""
    service: dict[str, object] = {
        "subsets": {"v1": {"endpoints": ["127.0.0.1:9101"]}, "v2": {"endpoints": ["127.0.0.1:9103"]}},
        "routes": [
            {"name": "canary", "match": {"headers": {"x-canary": "always"}}, "split": {"v2": 100}},
            {"name": "default", "split": {"v1": 90, "v2": 10}},
        ],
    }
    return service | overrides


def error(data: object, base_dir: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        Config.parse(data, source="gw.yaml", base_dir=base_dir)
    return str(info.value)


# --- the whole model ---------------------------------------------------------------------------------------------


def test_design_example_parses(design_file: Path) -> None:
    cfg = Config.load(str(design_file))
    gateway = cfg.gateway
    assert gateway.group == "catalog"
    assert gateway.listen == Listen(
        inbound=Address("0.0.0.0", 15006),
        edge=Address("0.0.0.0", 8080),
        outbound=Address("127.0.0.1", 15001),
        admin=Address("127.0.0.1", 15000),
        metrics=Address("0.0.0.0", 15090),
        advertise=Address("10.0.0.7", 15006),
    )
    assert gateway.tls is not None and gateway.tls.ca == str(design_file.parent / "mesh-ca.pem")
    assert (gateway.limits.max_header_bytes, gateway.limits.header_timeout, gateway.limits.idle_timeout) == (
        61440,
        10.0,
        60.0,
    )
    assert gateway.telemetry.tracing.endpoint == "http://127.0.0.1:9000/v1/traces"
    assert gateway.telemetry.tracing.sampling == 0.01
    assert gateway.telemetry.recent_requests == 100_000
    catalog = cfg.service("catalog")
    assert catalog is not None and cfg.service("nope") is None
    assert [subset.name for subset in catalog.subsets] == ["v1", "v2"]
    assert catalog.subsets[0].endpoints == (Address("127.0.0.1", 9101), Address("127.0.0.1", 9102))
    assert catalog.routes == (
        Route("canary-header", RouteMatch("/", (("x-canary", "always"),)), (("v1", 0), ("v2", 100))),
        Route("default", None, (("v1", 90), ("v2", 10))),
    )
    # `on:` is read by YAML 1.1 as the boolean true; it must still land in Retries.on.
    assert catalog.retries == Retries(2, frozenset({"connect-failure", "reset", "gateway-error"}), frozenset(), 0.2)
    assert catalog.health == Health()
    assert (catalog.outlier.base_ejection, catalog.outlier.max_ejected) == (30.0, 0.1)
    assert catalog.authorization.allow == ("*",)
    assert cfg.source == str(design_file)


def test_defaults_when_keys_are_omitted() -> None:
    cfg = Config.parse({"services": {"catalog": {"subsets": {"v1": {}}}}})
    assert cfg.gateway == Config().gateway
    listen = cfg.gateway.listen
    assert (listen.inbound, listen.outbound, listen.admin) == (
        Address("0.0.0.0", 15006),
        Address("127.0.0.1", 15001),
        Address("127.0.0.1", 15000),
    )
    assert listen.edge is listen.metrics is listen.advertise is None
    assert cfg.gateway.group == "default" and cfg.gateway.tls is None and cfg.gateway.preserve_request_id
    assert cfg.gateway.limits.max_header_bytes == 60 * 1024 and cfg.gateway.limits.max_headers == 100
    assert cfg.gateway.telemetry.access_log == "stdout" and cfg.gateway.telemetry.tracing.endpoint is None
    (catalog,) = cfg.services
    assert catalog.subsets[0].endpoints == ()
    assert catalog.routes == (Route("default", None, (("v1", 100),)),)
    assert catalog.lb == LoadBalancer("ewma", None)
    assert (catalog.timeouts.connect, catalog.timeouts.per_try, catalog.timeouts.request) == (1.0, 1.0, 15.0)
    assert catalog.retries == Retries() and catalog.retries.budget == 0.2
    assert catalog.health is None
    assert (catalog.outlier.consecutive_5xx, catalog.limits.max_requests, catalog.limits.max_pending) == (5, 1024, 1024)


def test_gateway_only_file_and_empty_sections() -> None:
    assert Config.parse({"gateway": {"group": "shop"}}).services == ()
    assert Config.parse({"gateway": {}, "services": None}) == Config()
    assert Config.parse({}) == Config()


def test_health_block_gives_defaults_and_null_means_none() -> None:
    health = Config.parse({"services": {"a": {"subsets": {"v1": {}}, "health": {}}}}).services[0].health
    assert health == Health("/healthz", 5.0, 1.0, 2, 3)
    assert Config.parse({"services": {"a": {"subsets": {"v1": {}}, "health": None}}}).services[0].health is None


def test_split_weighs_every_subset_in_subset_order() -> None:
    service = two_subsets(subsets={"v2": {}, "v1": {}, "v3": {}})
    routes = Config.parse({"services": {"catalog": service}}).services[0].routes
    assert [route.split for route in routes] == [
        (("v2", 100), ("v1", 0), ("v3", 0)),
        (("v2", 10), ("v1", 90), ("v3", 0)),
    ]


def test_match_headers_are_lower_cased_and_lb_hash_is_parsed() -> None:
    service = first(match={"path_prefix": "/api", "headers": {"X-Canary": "Always"}}) | {"lb": "hash(header:X-User)"}
    parsed = Config.parse({"services": {"catalog": service}}).services[0]
    assert parsed.routes[0].match == RouteMatch("/api", (("x-canary", "Always"),))
    assert parsed.lb == LoadBalancer("hash", "x-user")
    assert parsed.to_dict()["lb"] == "hash(header:x-user)"


def test_advertised_address() -> None:
    assert Listen().advertised() is None
    assert Listen(inbound=Address("::", 15006)).advertised() is None
    assert Listen(inbound=Address("10.0.0.7", 15006)).advertised() == Address("10.0.0.7", 15006)
    assert Listen(advertise=Address("10.0.0.8", 1)).advertised() == Address("10.0.0.8", 1)


def test_listeners_may_share_port_zero_or_distinct_hosts() -> None:
    listen = {"inbound": "127.0.0.1:0", "outbound": "127.0.0.1:0", "admin": "127.0.0.1:0", "edge": "10.0.0.1:15001"}
    assert Config.parse({"gateway": {"listen": listen}}).gateway.listen.inbound.port == 0


def test_dataclasses_are_frozen_slotted_and_source_is_not_compared() -> None:
    cfg = Config.parse({}, source="a.yaml")
    assert cfg == Config.parse({}, source="b.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gateway.group = "x"  # type: ignore[misc]
    assert not hasattr(cfg.gateway.limits, "__dict__")


# --- to_dict -----------------------------------------------------------------------------------------------------


def test_to_dict_round_trips_through_json_and_yaml(design_file: Path) -> None:
    cfg = Config.load(str(design_file))
    data = cfg.to_dict()
    assert Config.parse(data) == cfg
    assert Config.parse(json.loads(json.dumps(data))) == cfg
    assert Config.parse(yaml.safe_load(yaml.safe_dump(data))) == cfg
    gateway: Any = data["gateway"]
    assert gateway["limits"] == {
        "max_header_bytes": 61440,
        "max_headers": 100,
        "header_timeout": "10s",
        "idle_timeout": "1m",
        "body_timeout": "30s",
        "send_timeout": "30s",
    }
    assert gateway["trusted_proxies"] == []
    catalog: Any = data["services"]
    assert catalog["catalog"]["retries"]["budget"] == "20%"
    assert catalog["catalog"]["outlier"] == {"consecutive_5xx": 5, "base_ejection": "30s", "max_ejected": "10%"}
    assert [route.get("match") for route in catalog["catalog"]["routes"]][1] is None


def test_to_dict_round_trips_defaults_and_odd_values() -> None:
    service = two_subsets(
        lb="round_robin",
        timeouts={"connect": "250ms", "per_try": 1.5, "request": "2h"},
        retries={"attempts": 0, "on": ["5xx", "retriable-status"], "statuses": [503, 429], "budget": "12.5%"},
        outlier={"max_ejected": 1 / 3},
        authorization={"allow": ["shop", "web.front"]},
    )
    gateway = {"telemetry": {"access_log": "off", "tracing": {"sampling": "1%"}}, "listen": {"edge": "[::1]:8080"}}
    cfg = Config.parse({"gateway": gateway, "services": {"catalog": service}})
    assert Config.parse(cfg.to_dict()) == cfg
    subsets = {
        "v1": {"dns": "catalog-v1.svc:8080"},
        "v2": {"srv": "_http._tcp.catalog-v2."},
        "v3": {"etcd": "/meshgate/endpoints/catalog/v3/"},
    }
    discovered = two_subsets(subsets=subsets)
    gateway = {"discovery": {"resolvers": ["127.0.0.1:5353", "[::1]:53"], "etcd": ["http://127.0.0.1:2379"]}}
    cfg = Config.parse({"gateway": gateway, "services": {"catalog": discovered}})
    assert Config.parse(cfg.to_dict()) == cfg
    assert [subset.discovered for subset in cfg.services[0].subsets] == [True, True, True]
    assert cfg.gateway.discovery.resolvers[1] == Address("::1", 53)
    assert Config.parse(Config().to_dict()) == Config()


# --- validation: every rule names the field and the value --------------------------------------------------------


def route(**fields: object) -> dict[str, object]:
    return {"name": "a", "split": {"v1": 100}} | fields


def routed(*routes: dict[str, object]) -> dict[str, object]:
    return two_subsets(routes=list(routes))


def first(**fields: object) -> dict[str, object]:
    """Routes where the first one has `fields`, followed by a valid catch-all."""
    return routed(route(**fields), route(name="b"))


PERCENT_RULE = "expected a percentage from 0% to 100% (or a ratio from 0 to 1)"
DURATION_RULE = "expected a positive duration like 250ms, 2s or 1m"
LB_RULE = "expected ewma, least_request, round_robin or hash(header:NAME)"


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        (first(match={}, split={"v1": 100, "v2": 10}), "routes[0].split: weights must sum to 100, got 110"),
        (routed(route(split={})), "routes[0].split: weights must sum to 100, got 0"),
        (routed(route(split={"v3": 100})), "routes[0].split.v3: unknown subset (expected one of: v1, v2)"),
        (routed(route(split={"v1": 50.0, "v2": 50})), "routes[0].split.v1: expected an integer >= 0, got 50.0"),
        (routed(route(split={"v1": True, "v2": 99})), "routes[0].split.v1: expected an integer >= 0, got True"),
        (routed(route(split={"v1": -10, "v2": 110})), "routes[0].split.v1: expected an integer >= 0, got -10"),
        (routed(route(split="v1")), "routes[0].split: expected a mapping, got 'v1'"),
        (
            routed(route(match={"path_prefix": "/"})),
            "routes[0].match: expected no match on the last route, which is the catch-all, got {'path_prefix': '/'}",
        ),
        (first(), "routes[0].match: required on every route but the last, which is the catch-all"),
        (first(match=None), "routes[0].match: required on every route but the last, which is the catch-all"),
        (first(name="b", match={}), "routes[1].name: expected a route name unique in the service, got 'b'"),
        (routed(route(name="Default")), f"routes[0].name: expected {NAME_RULE}, got 'Default'"),
        (routed({"split": {"v1": 100}}), "routes[0].name: required key is missing"),
        (routed({"name": "default"}), "routes[0].split: required key is missing"),
        (routed(), "routes: expected a non-empty list of routes, got []"),
        (two_subsets(routes={"a": {}}), "routes: expected a non-empty list of routes, got {'a': {}}"),
        ({"subsets": {"v1": {}, "v2": {}}}, "routes: required when a service has several subsets (v1, v2)"),
        (
            first(match={"path_prefix": "api"}),
            "routes[0].match.path_prefix: expected a path starting with /, got 'api'",
        ),
        (
            first(match={"headers": {"x-n": 1}}),
            "routes[0].match.headers.x-n: expected a string (quote numbers and booleans in YAML), got 1",
        ),
        (first(match={"headers": ["x-n"]}), "routes[0].match.headers: expected a mapping, got ['x-n']"),
        (
            first(match={"headers": {"x n": "1"}}),
            "routes[0].match.headers: expected distinct HTTP header names, got 'x n'",
        ),
        (
            first(match={"headers": {"x-a": "1", "X-A": "2"}}),
            "routes[0].match.headers: expected distinct HTTP header names, got 'X-A'",
        ),
        ({"routes": []}, "subsets: required key is missing"),
        (two_subsets(subsets={}), "subsets: expected at least one subset, got {}"),
        (two_subsets(subsets=["v1"]), "subsets: expected a mapping, got ['v1']"),
        (two_subsets(subsets={"V1": {}}), f"subsets: expected {NAME_RULE}, got 'V1'"),
        (two_subsets(subsets={"v1": None}), "subsets.v1: expected a mapping, got None"),
        (
            two_subsets(subsets={"v1": {"endpoints": "127.0.0.1:9101"}}),
            "subsets.v1.endpoints: expected a list, got '127.0.0.1:9101'",
        ),
        (
            two_subsets(subsets={"v1": {"endpoints": ["127.0.0.1:0"]}}),
            "subsets.v1.endpoints[0]: expected a port from 1 to 65535, got '127.0.0.1:0'",
        ),
        (
            two_subsets(subsets={"v1": {"endpoints": ["127.0.0.1:1", "::1:80"]}}),
            "subsets.v1.endpoints[1]: expected host:port (IPv6 addresses need brackets, as in [::1]:80), got '::1:80'",
        ),
        (
            two_subsets(subsets={"v1": {"endpoints": [9101]}}),
            "subsets.v1.endpoints[0]: expected a host:port string, got 9101",
        ),
        (
            two_subsets(subsets={"v1": {"endpoints": ["a:1", "a:1"]}}),
            "subsets.v1.endpoints[1]: expected each endpoint once, got 'a:1'",
        ),
        (two_subsets(lb="random"), f"lb: {LB_RULE}, got 'random'"),
        (two_subsets(lb="hash"), f"lb: {LB_RULE}, got 'hash'"),
        (two_subsets(lb={"policy": "ewma"}), f"lb: {LB_RULE}, got {{'policy': 'ewma'}}"),
        (two_subsets(timeouts={"connect": "0s"}), f"timeouts.connect: {DURATION_RULE}, got '0s'"),
        (two_subsets(timeouts={"request": "-1s"}), f"timeouts.request: {DURATION_RULE}, got '-1s'"),
        (two_subsets(timeouts={"per_try": True}), f"timeouts.per_try: {DURATION_RULE}, got True"),
        (two_subsets(timeouts="1s"), "timeouts: expected a mapping, got '1s'"),
        (
            two_subsets(retries={"atempts": 3}),
            "retries.atempts: unknown key (expected one of: attempts, on, statuses, budget)",
        ),
        (two_subsets(retries={"attempts": 11}), "retries.attempts: expected an integer from 0 to 10, got 11"),
        (two_subsets(retries={"attempts": True}), "retries.attempts: expected an integer from 0 to 10, got True"),
        (
            two_subsets(retries={"on": ["reset", "timeout"]}),
            "retries.on[1]: expected one of: connect-failure, reset, gateway-error, 5xx, retriable-status, "
            "cancelled, deadline-exceeded, resource-exhausted, unavailable, got 'timeout'",
        ),
        (two_subsets(retries={"on": "reset"}), "retries.on: expected a list, got 'reset'"),
        (
            two_subsets(retries={"statuses": [503, 600]}),
            "retries.statuses[1]: expected an integer from 100 to 599, got 600",
        ),
        (
            two_subsets(retries={"statuses": ["503"]}),
            "retries.statuses[0]: expected an integer from 100 to 599, got '503'",
        ),
        (two_subsets(retries={"budget": "120%"}), f"retries.budget: {PERCENT_RULE}, got '120%'"),
        (two_subsets(retries={"budget": 20}), f"retries.budget: {PERCENT_RULE}, got 20"),
        (two_subsets(outlier={"consecutive_5xx": 0}), "outlier.consecutive_5xx: expected an integer >= 1, got 0"),
        (two_subsets(outlier={"base_ejection": 0}), f"outlier.base_ejection: {DURATION_RULE}, got 0"),
        (two_subsets(outlier={"max_ejected": "ten"}), f"outlier.max_ejected: {PERCENT_RULE}, got 'ten'"),
        (two_subsets(limits={"max_requests": 0}), "limits.max_requests: expected an integer >= 1, got 0"),
        (two_subsets(limits={"max_pending": 1.5}), "limits.max_pending: expected an integer >= 1, got 1.5"),
        (two_subsets(health={"path": "healthz"}), "health.path: expected a path starting with /, got 'healthz'"),
        (two_subsets(health={"healthy": 0}), "health.healthy: expected an integer >= 1, got 0"),
        (two_subsets(health={"interval": "5 s s"}), f"health.interval: {DURATION_RULE}, got '5 s s'"),
        (
            two_subsets(authorization={"allow": ["shop", "Web"]}),
            f"authorization.allow[1]: expected '*' or {NAME_RULE}, got 'Web'",
        ),
        (two_subsets(authorization={"allow": "*"}), "authorization.allow: expected a list, got '*'"),
        (routed(route(weight=1)), "routes[0].weight: unknown key (expected one of: name, match, split)"),
        (
            first(match={"method": "GET"}),
            "routes[0].match.method: unknown key (expected one of: path_prefix, headers)",
        ),
        (
            two_subsets(subsets={"v1": {"weight": 1}}),
            "subsets.v1.weight: unknown key (expected one of: endpoints, dns, srv, etcd, protocol)",
        ),
        (
            two_subsets(subsets={"v1": {"dns": "catalog.svc"}}),
            "subsets.v1.dns: expected host:port (missing host or port), got 'catalog.svc'",
        ),
        (
            two_subsets(subsets={"v1": {"dns": "catalog.svc:0"}}),
            "subsets.v1.dns: expected a port from 1 to 65535, got 'catalog.svc:0'",
        ),
        (
            two_subsets(subsets={"v1": {"srv": "_http._tcp.catalog svc"}}),
            "subsets.v1.srv: expected a DNS name such as _http._tcp.catalog.example, got '_http._tcp.catalog svc'",
        ),
        (
            two_subsets(subsets={"v1": {"etcd": "meshgate/endpoints"}}),
            "subsets.v1.etcd: expected a key prefix starting with /, got 'meshgate/endpoints'",
        ),
        (
            two_subsets(subsets={"v1": {"endpoints": ["127.0.0.1:9101"], "srv": "_http._tcp.catalog"}}),
            "subsets.v1.srv: expected one source of endpoints, not ['endpoints', 'srv']",
        ),
        (
            two_subsets(retry={}),
            "retry: unknown key (expected one of: subsets, routes, lb, protocol, timeouts, retries, health, outlier, "
            "limits, authorization, grpc)",
        ),
        (two_subsets(protocol="http2"), "protocol: expected one of: http1, h2c, grpc, got 'http2'"),
        (
            two_subsets(subsets={"v1": {"endpoints": ["127.0.0.1:9101"], "protocol": "h3"}}),
            "subsets.v1.protocol: expected one of: http1, h2c, grpc, got 'h3'",
        ),
        (
            two_subsets(grpc={"failure_codes": ["unavailable", "BOGUS"]}),
            "grpc.failure_codes[1]: expected a gRPC status code name or number (0-16), got 'BOGUS'",
        ),
        (
            two_subsets(grpc={"failure_codes": [17]}),
            "grpc.failure_codes[0]: expected a gRPC status code name or number (0-16), got 17",
        ),
        (
            two_subsets(timeouts={"stream_idle": "0s"}),
            "timeouts.stream_idle: expected a positive duration like 250ms, 2s or 1m, got '0s'",
        ),
    ],
)
def test_service_rules(service: dict[str, object], expected: str) -> None:
    assert error({"services": {"catalog": service}}) == f"gw.yaml: services.catalog.{expected}"


def test_grpc_failure_codes_take_names_or_numbers_and_default_to_linkerds_set() -> None:
    parsed = Config.parse({"services": {"rpc": {"subsets": {"v1": {}}, "grpc": {"failure_codes": ["internal", 14]}}}})
    service = parsed.service("rpc")
    assert service is not None and service.grpc.failure_codes == {13, 14}
    assert service.to_dict()["grpc"] == {"failure_codes": ["INTERNAL", "UNAVAILABLE"]}
    default = Config.parse({"services": {"rpc": {"subsets": {"v1": {}}}}}).service("rpc")
    assert default is not None and default.grpc.failure_codes == {2, 4, 7, 13, 14, 15}
    assert default.protocol == "http1" and default.timeouts.max_stream_duration is None


def test_split_sum_error_matches_the_design_example() -> None:
    service = routed(route(match={}), route(name="default", split={"v1": 100, "v2": 10}))
    message = "gw.yaml: services.catalog.routes[1].split: weights must sum to 100, got 110"
    assert error({"services": {"catalog": service}}) == message


SIZE_RULE = "expected a size of at least 1KiB, like 60KiB or 65536"
URL_RULE = "expected an http:// or https:// URL"
CIDR_RULE = "expected an IP address or CIDR block, like 10.0.0.0/8 or fd00::/8"
LOG_RULE = "expected off, stdout or a file path"


@pytest.mark.parametrize(
    ("gateway", "expected"),
    [
        ({"group": "Catalog"}, f"group: expected {NAME_RULE}, got 'Catalog'"),
        ({"group": "x" * 64}, f"group: expected {NAME_RULE}, got '{'x' * 64}'"),
        ({"group": "-catalog"}, f"group: expected {NAME_RULE}, got '-catalog'"),
        (
            {"listen": {"ingress": "0.0.0.0:80"}},
            "listen.ingress: unknown key (expected one of: inbound, edge, outbound, admin, metrics, advertise)",
        ),
        ({"tls": {"cert": "a", "key": "b"}}, "tls.ca: required key is missing"),
        ({"tls": {"cert": "a", "key": "b", "ca": ""}}, "tls.ca: expected a file path, got ''"),
        ({"tls": "gw.pem"}, "tls: expected a mapping, got 'gw.pem'"),
        ({"preserve_request_id": "yes"}, "preserve_request_id: expected true or false, got 'yes'"),
        ({"preserve_request_id": 1}, "preserve_request_id: expected true or false, got 1"),
        ({"limits": {"max_header_bytes": 512}}, f"limits.max_header_bytes: {SIZE_RULE}, got 512"),
        ({"limits": {"max_header_bytes": "60XB"}}, f"limits.max_header_bytes: {SIZE_RULE}, got '60XB'"),
        ({"limits": {"max_headers": 0}}, "limits.max_headers: expected an integer >= 1, got 0"),
        ({"limits": {"max_headers": True}}, "limits.max_headers: expected an integer >= 1, got True"),
        ({"limits": {"header_timeout": "0ms"}}, f"limits.header_timeout: {DURATION_RULE}, got '0ms'"),
        ({"limits": {"idle_timeout": None}}, f"limits.idle_timeout: {DURATION_RULE}, got None"),
        ({"limits": {"body_timeout": "0s"}}, f"limits.body_timeout: {DURATION_RULE}, got '0s'"),
        ({"limits": {"send_timeout": "soon"}}, f"limits.send_timeout: {DURATION_RULE}, got 'soon'"),
        ({"trusted_proxies": "10.0.0.0/8"}, "trusted_proxies: expected a list, got '10.0.0.0/8'"),
        ({"trusted_proxies": ["10.0.0.0/33"]}, f"trusted_proxies[0]: {CIDR_RULE}, got '10.0.0.0/33'"),
        ({"trusted_proxies": ["lb.example"]}, f"trusted_proxies[0]: {CIDR_RULE}, got 'lb.example'"),
        ({"trusted_proxies": [10]}, f"trusted_proxies[0]: {CIDR_RULE}, got 10"),
        ({"telemetry": {"tracing": {"endpoint": "ftp://x"}}}, f"telemetry.tracing.endpoint: {URL_RULE}, got 'ftp://x'"),
        ({"telemetry": {"tracing": {"endpoint": "http://"}}}, f"telemetry.tracing.endpoint: {URL_RULE}, got 'http://'"),
        ({"telemetry": {"tracing": {"sampling": 2}}}, f"telemetry.tracing.sampling: {PERCENT_RULE}, got 2"),
        (
            {"discovery": {"resolvers": ["dns.example:53"]}},
            "discovery.resolvers[0]: expected an IP address and port, like 127.0.0.1:53 or [::1]:53, "
            "got 'dns.example:53'",
        ),
        ({"discovery": {"etcd": ["etcd:2379"]}}, f"discovery.etcd[0]: {URL_RULE}, got 'etcd:2379'"),
        (
            {"telemetry": {"tracing": {"rate": 1}}},
            "telemetry.tracing.rate: unknown key (expected one of: endpoint, sampling)",
        ),
        ({"telemetry": {"access_log": ""}}, f"telemetry.access_log: {LOG_RULE}, got ''"),
        ({"telemetry": {"access_log": True}}, f"telemetry.access_log: {LOG_RULE}, got True"),
        ({"telemetry": {"recent_requests": False}}, "telemetry.recent_requests: expected an integer >= 0, got False"),
        (
            {"identity": {}},
            "identity: unknown key (expected one of: group, listen, tls, edge_tls, preserve_request_id, "
            "trusted_proxies, limits, telemetry, discovery)",
        ),
    ],
)
def test_gateway_rules(gateway: object, expected: str) -> None:
    assert error({"gateway": gateway}) == f"gw.yaml: gateway.{expected}"


@pytest.mark.parametrize(
    ("listener", "address", "rule"),
    [
        ("edge", "0.0.0.0:15006", "address already used by inbound"),
        ("metrics", "127.0.0.1:15000", "address already used by admin"),
        ("admin", "127.0.0.1:15006", "address already used by inbound"),
        ("inbound", "0.0.0.0:70000", "expected host:port (port must be a number from 0 to 65535)"),
        ("admin", 15000, "expected a host:port string"),
        ("advertise", "0.0.0.0:15006", "expected an address peers can reach, not a wildcard"),
        ("advertise", "10.0.0.7:0", "expected a port from 1 to 65535"),
    ],
)
def test_listen_rules(listener: str, address: object, rule: str) -> None:
    expected = f"gw.yaml: gateway.listen.{listener}: {rule}, got {address!r}"
    assert error({"gateway": {"listen": {listener: address}}}) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, "gw.yaml: expected a mapping, got None"),
        (["gateway"], "gw.yaml: expected a mapping, got ['gateway']"),
        ({"groups": {}}, "gw.yaml: groups: unknown key (expected one of: gateway, services)"),
        ({1: {}}, "gw.yaml: expected text keys, got 1"),
        ({"gateway": "catalog"}, "gw.yaml: gateway: expected a mapping, got 'catalog'"),
        ({"services": ["catalog"]}, "gw.yaml: services: expected a mapping, got ['catalog']"),
        ({"services": {"Catalog": {}}}, f"gw.yaml: services: expected {NAME_RULE}, got 'Catalog'"),
        ({"services": {"catalog": "v1"}}, "gw.yaml: services.catalog: expected a mapping, got 'v1'"),
    ],
)
def test_top_level_rules(data: object, expected: str) -> None:
    assert error(data) == expected


# --- files -------------------------------------------------------------------------------------------------------


def test_tls_files_resolve_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    for name in ("gw.pem", "gw.key", "ca.pem"):
        (tmp_path / "certs" / name).write_text("PEM\n")
    path = tmp_path / "gw.yaml"
    path.write_text("gateway:\n  tls: {cert: certs/gw.pem, key: certs/gw.key, ca: certs/ca.pem}\n")
    tls = Config.load(str(path)).gateway.tls
    assert tls is not None and tls.cert == str(tmp_path / "certs" / "gw.pem")


def test_missing_tls_file_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "gw.pem").write_text("PEM\n")
    (tmp_path / "gw.key").write_text("PEM\n")
    message = error({"gateway": {"tls": {"cert": "gw.pem", "key": "gw.key", "ca": "ca.pem"}}}, base_dir=str(tmp_path))
    assert (
        message
        == f"gw.yaml: gateway.tls.ca: expected an existing file (looked for {tmp_path / 'ca.pem'}), got 'ca.pem'"
    )


def test_access_log_off_and_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("gateway:\n  telemetry: {access_log: off}\n")  # YAML 1.1 reads `off` as false
    assert Config.load(str(path)).gateway.telemetry.access_log == "off"
    path.write_text("gateway:\n  telemetry: {access_log: logs/access.log}\n")
    assert Config.load(str(path)).gateway.telemetry.access_log == str(tmp_path / "logs" / "access.log")


def test_load_reports_yaml_syntax_errors_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("gateway:\n  group: catalog\n   listen: {}\n")
    with pytest.raises(ConfigError) as info:
        Config.load(str(path))
    assert str(info.value) == f"{path}: line 3, column 10: invalid YAML: mapping values are not allowed here"


def test_load_reports_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read the file"):
        Config.load(str(tmp_path / "missing.yaml"))
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"binary\.yaml: cannot read the file"):
        Config.load(str(tmp_path / "binary.yaml"))


def test_load_validation_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("services:\n  catalog:\n    subsets: {v1: {}}\n    retries: {atempts: 3}\n")
    with pytest.raises(ConfigError) as info:
        Config.load(str(path))
    assert str(info.value).startswith(f"{path}: services.catalog.retries.atempts: unknown key")


# --- value helpers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("10", 10.0),
        (3, 3.0),
        (0.5, 0.5),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["-1s", -1, "1d", "abc", "", "ms", "1 m s", True, float("inf"), float("nan"), "1e400s"]
)
def test_parse_duration_rejects(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "250ms"),
        (2.0, "2s"),
        (60.0, "1m"),
        (3600.0, "1h"),
        (1.5, "1.5s"),
        (90.0, "90s"),
        (5400.0, "90m"),
        (0.0, "0s"),
        (0.001, "1ms"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("seconds", [0.1, 0.3, 1 / 3, 2.75, 1e-9, 123456.789])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("60KiB", 61440),
        ("1MiB", 1 << 20),
        ("1GiB", 1 << 30),
        ("512", 512),
        (512, 512),
        ("1KB", 1000),
        ("1kB", 1000),
        ("2MB", 2_000_000),
        ("1.5KiB", 1536),
        ("7B", 7),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1.5B", "-1", -1, True, "1XB", "KiB", "", 1.5])
def test_parse_size_rejects(text: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "ratio"), [("20%", 0.2), ("0%", 0.0), ("100%", 1.0), ("12.5%", 0.125), ("1%", 0.01), (0.2, 0.2), (1, 1.0)]
)
def test_parse_percent(text: str | float, ratio: float) -> None:
    assert parse_percent(text) == ratio


@pytest.mark.parametrize("text", ["120%", "-1%", "20", 2, -0.1, True, "abc%", "%", float("nan")])
def test_parse_percent_rejects(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_percent(text)


@pytest.mark.parametrize(
    ("ratio", "text"), [(0.2, "20%"), (0.1, "10%"), (0.125, "12.5%"), (0.01, "1%"), (0.0, "0%"), (1.0, "100%")]
)
def test_format_percent(ratio: float, text: str) -> None:
    assert format_percent(ratio) == text


@pytest.mark.parametrize("ratio", [1 / 3, 0.07, 1e-9, 0.123456789])
def test_format_percent_round_trips(ratio: float) -> None:
    assert parse_percent(format_percent(ratio)) == ratio


@pytest.mark.parametrize(
    ("text", "address", "shown"),
    [
        ("127.0.0.1:9101", Address("127.0.0.1", 9101), "127.0.0.1:9101"),
        ("[::1]:80", Address("::1", 80), "[::1]:80"),
        ("localhost:0", Address("localhost", 0), "localhost:0"),
        ("catalog-v1.mesh:8080", Address("catalog-v1.mesh", 8080), "catalog-v1.mesh:8080"),
        ("catalog_v1:8080", Address("catalog_v1", 8080), "catalog_v1:8080"),
    ],
)
def test_parse_address(text: str, address: Address, shown: str) -> None:
    assert parse_address(text) == address
    assert str(address) == shown


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1",
        ":80",
        "host:",
        "host:99999",
        "host:8a",
        "host:-1",
        "::1:80",
        "[zz]:80",
        "[127.0.0.1]:80",
        "999.1.1.1:80",
        "a b:80",
        "-bad:80",
        "",
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_backoff_grows_from_low_to_high_with_jitter() -> None:
    firsts = {backoff(0, 1.0, 30.0) for _ in range(200)}
    assert all(value == 1.0 for value in firsts)  # the first retry waits `low`
    thirds = [backoff(2, 1.0, 30.0) for _ in range(200)]
    assert all(1.0 <= value <= 4.0 for value in thirds) and len(set(thirds)) > 100  # jittered up to 4 s
    late = [backoff(10_000, 0.25, 30.0) for _ in range(200)]  # no overflow after a long outage
    assert all(0.25 <= value <= 30.0 for value in late) and max(late) > 20
