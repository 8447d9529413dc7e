"""Tokens and principals: what a token looks like, that only its digest is stored, and how `Auth` picks a
principal and checks roles (including a second authenticator, the way the UI's cookie sessions will plug in)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from starlette.requests import Request

from dashboard.api.auth import GATEWAY, READ, WRITE, Auth, BearerTokens, Principal, TokenError, digest, new_token
from dashboard.attempts import FailedAttempts, client_key
from dashboard.errors import ApiError
from dashboard.store import open_store
from dashboard.store.model import Store
from dashboard.store.sqlite import SQLiteStore
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio


def request(authorization: str | None = None, cookie: str | None = None) -> Request:
    headers = []
    if authorization is not None:
        headers.append((b"authorization", authorization.encode()))
    if cookie is not None:
        headers.append((b"cookie", cookie.encode()))
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers, "query_string": b""})


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[Store]:
    store = open_store(str(tmp_path / "data"))
    yield store
    await store.close()


@pytest.mark.parametrize(("role", "prefix"), [("operator", "mgo_"), ("viewer", "mgv_"), ("gateway", "mgj_")])
def test_tokens_carry_their_role_in_the_prefix_and_32_random_bytes(role: str, prefix: str) -> None:
    group = "shop" if role == "gateway" else None
    secret, record = new_token(role, group)
    assert secret.startswith(prefix) and len(secret) == len(prefix) + 43  # 32 bytes, urlsafe base64
    assert record.digest == hashlib.sha256(secret.encode()).hexdigest() == digest(secret)
    assert secret not in repr(record)
    assert record.role == role and record.group == group and record.name.startswith(role)
    assert new_token(role, group)[0] != secret


@pytest.mark.parametrize(
    ("role", "group", "name", "fragment"),
    [
        ("admin", None, None, "role"),
        ("gateway", None, None, "--group is required"),
        ("viewer", "shop", None, "--group is for gateway"),
        ("gateway", "Shop!", None, "Shop!"),
        ("operator", None, "<script>", "name"),
        ("operator", None, "x" * 64, "name"),
    ],
)
def test_tokens_that_cannot_be_made(role: str, group: str | None, name: str | None, fragment: str) -> None:
    with pytest.raises(TokenError, match=None) as caught:
        new_token(role, group, name)
    assert fragment in str(caught.value)


def test_the_audit_name_of_a_principal() -> None:
    principal = Principal(id="3f2a9c1d0b7e4a65", name="alice", role="operator", group=None)
    assert principal.who == "alice (token 3f2a9c1d0b7e4a65)"


async def test_the_store_keeps_only_the_digest(tmp_path: Path) -> None:
    store = SQLiteStore.open(str(tmp_path / "data"))
    secret, record = new_token("operator", name="alice")
    await store.add_token(record)
    await store.close()
    stored = b"".join(path.read_bytes() for path in (tmp_path / "data").iterdir())
    assert record.digest.encode() in stored
    assert secret.encode() not in stored and secret.split("_", 1)[1].encode() not in stored


async def test_bearer_tokens_name_the_principal(sqlite: Store) -> None:
    secret, record = new_token("gateway", "shop", "shop-join")
    await sqlite.add_token(record)
    auth = Auth([BearerTokens(sqlite)])
    principal = await auth.require_gateway(request(f"Bearer {secret}"), "shop")
    assert principal == Principal(id=record.id, name="shop-join", role="gateway", group="shop")
    assert await auth.principal(request(f"bearer  {secret} ")) == principal, "scheme case and spaces are lenient"


@pytest.mark.parametrize(
    "header", [None, "Bearer mgo_" + "A" * 43, "Bearer mgo_short", "Token abc", "Bearer", "Basic YWxpY2U6c2VjcmV0"]
)
async def test_missing_unknown_or_malformed_credentials_are_401(sqlite: Store, header: str | None) -> None:
    with pytest.raises(ApiError) as caught:
        await Auth([BearerTokens(sqlite)]).principal(request(header))
    assert caught.value.status == 401
    assert caught.value.headers["www-authenticate"].startswith("Bearer")


async def test_roles(sqlite: Store) -> None:
    tokens = {}
    for role, group in (("operator", None), ("viewer", None), ("gateway", "shop")):
        tokens[role], record = new_token(role, group)
        await sqlite.add_token(record)
    auth = Auth([BearerTokens(sqlite)])
    allowed = {
        ("operator", WRITE): True,
        ("operator", READ): True,
        ("operator", GATEWAY): False,
        ("viewer", WRITE): False,
        ("viewer", READ): True,
        ("viewer", GATEWAY): False,
        ("gateway", WRITE): False,
        ("gateway", READ): False,
        ("gateway", GATEWAY): True,
    }
    for (role, roles), ok in allowed.items():
        try:
            await auth.require(request(f"Bearer {tokens[role]}"), roles)
        except ApiError as err:
            assert not ok and err.status == 403, (role, roles, err.reason)
        else:
            assert ok, (role, roles)
    with pytest.raises(ApiError) as caught:
        await auth.require_gateway(request(f"Bearer {tokens['gateway']}"), "web")
    assert caught.value.status == 403 and "'shop'" in caught.value.reason


class CookieSessions:
    """A stand-in for the UI's session authenticator: a principal from a cookie (a real one checks CSRF too)."""

    async def authenticate(self, request: Request) -> Principal | None:
        if request.cookies.get("session") == "valid":
            return Principal(id="s1", name="bob", role="operator", group=None, via="session")
        return None


