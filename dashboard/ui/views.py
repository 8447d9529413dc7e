"""The operator UI: Jinja2 pages and htmx partials, all rendered on the server from the same data as the API.

Pages (`/topology`, `/services`, `/services/{name}`, `/traces`, `/gateways`) each have a `/ui/...` partial that
htmx polls every `refresh` seconds and swaps by element id, so focus (htmx restores it by id), scroll and what the
operator selected survive each update; the form controls live outside the polled parts. Reads need a viewer or
operator, like the API (`auth.READ`); writes need an operator and, for a cookie session, its CSRF token
(`dashboard.ui.sessions`). A viewer's pages carry no write controls, and a write they send anyway gets 403.

Canary changes do not validate anything here: they go through `OperatorApi.commit` with the same `Mesh` edit,
action and target as `PUT /api/v1/services/{name}/weights`, so the same rules, the same one-writer lock and the
same audit entry apply. The form only turns text fields into numbers. Rollouts likewise: the start form becomes the
API's `RolloutBody` and spec (`dashboard.api.rollouts.spec_of`), and every control calls `Rollouts.start` or
`Rollouts.act` as the API does. The rollout panel polls on its own (`/ui/services/{name}/rollout`); its controls sit
outside the polled part and are fetched again when the rollout's phase changes (the poll's answer fires
`meshgate-rollout` then), so typing a reason is not interrupted every refresh.

Templates autoescape everything (service names are restricted, but span attributes, hosts and paths are not).
Data comes from `PageData` (`dashboard.ui.pagedata`): the store, the gateways' view, golden signals and traces.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import jinja2
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from dashboard.api.auth import READ, WRITE, Auth, Principal
from dashboard.api.bodies import RolloutBody, convert_body, operator_reason
from dashboard.api.operator import OperatorApi, int_param
from dashboard.api.rollouts import spec_of
from dashboard.attempts import client_address
from dashboard.errors import ApiError, DashboardError, on_http_exception, one_line
from dashboard.rollout.driver import Rollouts
from dashboard.ui.charts import clock, fmt
from dashboard.ui.pagedata import WINDOWS, PageData, short_id
from dashboard.ui.sessions import CSRF_HEADER, LoginError, Sessions, form_field

TEMPLATES = Path(__file__).resolve().parent / "templates"
HTMX_FILE = "htmx-2.0.11.min.js"
HTMX_CONFIG = {
    "allowEval": False,
    "allowScriptTags": False,
    "includeIndicatorStyles": False,
    "selfRequestsOnly": True,
    "historyCacheSize": 0,
    "defaultSettleDelay": 0,
    # Swap error answers too: a 422 from a canary change shows its one-line reason where the result goes.
    "responseHandling": [{"code": "204", "swap": False}, {"code": "...", "swap": True}],
}
LOGIN_COOKIE = "meshgate_login"  # pre-login CSRF: the login form must come from our own page
REFRESH = 2.0
NOT_PAGES = ("/api/", "/v1/", "/ui/", "/static/", "/metrics", "/healthz")  # their 404s stay JSON (or plain)
_WEIGHT = re.compile(r"-?[0-9]{1,9}")
_STEP = re.compile(r"[0-9]{1,3}")
_SECONDS = re.compile(r"[0-9]{1,7}(\.[0-9]{1,3})?")
Handler = Callable[[Request], Awaitable[Response]]


def static_dir() -> Path:
    """`static/` packaged next to the modules (a wheel), else the repository's top-level `static/`."""
    package = Path(__file__).resolve().parents[1]  # dashboard/
    packaged = package / "static"
    return packaged if packaged.is_dir() else package.parent / "static"


def _ago(ts: object) -> str:
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return "–"
    seconds = time.time() - ts
    if seconds < 0:
        return "in " + _span(-seconds)
    return _span(seconds) + " ago"


def _span(seconds: float) -> str:
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def node_name(node_id: object) -> str:
    """`group:shop` -> shop, `service:catalog` -> catalog, `unknown:source` -> unknown, `external` -> external."""
    kind, _, name = str(node_id).partition(":")
    return kind if kind == "unknown" or not name else name


