"""`meshgate demo` as a newcomer runs it: real processes on loopback, checked through the printed block and the
dashboard's API, and nothing left behind afterwards."""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import pytest

from meshgate.demo import Ports, first_busy
from tests.conftest import ROOT, metric, wait_for

BLOCK_TIMEOUT = 40.0  # seconds from the command to its printed block


def free_port_base() -> int:
    for _ in range(100):
        base = random.randrange(20000, 60000, 100)
        if first_busy(Ports(base)) is None:
            return base
    raise AssertionError("no free range of demo ports")


@dataclass
class Block:
    url: str
    token: str
    curl: str


@dataclass
class DemoRun:
    """`meshgate demo ARGS` with its output collected; `block()` waits for the printed block."""

    args: tuple[str, ...]
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshgate.cli", "demo", *self.args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def block(self) -> Block:
        def printed() -> Block | None:
            text = self.output()
            if self.proc.poll() is not None:
                raise AssertionError(f"meshgate demo exited with {self.proc.returncode}:\n{text}")
            url = re.search(r"^  Dashboard  (\S+)/$", text, re.M)
            token = re.search(r"^  Log in     operator token (\S+)$", text, re.M)
            curl = re.search(r"^  Try        (curl .+)$", text, re.M)
            if url and token and curl and re.search(r"^  Stop ", text, re.M):
                return Block(url[1], token[1], curl[1])
            return None

        try:
            found: Block = wait_for(printed, BLOCK_TIMEOUT, 0.05, "the demo's block")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.output()}") from None
        return found

    def descendants(self) -> list[psutil.Process]:
        found: list[psutil.Process] = psutil.Process(self.proc.pid).children(recursive=True)
        return found

    def wait(self, timeout: float) -> int:
        try:
            status = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.reader.join(5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        return status


@pytest.fixture
def start_demo() -> Iterator[Any]:
    runs: list[DemoRun] = []

    def start(*args: str) -> DemoRun:
        run = DemoRun(args)
        runs.append(run)
        return run

    yield start
    for run in runs:  # a failed test still stops its demo (SIGTERM: the demo stops its children)
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGTERM)
            run.wait(30)


def gone(processes: list[psutil.Process]) -> list[str]:
    """The processes of `processes` still running (zombies count as gone)."""
    left = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {' '.join(process.cmdline())}")
        except psutil.NoSuchProcess:
            continue
    return left


def run_curl(command: str) -> tuple[int, dict[str, str]]:
    """Run the printed curl (the real one when installed): the response's status and headers (names lowercase)."""
    argv = shlex.split(command)
    if shutil.which("curl") is None:  # the same request without curl: `curl -i -H 'Host: h' URL`
        answer = httpx.get(argv[-1], headers=dict([argv[3].split(": ", 1)]), timeout=10, trust_env=False)
        return answer.status_code, dict(answer.headers)
    done = subprocess.run(argv, capture_output=True, timeout=15, check=True)  # bytes: keep the CRLFs
    status, *lines = done.stdout.decode().split("\r\n\r\n", 1)[0].split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status.split()[1]), {name.lower(): value for name, value in headers.items()}


