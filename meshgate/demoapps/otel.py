"""OpenTelemetry for the demo services: a tracer provider exporting OTLP/HTTP, server spans continued from the
incoming `traceparent` (HTTP headers or gRPC metadata), and calls made through httpx or grpcio with the context
injected by hand (W3C trace context, the SDK's own propagator), so the services' spans sit between the gateways'
hops in one trace.

The request's `x-request-id` is kept in a context variable: it is recorded on every span (as
`http.request.header.x-request-id`, which the dashboard indexes) and passed on to the next call, so the gateways
of every hop file the request under the same ID.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import httpx
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

EXPORT_DELAY_MS = 500  # spans reach the dashboard within a second: the trace page is live
EXPORT_TIMEOUT = 2.0  # seconds; a dashboard that is down costs a dropped batch, never a stuck service

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_propagator = TraceContextTextMapPropagator()


def tracer_provider(service: str, version: str, endpoint: str | None) -> TracerProvider:
    """The provider for one service process; spans are exported only when `endpoint` is set."""
    resource = Resource.create(
        {"service.name": service, "service.version": version, "service.namespace": "meshgate-demo"}
    )
    provider = TracerProvider(resource=resource)
    if endpoint:
        exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS))
    return provider


class Tracing:
    """Spans for one service: `server()` around a request's handling, `call()` for each request it makes.

    >>> tracing = Tracing(provider.get_tracer("storefront"))
    >>> with tracing.server("GET /products/{id}", request.method, request.url.path, request.headers) as span:
    ...     answer = await tracing.call(client, "catalog", "GET", "/products/3")
    """

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    @contextmanager
    def server(self, name: str, method: str, path: str, headers: Mapping[str, str]) -> Iterator[Span]:
        parent = _propagator.extract(carrier=dict(headers))
        request_id = headers.get("x-request-id")
        token = _request_id.set(request_id)
        attributes: dict[str, str | list[str]] = {"http.request.method": method, "url.path": path}
        if request_id:
            attributes["http.request.header.x-request-id"] = [request_id]
        try:
            with self.tracer.start_as_current_span(
                name, context=parent, kind=SpanKind.SERVER, attributes=attributes
            ) as span:
                yield span
        finally:
            _request_id.reset(token)

    @contextmanager
    def client(self, name: str, service: str, attributes: dict[str, str]) -> Iterator[tuple[Span, dict[str, str]]]:
        """A client span for a call to `service`, current inside the block, and the headers (or gRPC metadata)
        the call carries: the request's `x-request-id` and the span's `traceparent`."""
        headers: dict[str, str] = {}
        request_id = _request_id.get()
        recorded: dict[str, str | list[str]] = {**attributes, "server.address": service}
        if request_id:
            headers["x-request-id"] = request_id  # trusted on the outbound listener: one ID for every hop
            recorded["http.request.header.x-request-id"] = [request_id]
        with self.tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=recorded) as span:
            _propagator.inject(headers)  # the client span is current: it becomes the next hop's parent
            yield span, headers

    async def call(
        self, client: httpx.AsyncClient, service: str, method: str, path: str, body: object = None
    ) -> httpx.Response:
        """Call `service` through the gateway `client` points at (the outbound listener routes by Host)."""
        attributes = {"http.request.method": method, "url.path": path}
        with self.client(f"{method} {service}", service, attributes) as (span, headers):
            try:
                answer = await client.request(method, path, headers={"host": service, **headers}, json=body)
            except httpx.HTTPError as err:
                span.set_attribute("error.type", type(err).__name__)
                span.set_status(Status(StatusCode.ERROR, str(err) or type(err).__name__))
                raise
            record_status(span, answer.status_code)
            return answer


def record_status(span: Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_attribute("error.type", str(status))
        span.set_status(Status(StatusCode.ERROR))


def record_grpc_status(span: Span, code: int, name: str) -> None:
    """A gRPC call's outcome on its span (client or server side): any code but OK (0) is an error here."""
    span.set_attribute("rpc.grpc.status_code", code)
    if code != 0:
        span.set_attribute("error.type", name)
        span.set_status(Status(StatusCode.ERROR))
