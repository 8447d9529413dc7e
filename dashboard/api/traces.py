"""Trace lookup by request ID or trace ID, and the recent-traces list: `Traces`, and `TraceApi` for its routes.

A request ID is found whether or not its trace was sampled. `Traces.lookup_request` asks, at the same time, every
live gateway's ring of recent hop records (`GatewayRings`: `GET /requests/{id}` on each gateway's advertised
inbound address, over mTLS with the dashboard's own mesh identity, each answer accepted only from the SPIFFE ID of
that gateway's group) and the sampled spans: the span store (`store`), or Jaeger's query API when
`--jaeger` is set (`jaeger`). Traces the rings name but the request ID did not find are read whole (so an
application's own spans in the same trace come along). Everything becomes the one span shape of
`spans.span_dict` and is merged by span ID: a sampled hop is in its gateway's ring and in the store, and shows
once, with what both say. Gateways that could not be asked are listed in the answer, never an error.

Hops come only from gateways that proved their group: the rings over mTLS, and stored spans whose sender
authenticated as the gateway group they claim. Any other stored span that claims to be a gateway's hop is still
shown, with the reason in `unverified`, but as no hop; and where a span ID has a proven copy, unproven ones add
nothing to it.

`TraceApi` serves `POST /v1/traces` (the OTLP/HTTP receiver: loopback clients need no credentials, others a token;
see `TraceApi.sender`), `GET /api/v1/traces?request_id=` or the recent list (`?service=&status=&min_duration_ms=
&limit=`), and `GET /api/v1/traces/{trace_id}`.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dashboard.api.auth import CHALLENGE, READ, Auth
from dashboard.api.operator import json_response
from dashboard.errors import HEADERS, ApiError
from dashboard.identity import MeshCA
from dashboard.settings import Settings
from dashboard.spans.jaeger import JaegerError, JaegerQuery, spans_of, summarise
from dashboard.spans.receiver import (
    LOOPBACK,
    MAX_REQUEST_BYTES,
    Sender,
    Spans,
    decode_export,
    export_response,
    span_rows,
)
from dashboard.spans.store import SpanCollector, SpanStore, TraceFilters, from_stored, integer, span_dict, text
from dashboard.store.model import GatewayRecord, Store
from gateway.tls import mesh_client_context, peer_spiffe_id
from gateway.units import is_loopback

LOOKUP_TIMEOUT = 2.0  # seconds for each gateway's answer
MAX_TRACES = 20  # traces one request ID may name
MAX_REQUEST_IDS = 4  # request IDs of one trace whose hops are asked for
REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # the request IDs gateways keep (gateway.exchange)
TRACE_ID = re.compile(r"[0-9a-f]{1,32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_FULL_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_HOP_FIELDS = frozenset(
    ("trace_id", "span_id", "parent_span_id", "start", "duration", "status", "error", "reporter", "source")
    + ("destination", "subset", "route", "endpoint", "method", "tries", "request_id")
)


@dataclass(frozen=True)
class TraceResult:
    """What a lookup found: spans oldest first, every gateway asked, and those that could not be."""

    trace_id: str | None  # the trace of the earliest span
    trace_ids: tuple[str, ...]
    request_id: str | None
    spans: tuple[dict[str, Any], ...]
    gateways_asked: tuple[dict[str, Any], ...]
    unreachable: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "trace_ids": list(self.trace_ids),
            "request_id": self.request_id,
            "spans": list(self.spans),
            "gateways_asked": list(self.gateways_asked),
            "unreachable": list(self.unreachable),
        }


@dataclass(frozen=True)
class RingAnswer:
    spans: list[dict[str, Any]]
    asked: list[dict[str, Any]]
    unreachable: list[dict[str, Any]]


def from_hop(hop: Mapping[str, Any], group: str) -> dict[str, Any] | None:
    """A hop record (`gateway.hops.hop_to_dict`) from `group`'s gateway, in the span shape; None if malformed."""
    trace_id, span_id, parent = text(hop.get("trace_id")), text(hop.get("span_id")), hop.get("parent_span_id")
    start, duration = hop.get("start"), hop.get("duration")
    if trace_id is None or not _FULL_TRACE_ID.fullmatch(trace_id) or span_id is None or not _SPAN_ID.fullmatch(span_id):
        return None
    if not isinstance(start, int | float) or not isinstance(duration, int | float):
        return None
    parent = parent if isinstance(parent, str) and _SPAN_ID.fullmatch(parent) else ""
    status, reporter = integer(hop.get("status")), text(hop.get("reporter"))
    method, route, destination = text(hop.get("method")), text(hop.get("route")), text(hop.get("destination"))
    target = text(hop.get("target"))
    endpoint = hop.get("endpoint")
    return span_dict(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        name=f"{method or 'HTTP'} {route or destination or ''}".strip(),
        kind="server" if reporter == "destination" else "client",
        service=f"meshgate-gateway-{group}",
        group=group,
        reporter=reporter,
        caller=text(hop.get("source")),
        destination=destination,
        subset=text(hop.get("subset")),
        route=route,
        endpoint=None if endpoint is None else str(endpoint),
        method=method,
        path=None if target is None else target.partition("?")[0],
        start=float(start),
        duration_ms=float(duration) * 1e3,
        status=status,
        error=text(hop.get("error")) or (str(status) if (status or 0) >= 500 else None),
        tries=integer(hop.get("tries")),
        request_id=text(hop.get("request_id")),
        attributes={f"hop.{key}": value for key, value in hop.items() if key not in _HOP_FIELDS},
        source="ring",
    )


