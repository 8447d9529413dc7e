"""The OpenAPI document at /api/v1/openapi.json, built by Starlette's `SchemaGenerator` from endpoint docstrings.

Each endpoint's docstring ends in its OpenAPI operation after `---`. `responses: write` is shorthand for the
answers every config write can give, and every operation that needs a token gets its 401, both added here so each
is written once. The body schemas are generated from the msgspec Structs that validate the bodies
(`dashboard.api.bodies`, `dashboard.api.heartbeats`), so the document and the checks cannot disagree.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.schemas import SchemaGenerator

from dashboard.api.bodies import OPERATOR_BODIES, Reason
from dashboard.api.heartbeats import MAX_HEARTBEAT, Heartbeat
from dashboard.errors import HEADERS

REF = "#/components/schemas/{name}"
_ERROR = {"$ref": "#/components/responses/Error"}
WRITE_RESPONSES: dict[str, Any] = {
    "200": {
        "description": "`{version, changed}`: the new config version (or the current one when nothing changed)",
        "content": {"application/json": {"schema": {"$ref": REF.format(name="Version")}}},
    },
    **{code: _ERROR for code in ("400", "401", "403", "404", "409", "413", "422")},
}


class Error(msgspec.Struct, forbid_unknown_fields=True):
    """Every error answer: one line saying what was wrong."""

    error: str


class Version(msgspec.Struct, forbid_unknown_fields=True):
    """The config version a write left live, and whether the write changed it."""

    version: int
    changed: bool = False


def schemas() -> dict[str, Any]:
    """The components for every body and answer, from the Structs that validate them (one definition each)."""
    _, components = msgspec.json.schema_components([Error, Version, *OPERATOR_BODIES, Heartbeat], ref_template=REF)
    components["Heartbeat"]["description"] = (
        f"At most {MAX_HEARTBEAT} bytes. " + components["Heartbeat"].get("description", "")
    ).strip()
    return components


def _schema_of(annotation: object) -> dict[str, Any]:
    (schema,), _ = msgspec.json.schema_components([annotation], ref_template=REF)
    return dict(schema)


BASE: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "meshgate dashboard", "version": "1"},
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "mgo_/mgv_/mgj_ token"}},
        "responses": {
            "Error": {
                "description": "`{error}`: one line saying what was wrong",
                "content": {"application/json": {"schema": {"$ref": REF.format(name="Error")}}},
            }
        },
        "parameters": {
            "name": {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
            "subset": {"name": "subset", "in": "path", "required": True, "schema": {"type": "string"}},
            "address": {
                "name": "address",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": "host:port",
            },
            "version": {"name": "version", "in": "path", "required": True, "schema": {"type": "integer"}},
            "if_match": {
                "name": "If-Match",
                "in": "header",
                "schema": {"type": "string"},
                "description": "the config version the edit is based on; 409 if it is no longer current",
            },
            "reason": {"name": "reason", "in": "query", "schema": _schema_of(Reason)},
            "limit": {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
            "before": {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 0}},
        },
        "schemas": schemas(),
    },
}


def _expand(operation: dict[str, Any]) -> None:
    """`responses: write` becomes the write answers; every operation that needs a token can answer 401."""
    if operation.get("responses") == "write":
        operation["responses"] = WRITE_RESPONSES
    elif operation.get("security") != []:
        operation["responses"] = {**operation.get("responses", {}), "401": _ERROR}


class OpenAPI:
    """Serves the document for `routes`, generated once on first request (routes do not change)."""

    def __init__(self, routes: list[BaseRoute]) -> None:
        self.routes = routes
        self.document: dict[str, Any] | None = None

    def schema(self) -> dict[str, Any]:
        if self.document is None:
            document = SchemaGenerator(BASE).get_schema(self.routes)
            for operations in document["paths"].values():
                for operation in operations.values():
                    _expand(operation)
            self.document = document
        return self.document

    async def endpoint(self, request: Request) -> Response:
        """---
        summary: This document
        tags: [meta]
        security: []
        responses:
          "200": {description: OpenAPI 3.1}
        """
        return JSONResponse(self.schema(), headers=HEADERS)
