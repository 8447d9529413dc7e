"""`meshgate demo`: a whole mesh on one machine in one command (arguments in `meshgate.cli`).

What it starts, each a child process in its own process group (`meshgate.demoapps.processes`), output in
DATA/logs/:
- the dashboard on `--port-base` (SQLite, CA, spans and `operator-token` in DATA);
- the shop's five service processes (`meshgate.demoapps.shop`) on base+50..54; payments speaks gRPC (the mesh
  document says `protocol: grpc`, storefront calls it with grpcio through its gateway) and refuses one charge in 20
  with UNAVAILABLE;
- a joined gateway per group (shop, catalog, inventory, payments) on base+10·i+0/1/2 (inbound, outbound, admin),
  shop's with the edge listener on base+80; access logs in DATA/logs, every trace exported to the dashboard;
- the traffic generator (`meshgate.demoapps.traffic`) at the edge.

Start-up, every step waited for with a deadline: all ports free (else one line naming the port, exit 2, nothing
started); the dashboard serving; the mesh document put through the API (catalog v1 90 / v2 10); a join token per
group; the gateways ready; the home page and a checkout answered 200 through the edge; traffic on. Then one block
with the URL, the operator token, a `curl`, the `meshgate rollout` command that follows a rollout, and how to stop.

With `--rollout`, once the traffic is on, the demo starts an automated canary rollout of catalog v2 against v1
through the API (`ROLLOUT`: steps 10, 25, 50, a decision every 30 s). v2 fails every 33rd request and is 60 ms
slower, so the judge rolls it back by itself, v1 back to 100 %, and `meshgate rollout status catalog` explains why.

Ctrl-C, SIGTERM or the end of `--duration` stops the traffic first, then the services and gateways, then the
dashboard, and checks that no process of any of their groups is left (exit 0). A child that exits on its own
stops the demo with the end of its log (exit 1). Without `--data` the data directory is temporary and removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import yaml

from meshgate.demoapps.processes import Child, ChildExited, Children

GROUPS = ("shop", "catalog", "inventory", "payments")
LISTENERS = ("inbound", "outbound", "admin")
EDGE_OFFSET = 80
HOST = "127.0.0.1"
DRAIN = "3s"  # gateways and the dashboard, on the way out: the traffic has stopped by then
# `--rollout`: the body of POST /api/v1/services/catalog/rollout (dashboard.api.bodies.RolloutBody)
ROLLOUT_STEPS = (10, 25, 50)  # the first is the mesh document's v2 weight: the rollout begins where the demo is
ROLLOUT_INTERVAL = 30  # seconds between decisions to step up (a rollback needs no wait)
ROLLOUT = {
    "canary": "v2",
    "primary": "v1",
    "steps": list(ROLLOUT_STEPS),
    "interval": float(ROLLOUT_INTERVAL),
    "reason": "demo: automated canary analysis of catalog v2",
}


@dataclass(frozen=True)
class App:
    service: str
    group: str
    version: str
    offset: int  # its port is --port-base + offset
    args: tuple[str, ...] = ()
    grpc: bool = False

    @property
    def name(self) -> str:
        return f"{self.service}-{self.version}" if self.service == "catalog" else self.service


APPS = (
    App("storefront", "shop", "v1", 50),
    App("catalog", "catalog", "v1", 51),
    App("catalog", "catalog", "v2", 52, ("--latency", "60ms", "--fail-every", "33")),  # the canary: worse
    App("inventory", "inventory", "v1", 53),
    App("payments", "payments", "v1", 54, ("--fail-every", "20"), grpc=True),  # a flaky payment provider
)
GRPC_SERVICES = tuple(app.service for app in APPS if app.grpc)
GRPC_APPS = {app.name: app for app in APPS if app.grpc}


@dataclass(frozen=True)
class Ports:
    """Every port the demo uses, from one base.

    >>> Ports(19000).gateway("catalog", "outbound"), Ports(19000).edge
    (19021, 19080)
    """

    base: int

    @property
    def dashboard(self) -> int:
        return self.base

    @property
    def edge(self) -> int:
        return self.base + EDGE_OFFSET

    def gateway(self, group: str, listener: str) -> int:
        return self.base + 10 * (GROUPS.index(group) + 1) + LISTENERS.index(listener)

    def app(self, app: App) -> int:
        return self.base + app.offset

    def named(self) -> list[tuple[int, str]]:
        ports = [(self.dashboard, "the dashboard"), (self.edge, "the shop gateway's edge listener")]
        ports += [(self.gateway(g, kind), f"the {g} gateway's {kind} listener") for g in GROUPS for kind in LISTENERS]
        ports += [(self.app(app), f"the {app.service} {app.version} service") for app in APPS]
        return sorted(ports)


def first_busy(ports: Ports) -> tuple[int, str] | None:
    """The first port something else listens on (bound as the servers bind: with SO_REUSEADDR)."""
    for port, what in ports.named():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
                sock.listen(1)
            except OSError:
                return port, what
    return None


def mesh_document(ports: Ports) -> dict[str, Any]:
    """Groups and services: storefront (shop), catalog v1/v2 at 90/10, inventory (catalog's only), payments (gRPC)."""

    def subsets(service: str) -> dict[str, Any]:
        return {app.version: {"endpoints": [f"{HOST}:{ports.app(app)}"]} for app in APPS if app.service == service}

    return {
        "groups": {group: [app.service for app in APPS if app.group == group][:1] for group in GROUPS},
        "services": {
            "storefront": {"subsets": subsets("storefront")},
            "catalog": {
                "subsets": subsets("catalog"),
                "routes": [{"name": "default", "split": {"v1": 90, "v2": 10}}],
                # Not retrying 503s keeps the canary's failures visible, as they would be to its users.
                "retries": {"attempts": 2, "on": ["connect-failure", "reset"]},
            },
            "inventory": {"subsets": subsets("inventory"), "authorization": {"allow": ["catalog"]}},
            "payments": {
                "subsets": subsets("payments"),
                "protocol": "grpc",
                "health": {},  # grpc.health.v1 Check, asked by the gateways
                # A charge is retried only when it cannot have reached payments: an UNAVAILABLE stays the shop's.
                "retries": {"attempts": 2, "on": ["connect-failure"]},
                "authorization": {"allow": ["shop"]},
            },
        },
    }


def gateway_section(group: str, ports: Ports, logs: Path, access_log: bool) -> dict[str, Any]:
    listen = {kind: f"{HOST}:{ports.gateway(group, kind)}" for kind in LISTENERS}
    if group == "shop":
        listen["edge"] = f"{HOST}:{ports.edge}"
    telemetry = {
        "access_log": str(logs / f"access-{group}.log") if access_log else "off",
        # Every trace: a demo's load is small, and the trace page should find any request with its app spans.
        "tracing": {"endpoint": f"http://{HOST}:{ports.dashboard}/v1/traces", "sampling": "100%"},
    }
    return {"gateway": {"group": group, "listen": listen, "telemetry": telemetry}}


class DemoError(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class Interrupted(Exception):
    """A signal arrived before the demo was ready."""


class Demo:
    """The running demo: start it, print how to use it, wait, stop it.

    >>> demo = Demo(Ports(19000), Path("/tmp/demo"), rate=5.0, access_log=True, rollout=True)
    >>> demo.start(); print(demo.block(None)); demo.wait(60.0); demo.stop()
    """

    def __init__(
        self,
        ports: Ports,
        data: Path,
        rate: float,
        access_log: bool,
        temporary: bool = False,
        rollout: bool = False,
    ) -> None:
        self.ports = ports
        self.data = data
        self.temporary = temporary
        self.rate = rate
        self.access_log = access_log
        self.rollout = rollout
        self.logs = data / "logs"
        self.children = Children(self.logs)
        self.dashboard_url = f"http://{HOST}:{ports.dashboard}"
        self.edge_url = f"http://{HOST}:{ports.edge}"
        self.http = httpx.Client(timeout=2.0, trust_env=False)
        self.signalled: str | None = None

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = signal.Signals(signum).name

    # Start-up

    def start(self) -> None:
        dashboard = self._start_dashboard()
        apps = [self._start_app(app) for app in APPS]  # they need nothing else to come up
        self._step("dashboard", self.dashboard_url, lambda: self._wait([dashboard], "/metrics", 30))
        self._step("mesh config", "4 groups; catalog v1 90 / v2 10", self._put_mesh, lambda v: f"version {v}, ")
        names = ", ".join(app.name for app in APPS)
        self._step("services", names, lambda: self._wait(apps, "/healthz", 20))
        tokens = self._step("join tokens", ", ".join(GROUPS), self._join_tokens)
        gateways = [self._start_gateway(group, tokens[group]) for group in GROUPS]
        self._step("gateways", ", ".join(GROUPS), lambda: self._wait(gateways, "/ready", 30))
        self._step("end to end", "edge -> storefront -> catalog -> inventory, payments", self._wait_end_to_end)
        traffic = [sys.executable, "-m", "meshgate.demoapps.traffic", "--url", self.edge_url, "--rate", str(self.rate)]
        self.children.start("traffic", traffic)
        print(
            f"meshgate demo: traffic         {self.rate:g} req/s at the shop gateway's edge {self.edge_url}", flush=True
        )
        if self.rollout:
            detail = f"catalog v2 against v1, steps {self._steps(' %, ')} %, a decision every {ROLLOUT_INTERVAL}s"
            self._step("rollout", detail, self._start_rollout, lambda rollout_id: f"{rollout_id}, ")
            print(f"meshgate demo: follow it       {self.status_command()}", flush=True)

    def _step(
        self, label: str, detail: str, action: Callable[[], Any], note: Callable[[Any], str] | None = None
    ) -> Any:
        print(f"meshgate demo: {label:<15} {detail} ...", end=" ", flush=True)
        started = time.monotonic()
        try:
            result = action()
        except BaseException:
            print("", flush=True)
            raise
        print(f"ok ({note(result) if note else ''}{time.monotonic() - started:.1f}s)", flush=True)
        return result

    def _start_dashboard(self) -> Child:
        argv = [sys.executable, "-m", "meshgate.cli", "dashboard", "--listen", f"{HOST}:{self.ports.dashboard}"]
        argv += ["--data", str(self.data), "--signals-step", "2s", "--drain-timeout", DRAIN]
        return self.children.start("dashboard", argv)

    def _start_app(self, app: App) -> Child:
        outbound = self.ports.gateway(app.group, "outbound")
        argv = [sys.executable, "-m", "meshgate.demoapps.shop", app.service, "--port", str(self.ports.app(app))]
        argv += ["--version", app.version, "--gateway", f"http://{HOST}:{outbound}"]
        argv += ["--otlp", f"{self.dashboard_url}/v1/traces", *app.args]
        argv += [f"--grpc={service}" for service in GRPC_SERVICES]
        return self.children.start(app.name, argv)

    def _start_gateway(self, group: str, token: str) -> Child:
        config = self.data / "gateways" / f"{group}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(gateway_section(group, self.ports, self.logs, self.access_log)))
        argv = [sys.executable, "-m", "meshgate.cli", "gateway", "--control", self.dashboard_url, "--group", group]
        argv += ["--config", str(config), "--data", str(self.data / "gateways" / group), "--drain-timeout", DRAIN]
        return self.children.start(f"gateway-{group}", argv, env={"MESHGATE_JOIN_TOKEN": token})

    def _wait(self, children: list[Child], path: str, timeout: float) -> None:
        """Until every child answers 200 on `path` (a gRPC app: SERVING to grpc.health.v1 Check)."""
        probes = {child.name: self._grpc_probe(child, timeout) for child in children if child.name in GRPC_APPS}
        waiting = {child.name: self._health_url(child, path) for child in children if child.name not in probes}

        def done() -> bool:
            for name in [name for name, url in waiting.items() if self._ok(url)]:
                del waiting[name]
            for name in [name for name, probe in probes.items() if probe.poll() == 0]:
                del probes[name]
            return not waiting and not probes

        def what() -> str:
            return ", ".join([*(f"{name} ({path})" for name in sorted(waiting)), *(f"{n} (gRPC)" for n in probes)])

        try:
            self._until(done, timeout, what)
        finally:
            for probe in probes.values():
                probe.kill()
                probe.wait()

    def _grpc_probe(self, child: Child, timeout: float) -> subprocess.Popen[bytes]:
        # A process of its own: grpcio's threads stay out of the demo, which forks every other child.
        address = f"{HOST}:{self.ports.app(GRPC_APPS[child.name])}"
        return subprocess.Popen(
            [sys.executable, "-m", "meshgate.demoapps.rpc", "check", address, "--timeout", f"{timeout:g}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches only the demo, which then stops in order
        )

    def _health_url(self, child: Child, path: str) -> str:
        if child.name == "dashboard":
            return self.dashboard_url + path
        if child.name.startswith("gateway-"):
            return f"http://{HOST}:{self.ports.gateway(child.name.removeprefix('gateway-'), 'admin')}{path}"
        app = next(app for app in APPS if app.name == child.name)
        return f"http://{HOST}:{self.ports.app(app)}{path}"

    def _ok(self, url: str, method: str = "GET", **kwargs: Any) -> bool:
        try:
            return self.http.request(method, url, **kwargs).status_code == 200
        except httpx.HTTPError:
            return False

    def _until(self, done: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
        """Poll `done` until true; a signal, a child's exit or the deadline ends the wait with an exception."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            if done():
                return
            if time.monotonic() > deadline:
                waited_for = what if isinstance(what, str) else what()
                raise DemoError(f"not ready after {timeout:.0f}s: {waited_for} (logs in {self.logs})")
            time.sleep(0.05)

    def _put_mesh(self) -> int:
        body = {"mesh": mesh_document(self.ports), "reason": f"meshgate demo --port-base {self.ports.base}"}
        answer = self.http.put(f"{self.dashboard_url}/api/v1/config", json=body, headers=self._auth())
        if answer.status_code != 200:
            raise DemoError(f"the dashboard refused the demo mesh: {answer.status_code} {answer.text.strip()}")
        return int(answer.json()["version"])

    def _start_rollout(self) -> str:
        url = f"{self.dashboard_url}/api/v1/services/catalog/rollout"
        answer = self.http.post(url, json=ROLLOUT, headers=self._auth())
        if answer.status_code != 201:
            raise DemoError(f"the dashboard refused the catalog rollout: {answer.status_code} {answer.text.strip()}")
        return str(answer.json()["id"])

    @staticmethod
    def _steps(separator: str) -> str:
        return separator.join(str(weight) for weight in ROLLOUT_STEPS)

    def _connection(self) -> str:
        return f"--server {self.dashboard_url} --token-file {self.data / 'operator-token'}"

    def status_command(self) -> str:
        return f"meshgate rollout status catalog {self._connection()}"

    def start_command(self) -> str:
        return (
            f"meshgate rollout start catalog --canary v2 --steps {self._steps(',')} --interval {ROLLOUT_INTERVAL}s "
            f"{self._connection()}"
        )

    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.operator_token()}"}

    def operator_token(self) -> str:
        try:
            return (self.data / "operator-token").read_text().strip()
        except OSError as err:
            raise DemoError(f"no operator token in {self.data}: {err.strerror}") from None

    def _join_tokens(self) -> dict[str, str]:
        base = [sys.executable, "-m", "meshgate.cli", "dashboard", "token", "create", "--data", str(self.data)]
        procs = {
            group: subprocess.Popen(
                [*base, "--role", "gateway", "--group", group, "--name", f"meshgate-demo-{group}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # a terminal's Ctrl-C reaches only the demo, which then stops in order
            )
            for group in GROUPS
        }
        tokens = {}
        for group, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise DemoError(f"no join token for {group} after 20s") from None
            if proc.returncode != 0:
                raise DemoError(f"no join token for {group}: {err.strip()}")
            tokens[group] = out.strip()
        return tokens

    def _wait_end_to_end(self) -> None:
        # Each gateway learns the others' addresses from the dashboard as their heartbeats go round.
        home = self.edge_url + "/"
        checkout = self.edge_url + "/checkout"
        headers = {"host": "storefront"}
        self._until(lambda: self._ok(home, headers=headers), 30, "GET / through the edge")
        order = {"product": 1, "quantity": 1}
        self._until(lambda: self._ok(checkout, "POST", headers=headers, json=order), 30, "POST /checkout")

    def check(self) -> None:
        if self.signalled is not None:
            raise Interrupted(self.signalled)
        try:
            self.children.check()
        except ChildExited as exited:
            tail = exited.child.tail()
            status = 2 if "in use" in tail else 1
            hint = "; choose other ports with --port-base N" if status == 2 else ""
            raise DemoError(f"{exited} ({exited.child.log}){hint}:\n{tail}", status) from None

    # Running

    def block(self, duration: float | None) -> str:
        token_file = self.data / "operator-token"
        stop = (
            f"stops by itself after {duration:g}s; Ctrl-C (or kill {os.getpid()}) stops it sooner"
            if duration is not None
            else f"Ctrl-C (or kill {os.getpid()}) stops every process it started"
        )
        if self.rollout:
            rollout = [
                f"  Rollout    catalog v2 against v1, steps {self._steps(', ')} %, a decision every "
                f"{ROLLOUT_INTERVAL}s; v2 fails every 33rd request",
                f"             and is 60 ms slower, so it rolls back by itself: {self.dashboard_url}/services/catalog",
                f"             {self.status_command()}",
            ]
        else:
            rollout = [f"  Try        {self.start_command()}"]
        rule = "-" * 100
        return "\n".join(
            [
                rule,
                f"meshgate demo is running: 4 service groups with their gateways, {self.rate:g} req/s of shoppers",
                "",
                f"  Dashboard  {self.dashboard_url}/",
                "             topology, the catalog canary at /services/catalog, traces at /traces",
                f"  Log in     operator token {self.operator_token()}",
                f"             (saved in {token_file})",
                f"  Try        curl -i -H 'Host: storefront' {self.edge_url}/",
                "             paste the x-request-id it returns on the Traces page",
                *rollout,
                f"  Stop       {stop}",
                f"  Logs       {self.logs}" + (" (removed at exit; --data DIR keeps them)" if self.temporary else ""),
                rule,
            ]
        )

    def wait(self, duration: float | None) -> None:
        end = None if duration is None else time.monotonic() + duration
        while end is None or time.monotonic() < end:
            self.check()
            time.sleep(0.1)

    def stop(self) -> list[str]:
        """Stop everything; the names of children with processes still left (none, normally)."""
        traffic = [child for child in self.children.all if child.name == "traffic"]
        self.children.stop(traffic)
        summary = [line for line in traffic[0].tail().splitlines() if line.startswith("traffic:")] if traffic else []
        dashboard = [child for child in self.children.all if child.name == "dashboard"]
        self.children.stop([child for child in self.children.all if child not in traffic + dashboard])
        self.children.stop(dashboard)
        self.http.close()
        if summary:
            print(f"meshgate demo: {summary[-1]}", flush=True)
        return self.children.left()


def run(args: argparse.Namespace) -> int:
    ports = Ports(args.port_base)
    busy = first_busy(ports)
    if busy is not None:
        port, what = busy
        print(
            f"meshgate: port {port} ({what}) is in use; choose other ports with --port-base N "
            f"(--port-base {ports.base} uses {ports.base}-{ports.edge})",
            file=sys.stderr,
        )
        return 2
    temporary = args.data is None
    data = Path(tempfile.mkdtemp(prefix="meshgate-demo-") if temporary else args.data).resolve()
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"meshgate: --data {args.data}: {err.strerror}", file=sys.stderr)
        return 2
    where = "temporary, removed at exit; --data DIR keeps it" if temporary else "kept"
    print(f"meshgate demo: data directory {data} ({where})", flush=True)
    demo = Demo(ports, data, args.rate, not args.no_access_log, temporary, rollout=args.rollout)
    previous = {signum: signal.signal(signum, demo.on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        demo.start()
        print(demo.block(args.duration), flush=True)
        demo.wait(args.duration)
    except Interrupted as signalled:
        print(f"meshgate demo: {signalled}, stopping", flush=True)
    except DemoError as err:
        print(f"meshgate: {err}", file=sys.stderr, flush=True)
        status = err.status
    finally:
        count = len(demo.children.all)
        left = demo.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if temporary and status == 0:
            shutil.rmtree(data, ignore_errors=True)
        elif temporary:
            print(f"meshgate demo: logs kept in {demo.logs}", file=sys.stderr, flush=True)
    if left:
        print(f"meshgate: processes left running: {', '.join(left)}", file=sys.stderr)
        return 1
    print(f"meshgate demo: stopped {count} processes, none left", flush=True)
    return status
