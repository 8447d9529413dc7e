"""The gateway's configuration: YAML parsed once into frozen dataclasses.

A file has two top-level keys. `gateway` describes this process: its listeners, TLS files, header limits and
telemetry. `services` maps each service name to its subsets of endpoints, its routes (weighted splits over those
subsets, first match wins, the last route is the catch-all) and its traffic policy: load balancing, timeouts,
retries, health checks, outlier ejection, concurrency limits and authorization. Every key has a default or is
optional, and unknown keys are errors (README, "Configuration reference").

`Config.load(path)` reads YAML and `Config.parse(data)` validates plain data (the dashboard's API uses the same
model). `Config.to_dict()` gives that data back, so `Config.parse(cfg.to_dict()) == cfg`. Text such as `250ms`,
`60KiB`, `20%`, `host:port` and `hash(header:x-user)` becomes floats, ints, `Address` and `LoadBalancer` here,
once, so nothing on the request path parses strings.

Every problem raises one `ConfigError` naming the file, the field path, what is expected and the value given:
`gw.yaml: services.catalog.routes[1].split: weights must sum to 100, got 110`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import partial
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import yaml

from gateway import rpc
from gateway.rpc import GRPC_RETRY_ON
from gateway.units import (
    Address,
    format_duration,
    format_percent,
    is_hostname,
    is_ip,
    is_wildcard,
    parse_address,
    parse_duration,
    parse_percent,
    parse_size,
)

_T = TypeVar("_T")


class ConfigError(Exception):
    """A configuration that cannot be used. `str(err)` is the whole one-line message."""


# Reading plain data. A converter takes (value, path) and returns a typed value or raises _Invalid, which
# Config.parse turns into a ConfigError naming the source. Each dataclass field that is a YAML key carries its
# converter and its formatter in its metadata (see `_key`), so a key, its default and its rule are written once.

_Converter = Callable[[object, str], Any]
_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9._]*[a-z0-9])?")
_NAME_RULE = "a name of lowercase letters, digits, '-', '.' or '_' (starting and ending alphanumeric, max 63)"
_TOKEN = r"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_LB_HASH = re.compile(rf"hash\(header:\s*({_TOKEN})\s*\)")
_LB_POLICIES = ("ewma", "least_request", "round_robin")
_LISTENERS = ("inbound", "edge", "outbound", "admin", "metrics")
_CIDR = "expected an IP address or CIDR block, like 10.0.0.0/8 or fd00::/8"
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
RETRY_ON = ("connect-failure", "reset", "gateway-error", "5xx", "retriable-status", *GRPC_RETRY_ON)


class _Invalid(Exception):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)


def _fail(path: str, expected: str, value: object) -> NoReturn:
    raise _Invalid(path, f"{expected}, got {value!r}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _mapping(value: object, path: str) -> dict[str, object]:
    if not isinstance(value, Mapping):
        _fail(path, "expected a mapping", value)
    items: dict[str, object] = {}
    for key, item in value.items():
        if isinstance(key, bool):  # YAML 1.1 reads a bare `on:` key (retries.on) as True
            key = "on" if key else "off"
        if not isinstance(key, str):
            _fail(path, "expected text keys", key)
        items[key] = item
    return items


def _fields(value: object, path: str, spec: Mapping[str, _Converter], required: Sequence[str] = ()) -> dict[str, Any]:
    items = _mapping(value, path)
    for key in items:
        if key not in spec:
            raise _Invalid(_join(path, key), f"unknown key (expected one of: {', '.join(spec)})")
    for key in required:
        if key not in items:
            raise _Invalid(_join(path, key), "required key is missing")
    return {key: spec[key](item, _join(path, key)) for key, item in items.items()}


def _key(default: _T, parse: Callable[[object, str], _T], dump: Callable[[_T], object] = lambda value: value) -> _T:
    """A field that is a YAML key: its default, how to read it and how to write it back for `to_dict`."""
    return field(default=default, metadata={"parse": parse, "dump": dump})


def _spec(cls: type[Any]) -> dict[str, _Converter]:
    return {item.name: item.metadata["parse"] for item in fields(cls) if "parse" in item.metadata}


def _required(cls: type[Any]) -> list[str]:
    return [item.name for item in fields(cls) if "parse" in item.metadata and item.default is MISSING]


def _section(cls: type[_T]) -> Callable[[object, str], _T]:
    spec, required = _spec(cls), _required(cls)
    return lambda value, path: cls(**_fields(value, path, spec, required))


def _dump(section: Any) -> dict[str, object]:
    keys = [item for item in fields(section) if "dump" in item.metadata]
    values = {item.name: (item, getattr(section, item.name)) for item in keys}
    return {name: item.metadata["dump"](value) for name, (item, value) in values.items() if value is not None}


def _nested(cls: type[_T]) -> _T:
    return _key(cls(), _section(cls), _dump)


def _named(value: object, path: str) -> list[tuple[str, object]]:
    items = _mapping(value, path)
    for key in items:
        _name(key, path)
    return list(items.items())


def _each(convert: Callable[[object, str], _T]) -> Callable[[object, str], tuple[_T, ...]]:
    def convert_all(value: object, path: str) -> tuple[_T, ...]:
        if not isinstance(value, list | tuple):
            _fail(path, "expected a list", value)
        return tuple(convert(item, f"{path}[{index}]") for index, item in enumerate(value))

    return convert_all


def _optional(convert: Callable[[object, str], _T]) -> Callable[[object, str], _T | None]:
    return lambda value, path: None if value is None else convert(value, path)


def _rule(expected: str, ok: Callable[[Any], object], parse: Callable[[Any], Any] = lambda value: value) -> _Converter:
    """A converter that applies `parse` (which may raise ValueError or TypeError) and then checks `ok`."""

    def convert(value: object, path: str) -> Any:
        try:
            if ok(result := parse(value)):
                return result
        except (TypeError, ValueError):
            pass  # reported below, with the field path
        _fail(path, expected, value)

    return convert


def _int(low: int, high: int | None = None) -> _Converter:
    expected = f"expected an integer >= {low}" if high is None else f"expected an integer from {low} to {high}"
    return _rule(expected, lambda value: type(value) is int and value >= low and (high is None or value <= high))


def _is_http_url(value: object) -> bool:
    return isinstance(value, str) and urlsplit(value).scheme in ("http", "https") and bool(urlsplit(value).hostname)


def _is_name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 63 and _NAME.fullmatch(value) is not None


def _is_srv(value: object) -> bool:
    return isinstance(value, str) and is_hostname(value.removesuffix("."))


def _is_key_prefix(value: object) -> bool:
    return isinstance(value, str) and value.startswith("/") and len(value) > 1


def _is_file_name(value: object) -> bool:
    return isinstance(value, str) and value != ""


_bool = _rule("expected true or false", lambda value: isinstance(value, bool))
_name = _rule(f"expected {_NAME_RULE}", _is_name)
_group = _rule(f"expected '*' or {_NAME_RULE}", lambda value: value == "*" or _is_name(value))
_retry_on = _rule(f"expected one of: {', '.join(RETRY_ON)}", lambda value: value in RETRY_ON)
_url_path = _rule("expected a path starting with /", lambda value: isinstance(value, str) and value.startswith("/"))
_file_name = _rule("expected a file path", _is_file_name)
_access_log = _rule(  # YAML 1.1 reads a bare `off` as false
    "expected off, stdout or a file path", _is_file_name, lambda value: "off" if value is False else value
)
_url = _rule("expected an http:// or https:// URL", _is_http_url)
PROTOCOLS = ("http1", "h2c", "grpc")  # what a service's endpoints speak; grpc implies h2c
_protocol = _rule(f"expected one of: {', '.join(PROTOCOLS)}", lambda value: value in PROTOCOLS)
_duration = _rule("expected a positive duration like 250ms, 2s or 1m", lambda seconds: seconds > 0, parse_duration)
_percent = _rule("expected a percentage from 0% to 100% (or a ratio from 0 to 1)", lambda _: True, parse_percent)
_header_bytes = _rule("expected a size of at least 1KiB, like 60KiB or 65536", lambda size: size >= 1024, parse_size)


def _address(min_port: int = 0, reachable: bool = False) -> Callable[[object, str], Address]:
    """Listeners may use port 0 (ephemeral); endpoints need a real port; an advertised address no wildcard."""

    def convert(value: object, path: str) -> Address:
        if not isinstance(value, str):
            _fail(path, "expected a host:port string", value)
        try:
            address = parse_address(value)
        except ValueError as err:
            _fail(path, f"expected host:port ({err})", value)
        if address.port < min_port:
            _fail(path, f"expected a port from {min_port} to 65535", value)
        if reachable and is_wildcard(address.host):
            _fail(path, "expected an address peers can reach, not a wildcard", value)
        return address

    return convert


def _network(value: object, path: str) -> IPNetwork:
    """A CIDR block such as 10.0.0.0/8 or fd00::/8; a bare address is a block of one."""
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError:
            pass
    _fail(path, _CIDR, value)


def _resolver(value: object, path: str) -> Address:
    """A DNS server: an IP address and port (a name would need a resolver of its own)."""
    address = _address(min_port=1)(value, path)
    if not is_ip(address.host):
        _fail(path, "expected an IP address and port, like 127.0.0.1:53 or [::1]:53", value)
    return address


def _endpoints(value: object, path: str) -> tuple[Address, ...]:
    endpoints = _each(_address(min_port=1))(value, path)
    for index, endpoint in enumerate(endpoints):
        if endpoint in endpoints[:index]:
            _fail(f"{path}[{index}]", "expected each endpoint once", str(endpoint))
    return endpoints


def _headers(value: object, path: str) -> tuple[tuple[str, str], ...]:
    headers: list[tuple[str, str]] = []
    for name, text in _mapping(value, path).items():
        if not re.fullmatch(_TOKEN, name) or any(name.lower() == seen for seen, _ in headers):
            _fail(path, "expected distinct HTTP header names", name)
        if not isinstance(text, str):
            _fail(_join(path, name), "expected a string (quote numbers and booleans in YAML)", text)
        headers.append((name.lower(), text))
    return tuple(headers)


def _lb(value: object, path: str) -> LoadBalancer:
    if value in _LB_POLICIES:
        return LoadBalancer(str(value))
    if isinstance(value, str) and (match := _LB_HASH.fullmatch(value)):
        return LoadBalancer("hash", match[1].lower())
    _fail(path, "expected ewma, least_request, round_robin or hash(header:NAME)", value)


def _seconds(default: float) -> float:
    return _key(default, _duration, format_duration)


def _ratio(default: float) -> float:
    return _key(default, _percent, format_percent)


def _addresses(addresses: tuple[Address, ...]) -> list[str]:
    return [str(address) for address in addresses]


def _grpc_code(value: object, path: str) -> int:
    """A gRPC status code by name (`unavailable`, `UNAVAILABLE`) or number (14)."""
    if type(value) is int and 0 <= value < len(rpc.NAMES):
        return value
    if isinstance(value, str) and value.upper() in rpc.NAMES:
        return rpc.NAMES.index(value.upper())
    _fail(path, f"expected a gRPC status code name or number (0-{len(rpc.NAMES) - 1})", value)


def _set_of(convert: Callable[[object, str], _T]) -> Callable[[object, str], frozenset[_T]]:
    return lambda value, path: frozenset(_each(convert)(value, path))


@dataclass(frozen=True, slots=True)
class Listen:
    """The gateway's listeners. `advertise` is how peers reach `inbound`; see `advertised()`."""

    inbound: Address = _key(Address("0.0.0.0", 15006), _address(), str)
    edge: Address | None = _key(None, _optional(_address()), str)
    outbound: Address = _key(Address("127.0.0.1", 15001), _address(), str)
    admin: Address = _key(Address("127.0.0.1", 15000), _address(), str)
    metrics: Address | None = _key(None, _optional(_address()), str)
    advertise: Address | None = _key(None, _optional(_address(min_port=1, reachable=True)), str)

    def advertised(self) -> Address | None:
        """`advertise`, else `inbound` unless it binds a wildcard host (peers cannot be told that one)."""
        if self.advertise is not None:
            return self.advertise
        return None if is_wildcard(self.inbound.host) else self.inbound


