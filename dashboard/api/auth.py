"""Who may call the API: bearer tokens, the principal they name, and the role each endpoint needs.

Tokens are `mgo_…` (operator: read and write), `mgv_…` (viewer: read) and `mgj_…` (gateway join token, bound to
one group: only /join, /sync and /heartbeat for that group). A token is 32 random bytes; the store keeps only its
SHA-256 digest, so a leaked database cannot be replayed.

`Auth` asks each `Authenticator` in turn for a `Principal`. Today there is one, `BearerTokens`; the UI's cookie
sessions will be a second authenticator that also checks the CSRF token on unsafe methods, and endpoints will not
change, because they only ever see a `Principal`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from starlette.requests import Request

from dashboard.api.selfmetrics import template
from dashboard.attempts import FailedAttempts, client_address
from dashboard.errors import ApiError, DashboardError
from dashboard.mesh import Mesh
from dashboard.store.model import Store, TokenRecord
from gateway.config import ConfigError

ROLES = ("operator", "viewer", "gateway")
PREFIXES = {"operator": "mgo_", "viewer": "mgv_", "gateway": "mgj_"}
READ = frozenset({"operator", "viewer"})
WRITE = frozenset({"operator"})
GATEWAY = frozenset({"gateway"})
_TOKEN = re.compile(r"mg[ovj]_[A-Za-z0-9_-]{43}")
_NAME = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9._@]{0,62})")


class TokenError(DashboardError, ValueError):
    """A token that cannot be made as asked (unknown role, missing or stray group, bad name)."""

    status = 422


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `who` is what the audit log records.

    >>> Principal(id="3f2a9c1d0b7e4a65", name="alice", role="operator", group=None).who
    'alice (token 3f2a9c1d0b7e4a65)'
    """

    id: str
    name: str
    role: str
    group: str | None
    via: str = "token"  # later also "session"

    @property
    def who(self) -> str:
        return f"{self.name} ({self.via} {self.id})"


class Authenticator(Protocol):
    """Finds the principal of a request: None when the request carries no credential of its kind; raises
    `ApiError(401)` when it carries one that is not valid."""

    async def authenticate(self, request: Request) -> Principal | None: ...


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(role: str, group: str | None = None, name: str | None = None) -> tuple[str, TokenRecord]:
    """A fresh secret and the record to store for it (which holds only the secret's digest)."""
    if role not in ROLES:
        raise TokenError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    if (role == "gateway") != (group is not None):
        raise TokenError("--group is required for gateway tokens" if group is None else "--group is for gateway tokens")
    if group is not None:
        try:  # the groups rule, applied by the mesh model itself
            Mesh.parse({"groups": {group: []}, "services": {}}, source="--group")
        except ConfigError as err:
            raise TokenError(str(err)) from None
    token_id = secrets.token_hex(8)
    name = name or f"{role}-{token_id[:6]}"
    if not _NAME.fullmatch(name):
        raise TokenError(f"name: expected letters, digits, '-', '.', '_' or '@' (max 63), got {name!r}")
    secret = PREFIXES[role] + secrets.token_urlsafe(32)
    return secret, TokenRecord(
        id=token_id, digest=digest(secret), role=role, group=group, name=name, created=time.time()
    )


class BearerTokens:
    """`Authorization: Bearer <token>`, looked up by digest in the store. A failed attempt is logged, counted and
    limited per client address by `attempts` (`dashboard.attempts`): 401, or 429 past the address's budget."""

    def __init__(self, store: Store, attempts: FailedAttempts | None = None) -> None:
        self.store = store
        self.attempts = attempts

    async def authenticate(self, request: Request) -> Principal | None:
        header = request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise self._failed(request, "expected an Authorization: Bearer <token> header")
        token = token.strip()
        record = await self.store.find_token(digest(token)) if _TOKEN.fullmatch(token) else None
        if record is None:
            raise self._failed(request, "unknown token")
        return Principal(id=record.id, name=record.name, role=record.role, group=record.group)

    def _failed(self, request: Request, reason: str) -> ApiError:
        address = client_address(request)
        where = f"{reason} ({request.method} {template(request.scope.get('route'))})"  # a route, never a raw path
        wait = self.attempts.failed(address, "token", where) if self.attempts is not None else 0
        if wait:
            reason = f"{reason}, and too many failed attempts from {address}: try again in {wait}s"
            return ApiError(429, reason, {"retry-after": str(wait)})
        return ApiError(401, reason, CHALLENGE)


CHALLENGE = {"www-authenticate": 'Bearer realm="meshgate"'}
_NEEDED = {WRITE: "an operator token", READ: "a viewer or operator token", GATEWAY: "a gateway join token"}


class Auth:
    """The authenticators, tried in order, and the role checks endpoints call.

    >>> principal = await auth.require(request, WRITE)   # 401 without a credential, 403 with the wrong role
    """

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self.authenticators = tuple(authenticators)

    async def principal(self, request: Request) -> Principal:
        for authenticator in self.authenticators:
            principal = await authenticator.authenticate(request)
            if principal is not None:
                return principal
        raise ApiError(401, "authentication required: send Authorization: Bearer <token>", CHALLENGE)

    async def require(self, request: Request, roles: Collection[str]) -> Principal:
        principal = await self.principal(request)
        if principal.role not in roles:
            needed = _NEEDED.get(frozenset(roles), " or ".join(sorted(roles)) + " token")
            raise ApiError(403, f"this needs {needed}; {principal.name} is a {principal.role} token")
        return principal

    async def require_gateway(self, request: Request, group: object = None) -> Principal:
        """A gateway join token; when `group` is given, one bound to that group (else 403)."""
        principal = await self.require(request, GATEWAY)
        check_group(principal, group)
        return principal


def check_group(principal: Principal, group: object) -> None:
    """403 unless `group` is None or the principal's own group."""
    if group is not None and group != principal.group:
        raise ApiError(403, f"this token belongs to group {principal.group!r}, not {group!r}")
