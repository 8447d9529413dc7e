"""Browser sessions: the login page's token becomes a server-side session behind an HttpOnly cookie.

`Sessions.login(token)` checks an operator or viewer token exactly as `BearerTokens` does (by digest in the store)
and opens a session: a random 256-bit id that only the cookie carries (the table keys on its SHA-256, so a dump of
memory holds no usable cookie) and a random CSRF token that pages embed. `Sessions` is also an `Authenticator`
(the second one in `auth.Auth`, after bearer tokens), so the JSON API and the pages accept a session alike:

- the cookie is `HttpOnly`, `SameSite=Strict`, `Path=/`, and on HTTPS `Secure` with the `__Host-` prefix;
- a session ends at logout, after `idle` seconds without a request, `lifetime` seconds after login, or as soon as
  its token is no longer in the store (checked on every request, so deleting a token logs its sessions out);
- every unsafe method (anything but GET, HEAD, OPTIONS) must carry the session's CSRF token, in the
  `X-CSRF-Token` header (htmx sends it from `hx-headers` on `<body>`) or a `csrf` form field (plain forms);
  a missing or wrong one is 403 and nothing runs.

Sessions live in this process's memory: a dashboard restart logs everyone out, and dashboard replicas behind one
address need sticky sessions. A principal (one token) holds at most `per_principal` sessions, its oldest going
first, and the table at most `max_sessions`: when it is full, the principal holding the most loses its oldest, so
one token logging in again and again only ever logs itself out. A login with an unknown or malformed token is a
failed attempt (`dashboard.attempts`): logged, counted, and past the address's budget answered 429.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response

from dashboard.api.auth import READ, Principal, digest
from dashboard.attempts import FailedAttempts
from dashboard.errors import ApiError, DashboardError
from dashboard.store.model import Store

COOKIE = "meshgate_session"
SECURE_COOKIE = "__Host-meshgate_session"  # the browser only accepts it with Secure, Path=/ and no Domain
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LIFETIME = 12 * 3600.0  # seconds from login to the end of a session, however busy
IDLE = 3600.0  # seconds without a request after which a session ends
MAX_SESSIONS = 10_000
MAX_SESSIONS_PER_PRINCIPAL = 100  # one token's browsers: a team sharing a viewer token on its screens
MAX_FORM = 64 * 1024  # bytes of a form body searched for the CSRF field
_TOKEN_SHAPE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class LoginError(DashboardError, ValueError):
    """A login the dashboard refuses; `str(err)` is one line a person can read. `retry_after` is set (seconds)
    when the client's address is over its budget of failed attempts: 429."""

    def __init__(self, reason: str, retry_after: int = 0) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.status = 429 if retry_after else 401
        self.headers = {"retry-after": str(retry_after)} if retry_after else {}


@dataclass(frozen=True, slots=True)
class Session:
    """One logged-in browser. `principal.via` is "session", so the audit log says a change came from the UI."""

    key: str  # sha256 of the cookie value
    principal: Principal
    token_digest: str
    csrf: str
    created: float
    seen: float


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def cookie_name(request: Request) -> str:
    return SECURE_COOKIE if request.url.scheme == "https" else COOKIE