def _listen(value: object, path: str) -> Listen:
    listen = _section(Listen)(value, path)
    bound: list[tuple[str, Address]] = []
    for key in _LISTENERS:
        address: Address | None = getattr(listen, key)
        if address is None or address.port == 0:  # port 0 binds an ephemeral port: never a clash
            continue
        for other, used in bound:
            hosts_overlap = used.host == address.host or is_wildcard(used.host) or is_wildcard(address.host)
            if used.port == address.port and hosts_overlap:
                _fail(_join(path, key), f"address already used by {other}", str(address))
        bound.append((key, address))
    return listen


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM files for standalone mTLS. `Config.parse` resolves them against the config file's directory."""

    cert: str = field(metadata={"parse": _file_name, "dump": str})
    key: str = field(metadata={"parse": _file_name, "dump": str})
    ca: str = field(metadata={"parse": _file_name, "dump": str})


@dataclass(frozen=True, slots=True)
class CertKey:
    """One server certificate of the edge listener: a PEM chain and its key, resolved like `tls` files."""

    cert: str = field(metadata={"parse": _file_name, "dump": str})
    key: str = field(metadata={"parse": _file_name, "dump": str})


@dataclass(frozen=True, slots=True)
class Limits:
    """What one HTTP/1.1 client connection may send and how long it may stall. `max_header_bytes` and
    `max_headers` bound a request's head and trailers together, and an upstream response's head and trailers.
    `body_timeout` is the longest pause while a request body arrives (408) or a response body is relayed from
    the upstream; `send_timeout` the longest a client may leave a response unread."""

    max_header_bytes: int = _key(60 * 1024, _header_bytes)
    max_headers: int = _key(100, _int(1))
    header_timeout: float = _seconds(10.0)
    idle_timeout: float = _seconds(60.0)
    body_timeout: float = _seconds(30.0)
    send_timeout: float = _seconds(30.0)


