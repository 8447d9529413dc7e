"""Fixtures that start real processes and servers on 127.0.0.1 and wait until they are ready."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.upstream_app import UpstreamServer

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening (.*)")


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Gateway:
    """A `meshgate gateway` process; `addresses` come from its "listening" log line."""

    def __init__(self, config_path: Path, args: list[str]) -> None:
        self.config_path = config_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dashboard.cli", "gateway", "--config", str(config_path), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(20):
            self.stop()
            raise AssertionError("gateway did not start:\n" + self.output())

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = LISTENING.search(line)
            if match and not self._listening.is_set():
                for item in match.group(1).split():
                    kind, _, address = item.partition("=")
                    host, _, port = address.rpartition(":")
                    self.addresses[kind] = (host.strip("[]"), int(port))
                self._listening.set()

    def output(self) -> str:
        return "".join(self.lines)

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        wait_for(lambda: text in self.output(), timeout, what=f"log line {text!r}")

    @property
    def inbound(self) -> tuple[str, int]:
        return self.addresses["inbound"]

    @property
    def admin(self) -> tuple[str, int]:
        return self.addresses["admin"]

    def url(self, kind: str = "inbound") -> str:
        host, port = self.addresses[kind]
        return f"http://{host}:{port}"

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def gateway_config(services: dict[str, Any], **gateway: Any) -> dict[str, Any]:
    """A standalone config listening on ephemeral loopback ports, access log off."""
    section: dict[str, Any] = {
        "group": "test",
        "listen": {"inbound": "127.0.0.1:0", "outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "telemetry": {"access_log": "off"},
    }
    section.update(gateway)
    return {"gateway": section, "services": services}


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(config: dict[str, Any], *args: str) -> Gateway:
        path = tmp_path / f"gateway-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config))
        gateway = Gateway(path, list(args))
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def start_upstream() -> Iterator[Callable[[str], UpstreamServer]]:
    started: list[UpstreamServer] = []

    def start(name: str) -> UpstreamServer:
        server = UpstreamServer(name).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def raw_request(address: tuple[str, int], data: bytes, timeout: float = 5.0, read_until_close: bool = True) -> bytes:
    """Send raw bytes, return everything the peer sends until it closes (or `timeout`)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close:
                break
        return b"".join(chunks)