def merge(spans: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One span per (trace, span ID), oldest first. The first proven one seen leads (a copy marked `unverified`
    only when there is none); the others fill in what it lacks, except unproven copies of a proven span."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for span in sorted(spans, key=lambda span: span["unverified"] is not None):  # stable: otherwise as given
        key = (span["trace_id"], span["span_id"])
        have = merged.get(key)
        if have is None:
            merged[key] = {**span, "found_in": list(span["found_in"])}
            continue
        if span["unverified"] is not None and have["unverified"] is None:
            continue  # anyone may post a span under a hop's ID: it changes nothing the gateway said
        for name, value in span.items():
            if have.get(name) is None:
                have[name] = value
        have["attributes"] = {**span["attributes"], **have["attributes"]}
        have["found_in"] = sorted(set(have["found_in"]) | set(span["found_in"]))
    return sorted(merged.values(), key=lambda span: (span["start"], span["span_id"]))


class GatewayRings:
    """Asks live gateways for their hop records of request IDs, over mTLS as `spiffe://<td>/dashboard`.

    The client certificate is issued from the dashboard's own CA and renewed at half its lifetime. A gateway's
    answer counts only if it came from the SPIFFE ID of that gateway's group.

    >>> answer = await GatewayRings(store, ca, stale_after=6.0).ask(["5f0c1d2e-..."])
    >>> answer.spans, answer.asked, answer.unreachable
    """

    def __init__(
        self, store: Store, ca: MeshCA, stale_after: float, timeout: float = LOOKUP_TIMEOUT, lifetime: float = 86400
    ) -> None:
        self.store = store
        self.ca = ca
        self.stale_after = stale_after
        self.timeout = timeout
        self.lifetime = lifetime
        self._context: ssl.SSLContext | None = None
        self._renew_at = 0.0

    def context(self) -> ssl.SSLContext:
        now = time.time()
        if self._context is None or now >= self._renew_at:
            key, chain, not_after = self.ca.issue(self.ca.dashboard_id, lifetime=self.lifetime)
            self._context = mesh_client_context(chain, key, self.ca.root_pem)
            self._renew_at = now + (not_after - now) / 2
        return self._context

    async def live(self) -> list[GatewayRecord]:
        """Live gateways with an advertised address, one per group and address (a restarted gateway heartbeats
        under a new instance ID while its old record is still fresh)."""
        now = time.time()
        newest: dict[tuple[str, str], GatewayRecord] = {}
        for record in await self.store.gateways():
            address = record.data.get("advertise")
            if not isinstance(address, str) or now - record.seen > self.stale_after:
                continue
            key = (record.group, address)
            if key not in newest or newest[key].seen < record.seen:
                newest[key] = record
        return [newest[key] for key in sorted(newest)]

    async def ask(self, request_ids: Collection[str]) -> RingAnswer:
        gateways = await self.live()
        answer = RingAnswer([], [], [])
        if not gateways or not request_ids:
            return answer
        async with httpx.AsyncClient(verify=self.context(), timeout=self.timeout, trust_env=False) as client:
            replies = await asyncio.gather(*(self._ask_one(client, record, request_ids) for record in gateways))
        for record, (spans, error) in zip(gateways, replies, strict=True):
            who = {"group": record.group, "instance": record.instance, "address": record.data["advertise"]}
            answer.asked.append(who)
            answer.spans.extend(spans)
            if error is not None:
                answer.unreachable.append({**who, "kind": "gateway", "error": error})
        return answer

    async def _ask_one(
        self, client: httpx.AsyncClient, record: GatewayRecord, request_ids: Collection[str]
    ) -> tuple[list[dict[str, Any]], str | None]:
        spans: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(self.timeout):  # one deadline for the gateway, however many IDs
                for request_id in request_ids:
                    hops = await self._hops(client, record, request_id)
                    spans += filter(None, (from_hop(hop, record.group) for hop in hops))
        except (httpx.HTTPError, httpx.InvalidURL, OSError, TimeoutError) as err:
            return spans, _describe(err)
        except ValueError as err:  # an answer that was not a hop lookup
            return spans, str(err)
        return spans, None

    async def _hops(self, client: httpx.AsyncClient, record: GatewayRecord, request_id: str) -> list[Any]:
        url = f"https://{record.data['advertise']}/requests/{quote(request_id, safe='')}"
        response = await client.get(url)
        stream = response.extensions.get("network_stream")
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        presented = peer_spiffe_id(ssl_object) if ssl_object is not None else None
        expected = f"spiffe://{self.ca.trust_domain}/group/{record.group}"
        if presented != expected:
            raise ValueError(f"presented {presented or 'no SPIFFE ID'}, expected {expected}")
        try:
            body = response.json()
        except ValueError:
            body = None
        hops = body.get("hops") if isinstance(body, dict) else None
        if response.status_code not in (200, 404) or not isinstance(hops, list):
            raise ValueError(f"answered {response.status_code} without hop records (does it serve the dashboard?)")
        return hops


def _describe(err: Exception) -> str:
    if isinstance(err, TimeoutError | httpx.TimeoutException):
        return "timed out"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


class Traces:
    """Trace lookup for the API and the pages.

    >>> traces = Traces(store, ca, spans=span_store, stale_after=6.0)      # or jaeger=JaegerQuery(url)
    >>> result = await traces.lookup_request("5f0c1d2e-...")                # TraceResult; .spans empty: not found
    >>> result = await traces.lookup_trace("0af7651916cd43dd8448eb211c80319c")
    >>> await traces.recent(TraceFilters(service="catalog", status="5xx"))  # newest first
    """

    def __init__(
        self,
        store: Store,
        ca: MeshCA,
        *,
        spans: SpanStore | None = None,
        jaeger: JaegerQuery | None = None,
        stale_after: float = 6.0,
        timeout: float = LOOKUP_TIMEOUT,
        cert_lifetime: float = 86400,
    ) -> None:
        self.store = store
        self.spans = spans
        self.jaeger = jaeger
        self.rings = GatewayRings(store, ca, stale_after, timeout, cert_lifetime)

    async def lookup_request(self, request_id: str) -> TraceResult:
        """Raises ValueError for a malformed request ID."""
        if not REQUEST_ID.fullmatch(request_id):
            raise ValueError(f"request_id: expected 1 to 128 letters, digits or ._:- characters, got {request_id!r}")
        (sampled, problems), ring = await asyncio.gather(
            self._sampled_by_request(request_id), self.rings.ask([request_id])
        )
        missing = {span["trace_id"] for span in ring.spans} - {span["trace_id"] for span in sampled}
        if missing:  # the rest of those traces: applications' own spans carry no request ID
            more, more_problems = await self._sampled_by_traces(missing)
            sampled, problems = sampled + more, problems + more_problems
        return _result(merge(sampled + ring.spans), request_id, ring, problems)

    async def lookup_trace(self, trace_id: str) -> TraceResult:
        """Raises ValueError for a malformed trace ID. The rings are asked for the request IDs the trace holds."""
        trace_id = trace_id.lower()
        if not TRACE_ID.fullmatch(trace_id):
            raise ValueError(f"trace_id: expected up to 32 hex digits, got {trace_id!r}")
        trace_id = trace_id.rjust(32, "0")
        sampled, problems = await self._sampled_by_traces([trace_id])
        request_ids = sorted({span["request_id"] for span in sampled if span["request_id"]})[:MAX_REQUEST_IDS]
        ring = await self.rings.ask(request_ids)
        hops = [span for span in ring.spans if span["trace_id"] == trace_id]
        spans = merge(sampled + hops)
        request_id = next((span["request_id"] for span in spans if span["request_id"]), None)
        return _result(spans, request_id, ring, problems)

    async def recent(self, filters: TraceFilters) -> list[dict[str, Any]]:
        """The most recent sampled traces passing `filters`, newest first (from Jaeger when it is configured:
        raises JaegerError when Jaeger cannot be asked)."""
        if self.jaeger is not None:
            return await self._recent_in_jaeger(filters)
        return [] if self.spans is None else await self.spans.recent(filters)

    async def _sampled_by_request(self, request_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if self.jaeger is not None:
            services = [f"meshgate-gateway-{group}" for group in await self._groups()]
            tags = {"guid:x-request-id": request_id}
            return await self._jaeger_traces([self.jaeger.search(service, tags=tags) for service in services])
        if self.spans is None:
            return [], []
        return [from_stored(span) for span in await self.spans.by_request(request_id, MAX_TRACES)], []

    async def _sampled_by_traces(self, trace_ids: Collection[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if self.jaeger is not None:
            jaeger = self.jaeger
            return await self._jaeger_traces([_as_list(jaeger.trace(trace_id)) for trace_id in trace_ids])
        if self.spans is None:
            return [], []
        return [from_stored(span) for span in await self.spans.by_traces(trace_ids)], []

    async def _jaeger_traces(self, searches: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every span of the traces the searches found, and Jaeger's failure if it failed."""
        assert self.jaeger is not None
        try:
            found = await asyncio.gather(*searches)
        except JaegerError as err:
            return [], [{"kind": "jaeger", "address": self.jaeger.url, "error": str(err)}]
        traces = {trace.get("traceID"): trace for answer in found for trace in answer}
        return [span for trace in list(traces.values())[:MAX_TRACES] for span in spans_of(trace)], []

    async def _recent_in_jaeger(self, filters: TraceFilters) -> list[dict[str, Any]]:
        assert self.jaeger is not None
        revision = await self.store.current()
        owners = {service: group for group, services in revision.mesh.get("groups", {}).items() for service in services}
        tags: dict[str, str] = {"error": "true"} if filters.status == "error" else {}
        if filters.service is None:
            searches = [f"meshgate-gateway-{group}" for group in await self._groups()]
        elif filters.service in owners:  # a mesh service: its owner's gateway records every call to it
            searches = [f"meshgate-gateway-{owners[filters.service]}"]
            tags["meshgate.service"] = filters.service
        else:
            searches = [filters.service]
        jaeger = self.jaeger
        found = await asyncio.gather(
            *(
                jaeger.search(service, tags=tags, limit=filters.limit, min_duration_ms=filters.min_duration_ms)
                for service in searches
            )
        )
        traces = {trace.get("traceID"): trace for answer in found for trace in answer}
        summaries = [summarise(spans) for trace in traces.values() if (spans := spans_of(trace))]
        if filters.status not in (None, "error"):
            low = int(str(filters.status)[0]) * 100
            summaries = [line for line in summaries if low <= (line["status"] or 0) < low + 100]
        return sorted(summaries, key=lambda line: line["start"], reverse=True)[: filters.limit]

    async def _groups(self) -> list[str]:
        """The mesh's groups, and those of live gateways (a group may run before the mesh names it)."""
        revision = await self.store.current()
        live = {record.group for record in await self.rings.live()}
        return sorted(set(revision.mesh.get("groups", {})) | live)


async def _as_list(trace: Any) -> list[dict[str, Any]]:
    found = await trace
    return [] if found is None else [found]


def _result(spans: list[dict[str, Any]], request_id: str | None, ring: RingAnswer, problems: list[Any]) -> TraceResult:
    trace_ids = tuple(dict.fromkeys(span["trace_id"] for span in spans))
    return TraceResult(
        trace_id=trace_ids[0] if trace_ids else None,
        trace_ids=trace_ids,
        request_id=request_id,
        spans=tuple(spans),
        gateways_asked=tuple(ring.asked),
        unreachable=tuple(ring.unreachable + problems),
    )


def not_found(result: TraceResult, what: str) -> str:
    """The one-line reason for a 404: what was searched and what could not be."""
    asked = len(result.gateways_asked)
    reason = f"no spans or hop records for {what}: asked {asked} gateway{'s' if asked != 1 else ''}"
    if result.unreachable:
        reason += "; could not ask " + ", ".join(
            f"{problem.get('group') or problem['kind']} ({problem['address']}: {problem['error']})"
            for problem in result.unreachable
        )
    return reason


class TraceApi:
    """`POST /v1/traces` (OTLP/HTTP: from loopback without credentials, like a collector; from elsewhere with a
    token) and trace lookups for viewers and operators.

    >>> api = TraceApi(settings, store, auth); routes = api.routes(); api.traces   # the `Traces` it serves
    """

    def __init__(self, settings: Settings, store: Store, auth: Auth) -> None:
        self.auth = auth
        self.spans = settings.spans
        self.traces = Traces(
            store,
            settings.ca,
            spans=settings.spans,
            jaeger=JaegerQuery(settings.jaeger) if settings.jaeger else None,
            stale_after=settings.stale_after,
            cert_lifetime=settings.cert_lifetime,
        )
        if settings.spans is not None:
            settings.registry.register(SpanCollector(settings.spans))

    def routes(self) -> list[Route]:
        return [
            Route("/v1/traces", self.receive, methods=["POST"]),
            Route("/api/v1/traces", self.find, methods=["GET"]),
            Route("/api/v1/traces/{trace_id}", self.get_trace, methods=["GET"]),
        ]

    async def receive(self, request: Request) -> Response:
        """---
        summary: Receive spans (OTLP/HTTP, protobuf or JSON, optionally gzip); beyond loopback a token is needed
        description: >-
          Loopback clients may send without credentials. Others send `Authorization: Bearer` with a gateway's
          join token (joined gateways do) or a viewer or operator token. A span that claims a gateway group
          (`meshgate.group`, a `service.name` of `meshgate-gateway-<group>`, or `meshgate.reporter`) is a hop only
          when sent with that group's join token; otherwise it is stored marked `unverified`, with the reason.
        tags: [traces]
        security: [{}, {bearer: []}]
        requestBody:
          required: true
          content:
            application/x-protobuf: {schema: {type: string, format: binary}}
            application/json: {schema: {type: object}}
        responses:
          "200": {description: "ExportTraceServiceResponse, with partial_success when spans were not taken"}
          "400": {$ref: "#/components/responses/Error"}
          "404": {$ref: "#/components/responses/Error"}
          "413": {$ref: "#/components/responses/Error"}
          "415": {$ref: "#/components/responses/Error"}
        """
        spans = self.spans
        if spans is None:
            raise ApiError(404, "this dashboard keeps no spans (traces are read from Jaeger): export OTLP there")
        sender = await self.sender(request)  # before the body: strangers' bodies are never decoded
        body = await request.body()
        headers = request.headers

        def decode() -> tuple[Spans, str]:
            message, media = decode_export(body, headers.get("content-type"), headers.get("content-encoding"))
            return span_rows(message, sender), media

        batch, media = await asyncio.to_thread(decode)  # ~17 µs a span: not on the event loop
        taken = spans.offer(batch.rows, batch.invalid, batch.oversize)
        dropped = len(batch.rows) - taken
        reasons = [f"{batch.invalid} with invalid trace or span ids"] if batch.invalid else []
        if batch.oversize:
            reasons.append(f"{batch.oversize} past the {MAX_REQUEST_BYTES >> 20} MiB one request may store")
        if dropped:
            reasons.append(f"{dropped} dropped: the span writer is behind")
        rejected = batch.invalid + batch.oversize + dropped
        return Response(export_response(media, rejected, "; ".join(reasons)), media_type=media, headers=HEADERS)

    async def sender(self, request: Request) -> Sender:
        """Who sends these spans. Loopback clients (the demo, a local collector) may send none; anyone else needs a
        token: a gateway's join token (its spans are then its group's hops) or a viewer or operator token.
        Raises ApiError(401) with the reason."""
        client = request.client.host if request.client else ""
        if "authorization" not in request.headers:
            if is_loopback(client):
                return LOOPBACK
            raise ApiError(
                401,
                f"spans from {client or 'an unknown address'} (beyond loopback) need Authorization: Bearer with a "
                "gateway's join token, or a viewer or operator token",
                CHALLENGE,
            )
        principal = await self.auth.principal(request)
        if principal.role == "gateway":
            return Sender(principal.group, f"the join token {principal.name} of group {principal.group}")
        return Sender(None, f"the {principal.role} token {principal.name}")

    async def find(self, request: Request) -> Response:
        """---
        summary: Look a request ID up (sampled or not), or list recent sampled traces
        tags: [traces]
        parameters:
          - {name: request_id, in: query, schema: {type: string}, description: an x-request-id a client got back}
          - {name: service, in: query, schema: {type: string}}
          - {name: status, in: query, schema: {type: string, enum: [2xx, 3xx, 4xx, 5xx, error]}}
          - {name: min_duration_ms, in: query, schema: {type: number, minimum: 0}}
          - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 500, default: 50}}
        responses:
          "200":
            description: >-
              with request_id: `{trace_id, trace_ids, request_id, spans, gateways_asked, unreachable}`;
              without: `{traces: [{trace_id, request_id, name, service, destination, start, duration_ms, status,
              error, spans}]}`
          "400": {$ref: "#/components/responses/Error"}
          "403": {$ref: "#/components/responses/Error"}
          "404": {$ref: "#/components/responses/Error"}
          "502": {$ref: "#/components/responses/Error"}
        """
        await self.auth.require(request, READ)
        params = request.query_params
        request_id = params.get("request_id")
        try:
            if request_id is None:
                return json_response({"traces": await self.traces.recent(TraceFilters.parse(params))})
            if any(params.get(name) for name in ("service", "status", "min_duration_ms")):
                raise ValueError("request_id: give it alone (filters are for the recent-traces list)")
            result = await self.traces.lookup_request(request_id)
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        if not result.spans:
            raise ApiError(404, not_found(result, f"request ID {request_id}"))
        return json_response(result.to_dict())

    async def get_trace(self, request: Request) -> Response:
        """---
        summary: One trace by its ID, with the hop records of its request IDs
        tags: [traces]
        parameters: [{name: trace_id, in: path, required: true, schema: {type: string}, description: 32 hex digits}]
        responses:
          "200": {description: "`{trace_id, trace_ids, request_id, spans, gateways_asked, unreachable}`"}
          "400": {$ref: "#/components/responses/Error"}
          "403": {$ref: "#/components/responses/Error"}
          "404": {$ref: "#/components/responses/Error"}
        """
        await self.auth.require(request, READ)
        trace_id = request.path_params["trace_id"]
        try:
            result = await self.traces.lookup_trace(trace_id)
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        if not result.spans:
            raise ApiError(404, not_found(result, f"trace {trace_id}"))
        return json_response(result.to_dict())