@dataclass(frozen=True, slots=True)
class Tracing:
    """Where spans go (OTLP/HTTP) and the share of traces started here (`sampling` is a ratio 0..1)."""

    endpoint: str | None = _key(None, _optional(_url))
    sampling: float = _key(0.01, _percent)


@dataclass(frozen=True, slots=True)
class Telemetry:
    """`access_log` is "off", "stdout" or a file path; `recent_requests` sizes the ring of hop records."""

    access_log: str = _key("stdout", _access_log)
    tracing: Tracing = _nested(Tracing)
    recent_requests: int = _key(100_000, _int(0))


@dataclass(frozen=True, slots=True)
class Discovery:
    """Where subsets with `dns`, `srv` or `etcd` find their endpoints: DNS servers (default: the system's, from
    /etc/resolv.conf) and the etcd v3 endpoints whose leased keys list them."""

    resolvers: tuple[Address, ...] = _key((), _each(_resolver), _addresses)
    etcd: tuple[str, ...] = _key((), _each(_url), list)


@dataclass(frozen=True, slots=True)
class GatewaySection:
    """The `gateway:` key: this process, as opposed to the services it routes to."""

    group: str = _key("default", _name)
    listen: Listen = _key(Listen(), _listen, _dump)
    tls: TLSFiles | None = _key(None, _optional(_section(TLSFiles)), _dump)
    # TLS on the edge listener: certificates chosen by the client's SNI among their names; the first is the default.
    edge_tls: tuple[CertKey, ...] = _key((), _each(_section(CertKey)), lambda pairs: [_dump(pair) for pair in pairs])
    preserve_request_id: bool = _key(True, _bool)
    trusted_proxies: tuple[IPNetwork, ...] = _key((), _each(_network), lambda networks: [str(n) for n in networks])
    limits: Limits = _nested(Limits)
    telemetry: Telemetry = _nested(Telemetry)
    discovery: Discovery = _nested(Discovery)