def environment(directory: Path = TEMPLATES) -> jinja2.Environment:
    """Autoescape on for every template (HTML and SVG partials alike); undefined names fail loudly."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters.update(fmt=fmt, clock=clock, ago=_ago, span=_span, short=short_id, urlq=lambda text: quote(text, ""))
    env.filters["node_name"] = node_name
    env.globals["urlencode"] = urlencode
    return env


def local_path(text: str | None) -> str:
    """Where to go after login: a path on this site only (never `//host` or `/\\host`)."""
    if not text or not text.startswith("/") or text.startswith(("//", "/\\")) or any(c in text for c in "\r\n\\"):
        return "/topology"
    return text


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def weights_from_form(fields: Mapping[str, str], subsets: list[str]) -> dict[str, object]:
    """The weights a canary form asks for. `percent` with `primary` and `canary` shifts that share to the canary;
    otherwise `w.<subset>` fields are exact weights (blank = omitted = 0). Text that is not an integer is passed
    on as text, so the one validation (`Mesh.with_weights`) reports it."""
    if "percent" in fields:
        percent, primary, canary = fields["percent"], fields.get("primary", ""), fields.get("canary", "")
        if not re.fullmatch(r"[0-9]{1,3}", percent) or int(percent) > 100:
            raise ApiError(422, f"percent: expected 0 to 100, got {percent!r}")
        if primary == canary:
            raise ApiError(422, f"canary: expected a subset other than the primary ({primary!r})")
        return {primary: 100 - int(percent), canary: int(percent)}
    weights: dict[str, object] = {}
    for subset in subsets:
        text = fields.get(f"w.{subset}", "").strip()
        if text:
            weights[subset] = int(text) if _WEIGHT.fullmatch(text) else text
    return weights


def rollout_from_form(fields: Mapping[str, str]) -> RolloutBody:
    """The start form as the API's body: `steps` "5, 10, 25, 50" and `interval` seconds become numbers (text that is
    not one is passed on, so the body's own validation names the field), `approval` is a checkbox."""
    data: dict[str, object] = {"canary": fields.get("canary", ""), "reason": fields.get("reason", "")}
    if fields.get("primary"):
        data["primary"] = fields["primary"]
    steps = [part.strip() for part in fields.get("steps", "").replace(";", ",").split(",") if part.strip()]
    if steps:
        data["steps"] = [int(part) if _STEP.fullmatch(part) else part for part in steps]
    interval = fields.get("interval", "").strip()
    if interval:
        data["interval"] = float(interval) if _SECONDS.fullmatch(interval) else interval
    data["approval"] = fields.get("approval") in ("on", "true", "1")
    return convert_body(data, RolloutBody)


def describe(weights: Mapping[str, object]) -> str:
    return ", ".join(f"{subset} {weight} %" for subset, weight in weights.items())


