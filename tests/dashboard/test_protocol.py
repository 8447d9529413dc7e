"""The dashboard's HTTP/1.1 limits (dashboard/guard.py) on a real uvicorn socket: slow or endless heads and
stalled bodies are refused with 408 or 431 and the connection closed, instead of being held for ever."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dashboard.guard import GuardedHttpProtocol
from tests.conftest import raw_request
from tests.dashboard.dashboards import Dashboard, running

SHORT = 1.0
LATE = SHORT + 2.0  # a loaded machine's slack


class ShortLimits(GuardedHttpProtocol):
    limits = dataclasses.replace(GuardedHttpProtocol.limits, header_timeout=SHORT, body_timeout=SHORT)


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    with running(Path(tmp_path_factory.mktemp("dash")), http=ShortLimits) as dashboard:
        yield dashboard


def exchange(dash: Dashboard, data: bytes) -> tuple[bytes, float]:
    """Send `data`, then read until the dashboard closes: what it sent, and after how long (LATE + 2 at most)."""
    host, port = dash.url.removeprefix("http://").split(":")
    started = time.monotonic()
    received = raw_request((host, int(port)), data, timeout=LATE + 2)
    return received, time.monotonic() - started


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: d\r\nX-Slow: ", id="half-a-head"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: d\r\n\r\nGET /healthz HTTP/1.1\r\n", id="second-head-stalls"),
    ],
)
def test_a_head_not_complete_in_time_is_408_and_closed(dash: Dashboard, data: bytes) -> None:
    received, took = exchange(dash, data)
    assert received.endswith(b"\r\n\r\nmeshgate: request headers not complete within 1s\n"), received[-300:]
    assert b"HTTP/1.1 408 " in received
    assert SHORT * 0.9 <= took <= LATE


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            b"PUT /api/v1/services/x/weights HTTP/1.1\r\nHost: d\r\nContent-Length: 100\r\n\r\n{", id="unread"
        ),
        pytest.param(
            b"POST /login HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", id="chunked"
        ),
    ],
)
def test_a_stalled_body_is_not_held_for_ever(dash: Dashboard, data: bytes) -> None:
    """The first is answered 401 at once, before its body is read; uvicorn would wait for the rest of that body
    for ever to keep the connection. Either way the connection closes once the body pauses too long."""
    received, took = exchange(dash, data)
    assert received.startswith(b"HTTP/1.1 "), received[:200]
    assert took <= LATE


def test_an_endless_header_is_cut_off(dash: Dashboard) -> None:
    """Refused once past the limit (a 431, unless the close with the client's bytes unread resets it first)."""
    host, port = dash.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=LATE) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: d\r\nX-Endless: ")
        sent = 0
        try:
            while sent < 64 << 20:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    assert sent < 16 << 20, f"{sent} bytes of one header were read"
    assert received.startswith(b"HTTP/1.1 431 ") or received == b"", received[:200]


def test_ordinary_requests_are_untouched(dash: Dashboard) -> None:
    received, _ = exchange(dash, b"GET /healthz HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200 ")