@dataclass(frozen=True, slots=True)
class Subset:
    """A named group of endpoints of one service, such as a version. It may be empty.

    The endpoints are listed, or discovered from one source: `dns` (A/AAAA records of a name, with the port
    given), `srv` (SRV records: targets and ports) or `etcd` (leased keys under a prefix, named `host:port`).
    """

    name: str
    endpoints: tuple[Address, ...] = _key((), _endpoints, _addresses)
    dns: Address | None = _key(None, _optional(_address(min_port=1)), str)
    srv: str | None = _key(None, _optional(_rule("expected a DNS name such as _http._tcp.catalog.example", _is_srv)))
    etcd: str | None = _key(None, _optional(_rule("expected a key prefix starting with /", _is_key_prefix)))
    protocol: str | None = _key(None, _optional(_protocol))  # None: the service's

    @property
    def discovered(self) -> bool:
        return bool(self.dns or self.srv or self.etcd)

    @property
    def source(self) -> str | None:
        """Where a discovered subset's endpoints come from, as logs and pages name it: `dns catalog-v2:8080`."""
        if self.dns is not None:
            return f"dns {self.dns}"
        if self.srv is not None:
            return f"srv {self.srv}"
        return None if self.etcd is None else f"etcd {self.etcd}"


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """A path prefix plus exact header values; header names are lower-cased."""

    path_prefix: str = _key("/", _url_path)
    headers: tuple[tuple[str, str], ...] = _key((), _headers, dict)


