"""A whole mesh on loopback for end-to-end tests: a real `meshgate dashboard` process and joined gateways."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import ROOT, Gateway, listeners, wait_for

URL = re.compile(r"listening .*\burl=(\S+)")


class Dashboard:
    """A `meshgate dashboard` process on an ephemeral loopback port; `url` comes from its "listening" line."""

    def __init__(self, data: Path, *args: str) -> None:
        self.data = data
        self.args = args
        self.lines: list[str] = []
        self.url = ""
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[str]:
        self.lines = []
        ready = threading.Event()
        listen = "127.0.0.1:0" if not self.url else self.url.split("://", 1)[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshgate.cli", "dashboard", "--listen", listen, "--data", str(self.data)]
            + list(self.args),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.append(line)
                match = URL.search(line)
                if match and not ready.is_set():
                    self.url = match.group(1)
                    ready.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        if not ready.wait(30):
            proc.kill()
            self._reap(proc)
            raise AssertionError("dashboard did not start:\n" + "".join(self.lines))
        return proc

    def _reap(self, proc: subprocess.Popen[str]) -> None:
        proc.wait()
        self.reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()

    @property
    def operator_token(self) -> str:
        return (self.data / "operator-token").read_text().strip()

    def token(self, role: str, group: str | None = None) -> str:
        args = ["--role", role] + (["--group", group] if group else [])
        if "--store" in self.args:
            args += ["--store", self.args[self.args.index("--store") + 1]]
        done = subprocess.run(
            [sys.executable, "-m", "meshgate.cli", "dashboard", "token", "create", "--data", str(self.data), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    def api(self, token: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {token or self.operator_token}"}
        verify = (
            ssl.create_default_context(cafile=self.data / "ca" / "root.pem") if self.url.startswith("https") else True
        )
        return httpx.Client(base_url=f"{self.url}/api/v1", headers=headers, timeout=10, verify=verify)

    def kill(self) -> None:
        self.proc.kill()
        self._reap(self.proc)

    def restart(self) -> None:
        """Start again on the same port and data directory (after `kill` or `stop`)."""
        self.proc = self._start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reap(self.proc)

    def output(self) -> str:
        return "".join(self.lines)


def joined_gateway(
    dashboard: Dashboard, directory: Path, group: str, *extra_listeners: str, args: tuple[str, ...] = (), **gateway: Any
) -> Gateway:
    """A gateway of `group` joined to `dashboard`, with its own data directory, a join token and `args`."""
    section: dict[str, Any] = {"listen": listeners(*extra_listeners), "telemetry": {"access_log": "off"}}
    section.update(gateway)
    path = directory / f"gateway-{group}.yaml"
    path.write_text(yaml.safe_dump({"gateway": section}))
    token = dashboard.token("gateway", group)
    data = directory / f"gateway-{group}-data"
    return Gateway(path, ["--control", dashboard.url, "--group", group, "--token", token, "--data", str(data), *args])


def ready(gateway: Gateway) -> bool:
    try:
        return httpx.get(gateway.url("admin") + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ready(*gateways: Gateway, timeout: float = 20.0) -> None:
    for gateway in gateways:
        try:
            wait_for(functools.partial(ready, gateway), timeout, what=f"{gateway.config_path.name} ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{gateway.output()}") from None


@contextlib.contextmanager
def caller_and_owner(directory: Path, services: dict[str, Any]) -> Iterator[tuple[Dashboard, Gateway, Gateway]]:
    """A dashboard whose mesh document puts `services` in group "rpc", and two joined gateways, ready: "shop"'s,
    which calls them, and "rpc"'s, which owns them. Everything is stopped at the end."""
    mesh_file = directory / "mesh.yaml"
    mesh_file.write_text(yaml.safe_dump({"groups": {"shop": [], "rpc": list(services)}, "services": services}))
    dashboard = Dashboard(directory / "dashboard", "--config", str(mesh_file))
    gateways: list[Gateway] = []
    try:
        gateways.append(joined_gateway(dashboard, directory, "shop"))
        gateways.append(joined_gateway(dashboard, directory, "rpc"))
        wait_ready(*gateways)
        yield dashboard, gateways[0], gateways[1]
    finally:
        for gateway in gateways:
            gateway.stop()
        dashboard.stop()
