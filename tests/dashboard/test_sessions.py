"""Cookie sessions: login with a pasted token, the cookie's attributes, expiry, CSRF on every unsafe method, and
the session as a second `Authenticator` that the JSON API accepts too. Unit tests drive `Sessions` with a real
SQLite store and a hand-set clock; the rest talks HTTP to a real dashboard (uvicorn on loopback)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dashboard.api.auth import Auth, BearerTokens, new_token
from dashboard.attempts import FAILURE_BURST, FAILURE_REFILL, FailedAttempts
from dashboard.errors import ApiError
from dashboard.headers import SecurityHeaders
from dashboard.store import open_store
from dashboard.store.model import Store
from dashboard.ui.sessions import COOKIE, SECURE_COOKIE, LoginError, Sessions, form_field
from tests.conftest import FakeClock
from tests.dashboard.dashboards import Dashboard

# Unit: Sessions over a real store


def request(
    method: str = "GET",
    cookie: str | None = None,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    scheme: str = "http",
) -> Request:
    raw = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    if cookie is not None:
        raw.append((b"cookie", f"{COOKIE}={cookie}".encode()))
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": method,
        "path": "/",
        "headers": raw,
        "query_string": b"",
        "scheme": scheme,
        "server": ("127.0.0.1", 80),
    }
    return Request(scope, receive)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = open_store(str(tmp_path / "data"))
    yield opened
    await opened.close()


async def token(store: Store, role: str, group: str | None = None) -> str:
    secret, record = new_token(role, group, name=f"{role}-alice")
    await store.add_token(record)
    return secret


@pytest.mark.anyio
async def test_a_login_makes_a_session_whose_principal_is_the_tokens(store: Store) -> None:
    sessions = Sessions(store)
    session_id, session = await sessions.login(await token(store, "operator"))
    assert len(session_id) >= 43 and session.key != session_id  # the table keys on a digest, not the cookie
    principal = await sessions.authenticate(request(cookie=session_id))
    assert principal is not None and principal.role == "operator" and principal.via == "session"
    assert principal.who.startswith("operator-alice (session ")
    assert await sessions.authenticate(request()) is None  # no cookie: not this authenticator's business
    other_id, other = await sessions.login(await token(store, "viewer"))
    assert other_id != session_id and other.csrf != session.csrf and len(sessions) == 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("pasted", "reason"),
    [
        ("", "paste"),
        ("password123", "not a meshgate token"),
        ("mgo_" + "A" * 43, "unknown token"),
        ("mgo_<script>", "not a meshgate token"),
    ],
)
async def test_logins_refused(store: Store, pasted: str, reason: str) -> None:
    with pytest.raises(LoginError, match=reason):
        await Sessions(store).login(pasted)


@pytest.mark.anyio
async def test_a_gateway_join_token_cannot_log_in(store: Store) -> None:
    with pytest.raises(LoginError, match="gateway token cannot log in"):
        await Sessions(store).login(await token(store, "gateway", "shop"))


@pytest.mark.anyio
async def test_sessions_end_after_idle_time_and_after_their_lifetime(store: Store) -> None:
    clock = FakeClock(1_000_000.0)
    sessions = Sessions(store, lifetime=100.0, idle=30.0, clock=clock)
    secret = await token(store, "viewer")
    idle_id, _ = await sessions.login(secret)
    busy_id, _ = await sessions.login(secret)
    for _ in range(4):  # a request every 20 s keeps a session alive past the idle time ...
        clock.now += 20
        assert await sessions.authenticate(request(cookie=busy_id)) is not None
    with pytest.raises(ApiError) as ended:  # ... the other one was idle for 80 s
        await sessions.authenticate(request(cookie=idle_id))
    assert ended.value.status == 401 and "log in again" in ended.value.reason
    clock.now += 21  # 101 s after login: past the lifetime however busy
    with pytest.raises(ApiError):
        await sessions.authenticate(request(cookie=busy_id))
    assert len(sessions) == 0


@pytest.mark.anyio
async def test_an_unknown_cookie_is_refused_not_ignored(store: Store) -> None:
    with pytest.raises(ApiError) as refused:
        await Sessions(store).authenticate(request(cookie="forged-or-from-before-a-restart"))
    assert refused.value.status == 401


@pytest.mark.anyio
async def test_unsafe_methods_need_the_csrf_token_in_a_header_or_form_field(store: Store) -> None:
    sessions = Sessions(store)
    session_id, session = await sessions.login(await token(store, "operator"))
    form = {"content-type": "application/x-www-form-urlencoded"}
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        with pytest.raises(ApiError) as refused:
            await sessions.authenticate(request(method, session_id))
        assert refused.value.status == 403 and "CSRF" in refused.value.reason
        wrong = request(method, session_id, {"x-csrf-token": session.csrf[:-1] + "x"})
        with pytest.raises(ApiError):
            await sessions.authenticate(wrong)
        assert await sessions.authenticate(request(method, session_id, {"x-csrf-token": session.csrf}))
    by_form = request("POST", session_id, form, f"percent=50&csrf={session.csrf}".encode())
    assert await sessions.authenticate(by_form) is not None
    assert await by_form.body() == f"percent=50&csrf={session.csrf}".encode()  # still there for the endpoint
    json_body = request(
        "POST", session_id, {"content-type": "application/json"}, f'{{"csrf": "{session.csrf}"}}'.encode()
    )
    with pytest.raises(ApiError):  # only a form field or the header count
        await sessions.authenticate(json_body)
    for method in ("GET", "HEAD", "OPTIONS"):
        assert await sessions.authenticate(request(method, session_id)) is not None


@pytest.mark.anyio
async def test_the_session_table_is_bounded_oldest_login_first(store: Store) -> None:
    sessions = Sessions(store, max_sessions=3)
    secret = await token(store, "viewer")
    ids = [(await sessions.login(secret))[0] for _ in range(5)]
    assert len(sessions) == 3
    with pytest.raises(ApiError):
        await sessions.authenticate(request(cookie=ids[0]))
    assert await sessions.authenticate(request(cookie=ids[-1])) is not None


@pytest.mark.anyio
async def test_one_token_logging_in_again_and_again_logs_only_itself_out(store: Store) -> None:
    """A viewer cannot empty the table of operators' sessions: past `per_principal`, its own oldest go."""
    sessions = Sessions(store, max_sessions=5, per_principal=3)
    operator, _ = await sessions.login(await token(store, "operator"))
    viewer = await token(store, "viewer")
    ids = [(await sessions.login(viewer))[0] for _ in range(10)]
    assert len(sessions) == 4
    assert (await sessions.authenticate(request(cookie=operator))) is not None
    for ended in ids[:-3]:
        with pytest.raises(ApiError, match="ended"):
            await sessions.authenticate(request(cookie=ended))
    for kept in ids[-3:]:
        assert await sessions.authenticate(request(cookie=kept)) is not None