@dataclass(frozen=True, slots=True)
class Route:
    """A route: `match` is None only on the catch-all, and `split` weighs every subset, in subset order.

    >>> Route("default", None, (("v1", 90), ("v2", 10))).split
    (('v1', 90), ('v2', 10))
    """

    name: str
    match: RouteMatch | None
    split: tuple[tuple[str, int], ...]

    def to_dict(self) -> dict[str, object]:
        match = {} if self.match is None else {"match": _dump(self.match)}
        return {"name": self.name, **match, "split": dict(self.split)}


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    """`policy` is ewma, least_request, round_robin or hash; YAML `hash(header:x-user)` sets `hash_header`."""

    policy: str = "ewma"
    hash_header: str | None = None

    def __str__(self) -> str:
        return f"hash(header:{self.hash_header})" if self.policy == "hash" else self.policy


# The timeouts of an HTTP/2 stream, which every hop applies: the caller's gateway takes them from the owner's service.
STREAM_TIMEOUTS = ("stream_idle", "max_stream_duration")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """`request` bounds an HTTP/1.1 request; an HTTP/2 stream (a gRPC call, say) has no total timeout unless
    `max_stream_duration` says so (or the client's grpc-timeout), and ends when nothing moves for `stream_idle`."""

    connect: float = _seconds(1.0)
    per_try: float = _seconds(1.0)
    request: float = _seconds(15.0)
    stream_idle: float = _seconds(300.0)  # Envoy's default too
    max_stream_duration: float | None = _key(None, _optional(_duration), lambda value: value and format_duration(value))


@dataclass(frozen=True, slots=True)
class Retries:
    """`attempts` counts retries after the first try; `on` holds values of `RETRY_ON`; `budget` is a ratio."""

    attempts: int = _key(2, _int(0, 10))
    on: frozenset[str] = _key(frozenset({"connect-failure", "reset", "gateway-error"}), _set_of(_retry_on), sorted)
    statuses: frozenset[int] = _key(frozenset(), _set_of(_int(100, 599)), sorted)
    budget: float = _ratio(0.2)


@dataclass(frozen=True, slots=True)
class Health:
    path: str = _key("/healthz", _url_path)
    interval: float = _seconds(5.0)
    timeout: float = _seconds(1.0)
    healthy: int = _key(2, _int(1))
    unhealthy: int = _key(3, _int(1))


@dataclass(frozen=True, slots=True)
class Outlier:
    consecutive_5xx: int = _key(5, _int(1))
    base_ejection: float = _seconds(30.0)
    max_ejected: float = _ratio(0.10)


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    max_requests: int = _key(1024, _int(1))
    max_pending: int = _key(1024, _int(1))


@dataclass(frozen=True, slots=True)
class Grpc:
    """What a gRPC service's calls count as failures (outlier ejection, error rates, span status)."""

    failure_codes: frozenset[int] = _key(
        rpc.DEFAULT_FAILURE_CODES, _set_of(_grpc_code), lambda codes: sorted(rpc.NAMES[code] for code in codes)
    )


