"""The mesh document: which group owns which service, and every service's gateway config.

A mesh is plain JSON-able data, `{"groups": {group: [service, ...]}, "services": {name: <service as in gateway
YAML>}}`. `Mesh.parse` validates it: services through `gateway.config.Config.parse` (so every gateway rule and its
error format apply unchanged), groups here (the gateway's name rule; each listed service exists; each service has
exactly one owning group). Edits (`with_weights`, `with_service`, `without_subset`, ...) work on a copy of the data
and parse the result again, so an edit either yields a valid `Mesh` or raises one `ConfigError` and changes nothing.
`diff(before, after)` describes a change in lines an operator can read in the history and the audit log.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeGuard

from gateway.config import _NAME_RULE, Config, ConfigError, Service, _is_name, read_yaml  # the name rule is private
from gateway.units import parse_address

EMPTY: dict[str, object] = {"groups": {}, "services": {}}
_KEYS = ("groups", "services")


class NotFound(LookupError):
    """An edit names a service, subset or endpoint the mesh does not have. `str(err)` is a one-line reason."""


def _fail(source: str, path: str, expected: str, value: object) -> NoReturn:
    raise ConfigError(f"{source}: {path}: {expected}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Mesh:
    """A validated mesh document. Edits return a new `Mesh`; the data given to them is parsed again.

    >>> mesh = Mesh.parse({"groups": {"shop": ["catalog"]},
    ...                    "services": {"catalog": {"subsets": {"v1": {}, "v2": {}},
    ...                                             "routes": [{"name": "default", "split": {"v1": 100}}]}}})
    >>> mesh.with_weights("catalog", {"v1": 90, "v2": 10}).services[0].routes[-1].split
    (('v1', 90), ('v2', 10))
    >>> mesh.group_of("catalog")
    'shop'
    """

    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    services: tuple[Service, ...] = ()
    source: str = field(default="<mesh>", compare=False)

    @classmethod
    def parse(cls, data: object, source: str = "<mesh>") -> Mesh:
        """Validate plain data; raises `ConfigError` naming `source`, the field path and the bad value."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping with the keys groups and services, got {data!r}")
        for key in data:
            if key not in _KEYS:
                raise ConfigError(f"{source}: {key}: unknown key (expected one of: {', '.join(_KEYS)})")
        services = Config.parse({"services": data.get("services")}, source=source).services
        return cls(_groups(data.get("groups"), [service.name for service in services], source), services, source)

    @classmethod
    def load(cls, path: str) -> Mesh:
        """Read a mesh YAML file, with `Config.load`'s error style."""
        return cls.parse(read_yaml(path), source=path)

    def to_dict(self) -> dict[str, Any]:
        """The canonical data: `Mesh.parse(mesh.to_dict()) == mesh`. Each call builds fresh containers."""
        groups = {name: list(members) for name, members in self.groups}
        return {"groups": groups, "services": {service.name: service.to_dict() for service in self.services}}

    def service(self, name: str) -> Service | None:
        return next((service for service in self.services if service.name == name), None)

    def group_of(self, service: str) -> str:
        """The group that owns `service`; raises `NotFound` for an unknown service."""
        for group, members in self.groups:
            if service in members:
                return group
        raise NotFound(f"services.{service}: no such service")

    def services_of(self, group: str) -> tuple[Service, ...]:
        """The services `group` owns, in the order the group lists them; () for an unknown group."""
        members = dict(self.groups).get(group, ())
        return tuple(service for name in members if (service := self.service(name)) is not None)

    # Edits. Each validates the whole result, so rules that span services and groups hold after every edit.

    def with_weights(self, service: str, weights: object) -> Mesh:
        """Set the catch-all (last) route's split. Weights follow the split rules: non-negative integers (not
        booleans or floats) naming known subsets, summing to 100; omitted subsets weigh 0."""
        data = self.to_dict()
        _spec(data, service)["routes"][-1]["split"] = weights
        return self._parse(data)

    def with_service(self, name: str, group: str, spec: object) -> Mesh:
        """Create or replace a service (its gateway YAML dict) and make `group` its owner (created if new)."""
        data = self.to_dict()
        for members in data["groups"].values():
            if name in members:
                members.remove(name)
        data["groups"].setdefault(group, []).append(name)
        data["services"][name] = spec
        return self._parse(data)

    def without_service(self, name: str) -> Mesh:
        """Delete a service; its group stays, possibly with no services."""
        data = self.to_dict()
        _spec(data, name)
        del data["services"][name]
        data["groups"][self.group_of(name)].remove(name)
        return self._parse(data)

    def with_subset(self, service: str, subset: str, spec: object) -> Mesh:
        """Create or replace a subset, `spec` as in YAML (`{"endpoints": [...]}`). A new subset weighs 0."""
        data = self.to_dict()
        _spec(data, service)["subsets"][subset] = spec
        return self._parse(data)

    def without_subset(self, service: str, subset: str) -> Mesh:
        """Delete a subset. Fails while any route still sends it traffic: move the weight first."""
        data = self.to_dict()
        spec = _subset(data, service, subset)[0]
        for index, route in enumerate(spec["routes"]):
            weight = route["split"].pop(subset, 0)
            if weight:
                path = f"services.{service}.routes[{index}].split.{subset}"
                _fail(self.source, path, f"expected weight 0 before deleting subset {subset}", weight)
        del spec["subsets"][subset]
        return self._parse(data)

    def with_endpoint(self, service: str, subset: str, address: str) -> Mesh:
        data = self.to_dict()
        _subset(data, service, subset)[1].setdefault("endpoints", []).append(address)
        return self._parse(data)

    def without_endpoint(self, service: str, subset: str, address: str) -> Mesh:
        """Delete an endpoint, matched as the gateway compares them (`127.0.0.1:080` is `127.0.0.1:80`)."""
        data = self.to_dict()
        endpoints: list[str] = _subset(data, service, subset)[1].get("endpoints", [])
        try:
            endpoints.remove(str(parse_address(address)))
        except ValueError:  # not a valid address, or not in the list: either way there is no such endpoint
            raise NotFound(f"services.{service}.subsets.{subset}.endpoints: no endpoint {address}") from None
        return self._parse(data)

    def with_routes(self, service: str, routes: object) -> Mesh:
        data = self.to_dict()
        _spec(data, service)["routes"] = routes
        return self._parse(data)

    def _parse(self, data: dict[str, Any]) -> Mesh:
        return Mesh.parse(data, source=self.source)


