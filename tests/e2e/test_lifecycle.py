"""End-to-end tests of a gateway's life: config reload (SIGHUP, file changes, bad files), draining on SIGTERM,
`--workers N` under a supervisor, and the wheel that installs it all.

Reload tests start the gateway from a config file padded to a fixed size, so a SIGHUP test can rewrite the file
in place with the same size and modification time: the gateway's file watcher cannot see that change, and only
the signal can make the new config live.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trustme
import yaml

from tests.conftest import (
    ROOT,
    Gateway,
    RenderConfig,
    StartGateway,
    StartUpstream,
    gateway_config,
    hello,
    listeners,
    raw_request,
    service,
    wait_for,
    workers_of,
)
from tests.e2e.upstream_app import UpstreamServer
from tests.etcd import free_ports

CONFIG_SIZE = 4096  # every config file a test writes is padded to this size (see the module docstring)
SLOW = {"timeouts": {"per_try": "10s", "request": "15s"}}  # so /delay/N requests are not cut by the 1s per-try


def render(config: dict[str, Any]) -> bytes:
    text = yaml.safe_dump(config).encode()
    assert len(text) < CONFIG_SIZE - 2
    return text + b"#" * (CONFIG_SIZE - len(text) - 1) + b"\n"


def write_unseen(path: Path, config: dict[str, Any]) -> None:
    """Rewrite the file in place keeping its inode, size and mtime: only SIGHUP can reveal the change."""
    before = path.stat()
    data = render(config)
    assert len(data) == before.st_size
    with open(path, "r+b") as file:
        file.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def replace_file(path: Path, data: bytes) -> None:
    """Replace the file as editors and config management do: write a new file, rename it over the old one."""
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


@pytest.fixture
def render_config() -> RenderConfig:
    """`start_gateway` writes every config file of this module padded (see the module docstring)."""
    return render


def split(v1: UpstreamServer, v2: UpstreamServer, weights: dict[str, int]) -> dict[str, Any]:
    subsets = {"v1": {"endpoints": [v1.address]}, "v2": {"endpoints": [v2.address]}}
    return {"hello": {"subsets": subsets, "routes": [{"name": "default", "split": weights}]}}


def admin(gw: Gateway, path: str) -> httpx.Response:
    return httpx.get(gw.url("admin") + path, trust_env=False, timeout=5.0)


def version(gw: Gateway) -> int:
    return int(admin(gw, "/config").json()["version"])


def wait_version(gw: Gateway, expected: int, timeout: float = 10.0) -> int:
    """Wait until /config reports at least version `expected`; return the version it reports."""
    return int(wait_for(lambda: (current := version(gw)) >= expected and current, timeout, what=f"version {expected}"))


def sighup_reload(gw: Gateway, config: dict[str, Any]) -> int:
    """Make `config` live through SIGHUP alone; return the new version.

    The watcher can only see the rewrite if it stats the file in the microseconds between the write and the
    mtime restore; then it reloads too and the version moves by two. The log shows that SIGHUP reloaded either way.
    """
    before, signalled = version(gw), gw.output().count("SIGHUP")
    write_unseen(gw.config_path, config)
    gw.signal(signal.SIGHUP)
    wait_for(lambda: gw.output().count("SIGHUP") > signalled, 10.0, what="the SIGHUP reload in the log")
    return wait_version(gw, before + 1)


def fresh_get(
    gw: Gateway, path: str = "/echo", kind: str = "inbound", headers: dict[str, str] | None = None
) -> httpx.Response:
    """One request on a new connection."""
    headers = {"host": "hello", **(headers or {})}
    return httpx.get(gw.url(kind) + path, headers=headers, trust_env=False, timeout=10.0)


def get_in_background(gw: Gateway, path: str) -> Future[httpx.Response]:
    """`fresh_get` on a thread of its own: the future holds the response, or the error that ended the request."""
    future: Future[httpx.Response] = Future()

    def run() -> None:
        try:
            future.set_result(fresh_get(gw, path))
        except Exception as exc:  # handed to the test through the future
            future.set_exception(exc)

    threading.Thread(target=run).start()
    return future


def served_by(gw: Gateway, count: int) -> list[str]:
    return [fresh_get(gw).headers["x-upstream"] for _ in range(count)]


def metric(gw: Gateway, name: str) -> float:
    for line in admin(gw, "/metrics").text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == name:
            return float(parts[1])
    raise AssertionError(f"metric {name} not found")


def refuses_connections(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# Reload


def test_sighup_reload_switches_traffic(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    v1, v2 = start_upstream("v1"), start_upstream("v2")
    gw = start_gateway(gateway_config(hello(v1.address)))
    assert version(gw) == 1
    with httpx.Client(base_url=gw.url(), headers={"host": "hello"}, trust_env=False) as kept_alive:
        assert kept_alive.get("/echo").headers["x-upstream"] == "v1"
        assert sighup_reload(gw, gateway_config(hello(v2.address))) >= 2
        # New connections and an existing keep-alive connection both follow the new snapshot.
        assert kept_alive.get("/echo").headers["x-upstream"] == "v2"
    assert served_by(gw, 5) == ["v2"] * 5
    assert admin(gw, "/config").json()["config"]["services"]["hello"]["subsets"]["v1"]["endpoints"] == [v2.address]
    assert metric(gw, "meshgate_config_version") == version(gw)

    # A split: smooth weighted round robin sends exactly half of each pair of requests to each subset.
    sighup_reload(gw, gateway_config(split(v1, v2, {"v1": 50, "v2": 50})))
    assert sorted(served_by(gw, 10)) == ["v1"] * 5 + ["v2"] * 5


def test_file_change_is_picked_up_without_a_signal(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    v1, v2 = start_upstream("v1"), start_upstream("v2")
    gw = start_gateway(gateway_config(hello(v1.address)))
    assert served_by(gw, 2) == ["v1", "v1"]
    replace_file(gw.config_path, render(gateway_config(split(v1, v2, {"v1": 50, "v2": 50}))))
    assert wait_version(gw, 2) == 2
    assert sorted(served_by(gw, 10)) == ["v1"] * 5 + ["v2"] * 5
    # Rewriting in place (a different size) is noticed too.
    gw.config_path.write_text(yaml.safe_dump(gateway_config(hello(v2.address))))
    assert wait_version(gw, 3) == 3
    assert served_by(gw, 3) == ["v2"] * 3


def test_bad_config_is_rejected_and_the_last_good_one_stays(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    v1, v2 = start_upstream("v1"), start_upstream("v2")
    gw = start_gateway(gateway_config(hello(v1.address)))
    path = str(gw.config_path)

    # An unknown key (a typo of `retries`), revealed by SIGHUP.
    bad = gateway_config(hello(v2.address, retry={"attempts": 1}))
    write_unseen(gw.config_path, bad)
    gw.signal(signal.SIGHUP)
    gw.wait_log("rejected")
    error = next(line for line in gw.lines if "rejected" in line)
    assert path in error
    assert "services.hello.retry" in error
    assert "unknown key" in error
    assert version(gw) == 1
    assert served_by(gw, 3) == ["v1"] * 3
    status = admin(gw, "/config").json()
    assert status["last_reload"].startswith("rejected")
    assert status["config"]["services"]["hello"]["subsets"]["v1"]["endpoints"] == [v1.address]
    assert metric(gw, "meshgate_config_last_reload_success") == 0

    # A bad value, noticed by the file watcher: the error names the file, the field and the value.
    bad_value = gateway_config(hello(v2.address, lb="fastest"))
    replace_file(gw.config_path, render(bad_value))
    wait_for(lambda: "fastest" in gw.output(), 10.0, what="the rejected lb value in the log")
    error = next(line for line in gw.lines if "fastest" in line)
    assert "rejected" in error
    assert path in error
    assert "services.hello.lb" in error
    assert version(gw) == 1
    assert served_by(gw, 3) == ["v1"] * 3

    # A deleted file is an error too; the gateway keeps serving.
    errors = gw.output().count("rejected")
    gw.config_path.unlink()
    wait_for(lambda: gw.output().count("rejected") > errors, 10.0, what="the missing file in the log")
    error = [line for line in gw.lines if "rejected" in line][-1]
    assert path in error and "no such file" in error.lower(), error
    assert version(gw) == 1
    assert served_by(gw, 3) == ["v1"] * 3

    # Fixing the file makes the next version live.
    replace_file(gw.config_path, render(gateway_config(hello(v2.address))))
    assert wait_version(gw, 2) == 2
    assert served_by(gw, 3) == ["v2"] * 3
    assert admin(gw, "/config").json()["last_reload"] == "ok"
    assert metric(gw, "meshgate_config_last_reload_success") == 1
    assert gw.proc.poll() is None


class Traffic:
    """Client threads sending steady GETs; every failure (exception or non-200) is recorded."""

    def __init__(self, gw: Gateway, keep_alive_threads: int = 3, fresh_threads: int = 1) -> None:
        self.gw = gw
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(True,)) for _ in range(keep_alive_threads)]
        self.threads += [threading.Thread(target=self.run, args=(False,)) for _ in range(fresh_threads)]

    def run(self, keep_alive: bool) -> None:
        with httpx.Client(base_url=self.gw.url(), headers={"host": "hello"}, trust_env=False, timeout=10.0) as http:
            while not self.stop.is_set():
                try:
                    response = http.get("/echo") if keep_alive else fresh_get(self.gw)
                    outcome = "" if response.status_code == 200 else f"{response.status_code}: {response.text}"
                except httpx.HTTPError as exc:
                    outcome = repr(exc)
                with self.lock:
                    if outcome:
                        self.failures.append(outcome)
                    else:
                        self.ok += 1

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=15)


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_fifty_reloads_under_load_lose_no_request(
    start_gateway: StartGateway, start_upstream: StartUpstream, workers: str
) -> None:
    v1, v2 = start_upstream("v1"), start_upstream("v2")
    configs = [gateway_config(hello(v1.address)), gateway_config(hello(v2.address))]
    gw = start_gateway(configs[0], "--workers", workers)
    with Traffic(gw) as traffic:
        wait_for(lambda: traffic.ok > 20, 10.0, what="traffic to flow")
        for reload in range(1, 51):
            sighup_reload(gw, configs[reload % 2])
            assert fresh_get(gw).headers["x-upstream"] == ("v2" if reload % 2 else "v1")
        done = traffic.ok
        wait_for(lambda: traffic.ok > done + 20, 10.0, what="traffic after the last reload")
    assert traffic.failures == []
    assert traffic.ok > 200
    assert gw.proc.poll() is None


def test_in_flight_request_finishes_on_its_snapshot(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    v1, v2 = start_upstream("v1"), start_upstream("v2")
    gw = start_gateway(gateway_config(hello(v1.address, **SLOW)))
    slow = get_in_background(gw, "/delay/1000")
    wait_for(lambda: v1.requests >= 1, 5.0, what="the slow request to reach the upstream")
    # The new config drops service `hello` and its endpoint altogether.
    sighup_reload(gw, gateway_config({"other": service(v2.address)}))
    assert fresh_get(gw).status_code == 404
    response = slow.result(timeout=10)
    assert response.status_code == 200
    assert response.headers["x-upstream"] == "v1"


def test_reload_applies_preserve_request_id(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address), listen=listeners("edge")))
    kept = fresh_get(gw, kind="edge", headers={"x-request-id": "edge-id-1"})
    assert kept.headers["x-request-id"] == "edge-id-1"
    sighup_reload(gw, gateway_config(hello(upstream.address), listen=listeners("edge"), preserve_request_id=False))
    assert admin(gw, "/config").json()["config"]["gateway"]["preserve_request_id"] is False
    replaced = fresh_get(gw, kind="edge", headers={"x-request-id": "edge-id-2"})
    assert replaced.status_code == 200
    assert replaced.headers["x-request-id"] != "edge-id-2", "preserve_request_id: false did not take effect on reload"
    assert replaced.json()["headers"]["x-request-id"] == [replaced.headers["x-request-id"]]


def test_reload_never_reports_mtls_that_is_not_enforced(
    start_gateway: StartGateway, start_upstream: StartUpstream, tmp_path: Path
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address)))
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    tls = {"cert": str(tmp_path / "gw.pem"), "key": str(tmp_path / "gw.key"), "ca": str(tmp_path / "ca.pem")}
    server.cert_chain_pems[0].write_to_path(tls["cert"])
    server.private_key_pem.write_to_path(tls["key"])
    ca.cert_pem.write_to_path(tls["ca"])
    signalled = gw.output().count("SIGHUP")
    write_unseen(gw.config_path, gateway_config(hello(upstream.address), tls=tls))
    gw.signal(signal.SIGHUP)
    wait_for(lambda: gw.output().count("SIGHUP") > signalled, 10.0, what="the SIGHUP reload in the log")
    # Adding mTLS may need a restart, but then the gateway must say so and keep reporting what is live:
    # /config must never show a tls block while the inbound listener still serves plaintext.
    plaintext = raw_request(gw.inbound, b"GET /echo HTTP/1.1\r\nhost: hello\r\nconnection: close\r\n\r\n")
    reported = admin(gw, "/config").json()["config"]["gateway"].get("tls")
    if plaintext.startswith(b"HTTP/1.1 200 "):
        assert reported is None, f"/config reports tls {reported} but inbound serves plaintext"
        since = gw.output().split("SIGHUP", signalled)[-1]
        assert "tls" in since.lower(), "the log does not say that the tls change waits for a restart"


# Drain on SIGTERM


def test_sigterm_drains_in_flight_requests(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address, **SLOW)))
    with socket.create_connection(gw.inbound, timeout=5) as idle:
        idle.sendall(b"GET /echo HTTP/1.1\r\nhost: hello\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200 ")  # a keep-alive connection, idle during the drain
        slow = get_in_background(gw, "/delay/1500")
        wait_for(lambda: upstream.requests >= 2, 5.0, what="the slow request to reach the upstream")
        signalled = time.monotonic()
        gw.signal(signal.SIGTERM)
        wait_for(lambda: refuses_connections(gw.inbound), 5.0, what="the inbound listener to close")
        assert idle.recv(65536) == b"", "an idle keep-alive connection is closed at once"
        assert not slow.done(), "the slow request ended before its upstream answered"
        response = slow.result(timeout=10)
    assert response.status_code == 200
    assert response.json()["path"] == "/delay/1500"
    assert response.headers.get("connection") == "close"
    assert gw.proc.wait(timeout=10) == 0
    assert time.monotonic() - signalled < 5.0
    assert refuses_connections(gw.addresses["outbound"])
    assert refuses_connections(gw.admin)


def test_drain_timeout_cuts_long_requests(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address, **SLOW)), "--drain-timeout", "500ms")
    long = get_in_background(gw, "/delay/8000")
    wait_for(lambda: upstream.requests >= 1, 5.0, what="the long request to reach the upstream")
    signalled = time.monotonic()
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=10) == 0
    elapsed = time.monotonic() - signalled
    cut = long.exception(timeout=10)
    assert 0.4 < elapsed < 3.0, elapsed
    assert isinstance(cut, httpx.TransportError), cut or long.result()


# --workers N


def two_workers(gw: Gateway) -> list[psutil.Process]:
    return list(wait_for(lambda: len(workers_of(gw)) == 2 and workers_of(gw), 10.0, what="two workers"))


def alive(process: psutil.Process) -> bool:
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def inbound_connections(process: psutil.Process, port: int) -> int:
    return sum(
        1
        for conn in process.net_connections(kind="tcp")
        if conn.status == psutil.CONN_ESTABLISHED and conn.laddr and conn.laddr.port == port
    )


def test_workers_share_traffic_reload_and_stop_cleanly(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    v1, v2 = start_upstream("v1"), start_upstream("v2")
    gw = start_gateway(gateway_config(hello(v1.address)), "--workers", "2")
    workers = two_workers(gw)
    assert all(worker.pid != gw.proc.pid for worker in workers)
    descendants = psutil.Process(gw.proc.pid).children(recursive=True)

    # Many keep-alive connections, each used once so it has surely been accepted: SO_REUSEPORT spreads them
    # over both workers (all 40 landing on one of two would happen once in 2**39 runs).
    clients = [httpx.Client(base_url=gw.url(), headers={"host": "hello"}, trust_env=False) for _ in range(40)]
    try:
        for http in clients:
            assert http.get("/echo").headers["x-upstream"] == "v1"
        port = gw.inbound[1]
        per_worker = {worker.pid: inbound_connections(worker, port) for worker in workers}
        assert sum(per_worker.values()) == 40, per_worker
        assert all(count > 0 for count in per_worker.values()), per_worker
    finally:
        for http in clients:
            http.close()

    # A reload reaches every worker: every new connection, whichever worker takes it, sees the new routing.
    sighup_reload(gw, gateway_config(hello(v2.address)))
    assert served_by(gw, 20) == ["v2"] * 20
    assert {worker.pid for worker in workers_of(gw)} == {worker.pid for worker in workers}

    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=20) == 0
    wait_for(lambda: not any(alive(p) for p in descendants), 10.0, what="every worker process to exit")
    assert refuses_connections(gw.inbound)


def test_supervisor_replaces_a_killed_worker(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    v1, v2 = start_upstream("v1"), start_upstream("v2")
    gw = start_gateway(gateway_config(hello(v1.address)), "--workers", "2")
    workers = two_workers(gw)
    sighup_reload(gw, gateway_config(hello(v2.address)))
    victim, survivor = workers
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=5)

    def replaced() -> list[psutil.Process] | None:
        current = workers_of(gw)
        pids = {worker.pid for worker in current}
        return current if len(current) == 2 and victim.pid not in pids and survivor.pid in pids else None

    current = wait_for(replaced, 20.0, what="a new worker to replace the killed one")
    newcomer = next(worker for worker in current if worker.pid != survivor.pid)
    gw.wait_log(f"worker {victim.pid} exited")
    # The newcomer starts from the live config (version 2), not the one the gateway started with. Once it has
    # joined the listener, 20 new connections reach it too (missing it every time: once in 2**20 runs).
    wait_for(
        lambda: any(conn.status == psutil.CONN_LISTEN for conn in newcomer.net_connections()),
        10.0,
        what="the new worker to listen",
    )
    assert served_by(gw, 20) == ["v2"] * 20

    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=20) == 0
    wait_for(lambda: not alive(newcomer) and not alive(survivor), 10.0, what="the workers to exit")


def test_workers_drain_in_flight_requests_on_sigterm(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address, **SLOW)), "--workers", "2")
    workers = two_workers(gw)
    slow = get_in_background(gw, "/delay/1500")
    wait_for(lambda: upstream.requests >= 1, 5.0, what="the slow request to reach the upstream")
    gw.signal(signal.SIGTERM)
    wait_for(lambda: refuses_connections(gw.inbound), 5.0, what="the inbound listeners to close")
    assert slow.result(timeout=10).status_code == 200
    assert gw.proc.wait(timeout=20) == 0
    wait_for(lambda: not any(alive(worker) for worker in workers), 10.0, what="the workers to exit")


# Packaging


@pytest.mark.slow  # build isolation fetches setuptools>=75 from the package index (the venv's is older)
def test_wheel_carries_every_module(tmp_path: Path) -> None:
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "meshgate-gateway-*"
    )
    shutil.copytree(ROOT, source, ignore=ignore)  # a copy, so the shared tree gets no build/ or stale files
    out = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = out.glob("meshgate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    # What the wheel must hold is judged on the copy, so files others add or remove meanwhile do not matter.
    expected = {
        path.relative_to(source).as_posix()
        for package in ("meshgate", "gateway", "dashboard")
        for path in (source / package).rglob("*")
        if path.is_file()
    }
    assert "gateway/server.py" in expected and "meshgate/cli.py" in expected
    assert expected - names == set()
    # Top-level static/ and templates/ are mapped into the package data: each file is in the wheel somewhere.
    for directory in ("static", "templates"):
        for path in (source / directory).rglob("*") if (source / directory).is_dir() else ():
            if path.is_file():
                relative = f"{directory}/{path.relative_to(source / directory).as_posix()}"
                assert any(name.endswith(relative) for name in names), relative
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        assert "meshgate = meshgate.cli:main" in archive.read(entry_points).decode()


def test_with_workers_ready_means_a_worker_listens(tmp_path: Path, start_upstream: StartUpstream) -> None:
    """The supervisor's admin listener is up before the workers are: /ready says 503 until one listens, so a probe
    never sends traffic to a port nobody accepts on yet."""
    v1 = start_upstream("v1")
    inbound, admin = free_ports(2)
    listen = {"inbound": f"127.0.0.1:{inbound}", "outbound": "127.0.0.1:0", "admin": f"127.0.0.1:{admin}"}
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(gateway_config(hello(v1.address), listen=listen)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshgate.cli", "gateway", "--config", str(path), "--workers", "2"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        seen: list[int] = []

        def ready() -> bool:
            try:
                seen.append(httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=1, trust_env=False).status_code)
            except httpx.TransportError:
                return False
            return seen[-1] == 200

        wait_for(ready, 30, 0.005, "/ready")
        # The moment /ready says so, the inbound port takes connections and answers.
        reply = httpx.get(f"http://127.0.0.1:{inbound}/echo", headers={"host": "hello"}, timeout=5, trust_env=False)
        assert reply.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