@dataclass(frozen=True, slots=True)
class Authorization:
    """Source groups allowed to call the service; "*" allows any mesh identity."""

    allow: tuple[str, ...] = _key(("*",), _each(_group), list)


@dataclass(frozen=True, slots=True)
class Service:
    """One service: subsets, ordered routes and traffic policy. `health` is None when not checked actively."""

    name: str
    subsets: tuple[Subset, ...]
    routes: tuple[Route, ...]
    lb: LoadBalancer = _key(LoadBalancer(), _lb, str)
    protocol: str = _key("http1", _protocol)
    timeouts: Timeouts = _nested(Timeouts)
    retries: Retries = _nested(Retries)
    health: Health | None = _key(None, _optional(_section(Health)), _dump)
    outlier: Outlier = _nested(Outlier)
    limits: ServiceLimits = _nested(ServiceLimits)
    authorization: Authorization = _nested(Authorization)
    grpc: Grpc = _nested(Grpc)

    def to_dict(self) -> dict[str, object]:
        subsets = {subset.name: _dump(subset) for subset in self.subsets}
        for subset in self.subsets:
            if subset.discovered and not subset.endpoints:  # none found (yet): the source alone says it
                del subsets[subset.name]["endpoints"]
        return {"subsets": subsets, "routes": [route.to_dict() for route in self.routes], **_dump(self)}


@dataclass(frozen=True, slots=True)
class Config:
    """A whole gateway configuration, validated.

    >>> cfg = Config.parse({"services": {"catalog": {"subsets": {"v1": {"endpoints": ["127.0.0.1:9101"]}}}}})
    >>> cfg.service("catalog").routes[0].split, cfg.gateway.listen.inbound.port
    ((('v1', 100),), 15006)
    """

    gateway: GatewaySection = GatewaySection()
    services: tuple[Service, ...] = ()
    source: str = field(default="<config>", compare=False)

    @classmethod
    def parse(cls, data: object, source: str = "<config>", base_dir: str | None = None) -> Config:
        """Validate plain data (as from YAML or JSON). Relative file paths resolve against `base_dir`."""
        try:
            parsed = _fields(data, "", {"gateway": _section(GatewaySection), "services": _services})
            gateway = _resolve_files(parsed.get("gateway", GatewaySection()), base_dir)
            return cls(gateway, parsed.get("services", ()), source)
        except _Invalid as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def load(cls, path: str, advertise: str | None = None) -> Config:
        """Read a YAML file. Relative paths inside it resolve against the file's directory. `advertise` (the
        `--advertise` flag) replaces `gateway.listen.advertise`, validated as that key."""
        data = read_yaml(path)
        if advertise is not None and isinstance(data, dict):
            data = {**data, "gateway": with_advertise(data.get("gateway") or {}, advertise)}
        return cls.parse(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))

    def to_dict(self) -> dict[str, object]:
        services = {service.name: service.to_dict() for service in self.services}
        return {"gateway": _dump(self.gateway), "services": services}

    def service(self, name: str) -> Service | None:
        return next((service for service in self.services if service.name == name), None)


def with_advertise(gateway: object, advertise: str | None) -> Any:
    """A `gateway:` section (plain data) with `advertise` as `listen.advertise`. A section or `listen` that is not
    a mapping stays as it is, for `Config.parse` to refuse with its path."""
    if advertise is None or not isinstance(gateway, dict):
        return gateway
    listen = gateway.get("listen") or {}
    if not isinstance(listen, dict):
        return gateway
    return {**gateway, "listen": {**listen, "advertise": advertise}}


def read_yaml(path: str) -> object:
    """A YAML file's data; unreadable files and bad YAML raise ConfigError naming the file and the place."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the file: {err}") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}invalid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None


def _resolve_files(gateway: GatewaySection, base_dir: str | None) -> GatewaySection:
    """Anchor relative file names at the config file's directory, and check that the TLS files exist."""
    base = base_dir or ""
    log = gateway.telemetry.access_log
    if log not in ("off", "stdout"):
        gateway = replace(gateway, telemetry=replace(gateway.telemetry, access_log=os.path.join(base, log)))
    if gateway.edge_tls:
        pairs = [
            _existing(pair, ("cert", "key"), base, f"gateway.edge_tls[{n}]") for n, pair in enumerate(gateway.edge_tls)
        ]
        gateway = replace(gateway, edge_tls=tuple(CertKey(**files) for files in pairs))
    if gateway.tls is None:
        return gateway
    return replace(gateway, tls=TLSFiles(**_existing(gateway.tls, ("cert", "key", "ca"), base, "gateway.tls")))


