"""The operator API under /api/v1: services, the whole config and its history, the audit log, groups.

Reads need a viewer or operator token; writes need an operator. Every write is a read-modify-write of the mesh
document: read the current revision, apply one `Mesh` edit (which validates the whole result), and commit it with
`expect_version`, so a concurrent edit is never overwritten. `If-Match: <version>` turns a lost race into 409;
without it the edit is retried on the newer revision. An edit that changes nothing commits nothing. Any error
leaves the store untouched, because the commit is the last step and is atomic.

The docstring of each endpoint ends in its OpenAPI operation (after `---`), read by `dashboard.api.openapi`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dashboard.api.auth import READ, WRITE, Auth, Principal
from dashboard.api.bodies import (
    ConfigBody,
    EndpointBody,
    RevertBody,
    RoutesBody,
    ServiceBody,
    SubsetBody,
    WeightsBody,
    optional_reason,
    read_body,
)
from dashboard.errors import HEADERS, ApiError, DashboardError, log
from dashboard.mesh import Mesh, NotFound
from dashboard.store.model import AuditEntry, Revision, Store, VersionConflict
from gateway.config import ConfigError

COMMIT_ATTEMPTS = 5  # read-modify-write tries without If-Match (racing other replicas) before a 409
MAX_LIMIT = 500
_DIGITS = re.compile(r"[0-9]{1,18}")  # fits SQLite's and etcd's 64-bit integers
_IF_MATCH = re.compile(r'\s*(?:W/)?"?([0-9]{1,18})"?\s*')

Edit = Callable[[Mesh], Mesh]


def json_response(content: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(content, status, headers={**HEADERS, **(headers or {})})


def version_etag(version: int) -> dict[str, str]:
    return {"etag": f'"{version}"'}


def if_match(request: Request) -> int | None:
    header = request.headers.get("if-match")
    if header is None or header.strip() == "*":
        return None
    match = _IF_MATCH.fullmatch(header)
    if match is None:
        raise ApiError(400, f"If-Match: expected a config version such as 42, got {header!r}")
    return int(match[1])


def int_param(request: Request, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not _DIGITS.fullmatch(text) or int(text) < low or (high is not None and int(text) > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ApiError(400, f"{name}: expected an integer {bounds}, got {text!r}")
    return int(text)


def revision_summary(revision: Revision) -> dict[str, object]:
    return {
        "version": revision.version,
        "author": revision.author,
        "reason": revision.reason,
        "time": revision.time,
        "diff": list(revision.diff),
    }


def service_summary(mesh: Mesh, name: str) -> dict[str, object]:
    service = mesh.service(name)
    assert service is not None
    return {
        "name": name,
        "group": mesh.group_of(name),
        "subsets": {subset.name: [str(endpoint) for endpoint in subset.endpoints] for subset in service.subsets},
        "weights": dict(service.routes[-1].split),
        "routes": [route.to_dict() for route in service.routes],
    }


@dataclass(frozen=True)
class Committed:
    """The outcome of a write: the config version now live, and whether this write made it."""

    version: int
    changed: bool

    def response(self) -> Response:
        return json_response({"version": self.version, "changed": self.changed}, 200, version_etag(self.version))


class OperatorApi:
    """The operator endpoints, bound to one store and one `Auth`; `routes()` lists them for the app."""

    def __init__(
        self, store: Store, auth: Auth, signals: Callable[[], Awaitable[dict[str, dict[str, Any]]]] | None = None
    ) -> None:
        self.store = store
        self.auth = auth
        self.signals = signals  # golden signals per service and subset over the last 5 minutes
        self._parsed: tuple[int, Mesh] | None = None  # revisions never change, so the last parse is reusable
        # One write at a time in this process, so edits here never race each other; a race with another
        # dashboard replica (etcd) is caught by expect_version and the edit redone.
        self._writing = asyncio.Lock()

    def routes(self) -> list[Route]:
        prefix = "/api/v1"
        return [
            Route(f"{prefix}/services", self.list_services, methods=["GET"]),
            Route(f"{prefix}/services/{{name}}", self.get_service, methods=["GET"]),
            Route(f"{prefix}/services/{{name}}", self.put_service, methods=["PUT"]),
            Route(f"{prefix}/services/{{name}}", self.delete_service, methods=["DELETE"]),
            Route(f"{prefix}/services/{{name}}/weights", self.put_weights, methods=["PUT"]),
            Route(f"{prefix}/services/{{name}}/routes", self.put_routes, methods=["PUT"]),
            Route(f"{prefix}/services/{{name}}/subsets/{{subset}}", self.put_subset, methods=["PUT"]),
            Route(f"{prefix}/services/{{name}}/subsets/{{subset}}", self.delete_subset, methods=["DELETE"]),
            Route(f"{prefix}/services/{{name}}/subsets/{{subset}}/endpoints", self.add_endpoint, methods=["POST"]),
            Route(
                f"{prefix}/services/{{name}}/subsets/{{subset}}/endpoints/{{address}}",
                self.delete_endpoint,
                methods=["DELETE"],
            ),
            Route(f"{prefix}/config", self.get_config, methods=["GET"]),
            Route(f"{prefix}/config", self.put_config, methods=["PUT"]),
            Route(f"{prefix}/config/history", self.history, methods=["GET"]),
            Route(f"{prefix}/config/versions/{{version}}", self.get_version, methods=["GET"]),
            Route(f"{prefix}/config/revert", self.revert, methods=["POST"]),
            Route(f"{prefix}/audit", self.audit, methods=["GET"]),
        ]

    def mesh_of(self, revision: Revision) -> Mesh:
        if self._parsed is None or self._parsed[0] != revision.version:
            self._parsed = (revision.version, Mesh.parse(revision.mesh, source="mesh"))
        return self._parsed[1]

    async def _read(self, request: Request) -> tuple[Revision, Mesh]:
        await self.auth.require(request, READ)
        revision = await self.store.current()
        return revision, self.mesh_of(revision)

    async def commit(
        self, principal: Principal, request: Request, edit: Edit, *, action: str, target: str, reason: str
    ) -> Response:
        return (await self.apply(principal, request, edit, action=action, target=target, reason=reason)).response()

    async def apply(
        self, principal: Principal, request: Request, edit: Edit, *, action: str, target: str, reason: str
    ) -> Committed:
        """Edit the current mesh and commit it as a new version: the one write path of the API and the pages."""
        expected = if_match(request)
        async with self._writing:
            return await self._commit(principal.who, edit, expected, action=action, target=target, reason=reason)

    async def set_weights(
        self, principal: Principal, request: Request, name: str, weights: object, reason: str
    ) -> Committed:
        if not isinstance(weights, dict):
            raise ApiError(422, f'weights: expected an object such as {{"v1": 90, "v2": 10}}, got {weights!r}')
        return await self.apply(
            principal,
            request,
            lambda mesh: mesh.with_weights(name, weights),
            action="weights.set",
            target=f"services/{name}/routes",
            reason=reason,
        )

    async def commit_split(self, who: str, name: str, split: Mapping[str, int], action: str, reason: str) -> int:
        """Set `name`'s weights for a writer that is not a request (a rollout's steps); the config version live."""
        async with self._writing:
            committed = await self._commit(
                who,
                lambda mesh: mesh.with_weights(name, dict(split)),
                None,
                action=action,
                target=f"services/{name}/routes",
                reason=reason,
            )
        return committed.version

    async def _commit(
        self, who: str, edit: Edit, expected: int | None, *, action: str, target: str, reason: str
    ) -> Committed:
        for _ in range(COMMIT_ATTEMPTS):
            current = await self.store.current()
            if expected is not None and current.version != expected:
                raise ApiError(409, f"version conflict: If-Match is {expected}, the config is at {current.version}")
            before = self.mesh_of(current)
            try:
                after = edit(before).to_dict()
            except NotFound as err:
                raise ApiError(404, str(err)) from None
            except ConfigError as err:
                raise ApiError(422, str(err)) from None
            if after == before.to_dict():
                return Committed(current.version, changed=False)
            try:
                revision = await self.store.commit(
                    after,
                    author=who,
                    reason=reason,
                    action=action,
                    target=target,
                    expect_version=current.version,
                )
            except VersionConflict:
                if expected is not None:
                    raise ApiError(409, f"version conflict: the config changed after version {expected}") from None
                continue  # someone committed between our read and our write: redo the edit on their version
            return Committed(revision.version, changed=True)
        raise ApiError(409, "the config kept changing while this edit was applied; try again")

    # Services

    async def list_services(self, request: Request) -> Response:
        """---
        summary: List services with their owning group, subsets, endpoints and live weights
        tags: [services]
        responses:
          "200": {description: "`{version, services: [{name, group, subsets, weights, routes, signals}]}`; signals are
            `{rps, error_rate, p99_ms, subsets: {...}}` over the last 5 minutes"}
          "403": {$ref: "#/components/responses/Error"}
        """
        revision, mesh = await self._read(request)
        golden = await self._signals()
        services = [
            {**service_summary(mesh, service.name), "signals": golden.get(service.name)} for service in mesh.services
        ]
        return json_response(
            {"version": revision.version, "services": services}, headers=version_etag(revision.version)
        )

    async def get_service(self, request: Request) -> Response:
        """---
        summary: One service, with its full spec as in gateway YAML
        tags: [services]
        parameters: [{$ref: "#/components/parameters/name"}]
        responses:
          "200": {description: "`{name, group, version, subsets, weights, routes, signals, spec}`"}
          "403": {$ref: "#/components/responses/Error"}
          "404": {$ref: "#/components/responses/Error"}
        """
        revision, mesh = await self._read(request)
        name = request.path_params["name"]
        service = mesh.service(name)
        if service is None:
            raise ApiError(404, f"services.{name}: no such service")
        golden = (await self._signals()).get(name)
        detail = {
            **service_summary(mesh, name),
            "version": revision.version,
            "signals": golden,
            "spec": service.to_dict(),
        }
        return json_response(detail, headers=version_etag(revision.version))

    async def _signals(self) -> dict[str, dict[str, Any]]:
        """Golden signals for the listing; when their source (Prometheus) is down, the config is still listed."""
        if self.signals is None:
            return {}
        try:
            return await self.signals()
        except DashboardError as err:
            log.warning("services listed without golden signals: %s", err)
            return {}

    async def put_service(self, request: Request) -> Response:
        """---
        summary: Create or replace a service and set its owning group (created if new)
        tags: [services]
        parameters: [{$ref: "#/components/parameters/name"}, {$ref: "#/components/parameters/if_match"}]
        requestBody:
          required: true
          content: {application/json: {schema: {$ref: "#/components/schemas/ServiceBody"}}}
        responses: write
        """
        principal = await self.auth.require(request, WRITE)
        name = request.path_params["name"]
        body = await read_body(request, ServiceBody)
        return await self.commit(
            principal,
            request,
            lambda mesh: mesh.with_service(name, body.group, body.spec),
            action="service.put",
            target=f"services/{name}",
            reason=body.reason,
        )

    async def delete_service(self, request: Request) -> Response:
        """---
        summary: Delete a service (its group stays)
        tags: [services]
        parameters:
          - {$ref: "#/components/parameters/name"}
          - {$ref: "#/components/parameters/if_match"}
          - {$ref: "#/components/parameters/reason"}
        responses: write
        """
        principal = await self.auth.require(request, WRITE)
        name = request.path_params["name"]
        return await self.commit(
            principal,
            request,
            lambda mesh: mesh.without_service(name),
            action="service.delete",
            target=f"services/{name}",
            reason=await optional_reason(request),
        )

    async def put_weights(self, request: Request) -> Response:
        """---
        summary: Set the split of a service's catch-all route (canary weights)
        description: >-
          Weights are non-negative integers (not booleans or floats) naming known subsets and summing to 100;
          omitted subsets weigh 0. Nothing changes on any error.
        tags: [services]
        parameters: [{$ref: "#/components/parameters/name"}, {$ref: "#/components/parameters/if_match"}]
        requestBody:
          required: true
          content: {application/json: {schema: {$ref: "#/components/schemas/WeightsBody"}}}
        responses: write
        """
        principal = await self.auth.require(request, WRITE)
        name = request.path_params["name"]
        body = await read_body(request, WeightsBody)
        return (await self.set_weights(principal, request, name, body.weights, body.reason)).response()

    async def put_routes(self, request: Request) -> Response:
        """---
        summary: Replace a service's routes (first match wins; the last one is the catch-all)
        tags: [services]
        parameters: [{$ref: "#/components/parameters/name"}, {$ref: "#/components/parameters/if_match"}]
        requestBody:
          required: true
          content: {application/json: {schema: {$ref: "#/components/schemas/RoutesBody"}}}
        responses: write
        """
        principal = await self.auth.require(request, WRITE)
        name = request.path_params["name"]
        body = await read_body(request, RoutesBody)
        return await self.commit(
            principal,
            request,
            lambda mesh: mesh.with_routes(name, body.routes),
            action="routes.set",
            target=f"services/{name}/routes",
            reason=body.reason,
        )

    async def put_subset(self, request: Request) -> Response:
        """---
        summary: Create or replace a subset; a new subset weighs 0 until a split names it
        tags: [services]
        parameters:
          - {$ref: "#/components/parameters/name"}
          - {$ref: "#/components/parameters/subset"}
          - {$ref: "#/components/parameters/if_match"}
        requestBody:
          required: true
          content: {application/json: {schema: {$ref: "#/components/schemas/SubsetBody"}}}
        responses: write
        """
        principal = await self.auth.require(request, WRITE)
        name, subset = request.path_params["name"], request.path_params["subset"]
        body = await read_body(request, SubsetBody)
        return await self.commit(
            principal,
            request,
            lambda mesh: mesh.with_subset(name, subset, body.spec()),
            action="subset.put",
            target=f"services/{name}/subsets/{subset}",
            reason=body.reason,
        )

    async def delete_subset(self, request: Request) -> Response:
        """---
        summary: Delete a subset; refused (422) while any route still sends it traffic
        tags: [services]
        parameters:
          - {$ref: "#/components/parameters/name"}
          - {$ref: "#/components/parameters/subset"}
          - {$ref: "#/components/parameters/if_match"}
          - {$ref: "#/components/parameters/reason"}
        responses: write
        """
        principal = await self.auth.require(request, WRITE)
        name, subset = request.path_params["name"], request.path_params["subset"]
        return await self.commit(
            principal,
            request,
            lambda mesh: mesh.without_subset(name, subset),
            action="subset.delete",
            target=f"services/{name}/subsets/{subset}",
            reason=await optional_reason(request),
        )

    async def add_endpoint(self, request: Request) -> Response:
        """---
        summary: Add an endpoint to a subset (adding one already there changes nothing)
        tags: [services]
        parameters:
          - {$ref: "#/components/parameters/name"}
          - {$ref: "#/components/parameters/subset"}
          - {$ref: "#/components/parameters/if_match"}
        requestBody:
          required: true
          content: {application/json: {schema: {$ref: "#/components/schemas/EndpointBody"}}}
        responses: write
        """
        principal = await self.auth.require(request, WRITE)
        name, subset = request.path_params["name"], request.path_params["subset"]
        body = await read_body(request, EndpointBody)
        address = body.address

        def edit(mesh: Mesh) -> Mesh:
            return mesh if _has_endpoint(mesh, name, subset, address) else mesh.with_endpoint(name, subset, address)

        return await self.commit(
            principal,
            request,
            edit,
            action="endpoint.add",
            target=f"services/{name}/subsets/{subset}",
            reason=body.reason,
        )

    async def delete_endpoint(self, request: Request) -> Response:
        """---
        summary: Remove an endpoint from a subset
        tags: [services]
        parameters:
          - {$ref: "#/components/parameters/name"}
          - {$ref: "#/components/parameters/subset"}
          - {$ref: "#/components/parameters/address"}
          - {$ref: "#/components/parameters/if_match"}
          - {$ref: "#/components/parameters/reason"}
        responses: write
        """
        principal = await self.auth.require(request, WRITE)
        params = request.path_params
        name, subset, address = params["name"], params["subset"], params["address"]
        return await self.commit(
            principal,
            request,
            lambda mesh: mesh.without_endpoint(name, subset, address),
            action="endpoint.delete",
            target=f"services/{name}/subsets/{subset}",
            reason=await optional_reason(request),
        )

    # The whole config

    async def get_config(self, request: Request) -> Response:
        """---
        summary: The current mesh document and its version
        tags: [config]
        responses:
          "200": {description: "`{version, mesh}`; the ETag header carries the version"}
          "403": {$ref: "#/components/responses/Error"}
        """
        revision, mesh = await self._read(request)
        content = {"version": revision.version, "mesh": mesh.to_dict()}
        return json_response(content, headers=version_etag(revision.version))

    async def put_config(self, request: Request) -> Response:
        """---
        summary: Replace the whole mesh document (what `meshgate apply` sends)
        tags: [config]
        parameters: [{$ref: "#/components/parameters/if_match"}]
        requestBody:
          required: true
          content: {application/json: {schema: {$ref: "#/components/schemas/ConfigBody"}}}
        responses: write
        """
        principal = await self.auth.require(request, WRITE)
        body = await read_body(request, ConfigBody)
        return await self.commit(
            principal,
            request,
            lambda _: Mesh.parse(body.mesh, source="mesh"),
            action="config.put",
            target="mesh",
            reason=body.reason,
        )

    async def history(self, request: Request) -> Response:
        """---
        summary: Config versions, newest first, each with its author, reason and diff
        tags: [config]
        parameters: [{$ref: "#/components/parameters/limit"}, {$ref: "#/components/parameters/before"}]
        responses:
          "200": {description: "`[{version, author, reason, time, diff}]`"}
          "400": {$ref: "#/components/responses/Error"}
          "403": {$ref: "#/components/responses/Error"}
        """
        await self.auth.require(request, READ)
        limit = int_param(request, "limit", 50, 1, MAX_LIMIT)
        assert limit is not None
        revisions = await self.store.history(limit, int_param(request, "before", None, 0))
        return json_response([revision_summary(revision) for revision in revisions])

    async def get_version(self, request: Request) -> Response:
        """---
        summary: One config version, with its mesh document
        tags: [config]
        parameters: [{$ref: "#/components/parameters/version"}]
        responses:
          "200": {description: "`{version, author, reason, time, diff, mesh}`"}
          "403": {$ref: "#/components/responses/Error"}
          "404": {$ref: "#/components/responses/Error"}
        """
        await self.auth.require(request, READ)
        text = request.path_params["version"]
        if not _DIGITS.fullmatch(text):
            raise ApiError(404, f"no config version {text}")
        version = int(text)
        revision = await self.store.get(version)
        if revision is None:
            raise ApiError(404, f"no config version {version}")
        return json_response({**revision_summary(revision), "mesh": revision.mesh})

    async def revert(self, request: Request) -> Response:
        """---
        summary: Make a new version whose mesh equals an older version's
        tags: [config]
        parameters: [{$ref: "#/components/parameters/if_match"}]
        requestBody:
          required: true
          content: {application/json: {schema: {$ref: "#/components/schemas/RevertBody"}}}
        responses: write
        """
        principal = await self.auth.require(request, WRITE)
        body = await read_body(request, RevertBody)
        version = body.version
        old = await self.store.get(version)
        if old is None:
            raise ApiError(404, f"no config version {version}")
        reason = body.reason or f"revert to version {version}"
        return await self.commit(
            principal,
            request,
            lambda _: Mesh.parse(old.mesh, source=f"version {version}"),
            action="config.revert",
            target="mesh",
            reason=reason,
        )

    async def audit(self, request: Request) -> Response:
        """---
        summary: The audit log, newest first - who changed what, before and after, why and when
        tags: [audit]
        parameters: [{$ref: "#/components/parameters/limit"}, {$ref: "#/components/parameters/before"}]
        responses:
          "200": {description: "`[{id, time, who, action, target, before, after, reason, version}]`"}
          "400": {$ref: "#/components/responses/Error"}
          "403": {$ref: "#/components/responses/Error"}
        """
        await self.auth.require(request, READ)
        limit = int_param(request, "limit", 100, 1, MAX_LIMIT)
        assert limit is not None
        entries = await self.store.audit(limit, int_param(request, "before", None, 0))
        return json_response([_entry(entry) for entry in entries])


def _has_endpoint(mesh: Mesh, name: str, subset: str, address: str) -> bool:
    service = mesh.service(name)
    if service is None:
        return False
    found = next((item for item in service.subsets if item.name == subset), None)
    return found is not None and address in {str(endpoint) for endpoint in found.endpoints}


def _entry(entry: AuditEntry) -> dict[str, object]:
    return {
        "id": entry.id,
        "time": entry.time,
        "who": entry.who,
        "action": entry.action,
        "target": entry.target,
        "before": entry.before,
        "after": entry.after,
        "reason": entry.reason,
        "version": entry.version,
    }