def _spec(data: dict[str, Any], service: str) -> dict[str, Any]:
    spec: dict[str, Any] | None = data["services"].get(service)
    if spec is None:
        raise NotFound(f"services.{service}: no such service")
    return spec


def _subset(data: dict[str, Any], service: str, subset: str) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = _spec(data, service)
    if subset not in spec["subsets"]:
        raise NotFound(f"services.{service}.subsets.{subset}: no such subset")
    return spec, spec["subsets"][subset]


def _groups(value: object, services: list[str], source: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if value is None:  # `groups:` with every entry commented out
        value = {}
    if not isinstance(value, Mapping):
        _fail(source, "groups", "expected a mapping from each group to the services it owns", value)
    owners: dict[str, str] = {}
    groups: list[tuple[str, tuple[str, ...]]] = []
    for group, members in value.items():
        if not _is_name(group):
            _fail(source, "groups", f"expected {_NAME_RULE}", group)
        path = f"groups.{group}"
        members = [] if members is None else members
        if not isinstance(members, list | tuple):
            _fail(source, path, "expected a list of service names", members)
        for index, member in enumerate(members):
            if not isinstance(member, str) or member not in services:
                known = ", ".join(services) or "none are defined"
                _fail(source, f"{path}[{index}]", f"expected a service defined under services ({known})", member)
            if member in owners:
                _fail(source, f"{path}[{index}]", f"expected a service not owned yet (groups.{owners[member]})", member)
            owners[member] = group
        groups.append((group, tuple(members)))
    for service in services:
        if service not in owners:
            raise ConfigError(f"{source}: services.{service}: expected a group that owns it (list it under groups)")
    return tuple(groups)


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """What changed, one line per leaf, such as `services.catalog.routes[1].split.v2: 10 → 50`,
    `services.search: added` or `groups.shop: removed`."""
    lines: list[str] = []
    _diff(before, after, "", lines)
    return lines


def _diff(before: object, after: object, path: str, lines: list[str]) -> None:
    if before == after:
        return
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        for key, value in before.items():
            if key in after:
                _diff(value, after[key], _join(path, key), lines)
            else:
                lines.append(f"{_join(path, key)}: removed{_shown(value)}")
        lines.extend(f"{_join(path, key)}: added{_shown(value)}" for key, value in after.items() if key not in before)
    elif _is_records(before) and _is_records(after):  # routes: compare route by route
        for index, (old, new) in enumerate(zip(before, after, strict=False)):
            _diff(old, new, f"{path}[{index}]", lines)
        lines.extend(f"{path}[{index}]: removed" for index in range(len(after), len(before)))
        lines.extend(f"{path}[{index}]: added" for index in range(len(before), len(after)))
    else:
        lines.append(f"{path}: {_text(before)} → {_text(after)}")


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _is_records(value: object) -> TypeGuard[list[Mapping[str, Any]]]:
    return isinstance(value, list) and all(isinstance(item, Mapping) for item in value)


def _shown(value: object) -> str:
    """Small values are worth repeating after `added` / `removed`; whole sections are not."""
    return "" if isinstance(value, Mapping) or (_is_records(value) and value) else f" ({_text(value)})"


def _text(value: object) -> str:
    return value if isinstance(value, str) and value else json.dumps(value, ensure_ascii=False)
