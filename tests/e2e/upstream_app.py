"""A real HTTP/1.1 upstream for end-to-end tests, on asyncio + httptools.

Run in a thread (`UpstreamServer(name).start()`) or as a process (`python tests/e2e/upstream_app.py NAME [PORT]`,
which prints `PORT <n>` when listening). Behaviour is chosen by path:

- `/echo...` (default): JSON with name, method, path, headers (lists per lower-cased name), body length and
  SHA-256;
- `/status/NNN`: that status, empty body;  `/delay/MS`: wait, then echo;
- `/chunked/N`: N chunks of "chunk-i\\n" with chunked encoding;  `/bytes/N`: N bytes with content-length;
- `/close`: a body delimited by closing the connection;  `/count`: streams the request body, counts it;
- `/ws`: answers an Upgrade with 101, then echoes bytes;  `/fail-first/K`: 503 for the first K requests;
- `/healthz`: 200, or 503 after `/health/off` (and 200 again after `/health/on`).
Every response carries `x-upstream: NAME`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import threading
from collections import defaultdict

import httptools


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, server: UpstreamServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.tunnel = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections += 1
        self.server.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.open.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            assert self.transport is not None
            self.transport.write(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.tunnel = True
            rest = data[upgrade.args[0] :]
            if rest:
                self.transport.write(rest)  # type: ignore[union-attr]
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers: dict[str, list[str]] = defaultdict(list)
        self.body_size = 0
        self.body_hash = hashlib.sha256()
        self.continued = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()].append(value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self.server.requests += 1
        path = self.url.decode()
        if path == "/ws" and self.parser.should_upgrade():
            self.reply(101, b"", extra=b"connection: upgrade\r\nupgrade: websocket\r\n", length=False)
        elif "100-continue" in self.headers.get("expect", []):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        self.body_hash.update(body)

    def on_message_complete(self) -> None:
        if self.tunnel or self.parser.should_upgrade():
            return
        method = self.parser.get_method().decode()
        path = self.url.decode()
        delay = 0.0
        if path.startswith("/delay/"):
            delay = int(path.split("/")[2]) / 1000
        if delay:
            asyncio.get_running_loop().call_later(delay, self.respond, method, path)
        else:
            self.respond(method, path)

    def respond(self, method: str, path: str) -> None:
        server = self.server
        if self.transport is None or self.transport.is_closing():
            return
        keep = self.parser.should_keep_alive()
        if path.startswith("/status/"):
            self.reply(int(path.split("/")[2]), b"")
        elif path.startswith("/fail-first/"):
            server.failures += 1
            self.reply(503 if server.failures <= int(path.split("/")[2]) else 200, b"ok\n")
        elif path.startswith("/chunked/"):
            parts = [b"chunk-%d\n" % i for i in range(int(path.split("/")[2]))]
            body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
            self.reply(200, body, extra=b"transfer-encoding: chunked\r\n", length=False)
        elif path.startswith("/bytes/"):
            self.reply(200, b"x" * int(path.split("/")[2]))
        elif path == "/close":
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nx-upstream: %s\r\nconnection: close\r\n\r\nuntil-close" % server.name.encode()
            )
            self.transport.close()
            return
        elif path == "/count":
            self.reply(200, str(self.body_size).encode())
        elif path == "/healthz":
            self.reply(200 if server.healthy else 503, b"")
        elif path in ("/health/off", "/health/on"):
            server.healthy = path == "/health/on"
            self.reply(200, b"")
        else:
            echo = {
                "name": server.name,
                "method": method,
                "path": path,
                "headers": self.headers,
                "body": self.body_size,
                "sha256": self.body_hash.hexdigest(),
            }
            self.reply(200, json.dumps(echo).encode(), extra=b"content-type: application/json\r\n")
        if not keep:
            self.transport.close()

    def reply(self, status: int, body: bytes, extra: bytes = b"", length: bool = True) -> None:
        head = b"HTTP/1.1 %d X\r\nx-upstream: %s\r\n%s" % (status, self.server.name.encode(), extra)
        if length:
            head += b"content-length: %d\r\n" % len(body)
        self.transport.write(head + b"\r\n" + body)  # type: ignore[union-attr]


class UpstreamServer:
    """An upstream in a background thread with its own event loop."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.port = port
        self.requests = 0
        self.connections = 0
        self.failures = 0
        self.healthy = True
        self.open: set[UpstreamProtocol] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> UpstreamServer:
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self.loop)
        future.result(timeout=10)
        return self

    async def _listen(self) -> None:
        self.server = await self.loop.create_server(lambda: UpstreamProtocol(self), "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close() -> None:
            assert self.server is not None
            self.server.close()
            for conn in list(self.open):
                assert conn.transport is not None
                conn.transport.close()
            await asyncio.sleep(0)  # let the transports finish closing before the loop stops

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


async def _main(name: str, port: int) -> None:
    server = UpstreamServer(name, port)
    server.loop = asyncio.get_running_loop()
    await server._listen()
    print(f"PORT {server.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1] if len(sys.argv) > 1 else "upstream", int(sys.argv[2]) if len(sys.argv) > 2 else 0))
