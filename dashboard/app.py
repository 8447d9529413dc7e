"""`create_app(settings)`: the control server's ASGI app (Starlette), built from injected parts only.

Requests pass `RequestMetrics` (latency by route template), `ErrorBoundary` (unexpected exception -> logged
traceback and a one-line JSON 500) and `BodyLimit` (413), then reach the operator API (`dashboard.api.operator`), the
gateway wire protocol (`dashboard.api.gateways`), /metrics, /healthz or the OpenAPI document. Store calls are timed by
`TimedStore`. Every `DashboardError` a handler raises becomes its JSON answer in `on_dashboard_error`.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from dashboard.api.auth import Auth, BearerTokens
from dashboard.api.bodies import BodyLimit
from dashboard.api.gateways import GatewayApi
from dashboard.api.heartbeats import MAX_HEARTBEAT
from dashboard.api.openapi import OpenAPI
from dashboard.api.operator import OperatorApi
from dashboard.api.rollouts import RolloutApi
from dashboard.api.selfmetrics import DashboardMetrics, MetricsEndpoint, RequestMetrics, TimedStore
from dashboard.api.signals import SignalsApi
from dashboard.api.traces import TraceApi
from dashboard.attempts import FailedAttempts
from dashboard.errors import DashboardError, ErrorBoundary, on_dashboard_error
from dashboard.headers import SecurityHeaders
from dashboard.rollout.driver import Rollouts
from dashboard.rollout.webhooks import Webhooks
from dashboard.settings import MAX_SPAN_BATCH, Settings
from dashboard.store.model import StoreError
from dashboard.ui.pagedata import PageData
from dashboard.ui.sessions import Sessions
from dashboard.ui.views import Views


async def healthz(request: Request) -> Response:
    """---
    summary: For probes (kubelet, compose), no token needed; 200 `ok` when the config store answers a read
    tags: [meta]
    security: []
    responses:
      "200": {description: "`ok`"}
      "503": {description: one line saying why the config store cannot be read}
    """
    try:
        await request.app.state.store.current()
    except StoreError as exc:
        return PlainTextResponse(f"the config store is unavailable: {exc}\n", 503)
    return PlainTextResponse("ok\n")


def create_app(settings: Settings) -> Starlette:
    """The dashboard app. The caller owns `settings.store` (opens and closes it) and serves the app.

    >>> app = create_app(Settings(store=store, ca=ca, registry=CollectorRegistry()))
    >>> uvicorn.run(app)
    """
    if settings.ca.trust_domain != settings.trust_domain:
        raise ValueError(f"the CA is for trust domain {settings.ca.trust_domain}, not {settings.trust_domain}")
    metrics = DashboardMetrics(settings.registry)
    store = TimedStore(settings.store, metrics)
    attempts = FailedAttempts(metrics.auth_failures)  # bad tokens and logins per client address: logged, limited
    sessions = Sessions(store, attempts=attempts)  # UI: cookie sessions, the second authenticator (the API too)
    auth = Auth([BearerTokens(store, attempts), sessions])
    scrape = MetricsEndpoint(metrics, store, settings.stale_after)
    signals = SignalsApi.create(settings, store, auth)  # golden signals; serve.py runs `signals.source.run()`
    operator = OperatorApi(
        store, auth, signals.services
    )  # UI: shared with the pages, so one write lock and one commit path
    gateway_api = GatewayApi(settings, store, auth, metrics)  # UI: shared with the gateways page
    trace_api = TraceApi(settings, store, auth)  # UI: its `traces` serve the trace page too
    rollouts = Rollouts(  # serve.py runs `rollouts.run()`, the driver; the API hands actions to it
        store,
        commit=operator.commit_split,
        webhooks=Webhooks(settings.webhook_secret, settings.webhook_allow, events=metrics.rollout_events),
        examples=settings.spans.examples if settings.spans is not None else None,
        tick=settings.rollout_tick,
    )
    routes: list[BaseRoute] = [
        *operator.routes(),
        *RolloutApi(rollouts, auth).routes(),
        *gateway_api.routes(),
        *signals.routes(),
        *trace_api.routes(),  # spans: the OTLP receiver and trace lookup
        Route("/metrics", scrape.endpoint, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    openapi = OpenAPI(routes)  # the same list: the document lists itself too
    routes.append(Route("/api/v1/openapi.json", openapi.endpoint, methods=["GET"]))
    # UI: page data, and the pages, login and static files (the rollout panel acts through the API's driver)
    pages = PageData(store, operator, gateway_api, signals=signals, traces=trace_api.traces, rollouts=rollouts)
    views = Views(auth=auth, sessions=sessions, operator=operator, data=pages, rollouts=rollouts)
    routes = [*routes, *views.routes()]  # UI: a new list, so the OpenAPI document leaves the pages out
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(SecurityHeaders),  # UI: CSP, X-Frame-Options, nosniff, Referrer-Policy on every answer
            Middleware(RequestMetrics, metrics=metrics),
            Middleware(ErrorBoundary),
            Middleware(
                BodyLimit,
                limit=settings.max_body,
                paths={"/v1/traces": MAX_SPAN_BATCH, "/api/v1/heartbeat": MAX_HEARTBEAT},
            ),
        ],
        # UI: a browser asking for a page that does not exist gets a page saying so, with the navigation
        exception_handlers={DashboardError: on_dashboard_error, HTTPException: views.on_http_exception},
    )
    app.state.auth = auth  # for pages and login added by the UI, which authenticate the same way
    app.state.store = store
    app.state.signals = signals  # the sampler to run, and topology / signals for pages
    app.state.rollouts = rollouts  # the driver to run
    return app