def test_the_demo_runs_a_live_mesh_and_leaves_nothing_behind(start_demo: Any) -> None:
    base = free_port_base()
    demo = start_demo("--duration", "20s", "--rate", "20", "--port-base", str(base))
    block = demo.block()
    ready_at = time.monotonic()
    children = demo.descendants()
    assert len(children) >= 11, children  # dashboard, 4 gateways, 5 services, traffic
    assert block.url == f"http://127.0.0.1:{base}"
    assert block.curl == f"curl -i -H 'Host: storefront' http://127.0.0.1:{base + 80}/"

    # The printed curl works and returns its request ID (a rare retried canary failure is still a 200).
    status, headers = run_curl(block.curl)
    assert status == 200, headers
    request_id = headers["x-request-id"]

    with httpx.Client(base_url=f"{block.url}/api/v1", headers={"authorization": f"Bearer {block.token}"}) as api:
        # Every group's gateway is live and in sync.
        def in_sync() -> bool:
            gateways = api.get("/gateways").json()
            return sorted(g["group"] for g in gateways if g["in_sync"] and not g["stale"]) == [
                "catalog",
                "inventory",
                "payments",
                "shop",
            ]

        wait_for(in_sync, 10, 0.2, "four gateways in sync")

        # The request is one trace: hops from several gateways with the services' own spans between them.
        def trace() -> list[dict[str, Any]] | None:
            spans: list[dict[str, Any]] = api.get("/traces", params={"request_id": request_id}).json()["spans"]
            hops = {span["group"] for span in spans if span["service"].startswith("meshgate-gateway-")}
            apps = {span["service"] for span in spans if "store" in span["found_in"]} - {
                f"meshgate-gateway-{group}" for group in hops
            }
            return (
                spans
                if {"shop", "catalog", "inventory"} <= hops and apps >= {"storefront", "catalog", "inventory"}
                else None
            )

        spans = wait_for(trace, 10, 0.2, f"the trace of {request_id} with app spans")
        assert len({span["trace_id"] for span in spans}) == 1
        by_id = {span["span_id"]: span for span in spans}
        catalog_app = next(s for s in spans if s["service"] == "catalog" and s["kind"] == "server")
        parent = by_id[catalog_app["parent_span_id"]]  # the catalog gateway's inbound hop
        assert parent["service"] == "meshgate-gateway-catalog" and parent["reporter"] == "destination"

        # The topology is alive: every call between groups has a rate.
        def edges() -> dict[tuple[str, str], dict[str, Any]] | None:
            found = {(e["source"], e["destination"]): e for e in api.get("/topology?window=5m").json()["edges"]}
            wanted = [("group:shop", "service:catalog"), ("group:catalog", "service:inventory")]
            wanted.append(("group:shop", "service:payments"))
            return found if all(float(found.get(key, {}).get("rps") or 0) > 0 for key in wanted) else None

        wait_for(edges, 10, 0.2, "shop->catalog, catalog->inventory and shop->payments with traffic")

        # Payments speaks gRPC: the shop gateway counts each charge with its gRPC status, and one in 20 is refused.
        shop = f"http://127.0.0.1:{Ports(base).gateway('shop', 'admin')}"  # the demo's gateway, not the test's

        def charges() -> tuple[float, float] | None:
            refused = metric(shop, "meshgate_requests_total", destination="payments", grpc_status="14")
            ok = metric(shop, "meshgate_requests_total", destination="payments", grpc_status="0")
            return (ok, refused) if refused else None

        ok, refused = wait_for(charges, max(1.0, ready_at + 15 - time.monotonic()), 0.2, "a refused gRPC charge")
        assert ok >= 19 * refused, (ok, refused)  # at most one in 20, read before the OKs (counters only grow)
        assert metric(shop, "meshgate_requests_total", destination="payments", grpc_status="") == 0

        # The canary fails every 33rd request, and only the canary fails.
        def catalog_totals() -> dict[str, dict[str, Any]] | None:
            subsets = api.get("/services/catalog/signals?window=5m").json()["subsets"]
            totals = {name: subset["totals"] for name, subset in subsets.items()}
            return totals if totals["v2"]["errors"] else None

        totals = wait_for(catalog_totals, max(1.0, ready_at + 19 - time.monotonic()), 0.5, "v2's first failures")
    v1, v2 = totals["v1"], totals["v2"]
    assert v1["errors"] == 0 and v1["requests"] > 5 * v2["requests"], totals
    assert abs(v2["errors"] - v2["requests"] / 33) <= 1, totals
    assert 0.015 <= v2["errors"] / v2["requests"] <= 0.035, totals  # about 3 %

    assert demo.wait(30) == 0, demo.output()
    assert "stopped 11 processes, none left" in demo.output()
    assert gone(children) == [], demo.output()
    assert first_busy(Ports(base)) is None


def test_a_port_in_use_is_named_with_a_way_out_and_nothing_starts(start_demo: Any) -> None:
    base = free_port_base()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 80))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "meshgate.cli", "demo", "--port-base", str(base), "--duration", "5s"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"port {base + 80} (the shop gateway's edge listener) is in use" in done.stderr
    assert "--port-base" in done.stderr
    started = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if any(f"127.0.0.1:{base}" in arg for arg in p.info["cmdline"] or ())
    ]
    assert started == []


def test_sigterm_stops_every_process_it_started(start_demo: Any) -> None:
    base = free_port_base()
    demo = start_demo("--port-base", str(base), "--duration", "60s")
    demo.block()
    children = demo.descendants()
    assert len(children) >= 11
    demo.proc.send_signal(signal.SIGTERM)
    assert demo.wait(30) == 0, demo.output()
    assert "SIGTERM, stopping" in demo.output()
    assert gone(children) == [], demo.output()
    assert first_busy(Ports(base)) is None
