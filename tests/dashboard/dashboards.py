"""A real dashboard for API tests: `create_app` served by uvicorn (meshgate's `DashboardServer`) on a loopback
port, in a thread with its own event loop, over a real store (SQLite in a temporary directory, or etcd) and a real
CA. Tests talk to it over HTTP with httpx, and reach its store on its own loop through `call`."""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from dashboard.api.auth import new_token
from dashboard.app import create_app
from dashboard.guard import GuardedHttpProtocol
from dashboard.identity import MeshCA
from dashboard.serve import DashboardServer, _bind
from dashboard.settings import Settings
from dashboard.store import open_store
from dashboard.store.model import Revision, Store
from gateway.units import Address
from tests.conftest import wait_for

T = TypeVar("T")

# Two groups: shop owns catalog (two subsets, a canary route), web owns frontend.
MESH: dict[str, Any] = {
    "groups": {"shop": ["catalog"], "web": ["frontend"]},
    "services": {
        "catalog": {
            "subsets": {
                "v1": {"endpoints": ["127.0.0.1:9101", "127.0.0.1:9102"]},
                "v2": {"endpoints": ["127.0.0.1:9103"]},
            },
            "routes": [
                {"name": "canary-header", "match": {"headers": {"x-canary": "always"}}, "split": {"v2": 100}},
                {"name": "default", "split": {"v1": 90, "v2": 10}},
            ],
        },
        "frontend": {"subsets": {"v1": {"endpoints": ["127.0.0.1:9201"]}}},
    },
}


def mesh() -> dict[str, Any]:
    return copy.deepcopy(MESH)


class Dashboard:
    """A running dashboard. `url` is its base URL; `token(role)` makes a real token in its store. `host` is the
    address it listens on (loopback unless a test needs clients from beyond it)."""

    def __init__(
        self,
        data: Path,
        store_url: str | None = None,
        wrap: Callable[[Store], Store] | None = None,
        host: str = "127.0.0.1",
        http: type[GuardedHttpProtocol] = GuardedHttpProtocol,
        **settings: Any,
    ) -> None:
        self.data = data
        self.host = host
        self.http = http  # uvicorn's protocol, as `meshgate dashboard` runs it (a test may shorten its limits)
        self.store_url = store_url or str(data)
        self.wrap = wrap or (lambda store: store)
        self.overrides = settings
        self.loop = asyncio.new_event_loop()
        self.server: DashboardServer | None = None
        self.error: BaseException | None = None
        self.url = ""
        self.thread = threading.Thread(target=self._run, name="dashboard", daemon=True)
        self.thread.start()
        wait_for(lambda: self.error or (self.server is not None and self.server.started), 15, what="dashboard start")
        if self.error is not None:
            raise self.error
        assert self.server is not None
        host, port = self.server.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:
            self.error = exc
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self.store = open_store(self.store_url)
        self.ca = MeshCA.load_or_create(str(self.data / "ca"), "meshgate.local")
        self.settings = Settings(
            store=self.wrap(self.store), ca=self.ca, registry=CollectorRegistry(), **self.overrides
        )
        self.app: Starlette = create_app(self.settings)
        sock = _bind(Address(self.host, 0))
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=5, http=self.http
        )
        self.server = DashboardServer(config, self.settings.stopping, sock, "http")
        try:
            await self.server.serve(sockets=[sock])
        finally:
            sock.close()
            await self.store.close()

    def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run `make()` on the dashboard's loop (where its store lives) and return the result."""

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def token(self, role: str, group: str | None = None, name: str | None = None) -> str:
        secret, record = new_token(role, group, name)
        self.call(lambda: self.store.add_token(record))
        return secret

    def seed(self, data: dict[str, Any] | None = None) -> Revision:
        return self.call(
            lambda: self.store.commit(data or mesh(), author="test", reason="seed", action="config.seed", target="mesh")
        )

    def current(self) -> Revision:
        return self.call(self.store.current)

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 10.0), **kwargs)

    def stop(self) -> None:
        if self.server is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.server.stop)
        self.thread.join(15)
        assert not self.thread.is_alive(), "the dashboard did not stop"


def routed_ipv4() -> str:
    """This host's IPv4 address that clients beyond it would come from (never loopback); the test is skipped on a
    machine with loopback only."""
    from dashboard.serve import _routed_addresses

    routed = sorted(address for address in _routed_addresses() if "." in address)
    if not routed:
        pytest.skip("this machine has no IPv4 route, so no address beyond loopback to connect from")
    return routed[0]


@contextmanager
def running(data: Path, **kwargs: Any) -> Iterator[Dashboard]:
    dashboard = Dashboard(data, **kwargs)
    try:
        yield dashboard
    finally:
        dashboard.stop()
