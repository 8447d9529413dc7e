"""Dashboard fixtures: the store under test, opened on SQLite or on a real etcd (tests/etcd.py), and `dash`, a
seeded dashboard app serving on loopback (modules that need other settings define their own). Async tests run
through anyio's pytest plugin on asyncio."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dashboard.store import open_store
from dashboard.store.model import Store
from tests.dashboard.dashboards import Dashboard, running
from tests.etcd import EtcdServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "etcd"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where `store` lives; each behaviour test runs against both implementations."""
    if request.param == "sqlite":
        return str(tmp_path / "data")
    server: EtcdServer = request.getfixturevalue("etcd")
    return server.url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = open_store(store_url)
    yield opened
    await opened.close()


@pytest.fixture
def dash(tmp_path: Path) -> Iterator[Dashboard]:
    with running(tmp_path / "data") as dashboard:
        dashboard.seed()
        yield dashboard
