"""uvicorn's HTTP/1.1 protocol with the limits the gateway puts on its own clients (`gateway.config.Limits`).

uvicorn bounds neither how long a request head may take nor how large it may grow, nor how long a body may pause:
a client trickling a head, or a body nobody reads, holds a connection for ever (slowloris), and httptools gathers
an endless header by concatenation. `GuardedHttpProtocol` adds, per connection:

- a head must be complete within `header_timeout` of the connection opening or of the previous request ending
  (408), and within `max_header_bytes` (plus 8 KiB for the request target) of raw bytes (431);
- a request body may pause at most `body_timeout` between reads (408 if no answer was started, else the connection
  closes), whether or not the app is reading it.

One timer per connection, re-armed on each body read: the dashboard is not a hot path.

>>> uvicorn.Config(app, http=GuardedHttpProtocol)
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config import Limits
from gateway.errors import local_reply
from gateway.http1 import MAX_LINE
from gateway.propagation import new_request_id

LIMITS = Limits()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body timeouts and a head size limit."""

    limits = LIMITS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._in_head = True
        self._in_body = False
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout, "request headers not complete")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            limit = self.limits.max_header_bytes
            if self._head_bytes > 2 * limit + MAX_LINE:  # twice: the count holds the tail of what came before
                self._refuse(431, f"request header block exceeds {limit} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head, self._in_body, self._head_bytes = False, True, 0
        self._arm(self.limits.body_timeout, "request body stalled")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._arm(self.limits.body_timeout, "request body stalled")
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()
        if self.cycle is None or self.cycle.response_complete:
            self._await_head()  # answered before the body was all in (a 401, say): the next head is due
        else:
            self._disarm()  # the app is answering; it takes as long as it takes (a long-poll, say)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._in_body:
            self._await_head()  # besides uvicorn's keep-alive timeout, which the first byte of a head cancels

    def _await_head(self) -> None:
        if not self.transport.is_closing():
            self._in_head, self._head_bytes = True, 0
            self._arm(self.limits.header_timeout, "request headers not complete")

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, f"{what} within {seconds:g}s")

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, reason: str) -> None:
        self._timer = None
        self._refuse(408, reason)

    def _refuse(self, status: int, reason: str) -> None:
        self._disarm()
        if self.transport.is_closing():
            return
        cycle = self.cycle  # the request being answered, or the last one answered
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(local_reply(status, reason, new_request_id(), keep_alive=False))
            if cycle is not None:
                cycle.disconnected = True  # the app's answer, if one is still coming, is not sent
        self.transport.close()
