"""A real etcd server (Debian's etcd-server, /usr/bin/etcd) on free loopback ports, for the etcd store's tests
and the multi-replica mesh tests. `tests/conftest.py` exposes the fixtures to every test."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_ports(count: int) -> list[int]:
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class EtcdServer:
    """One etcd member with a temporary data directory; `url` is what `open_store` takes."""

    def __init__(self, directory: Path) -> None:
        client, peer = free_ports(2)
        self.client_url = f"http://127.0.0.1:{client}"
        self.url = f"etcd://127.0.0.1:{client}"
        self.log_path = directory / "etcd.log"
        peer_url = f"http://127.0.0.1:{peer}"
        self.args = [
            ETCD,
            *("--name", "test", "--data-dir", str(directory / "data")),
            *("--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url),
            *("--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url),
            *("--initial-cluster", f"test={peer_url}", "--log-level", "warn"),
        ]
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)

    def restart(self) -> None:
        """Start again on the same ports and data (after `stop`), as an etcd back from an outage."""
        self.proc = self._start()

    def wait_healthy(self, timeout: float = 30.0) -> bool:
        """True once /health says so; False if etcd exited (a port was taken meanwhile) or the deadline passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.client_url}/health", timeout=1.0).json().get("health") == "true":
                    return True
            except (httpx.HTTPError, ValueError):
                pass  # not listening yet
            time.sleep(0.05)
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wipe(self) -> None:
        """Delete every meshgate key, so each test starts from an empty store."""
        body = {"key": base64.b64encode(b"/meshgate/").decode(), "range_end": base64.b64encode(b"/meshgate0").decode()}
        httpx.post(f"{self.client_url}/v3/kv/deleterange", json=body, timeout=5.0).raise_for_status()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    if not os.access(ETCD, os.X_OK):
        pytest.skip(f"{ETCD} is not installed (apt-get install etcd-server)")
    for attempt in range(3):  # a free port can be taken between choosing it and etcd binding it
        server = EtcdServer(tmp_path_factory.mktemp(f"etcd{attempt}"))
        if server.wait_healthy():
            break
        server.stop()
    else:
        raise AssertionError(f"etcd did not become healthy:\n{server.log()}")
    yield server
    server.stop()


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> EtcdServer:
    """The session's etcd, emptied for this test."""
    etcd_server.wipe()
    return etcd_server