async def test_a_second_authenticator_is_asked_when_there_is_no_bearer_token(sqlite: Store) -> None:
    auth = Auth([BearerTokens(sqlite), CookieSessions()])
    principal = await auth.require(request(cookie="session=valid"), WRITE)
    assert principal.who == "bob (session s1)"
    with pytest.raises(ApiError) as caught:
        await auth.principal(request("Bearer mgo_" + "A" * 43, cookie="session=valid"))
    assert caught.value.status == 401, "an invalid bearer token is refused, never passed over"
    with pytest.raises(ApiError):
        await auth.principal(request(cookie="session=forged"))


# Failed attempts: logged, counted and limited per client address


def attempts(clock: FakeClock, **limits: Any) -> tuple[FailedAttempts, Counter]:
    counter = Counter("failures", "failed attempts", ["via", "answer"], registry=CollectorRegistry())
    return FailedAttempts(counter, clock=clock, **limits), counter


def from_address(authorization: str, address: str) -> Request:
    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "client": (address, 40000)}
    return Request({**scope, "headers": [(b"authorization", authorization.encode())]})


async def refusal(auth: Auth, request: Request) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await auth.principal(request)
    return caught.value


async def test_failed_tokens_past_the_budget_get_429_and_a_valid_token_still_works(
    sqlite: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Operators behind one ingress share its address: someone else's guesses must not lock them out."""
    clock = FakeClock()
    limiter, counter = attempts(clock, burst=3, refill=20.0)
    auth = Auth([BearerTokens(sqlite, limiter)])
    valid, record = new_token("viewer", name="ops")
    await sqlite.add_token(record)
    guess = "mgo_" + "A" * 43
    for _ in range(3):
        assert (await refusal(auth, from_address(f"Bearer {guess}", "10.0.0.7"))).status == 401
    limited = await refusal(auth, from_address(f"Bearer {guess}", "10.0.0.7"))
    assert limited.status == 429 and limited.headers == {"retry-after": "20"}
    assert limited.reason == "unknown token, and too many failed attempts from 10.0.0.7: try again in 20s"
    assert (await auth.principal(from_address(f"Bearer {valid}", "10.0.0.7"))).name == "ops"
    assert (await refusal(auth, from_address(f"Bearer {guess}", "10.0.0.8"))).status == 401, "per address"
    clock.now += 20.0  # one attempt given back
    assert (await refusal(auth, from_address("Basic YWxpY2U6c2VjcmV0", "10.0.0.7"))).status == 401
    assert (await refusal(auth, from_address(f"Bearer {guess}", "10.0.0.7"))).status == 429
    assert counter.labels("token", "401")._value.get() == 5 and counter.labels("token", "429")._value.get() == 2
    assert "failed token from 10.0.0.7: unknown token (GET unmatched)" in caplog.text
    assert "answering 429 for 20s" in caplog.text
    assert guess not in caplog.text and "YWxpY2U6c2VjcmV0" not in caplog.text and valid not in caplog.text


def test_while_limited_only_the_first_429_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A flood is counted, not written to the log line by line."""
    limiter, counter = attempts(FakeClock(), burst=1, refill=60.0)
    with caplog.at_level(logging.WARNING, logger="meshgate.dashboard"):
        waits = [limiter.failed("10.0.0.7", "login", "unknown token") for _ in range(50)]
    assert waits[0] == 0 and set(waits[1:]) == {60}
    assert [record.getMessage() for record in caplog.records] == [
        "failed login from 10.0.0.7: unknown token",
        "failed login from 10.0.0.7: unknown token; too many: answering 429 for 60s",
    ]
    assert counter.labels("login", "429")._value.get() == 49


def test_the_addresses_tracked_are_bounded_least_recent_failure_first() -> None:
    limiter, _ = attempts(FakeClock(), burst=1, refill=60.0, max_clients=2)
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.3"):
        limiter.failed(address, "token", "unknown token")
    assert len(limiter._state) == 2
    assert limiter.failed("10.0.0.1", "token", "unknown token") == 60, "it failed last but one: still tracked"
    assert limiter.failed("10.0.0.2", "token", "unknown token") == 0, "it failed least recently: dropped"


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("unknown", "unknown"),
    ],
)
def test_failures_are_counted_per_ipv4_address_and_per_ipv6_64(host: str, key: str) -> None:
    """An IPv6 client holds a whole /64: counting per address would let it rotate past the limit."""
    assert client_key(host) == key