def form_field(body: bytes, name: str) -> str | None:
    """The first value of `name` in an `application/x-www-form-urlencoded` body, or None."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    for key, value in parse_qsl(text, keep_blank_values=True, max_num_fields=200):
        if key == name:
            return value
    return None


class Sessions:
    """The session table, and the `Authenticator` that reads it.

    >>> sessions = Sessions(store)
    >>> session_id, session = await sessions.login(token)        # LoginError for an unknown or gateway token
    >>> sessions.set_cookie(response, request, session_id)
    >>> auth = Auth([BearerTokens(store), sessions])              # pages and the API accept the cookie
    """

    def __init__(
        self,
        store: Store,
        *,
        lifetime: float = LIFETIME,
        idle: float = IDLE,
        max_sessions: int = MAX_SESSIONS,
        per_principal: int = MAX_SESSIONS_PER_PRINCIPAL,
        attempts: FailedAttempts | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_sessions < 1 or per_principal < 1:
            raise ValueError("max_sessions and per_principal must be at least 1")
        self.store = store
        self.lifetime = lifetime
        self.idle = idle
        self.max_sessions = max_sessions
        self.per_principal = per_principal
        self.attempts = attempts
        self.clock = clock
        self._table: dict[str, Session] = {}  # by login, oldest first
        self._held: dict[str, dict[str, None]] = {}  # principal id -> its sessions' keys, oldest first

    def __len__(self) -> int:
        return len(self._table)

    async def login(self, token: str, address: str = "unknown") -> tuple[str, Session]:
        """A new session for `token` (an operator or viewer token) from client `address`: the cookie value and the
        session."""
        token = token.strip()
        if not token:
            raise LoginError("paste an operator or viewer token")
        if len(token) > 100 or not token.startswith(("mgo_", "mgv_", "mgj_")) or not set(token) <= _TOKEN_SHAPE:
            raise self._failed(address, "that is not a meshgate token (they start with mgo_ or mgv_)")
        record = await self.store.find_token(digest(token))
        if record is None:
            raise self._failed(address, "unknown token")
        if record.role not in READ:
            raise LoginError(f"a {record.role} token cannot log in: use an operator or viewer token")
        now = self.clock()
        session_id = secrets.token_urlsafe(32)
        principal = Principal(id=record.id, name=record.name, role=record.role, group=None, via="session")
        session = Session(_key(session_id), principal, record.digest, secrets.token_urlsafe(32), now, now)
        self._make_room(principal.id, now)
        self._table[session.key] = session
        self._held.setdefault(principal.id, {})[session.key] = None
        return session_id, session

    def _failed(self, address: str, reason: str) -> LoginError:
        wait = self.attempts.failed(address, "login", reason) if self.attempts is not None else 0
        if wait:
            return LoginError(f"{reason}; too many failed logins from your address: try again in {wait}s", wait)
        return LoginError(reason)

    def logout(self, request: Request) -> None:
        session_id = request.cookies.get(cookie_name(request))
        if session_id:
            self._drop(_key(session_id))

    def current(self, request: Request) -> Session | None:
        """The request's live session (no store check, no CSRF check): what pages use to render."""
        session_id = request.cookies.get(cookie_name(request))
        if not session_id:
            return None
        session = self._table.get(_key(session_id))
        if session is None:
            return None
        now = self.clock()
        if now - session.created > self.lifetime or now - session.seen > self.idle:
            self._drop(session.key)
            return None
        return session

    async def authenticate(self, request: Request) -> Principal | None:
        """The session's principal; None without a cookie; 401 for an ended session; 403 for a write without
        the CSRF token."""
        if not request.cookies.get(cookie_name(request)):
            return None
        session = self.current(request)
        if session is None:
            raise ApiError(401, "the session has ended: log in again")
        if await self.store.find_token(session.token_digest) is None:
            self._drop(session.key)
            raise ApiError(401, "the session's token no longer exists: log in again")
        if request.method not in SAFE_METHODS and not await self._csrf_ok(request, session):
            raise ApiError(403, "missing or wrong CSRF token: reload the page and try again")
        self._table[session.key] = replace(session, seen=self.clock())
        return session.principal

    async def _csrf_ok(self, request: Request, session: Session) -> bool:
        sent = request.headers.get(CSRF_HEADER)
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if sent is None and content_type == "application/x-www-form-urlencoded":
            body = await request.body()  # cached on the request: the endpoint reads the same bytes
            sent = form_field(body[:MAX_FORM], CSRF_FIELD)
        return sent is not None and hmac.compare_digest(sent.encode(), session.csrf.encode())

    def set_cookie(self, response: Response, request: Request, session_id: str) -> None:
        https = request.url.scheme == "https"
        response.set_cookie(
            cookie_name(request),
            session_id,
            max_age=int(self.lifetime),
            path="/",
            secure=https,
            httponly=True,
            samesite="strict",
        )

    def clear_cookie(self, response: Response, request: Request) -> None:
        https = request.url.scheme == "https"
        response.delete_cookie(cookie_name(request), path="/", secure=https, httponly=True, samesite="strict")

    def _drop(self, key: str) -> None:
        session = self._table.pop(key, None)
        if session is not None:
            held = self._held[session.principal.id]
            del held[key]
            if not held:
                del self._held[session.principal.id]

    def _make_room(self, principal: str, now: float) -> None:
        """Room for one more session of `principal`: its own oldest goes past `per_principal`; in a full table, the
        ended ones go, then the oldest of whichever principal holds the most."""
        while len(self._held.get(principal, ())) >= self.per_principal:
            self._drop(next(iter(self._held[principal])))
        if len(self._table) < self.max_sessions:
            return
        ended = [
            key for key, old in self._table.items() if now - old.created > self.lifetime or now - old.seen > self.idle
        ]
        for key in ended:
            self._drop(key)
        while len(self._table) >= self.max_sessions:
            greediest = max(self._held.values(), key=len)  # dicts keep insertion order: its oldest login goes
            self._drop(next(iter(greediest)))
