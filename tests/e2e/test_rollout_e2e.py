"""Automated canary rollouts end to end, on real processes and sockets (issue 14's "End to end" proof).

- `meshgate demo --rollout`: catalog v2 (every 33rd request fails, 60 ms slower) is rolled back by itself, and
  `meshgate rollout status`, request lookup, the audit log, `meshgate get rollouts` and /metrics all say so.
- A healthy canary (two identical upstream processes behind one joined gateway, load from this test) is promoted
  step by step to 100 %, the service's weights following each step.
- A dashboard SIGKILLed in the middle of a rollout resumes it after a restart on the same SQLite data: same id,
  same step or later, more ticks, no second start, then a promotion; its replay gives the same outcomes.

Every wait polls with a deadline; the load thread's pacing is the only timed wait.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT, Gateway, wait_for
from tests.e2e.mesh import Dashboard, joined_gateway, wait_ready
from tests.e2e.servers import UpstreamProcess
from tests.e2e.test_demo import free_port_base, start_demo

__all__ = ["start_demo"]  # the fixture, used here as in test_demo

# Each request waits 5 ms in the upstream, as a real service's work would.
PATH = "/delay/5"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def cli(*args: str) -> str:
    """`meshgate ARGS` as a subprocess: its stdout (a non-zero exit fails the test with its stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "meshgate.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, f"meshgate {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
    return done.stdout


def dashboard_metric(url: str, name: str, **labels: str) -> float | None:
    """The value of the one sample of `name` on the dashboard's /metrics whose labels include `labels`."""
    for line in httpx.get(url + "/metrics", timeout=5, trust_env=False).text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith(name + "{") and all(f'{key}="{wanted}"' in head for key, wanted in labels.items()):
            return float(value)
    return None


# The demo


@pytest.mark.slow
@pytest.mark.timeout(300)  # start-up, up to 120 s for the rollback, and the stop
def test_the_demo_rollout_of_catalog_v2_rolls_back_by_itself_and_explains_why(start_demo: Any, tmp_path: Path) -> None:
    base = free_port_base()
    data = tmp_path / "demo"
    demo = start_demo("--rollout", "--rate", "40", "--port-base", str(base), "--data", str(data), "--duration", "180s")
    block = demo.block()
    token_file = data / "operator-token"
    output = demo.output()
    status_command = f"meshgate rollout status catalog --server {block.url} --token-file {token_file}"
    assert re.search(r"^meshgate demo: rollout +catalog v2 against v1.* ok \(catalog-[0-9a-f]+, ", output, re.M), output
    assert f"meshgate demo: follow it       {status_command}" in output
    assert f"             {status_command}" in output and f"{block.url}/services/catalog" in output
    connection = ("--server", block.url, "--token-file", str(token_file))

    with httpx.Client(base_url=f"{block.url}/api/v1", headers={"authorization": f"Bearer {block.token}"}) as api:
        rollout = api.get("/services/catalog/rollout").json()
        assert rollout["reason"] == "demo: automated canary analysis of catalog v2"
        assert rollout["spec"]["steps"] == [10, 25, 50] and rollout["spec"]["interval"] == 30

        def ended() -> dict[str, Any] | None:
            found: dict[str, Any] = api.get("/services/catalog/rollout").json()
            return found if not found["active"] else None

        rollout = wait_for(ended, 120, 0.5, "the demo's rollout to end")
        assert rollout["phase"] == "rolled_back", rollout
        assert api.get("/services/catalog").json()["weights"] == {"v1": 100, "v2": 0}

        # The explanation: the verdict's sentence with the counts on each side, and example request IDs.
        status = cli("rollout", "status", "catalog", *connection)
        sentence = re.search(
            r"^rolled back at 10 %: roll back: .*canary (\d+) of (\d+).*primary (\d+) of (\d+)", status, re.M
        )
        assert sentence is not None, status
        assert int(sentence[1]) > 0 and int(sentence[2]) >= int(sentence[1]), status
        rollback = next(line for line in status.splitlines() if re.match(r"\d\d:\d\d:\d\d +rollback ", line))
        examples = re.findall(UUID, rollback)
        assert examples, status

        # Request lookup finds one of them: a request the canary served.
        def looked_up() -> dict[str, Any] | None:
            for request_id in examples:
                answer = api.get("/traces", params={"request_id": request_id})
                if answer.status_code == 200 and answer.json()["spans"]:
                    return dict(answer.json())
            return None

        trace = wait_for(looked_up, 10, 0.2, f"request lookup of one of {examples}")
        assert any(span["destination"] == "catalog" and span["subset"] == "v2" for span in trace["spans"]), trace

        audit = api.get("/audit").json()
        starts = [entry for entry in audit if entry["action"] == "rollout.start"]
        assert [entry["target"] for entry in starts] == ["services/catalog/rollout"], audit
        assert starts[0]["reason"] == "demo: automated canary analysis of catalog v2"

    listed = cli("get", "rollouts", *connection)
    assert re.search(r"^catalog +rolled_back +v2 vs v1 +0% ", listed, re.M), listed
    assert dashboard_metric(block.url, "meshgate_rollout_phase", service="catalog", phase="rolled_back") == 1
    assert dashboard_metric(block.url, "meshgate_rollout_phase", service="catalog", phase="progressing") == 0

    demo.proc.terminate()
    assert demo.wait(30) == 0, demo.output()


def test_without_rollout_the_block_shows_how_to_start_one(start_demo: Any, tmp_path: Path) -> None:
    base = free_port_base()
    data = tmp_path / "demo"
    demo = start_demo("--port-base", str(base), "--data", str(data), "--duration", "60s")
    block = demo.block()
    wanted = (
        f"  Try        meshgate rollout start catalog --canary v2 --steps 10,25,50 --interval 30s "
        f"--server {block.url} --token-file {data / 'operator-token'}"
    )
    assert wanted in demo.output().splitlines(), demo.output()
    assert "meshgate demo: rollout" not in demo.output()
    with httpx.Client(base_url=f"{block.url}/api/v1", headers={"authorization": f"Bearer {block.token}"}) as api:
        assert api.get("/services/catalog/rollout").status_code == 404
    demo.proc.terminate()
    assert demo.wait(30) == 0, demo.output()


# A healthy canary on one joined gateway


class Load:
    """Keep-alive GETs through the gateway's edge listener from a few threads, a few hundred a second in all,
    until stopped; each answer's status is counted."""

    def __init__(self, address: tuple[str, int], host: str, path: str, threads: int = 4, pause: float = 0.004) -> None:
        self.address = address
        self.host = host
        self.path = path
        self.pause = pause
        self.stopping = threading.Event()
        self.statuses: dict[int, int] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        connection: http.client.HTTPConnection | None = None
        while not self.stopping.is_set():
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(*self.address, timeout=5)
                connection.request("GET", self.path, headers={"host": self.host})
                answer = connection.getresponse()
                answer.read()
                status = answer.status
            except (OSError, http.client.HTTPException):  # counted as 0; a new connection next time
                status = 0
                if connection is not None:
                    connection.close()
                connection = None
            with self.lock:
                self.statuses[status] = self.statuses.get(status, 0) + 1
            self.stopping.wait(self.pause)  # pacing, not synchronisation
        if connection is not None:
            connection.close()

    def total(self) -> int:
        with self.lock:
            return sum(self.statuses.values())

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(10)


@dataclass
class Healthy:
    dashboard: Dashboard
    gateway: Gateway
    load: Load

    def api(self) -> httpx.Client:
        return self.dashboard.api()


@contextlib.contextmanager
def healthy_mesh(directory: Path) -> Iterator[Healthy]:
    """A dashboard (SQLite in `directory`), one joined gateway of group "web" owning `hello`, whose subsets v1 (at
    100 %) and v2 (at 0 %) are identical upstream processes, and load through the gateway's edge listener."""
    upstreams = [UpstreamProcess(name) for name in ("v1", "v2")]
    subsets = {up.name: {"endpoints": [up.address]} for up in upstreams}
    hello = {"subsets": subsets, "routes": [{"name": "default", "split": {"v1": 100, "v2": 0}}]}
    mesh = {"groups": {"web": ["hello"]}, "services": {"hello": hello}}
    (directory / "mesh.yaml").write_text(yaml.safe_dump(mesh))
    dashboard: Dashboard | None = None
    gateway: Gateway | None = None
    load: Load | None = None
    try:
        dashboard = Dashboard(directory / "dashboard", "--config", str(directory / "mesh.yaml"), "--signals-step", "1")
        gateway = joined_gateway(dashboard, directory, "web", "edge")
        wait_ready(gateway)
        load = Load(gateway.addresses["edge"], "hello", PATH)
        wait_for(lambda: load is not None and load.statuses.get(200, 0) >= 100, 20, 0.05, "200s through the gateway")
        yield Healthy(dashboard, gateway, load)
    finally:
        if load is not None:
            load.stop()
        if gateway is not None:
            gateway.stop()
        if dashboard is not None:
            dashboard.stop()
        for upstream in upstreams:
            upstream.stop()


def until_promoted(api: httpx.Client, timeout: float, check: Any = None, step: int | None = None) -> dict[str, Any]:
    """Poll hello's rollout until it is promoted (or, with `step`, at that step or later), calling
    `check(rollout, weight)` on each look; on a timeout or a phase other than progressing, holding or promoted,
    fail with the messages it went through."""
    messages: list[str] = []

    def promoted() -> dict[str, Any] | None:
        weight = api.get("/services/hello").json()["weights"]["v2"]
        rollout: dict[str, Any] = api.get("/services/hello/rollout").json()
        if not messages or messages[-1] != rollout["message"]:
            messages.append(rollout["message"])
        if check is not None:
            check(rollout, weight)
        assert rollout["phase"] in ("progressing", "holding", "promoted"), "\n".join(messages)
        if step is not None:
            return rollout if rollout["step"] >= step and rollout["phase"] != "promoted" else None
        return rollout if rollout["phase"] == "promoted" and weight == 100 else None

    what = "the canary promoted" if step is None else f"step {step + 1}"
    try:
        found: dict[str, Any] = wait_for(promoted, timeout, 0.1, what)
    except AssertionError as err:
        raise AssertionError(f"{err}; messages:\n" + "\n".join(messages[-15:])) from None
    return found


def start_rollout(api: httpx.Client, steps: list[int], interval: float) -> dict[str, Any]:
    body = {"canary": "v2", "primary": "v1", "steps": steps, "interval": interval}
    body["reason"] = "healthy canary"
    answer = api.post("/services/hello/rollout", json=body)
    assert answer.status_code == 201, answer.text
    started: dict[str, Any] = answer.json()
    return started


def test_a_healthy_canary_is_promoted_step_by_step_to_100(tmp_path: Path) -> None:
    with healthy_mesh(tmp_path) as mesh, mesh.api() as api:
        started = start_rollout(api, [20, 50], 3.0)
        assert started["phase"] == "progressing" and started["weight"] == 20
        seen: list[int] = []  # the canary's weights as the service's split shows them, each change once

        def weights(rollout: dict[str, Any], weight: int) -> None:
            if not seen or seen[-1] != weight:
                seen.append(weight)

        rollout = until_promoted(api, 50, weights)
        assert seen == [20, 50, 100], seen
        assert rollout["id"] == started["id"] and rollout["new_primary"] == "v2", rollout
        assert api.get("/services/hello").json()["weights"] == {"v1": 0, "v2": 100}
        actions = [entry["action"] for entry in api.get("/services/hello/rollout/decisions").json()["decisions"]]
        assert actions[0] == "start" and actions[-1] == "promote" and actions.count("step") == 1, actions
        assert "rollback" not in actions
        assert mesh.load.statuses.get(200, 0) >= 0.99 * mesh.load.total(), mesh.load.statuses


def test_a_rollout_resumes_where_it_was_after_the_dashboard_is_sigkilled(tmp_path: Path) -> None:
    with healthy_mesh(tmp_path) as mesh:
        with mesh.api() as api:
            started = start_rollout(api, [20, 40, 60], 5.0)
            before = until_promoted(api, 45, step=1)
            ticks_before = api.get("/services/hello/rollout/replay").json()["ticks"]
        mesh.dashboard.kill()  # SIGKILL: no drain, no goodbye to the store
        mesh.dashboard.restart()  # the same port and data directory

        with mesh.api() as api:
            after = api.get("/services/hello/rollout").json()
            assert after["id"] == started["id"] and after["step"] >= before["step"], (before, after)
            wait_for(
                lambda: api.get("/services/hello/rollout/replay").json()["ticks"] > ticks_before,
                15,
                0.2,
                "a tick after the restart",
            )

            def not_back(rollout: dict[str, Any], weight: int) -> None:
                assert rollout["step"] >= before["step"], rollout  # never back to an earlier step

            rollout = until_promoted(api, 45, not_back)
            assert rollout["id"] == started["id"]
            assert api.get("/services/hello").json()["weights"] == {"v1": 0, "v2": 100}
            decisions = api.get("/services/hello/rollout/decisions").json()["decisions"]
            actions = [entry["action"] for entry in decisions]
            assert actions.count("start") == 1 and actions[-1] == "promote", actions
            replay = api.get("/services/hello/rollout/replay").json()
            assert replay["same"] is True and replay["ticks"] > ticks_before, replay