class Views:
    """The pages, partials, login and static files; `routes()` lists them for the app.

    >>> views = Views(auth=auth, sessions=sessions, operator=operator_api, data=PageData(...))
    >>> app = Starlette(routes=[*operator_api.routes(), *views.routes()], middleware=[Middleware(SecurityHeaders)])
    """

    def __init__(
        self,
        *,
        auth: Auth,
        sessions: Sessions,
        operator: OperatorApi,
        data: PageData,
        rollouts: Rollouts | None = None,
        refresh: float = REFRESH,
        templates: Path = TEMPLATES,
        static: Path | None = None,
    ) -> None:
        self.auth = auth
        self.sessions = sessions
        self.operator = operator
        self.data = data
        self.rollouts = rollouts
        self.refresh = refresh
        self.env = environment(templates)
        self.static = static or static_dir()

    def routes(self) -> list[BaseRoute]:
        page = self._page
        return [
            Route("/", self.home, methods=["GET"]),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", page(self.logout), methods=["POST"]),
            Route("/topology", page(self.topology), methods=["GET"]),
            Route("/ui/topology", page(self.topology_live), methods=["GET"]),
            Route("/services", page(self.services), methods=["GET"]),
            Route("/ui/services", page(self.services_live), methods=["GET"]),
            Route("/services/{name}", page(self.service), methods=["GET"]),
            Route("/ui/services/{name}", page(self.service_live), methods=["GET"]),
            Route("/services/{name}/weights", page(self.set_weights), methods=["POST"]),
            Route("/services/{name}/revert", page(self.revert_weights), methods=["POST"]),
            Route("/ui/services/{name}/rollout", page(self.rollout_live), methods=["GET"]),
            Route("/ui/services/{name}/rollout/controls", page(self.rollout_controls), methods=["GET"]),
            Route("/services/{name}/rollout", page(self.start_rollout), methods=["POST"]),
            Route("/services/{name}/rollout/{action}", page(self.act_on_rollout), methods=["POST"]),
            Route("/traces", page(self.traces), methods=["GET"]),
            Route("/gateways", page(self.gateways), methods=["GET"]),
            Route("/ui/gateways", page(self.gateways_live), methods=["GET"]),
            Mount("/static", StaticFiles(directory=self.static), name="static"),
        ]

    # Rendering

    def render(
        self,
        request: Request,
        name: str,
        context: Mapping[str, Any],
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> HTMLResponse:
        session = self.sessions.current(request)
        csrf = session.csrf if session is not None else ""
        principal = context.get("principal")
        full = {
            "request": request,
            "principal": principal,
            "can_write": principal is not None and principal.role in WRITE,
            "csrf": csrf,
            "csrf_headers": json.dumps({CSRF_HEADER: csrf}) if csrf else "",
            "htmx_config": json.dumps(HTMX_CONFIG, separators=(",", ":")),
            "htmx_file": HTMX_FILE,
            "refresh": self.refresh,
            "section": "",
            "now": time.time(),
            **context,
        }
        body = self.env.get_template(name).render(full)
        return HTMLResponse(body, status, headers={"cache-control": "no-store", **(headers or {})})

    def _page(self, handler: Handler) -> Handler:
        """Errors as pages (or as a fragment for htmx); no credential: to the login page."""

        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except DashboardError as err:
                return self._error(request, err.status, err.reason, err.headers)

        wrapped.__name__ = handler.__name__
        wrapped.__doc__ = handler.__doc__
        return wrapped

    def _error(self, request: Request, status: int, reason: str, headers: Mapping[str, str]) -> Response:
        if status == 401:
            if is_htmx(request):  # back to the page the browser shows, not to the partial it polled
                shown = urlsplit(request.headers.get("hx-current-url", ""))
                target = "/login?" + urlencode(
                    {"next": local_path(shown.path + (f"?{shown.query}" * bool(shown.query)))}
                )
                return Response(status_code=401, headers={"hx-redirect": target, "cache-control": "no-store"})
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse("/login?" + urlencode({"next": here if request.method == "GET" else "/"}), 303)
        extra = {key: value for key, value in headers.items() if key.lower() != "www-authenticate"}
        if is_htmx(request):
            context = {"ok": False, "message": one_line(reason)}
            return self.render(request, "partials/flash.html", context, status, extra)
        return self.error_page(request, status, reason, extra)

    def error_page(
        self, request: Request, status: int, reason: str, headers: Mapping[str, str] | None = None
    ) -> Response:
        """A page saying what went wrong, with the navigation when the browser is logged in."""
        session = self.sessions.current(request)
        principal = session.principal if session is not None else None
        context = {"status": status, "reason": one_line(reason), "principal": principal}
        return self.render(request, "error.html", context, status, headers)

    async def on_http_exception(self, request: Request, exc: Exception) -> Response:
        """Starlette's own 404/405 (no route): a page for a browser asking for a page, else the API's JSON."""
        assert isinstance(exc, HTTPException)
        accepts_html = "text/html" in request.headers.get("accept", "")
        if accepts_html and request.method in ("GET", "HEAD") and not request.url.path.startswith(NOT_PAGES):
            reason = {404: f"no page at {request.url.path}"}.get(exc.status_code, str(exc.detail))
            return self.error_page(request, exc.status_code, reason, dict(exc.headers or {}))
        return await on_http_exception(request, exc)

    async def _principal(self, request: Request, roles: frozenset[str] = READ) -> Principal:
        return await self.auth.require(request, roles)

    def _window(self, request: Request) -> tuple[str, float]:
        name = request.query_params.get("window", "5m")
        if name not in WINDOWS:
            raise ApiError(400, f"window: expected one of {', '.join(WINDOWS)}, got {name!r}")
        return name, WINDOWS[name]

    async def _form(self, request: Request) -> dict[str, str]:
        body = await request.body()
        fields: dict[str, str] = {}
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "expected a UTF-8 form body") from None
        for key, value in parse_qsl(text, keep_blank_values=True, max_num_fields=200):
            fields.setdefault(key, value)
        return fields

    # Login

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/topology", 303)

    async def login_form(self, request: Request, error: str = "", status: int = 200, next_path: str = "") -> Response:
        nonce = secrets.token_urlsafe(24)
        next_path = local_path(next_path or request.query_params.get("next"))
        response = self.render(request, "login.html", {"login_csrf": nonce, "next": next_path, "error": error}, status)
        https = request.url.scheme == "https"
        response.set_cookie(
            LOGIN_COOKIE, nonce, max_age=3600, path="/login", secure=https, httponly=True, samesite="strict"
        )
        return response

    async def login(self, request: Request) -> Response:
        """A token pasted into the login form becomes a session cookie; the form's nonce must match its cookie."""
        body = await request.body()
        sent = form_field(body, "login_csrf") or ""
        expected = request.cookies.get(LOGIN_COOKIE, "")
        next_path = local_path(form_field(body, "next"))
        if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            return await self.login_form(request, "the login form expired: try again", 403, next_path)
        try:
            session_id, _ = await self.sessions.login(form_field(body, "token") or "", client_address(request))
        except LoginError as err:
            refused = await self.login_form(request, err.reason, err.status, next_path)
            refused.headers.update(err.headers)
            return refused
        response = RedirectResponse(next_path, 303)
        self.sessions.set_cookie(response, request, session_id)
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(self, request: Request) -> Response:
        await self._principal(request)  # a session's CSRF token is checked here: no forced logouts
        self.sessions.logout(request)
        response = RedirectResponse("/login", 303)
        self.sessions.clear_cookie(response, request)
        return response

    # Topology

    async def _topology_context(self, request: Request) -> dict[str, Any]:
        principal = await self._principal(request)
        window, seconds = self._window(request)
        node, edge = request.query_params.get("node", ""), request.query_params.get("edge", "")
        graph = await self.data.topology(seconds, selected_node=node, selected_edge=edge)
        details = await self.data.details(seconds, node=node, edge=edge)
        return {
            "principal": principal,
            "section": "topology",
            "window": window,
            "windows": list(WINDOWS),
            "graph": graph,
            "details": details,
            "node": node,
            "edge": edge,
        }

    async def topology(self, request: Request) -> Response:
        return self.render(request, "topology.html", await self._topology_context(request))

    async def topology_live(self, request: Request) -> Response:
        return self.render(request, "partials/topology_live.html", await self._topology_context(request))

    # Services

    async def _services_context(self, request: Request) -> dict[str, Any]:
        principal = await self._principal(request)
        window, seconds = self._window(request)
        return {
            "principal": principal,
            "section": "services",
            "window": window,
            "windows": list(WINDOWS),
            "services": await self.data.services(seconds),
        }

    async def services(self, request: Request) -> Response:
        return self.render(request, "services.html", await self._services_context(request))

    async def services_live(self, request: Request) -> Response:
        return self.render(request, "partials/services_live.html", await self._services_context(request))

    async def _service_context(self, request: Request) -> dict[str, Any]:
        principal = await self._principal(request)
        window, seconds = self._window(request)
        service = await self.data.service(request.path_params["name"], seconds)
        return {
            "principal": principal,
            "section": "services",
            "window": window,
            "windows": list(WINDOWS),
            "service": service,
            "rollout": await self.data.rollout(service["name"], self._older(request)),
        }

    def _older(self, request: Request) -> int | None:
        return int_param(request, "older", None, 0)  # decisions numbered below it

    async def service(self, request: Request) -> Response:
        return self.render(request, "service.html", await self._service_context(request))

    async def service_live(self, request: Request) -> Response:
        return self.render(request, "partials/service_live.html", await self._service_context(request))

    async def set_weights(self, request: Request) -> Response:
        """Canary buttons, promote, roll back and exact weights: one form, one code path (the API's)."""
        principal = await self._principal(request, WRITE)
        name = request.path_params["name"]
        fields = await self._form(request)
        subsets = await self.data.subsets_of(name)
        weights = weights_from_form(fields, subsets)
        reason = operator_reason(fields.get("reason", ""))
        return await self._commit_weights(request, principal, name, weights, reason)

    async def revert_weights(self, request: Request) -> Response:
        """One-click revert of a timeline marker: the weights from before that version, through the same path."""
        principal = await self._principal(request, WRITE)
        name = request.path_params["name"]
        fields = await self._form(request)
        text = fields.get("version", "")
        if not re.fullmatch(r"[0-9]{1,18}", text):
            raise ApiError(422, f"version: expected a config version, got {text!r}")
        weights = await self.data.weights_before(name, int(text))
        reason = operator_reason(fields.get("reason", "")) or f"revert the weights change of version {text}"
        return await self._commit_weights(request, principal, name, weights, reason)

    async def _commit_weights(
        self, request: Request, principal: Principal, name: str, weights: Mapping[str, object], reason: str
    ) -> Response:
        committed = await self.operator.set_weights(principal, request, name, dict(weights), reason)
        if not is_htmx(request):
            return RedirectResponse(f"/services/{quote(name, '')}", 303)
        message = (
            f"{name}: {describe(weights)} (config version {committed.version})"
            if committed.changed
            else f"{name} already has these weights (config version {committed.version})"
        )
        # The exact-weights form is outside the polled part (so typing is never interrupted): send its new values.
        current = await self.data.weights_of(name)
        service = {"name": name, "subsets": [{"name": subset, "weight": weight} for subset, weight in current.items()]}
        context = {"ok": True, "message": message, "principal": principal, "service": service, "oob": True}
        return self.render(request, "partials/changed.html", context, headers={"hx-trigger": "meshgate-changed"})

    # Rollouts

    async def _rollout_context(self, request: Request, log: bool = True) -> dict[str, Any]:
        principal = await self._principal(request)
        name = request.path_params["name"]
        rollout = await self.data.rollout(name, self._older(request), log)
        if rollout is None:
            raise ApiError(404, "rollouts are not run by this dashboard")
        return {"principal": principal, "section": "services", "rollout": rollout}

    async def rollout_live(self, request: Request) -> Response:
        """The polled panel; when the rollout's phase differs from the one the page shows (`shown`), the answer
        fires `meshgate-rollout` so the controls are fetched again."""
        context = await self._rollout_context(request)
        shown = request.query_params.get("shown")
        changed = shown is not None and shown != context["rollout"]["key"]
        headers = {"hx-trigger": "meshgate-rollout"} if changed else None
        return self.render(request, "partials/rollout_live.html", context, headers=headers)

    async def rollout_controls(self, request: Request) -> Response:
        return self.render(request, "partials/rollout_controls.html", await self._rollout_context(request, log=False))

    def _driver(self) -> Rollouts:
        if self.rollouts is None:
            raise ApiError(404, "rollouts are not run by this dashboard")
        return self.rollouts

    async def start_rollout(self, request: Request) -> Response:
        """The start form: the API's body, spec and `Rollouts.start`, so the same rules and the same audit entry."""
        principal = await self._principal(request, WRITE)
        name = request.path_params["name"]
        driver = self._driver()
        body = rollout_from_form(await self._form(request))
        rollout = await driver.start(name, spec_of(body, await self.data.weights_of(name)), principal.who, body.reason)
        return self._rollout_done(request, name, f"{name}: rollout {rollout.id} started; {rollout.message}")

    async def act_on_rollout(self, request: Request) -> Response:
        """Pause, resume, promote, abort or approve: `Rollouts.act`, the API's path."""
        principal = await self._principal(request, WRITE)
        name, action = request.path_params["name"], request.path_params["action"]
        driver = self._driver()
        reason = operator_reason((await self._form(request)).get("reason", ""))
        rollout = await driver.act(name, action, principal.who, reason)
        return self._rollout_done(request, name, f"{name}: rollout {rollout.id} {rollout.phase}; {rollout.message}")

    def _rollout_done(self, request: Request, name: str, message: str) -> Response:
        if not is_htmx(request):
            return RedirectResponse(f"/services/{quote(name, '')}#rollout", 303)
        context = {"ok": True, "message": message}
        return self.render(request, "partials/flash.html", context, headers={"hx-trigger": "meshgate-changed"})

    # Traces

    async def traces(self, request: Request) -> Response:
        principal = await self._principal(request)
        params = request.query_params
        query = params.get("q", "").strip()
        filters = {key: params.get(key, "").strip() for key in ("service", "status", "min_ms")}
        lookup = await self.data.trace(query) if query else None
        recent, problem = await self.data.recent_traces(filters)
        context = {
            "principal": principal,
            "section": "traces",
            "query": query,
            "filters": filters,
            "lookup": lookup,
            "recent": recent,
            "recent_problem": problem,
            "services": await self.data.service_names(),
        }
        status = 404 if lookup is not None and not lookup["found"] else 200
        return self.render(request, "traces.html", context, status)

    # Gateways

    async def _gateways_context(self, request: Request) -> dict[str, Any]:
        principal = await self._principal(request)
        return {"principal": principal, "section": "gateways", "gateways": await self.data.gateways()}

    async def gateways(self, request: Request) -> Response:
        return self.render(request, "gateways.html", await self._gateways_context(request))

    async def gateways_live(self, request: Request) -> Response:
        return self.render(request, "partials/gateways_live.html", await self._gateways_context(request))