@pytest.mark.anyio
async def test_a_full_table_takes_from_the_principal_holding_the_most(store: Store) -> None:
    sessions = Sessions(store, max_sessions=4, per_principal=10)
    first, _ = await sessions.login(await token(store, "operator"))
    viewer = await token(store, "viewer")
    ids = [(await sessions.login(viewer))[0] for _ in range(3)]
    second, _ = await sessions.login(await token(store, "operator"))
    assert len(sessions) == 4
    assert await sessions.authenticate(request(cookie=first)) is not None, "the oldest login, but not the greediest"
    assert await sessions.authenticate(request(cookie=second)) is not None
    with pytest.raises(ApiError, match="ended"):
        await sessions.authenticate(request(cookie=ids[0]))


@pytest.mark.anyio
async def test_failed_logins_past_the_budget_are_429_and_a_valid_login_still_works(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    counter = Counter("failures", "failed attempts", ["via", "answer"], registry=CollectorRegistry())
    sessions = Sessions(store, attempts=FailedAttempts(counter, burst=2, refill=30.0))
    for pasted in ("mgo_" + "B" * 43, "not a token"):
        with pytest.raises(LoginError) as caught:
            await sessions.login(pasted, "10.0.0.7")
        assert caught.value.retry_after == 0
    with pytest.raises(LoginError, match="too many failed logins from your address: try again in 30s") as caught:
        await sessions.login("mgo_" + "C" * 43, "10.0.0.7")
    assert caught.value.retry_after == 30
    with pytest.raises(LoginError, match="paste"):  # an empty form is no attempt at a credential
        await sessions.login("", "10.0.0.7")
    assert (await sessions.login(await token(store, "viewer"), "10.0.0.7"))[1].principal.role == "viewer"
    assert counter.labels("login", "401")._value.get() == 2 and counter.labels("login", "429")._value.get() == 1
    assert "failed login from 10.0.0.7: unknown token" in caplog.text and "B" * 43 not in caplog.text


@pytest.mark.anyio
async def test_bearer_tokens_come_first_and_sessions_second_in_auth(store: Store) -> None:
    sessions = Sessions(store)
    auth = Auth([BearerTokens(store), sessions])
    session_id, _ = await sessions.login(await token(store, "viewer"))
    operator = await token(store, "operator")
    both = request(cookie=session_id, headers={"authorization": f"Bearer {operator}"})
    assert (await auth.principal(both)).role == "operator"
    assert (await auth.principal(request(cookie=session_id))).role == "viewer"


def test_cookie_attributes_on_http_and_https() -> None:
    sessions = Sessions(store=None)  # type: ignore[arg-type]  # cookies need no store
    plain, secure = Response(), Response()
    sessions.set_cookie(plain, request(), "abc")
    sessions.set_cookie(secure, request(scheme="https"), "abc")
    plain_cookie, secure_cookie = plain.headers["set-cookie"], secure.headers["set-cookie"]
    assert plain_cookie.startswith(f"{COOKIE}=abc;")
    for attribute in ("HttpOnly", "Path=/", "SameSite=strict", "Max-Age=43200"):
        assert attribute in plain_cookie and attribute in secure_cookie
    assert "Secure" not in plain_cookie
    assert secure_cookie.startswith(f"{SECURE_COOKIE}=abc;") and "Secure" in secure_cookie
    assert "Domain" not in secure_cookie  # the __Host- prefix forbids one


@pytest.mark.anyio
async def test_security_headers_and_hsts_only_over_https() -> None:
    async def page(request: Request) -> Response:
        return Response("hi", headers={"x-frame-options": "SAMEORIGIN"})

    transport = httpx.ASGITransport(Starlette(routes=[Route("/", page)], middleware=[Middleware(SecurityHeaders)]))
    async with httpx.AsyncClient(transport=transport, base_url="http://dashboard.example") as client:
        plain = await client.get("/")
        secure = await client.get("https://dashboard.example/")
    assert plain.headers["content-security-policy"].startswith("default-src 'self'")
    assert plain.headers["x-content-type-options"] == "nosniff" and "strict-transport-security" not in plain.headers
    assert plain.headers["x-frame-options"] == "SAMEORIGIN"  # what the app set itself wins
    assert secure.headers["strict-transport-security"] == "max-age=31536000"


def test_form_field_reads_urlencoded_bodies_only_as_text() -> None:
    assert form_field(b"a=1&csrf=x%2By&csrf=second", "csrf") == "x+y"
    assert form_field(b"a=1", "csrf") is None
    assert form_field(b"\xff\xfe", "csrf") is None


# Over HTTP: the login page and the API with a cookie


@pytest.fixture
def client(dash: Dashboard) -> Iterator[httpx.Client]:
    with dash.client() as opened:
        yield opened


def login(client: httpx.Client, token: str, next_path: str = "/topology") -> str:
    """Log `client` in with `token`; the session's CSRF token (read from a page, as a browser would)."""
    form = client.get("/login")
    nonce = re.search(r'name="login_csrf" value="([^"]+)"', form.text)
    assert nonce is not None, form.text
    answer = client.post("/login", data={"login_csrf": nonce[1], "token": token, "next": next_path})
    assert answer.status_code == 303, answer.text
    page = client.get("/topology")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    return csrf[1]


def test_wrong_logins_past_the_budget_get_429_and_a_right_one_still_works(
    dash: Dashboard, client: httpx.Client
) -> None:
    page = client.get("/login")
    answers = []
    for _ in range(FAILURE_BURST + 1):
        nonce = re.search(r'name="login_csrf" value="([^"]+)"', page.text)  # each page comes with a new one
        assert nonce is not None
        page = client.post("/login", data={"login_csrf": nonce[1], "token": "mgv_" + "Q" * 43, "next": "/"})
        answers.append(page)
    assert [answer.status_code for answer in answers] == [401] * FAILURE_BURST + [429]
    assert answers[-1].headers["retry-after"] == str(int(FAILURE_REFILL))
    assert "too many failed logins from your address" in answers[-1].text and "Traceback" not in answers[-1].text
    assert login(client, dash.token("viewer"))


def test_login_sets_a_strict_httponly_cookie_and_goes_where_asked(dash: Dashboard, client: httpx.Client) -> None:
    form = client.get("/login?next=/services/catalog")
    assert "meshgate_login=" in form.headers["set-cookie"] and "SameSite=strict" in form.headers["set-cookie"]
    nonce = re.search(r'name="login_csrf" value="([^"]+)"', form.text)
    assert nonce is not None and 'value="/services/catalog"' in form.text
    answer = client.post(
        "/login", data={"login_csrf": nonce[1], "token": dash.token("operator"), "next": "/services/catalog"}
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/services/catalog"
    cookie = next(value for name, value in answer.headers.multi_items() if value.startswith(COOKIE))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert client.get("/services/catalog").status_code == 200


@pytest.mark.parametrize("next_path", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:x"])
def test_login_never_redirects_off_site(dash: Dashboard, client: httpx.Client, next_path: str) -> None:
    nonce = re.search(r'name="login_csrf" value="([^"]+)"', client.get("/login").text)
    assert nonce is not None
    answer = client.post("/login", data={"login_csrf": nonce[1], "token": dash.token("viewer"), "next": next_path})
    assert answer.status_code == 303 and answer.headers["location"] == "/topology"


def test_a_login_post_without_the_forms_nonce_is_refused(dash: Dashboard, client: httpx.Client) -> None:
    answer = client.post("/login", data={"login_csrf": "guess", "token": dash.token("operator")})
    assert answer.status_code == 403 and "expired" in answer.text
    assert COOKIE not in answer.headers.get("set-cookie", "").split("=")[0]


def test_a_wrong_token_shows_the_reason_on_the_login_page(dash: Dashboard, client: httpx.Client) -> None:
    nonce = re.search(r'name="login_csrf" value="([^"]+)"', client.get("/login").text)
    assert nonce is not None
    answer = client.post("/login", data={"login_csrf": nonce[1], "token": "mgo_" + "x" * 43})
    assert answer.status_code == 401 and "unknown token" in answer.text and 'id="token"' in answer.text
    assert 'name="next" value="/topology"' in answer.text


def test_the_api_accepts_a_session_and_needs_its_csrf_token_for_writes(dash: Dashboard, client: httpx.Client) -> None:
    csrf = login(client, dash.token("operator"))
    assert client.get("/api/v1/services").status_code == 200
    body = {"weights": {"v1": 70, "v2": 30}, "reason": "from the browser"}
    refused = client.put("/api/v1/services/catalog/weights", json=body)
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
    assert dash.current().version == 1
    done = client.put("/api/v1/services/catalog/weights", json=body, headers={"x-csrf-token": csrf})
    assert done.status_code == 200 and done.json() == {"version": 2, "changed": True}
    with dash.client(dash.token("viewer")) as viewer:
        (entry,) = [item for item in viewer.get("/api/v1/audit").json() if item["version"] == 2]
    assert entry["action"] == "weights.set" and "(session " in entry["who"] and entry["reason"] == "from the browser"


def test_logout_needs_the_csrf_token_and_ends_the_session(dash: Dashboard, client: httpx.Client) -> None:
    csrf = login(client, dash.token("viewer"))
    assert client.post("/logout").status_code == 403  # a cross-site form cannot log anyone out
    assert client.get("/api/v1/services").status_code == 200
    cookie = client.cookies[COOKIE]
    out = client.post("/logout", data={"csrf": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert COOKIE not in client.cookies  # the browser forgets it ...
    with dash.client(cookies={COOKIE: cookie}) as replay:
        replayed = replay.get("/api/v1/services")
        assert replayed.status_code == 401 and "ended" in replayed.json()["error"]  # ... and the server too
        assert replay.get("/topology").headers["location"] == "/login?next=%2Ftopology"