def _existing(section: object, keys: tuple[str, ...], base: str, path: str) -> dict[str, str]:
    files = {key: os.path.normpath(os.path.join(base, getattr(section, key))) for key in keys}
    for key, resolved in files.items():
        if not os.path.isfile(resolved):
            _fail(f"{path}.{key}", f"expected an existing file (looked for {resolved})", getattr(section, key))
    return files


def _split(value: object, path: str, subsets: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    weights: dict[str, int] = {}
    for name, weight in _mapping(value, path).items():
        if name not in subsets:
            raise _Invalid(_join(path, name), f"unknown subset (expected one of: {', '.join(subsets)})")
        weights[name] = _int(0)(weight, _join(path, name))
    if (total := sum(weights.values())) != 100:
        _fail(path, "weights must sum to 100", total)
    return tuple((subset, weights.get(subset, 0)) for subset in subsets)


def _catch_all(value: object, path: str) -> None:
    if value is not None:
        _fail(path, "expected no match on the last route, which is the catch-all", value)


def _route(value: object, path: str, subsets: tuple[str, ...], last: bool) -> Route:
    match = _catch_all if last else _optional(_section(RouteMatch))
    spec: dict[str, _Converter] = {"name": _name, "match": match, "split": partial(_split, subsets=subsets)}
    parsed = _fields(value, path, spec, required=("name", "split"))
    if not last and parsed.get("match") is None:
        raise _Invalid(_join(path, "match"), "required on every route but the last, which is the catch-all")
    return Route(parsed["name"], parsed.get("match"), parsed["split"])


def _routes(value: object, path: str, subsets: tuple[str, ...]) -> tuple[Route, ...]:
    if not isinstance(value, list | tuple) or not value:
        _fail(path, "expected a non-empty list of routes", value)
    routes: list[Route] = []
    for index, item in enumerate(value):
        route = _route(item, f"{path}[{index}]", subsets, last=index == len(value) - 1)
        if any(route.name == seen.name for seen in routes):
            _fail(f"{path}[{index}].name", "expected a route name unique in the service", route.name)
        routes.append(route)
    return tuple(routes)


def _subsets(value: object, path: str) -> tuple[Subset, ...]:
    items = _named(value, path)
    if not items:
        _fail(path, "expected at least one subset", value)
    subsets = []
    for name, body in items:
        parsed = _fields(body, _join(path, name), _spec(Subset))
        sources = [key for key in ("endpoints", "dns", "srv", "etcd") if parsed.get(key)]
        if len(sources) > 1:
            raise _Invalid(_join(_join(path, name), sources[1]), f"expected one source of endpoints, not {sources}")
        subsets.append(Subset(name, **parsed))
    return tuple(subsets)


def _service(name: str, value: object, path: str) -> Service:
    spec: dict[str, _Converter] = {"subsets": _subsets, "routes": lambda raw, _: raw, **_spec(Service)}
    parsed = _fields(value, path, spec, required=("subsets",))
    subsets: tuple[Subset, ...] = parsed.pop("subsets")
    names = tuple(subset.name for subset in subsets)
    if "routes" in parsed:
        routes = _routes(parsed.pop("routes"), _join(path, "routes"), names)
    elif len(names) == 1:
        routes = (Route("default", None, ((names[0], 100),)),)
    else:
        raise _Invalid(_join(path, "routes"), f"required when a service has several subsets ({', '.join(names)})")
    return Service(name, subsets, routes, **parsed)


def _services(value: object, path: str) -> tuple[Service, ...]:
    if value is None:  # `services:` with every entry commented out
        return ()
    return tuple(_service(name, body, _join(path, name)) for name, body in _named(value, path))
