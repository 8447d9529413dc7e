"""The OpenAPI document at /api/v1/openapi.json, built by Starlette's `SchemaGenerator` from endpoint docstrings.

Each endpoint's docstring ends in its OpenAPI operation after `---`. `responses: write` is shorthand for the
answers every config write can give, expanded here so the contract is written once.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.schemas import SchemaGenerator

from dashboard.api.heartbeats import (
    MAX_ADDRESS,
    MAX_HEARTBEAT,
    MAX_LISTENERS,
    MAX_STATS_ENTRIES,
    MAX_TEXT,
    STATS_LISTS,
    STATS_NUMBERS,
)
from dashboard.errors import HEADERS

_ERROR = {"$ref": "#/components/responses/Error"}
WRITE_RESPONSES: dict[str, Any] = {
    "200": {
        "description": "`{version, changed}`: the new config version (or the current one when nothing changed)",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Version"}}},
    },
    **{code: _ERROR for code in ("400", "401", "403", "404", "409", "413", "422")},
}


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


_REASON = {"type": "string", "maxLength": 500, "description": "why: recorded in the history and the audit log"}
_WEIGHTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}, "example": {"v1": 90}}
_ANY_OBJECT = {"type": "object"}

BASE: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "meshgate dashboard", "version": "1"},
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "mgo_/mgv_/mgj_ token"}},
        "responses": {
            "Error": {
                "description": "`{error}`: one line saying what was wrong",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
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
            "reason": {"name": "reason", "in": "query", "schema": _REASON},
            "limit": {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
            "before": {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 0}},
        },
        "schemas": {
            "Error": _body({"error": {"type": "string"}}, ["error"]),
            "Version": _body({"version": {"type": "integer"}, "changed": {"type": "boolean"}}, ["version"]),
            "WeightsBody": _body({"weights": _WEIGHTS, "reason": _REASON}, ["weights"]),
            "ServiceBody": _body(
                {"group": {"type": "string"}, "spec": _ANY_OBJECT, "reason": _REASON}, ["group", "spec"]
            ),
            "RoutesBody": _body({"routes": {"type": "array", "items": _ANY_OBJECT}, "reason": _REASON}, ["routes"]),
            "SubsetBody": _body(  # one of endpoints, dns, srv or etcd
                {
                    "endpoints": {"type": "array", "items": {"type": "string"}},
                    "dns": {"type": "string", "description": "host:port; its A and AAAA records"},
                    "srv": {"type": "string", "description": "a name whose SRV records give hosts and ports"},
                    "etcd": {"type": "string", "description": "a key prefix; its keys are named host:port"},
                    "reason": _REASON,
                },
                [],
            ),
            "EndpointBody": _body({"address": {"type": "string"}, "reason": _REASON}, ["address"]),
            "ConfigBody": _body({"mesh": _ANY_OBJECT, "reason": _REASON}, ["mesh"]),
            "RevertBody": _body({"version": {"type": "integer", "minimum": 1}, "reason": _REASON}, ["version"]),
            "JoinBody": _body({"group": {"type": "string"}, "csr": {"type": "string"}}, ["group", "csr"]),
            "Heartbeat": {
                "type": "object",
                "description": f"At most {MAX_HEARTBEAT} bytes. Other fields are dropped (newer gateways send more).",
                "required": ["instance", "group"],
                "properties": {
                    "instance": {"type": "string", "format": "uuid"},
                    "group": {"type": "string"},
                    "meshgate_version": {"type": "string", "maxLength": MAX_TEXT},
                    "config_version": {"type": "integer", "minimum": 0},
                    "etag": {"type": "string", "maxLength": MAX_TEXT},
                    "started": {"type": ["number", "null"]},
                    "advertise": {"type": ["string", "null"], "maxLength": MAX_ADDRESS},
                    "listeners": {
                        "type": "object",
                        "maxProperties": MAX_LISTENERS,
                        "additionalProperties": {"type": "string", "maxLength": MAX_ADDRESS},
                    },
                    "cert_not_after": {"type": ["number", "null"]},
                    "stats": {
                        "type": "object",
                        "properties": {
                            **{key: {"type": "array", "maxItems": MAX_STATS_ENTRIES} for key in STATS_LISTS},
                            **{key: {"type": "number"} for key in STATS_NUMBERS},
                        },
                    },
                },
            },
        },
    },
}


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
                    if operation.get("responses") == "write":
                        operation["responses"] = WRITE_RESPONSES
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
