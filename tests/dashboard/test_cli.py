"""`meshgate dashboard`, `meshgate dashboard token create`, `meshgate apply` and `meshgate get`, run as users run
them: `.venv/bin/meshgate` subprocesses against a dashboard process on a loopback port.

Bad input exits 2 with one line on stderr that names the file, the field and the value, and never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import select
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from dashboard.identity import MeshCA
from dashboard.store import open_store
from tests.conftest import wait_for
from tests.dashboard.dashboards import mesh

ROOT = Path(__file__).resolve().parents[2]
MESHGATE = str(ROOT / ".venv" / "bin" / "meshgate")
TIMEOUT = 20.0
LISTENING = re.compile(r"meshgate dashboard listening http=(\S+) url=(\S+)")
TOKEN_LINE = re.compile(r"made the first operator token: read it from (\S+) \(0600\)")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def meshgate(*args: str, env: dict[str, str] | None = None) -> Result:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MESHGATE_")}
    proc = subprocess.run(
        [MESHGATE, *args], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env={**environment, **(env or {})}
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_bad_input(result: Result, *fragments: str, status: int = 2) -> None:
    assert result.returncode == status, f"exit {result.returncode}:\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


class DashboardProcess:
    """`meshgate dashboard ARGS` with its output collected; `url` from its "listening" line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [MESHGATE, "dashboard", "--listen", "127.0.0.1:0", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.url = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            wait_for(lambda: self.url or self.proc.poll() is not None, TIMEOUT, what="the dashboard to listen")
        except AssertionError:
            self.stop()
            raise
        assert self.url, f"the dashboard exited {self.proc.returncode}:\n{self.output()}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if match := LISTENING.search(line):
                assert match[2] == f"http://{match[1]}"
                self.url = match[2]

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    started: list[DashboardProcess] = []

    def run(*args: str) -> DashboardProcess:
        process = DashboardProcess(*args)
        started.append(process)
        return process

    yield run
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            process.stop()


@pytest.fixture
def mesh_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh()))
    return path


@pytest.fixture
def running(start: Any, tmp_path: Path, mesh_file: Path) -> tuple[DashboardProcess, str]:
    """A dashboard seeded from mesh.yaml, and its bootstrap operator token."""
    dashboard = start("--data", str(tmp_path / "data"), "--config", str(mesh_file))
    wait_for(lambda: TOKEN_LINE.search(dashboard.output()), 5, what="the operator token line")
    token = (tmp_path / "data" / "operator-token").read_text().strip()
    return dashboard, token


def test_first_start_seeds_the_store_and_saves_the_operator_token_but_never_logs_it(
    start: Any, tmp_path: Path, mesh_file: Path
) -> None:
    """Standard output is a pipe here, as under systemd or docker: it is the log, so the token is not printed."""
    data = tmp_path / "data"
    dashboard = start("--data", str(data), "--config", str(mesh_file))
    match = wait_for(lambda: TOKEN_LINE.search(dashboard.output()), 5, what="the operator token line")
    path = Path(match[1])
    token = path.read_text().strip()
    assert path == data / "operator-token" and re.fullmatch(r"mgo_[A-Za-z0-9_-]{43}", token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = httpx.get(f"{dashboard.url}/api/v1/config", headers={"authorization": f"Bearer {token}"}).json()
    assert config["version"] == 1 and config["mesh"]["groups"] == mesh()["groups"]
    assert "mgo_" not in dashboard.output(), "never in the log"

    assert dashboard.stop() == 0
    changed = tmp_path / "other.yaml"
    changed.write_text(yaml.safe_dump({"groups": {}, "services": {}}))
    again = start("--data", str(data), "--config", str(changed))
    wait_for(lambda: "is not applied" in again.output(), 5, what="the seed to be skipped")
    assert "mgo_" not in again.output(), "no new operator token while one exists"
    config = httpx.get(f"{again.url}/api/v1/config", headers={"authorization": f"Bearer {token}"}).json()
    assert config["version"] == 1, "the stored config wins over --config"


def read_until(fd: int, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
    """Read a pseudo-terminal until `pattern` matches what came out of it, or fail at the deadline."""
    deadline, received = time.monotonic() + timeout, b""
    while not (match := pattern.search(received.decode(errors="replace"))):
        remaining = deadline - time.monotonic()
        assert remaining > 0 and select.select([fd], [], [], remaining)[0], f"no match in {received!r}"
        received += os.read(fd, 4096)
    return match


def test_the_operator_token_is_printed_once_to_a_terminal_and_never_logged(tmp_path: Path) -> None:
    data = tmp_path / "data"
    terminal, child_end = pty.openpty()
    proc = subprocess.Popen(
        [MESHGATE, "dashboard", "--listen", "127.0.0.1:0", "--data", str(data)],
        cwd=ROOT,
        stdout=child_end,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    os.close(child_end)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        match = read_until(terminal, re.compile(r"operator token \(shown once, saved to (\S+)\): (mgo_\S+)"), TIMEOUT)
        assert Path(match[1]) == data / "operator-token" and (data / "operator-token").read_text() == match[2] + "\n"
        wait_for(lambda: LISTENING.search("".join(log)), TIMEOUT, what="the dashboard to listen")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(TIMEOUT)
        reader.join(5)
        os.close(terminal)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == 0
    assert "mgo_" not in "".join(log), "the log (standard error) never holds the token"


def private_files(data: Path) -> dict[str, int]:
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in data.iterdir() if path.is_file()}


def test_the_data_directory_and_its_files_are_private_and_checked_at_start(start: Any, tmp_path: Path) -> None:
    """Under the usual umask (022) the directory was 0755 (made as the CA's parent) and the databases 0644."""
    data = tmp_path / "data"
    umask = os.umask(0o022)  # the child inherits it
    try:
        dashboard = start("--data", str(data))
    finally:
        os.umask(umask)
    wait_for(lambda: TOKEN_LINE.search(dashboard.output()), 5, what="the operator token line")
    modes = private_files(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700 and stat.S_IMODE((data / "ca").stat().st_mode) == 0o700
    assert {"mesh.db", "spans.db", "operator-token"} <= set(modes) and set(modes.values()) == {0o600}, modes
    assert dashboard.stop() == 0

    data.chmod(0o755)  # as an older meshgate left them
    for name in ("mesh.db", "spans.db", "operator-token"):
        (data / name).chmod(0o644)
    again = start("--data", str(data))
    assert stat.S_IMODE(data.stat().st_mode) == 0o700 and set(private_files(data).values()) == {0o600}
    assert f"{data}: mode 0755 let other users in; changed to 0700" in again.output()
    assert f"{data / 'mesh.db'}: mode 0644 let other users in; changed to 0600" in again.output()


def test_ca_and_token_create_make_a_private_data_directory(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        made_by_ca = meshgate("dashboard", "ca", "--data", str(tmp_path / "ca-data"))
        made_by_token = meshgate("dashboard", "token", "create", "--data", str(tmp_path / "t"), "--role", "viewer")
    finally:
        os.umask(umask)
    assert made_by_ca.returncode == 0 and made_by_token.returncode == 0
    for data in (tmp_path / "ca-data", tmp_path / "t"):
        assert stat.S_IMODE(data.stat().st_mode) == 0o700, data
    assert set(private_files(tmp_path / "t").values()) == {0o600}


def test_sigterm_answers_long_polls_and_exits_0(start: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    dashboard = start("--data", str(data))
    join = meshgate("dashboard", "token", "create", "--data", str(data), "--role", "gateway", "--group", "shop")
    headers = {"authorization": f"Bearer {join.stdout.strip()}"}
    etag = httpx.get(f"{dashboard.url}/api/v1/sync", headers=headers).json()["etag"]
    answers: list[int] = []
    poll = threading.Thread(
        target=lambda: answers.append(
            httpx.get(
                f"{dashboard.url}/api/v1/sync", params={"after": etag, "wait": "60"}, headers=headers, timeout=70
            ).status_code
        )
    )
    poll.start()
    wait_for(
        lambda: "meshgate_dashboard_sync_watchers 1.0" in httpx.get(f"{dashboard.url}/metrics").text,
        10,
        what="the long-poll to wait",
    )
    stopping = time.monotonic()
    assert dashboard.stop() == 0, dashboard.output()
    poll.join(10)
    assert answers == [304]
    assert time.monotonic() - stopping < 5.0
    assert "Traceback" not in dashboard.output()


def test_get_prints_services_history_and_gateways(running: tuple[DashboardProcess, str]) -> None:
    dashboard, token = running
    env = {"MESHGATE_SERVER": dashboard.url, "MESHGATE_TOKEN": token}
    services = meshgate("get", "services", env=env)
    assert services.returncode == 0, services.stderr
    header, *rows = services.stdout.splitlines()
    assert header.split() == ["NAME", "GROUP", "WEIGHTS", "ENDPOINTS"]
    assert rows[0].split()[:4] == ["catalog", "shop", "v1=90", "v2=10"]
    as_json = json.loads(meshgate("get", "services", "-o", "json", env=env).stdout)
    assert [service["name"] for service in as_json["services"]] == ["catalog", "frontend"]
    history = meshgate("get", "history", "--server", dashboard.url, "--token", token)
    assert history.returncode == 0 and "seeded from" in history.stdout
    gateways = meshgate("get", "gateways", env=env)
    assert gateways.returncode == 0 and gateways.stdout.split()[:2] == ["GROUP", "INSTANCE"]


def test_rollout_commands_start_follow_act_and_refuse_bad_input(running: tuple[DashboardProcess, str]) -> None:
    """`meshgate rollout start|status|pause|resume|abort` and `meshgate get rollouts` against a real dashboard (no
    gateways: the rollout holds for lack of signals, which is all these commands need)."""
    dashboard, token = running
    env = {"MESHGATE_SERVER": dashboard.url, "MESHGATE_TOKEN": token}
    started = meshgate(
        "rollout", "start", "catalog", "--canary", "v2", "--steps", "20,50", "--interval", "1m",
        "--max-error-rate", "0.05", "--max-p99", "500ms", "--reason", "v2 canary", env=env,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert re.fullmatch(r"catalog: rollout catalog-[0-9a-f]{12} progressing at 20 %: step 1 of 2: .*\n", started.stdout)
    status = meshgate("rollout", "status", "catalog", env=env)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith("catalog: rollout catalog-") and "of v2 against v1, started by" in lines[0]
    assert "phase progressing, canary at 20 %, steps [20] 50 100" in lines[1]
    assert any(line.split()[1:3] == ["start", "20%"] for line in lines if line[:2].isdigit()), status.stdout
    spec = json.loads(meshgate("rollout", "status", "catalog", "-o", "json", env=env).stdout)["spec"]
    assert spec["judges"]["max_error_rate"] == 0.05 and spec["judges"]["max_p99_ms"] == 500.0
    listed = meshgate("get", "rollouts", env=env)
    header, row = listed.stdout.splitlines()
    assert header.split()[:4] == ["SERVICE", "PHASE", "CANARY", "WEIGHT"]
    assert row.split()[:6] == ["catalog", "progressing", "v2", "vs", "v1", "20%"]
    assert_bad_input(meshgate("rollout", "start", "catalog", "--canary", "v2", env=env), "409", "already has")
    assert_bad_input(meshgate("rollout", "resume", "catalog", env=env), "409", "not paused")
    for action, phase in (("pause", "paused"), ("resume", "progressing"), ("abort", "aborted")):
        done = meshgate("rollout", action, "catalog", "--reason", f"test {action}", env=env)
        assert done.returncode == 0 and f" {phase} at " in done.stdout, done.stdout + done.stderr
    services = json.loads(meshgate("get", "services", "-o", "json", env=env).stdout)["services"]
    assert services[0]["weights"] == {"v1": 100, "v2": 0}
    assert_bad_input(meshgate("rollout", "start", "catalog", "--canary", "v9", env=env), "422", "v9")
    assert_bad_input(meshgate("rollout", "start", "catalog", "--canary", "v2", "--steps", "50,20", env=env), "rising")
    assert_bad_input(meshgate("rollout", "promote", "nothing", env=env), "409", "no running rollout")
    assert meshgate("rollout", "start", "catalog", "--canary", "v2", "--steps", "x", env=env).returncode == 2


def test_apply_replaces_the_config_and_is_idempotent(running: tuple[DashboardProcess, str], tmp_path: Path) -> None:
    dashboard, token = running
    env = {"MESHGATE_SERVER": dashboard.url, "MESHGATE_TOKEN": token}
    data = mesh()
    data["services"]["catalog"]["routes"][-1]["split"] = {"v1": 50, "v2": 50}
    path = tmp_path / "step.yaml"
    path.write_text(yaml.safe_dump(data))
    applied = meshgate("apply", str(path), "--reason", "canary 50%", env=env)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.strip() == f"{path}: applied as config version 2"
    again = meshgate("apply", str(path), env=env)
    assert again.returncode == 0 and again.stdout.strip() == f"{path}: no changes (config version 2)"
    history = json.loads(meshgate("get", "history", "-o", "json", env=env).stdout)
    assert history[0]["reason"] == "canary 50%"
    assert history[0]["diff"] == [
        "services.catalog.routes[1].split.v1: 90 → 50",
        "services.catalog.routes[1].split.v2: 10 → 50",
    ]


def test_apply_refuses_a_bad_file_naming_file_field_and_value(
    running: tuple[DashboardProcess, str], tmp_path: Path
) -> None:
    dashboard, token = running
    env = {"MESHGATE_SERVER": dashboard.url, "MESHGATE_TOKEN": token}
    data = mesh()
    data["services"]["catalog"]["routes"][-1]["split"] = {"v1": 90, "v2": 20}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert_bad_input(meshgate("apply", str(path), env=env), str(path), "services.catalog.routes[1].split", "110")
    path.write_text("groups: [unclosed")
    assert_bad_input(meshgate("apply", str(path), env=env), str(path), "line 1")
    assert_bad_input(meshgate("apply", str(tmp_path / "missing.yaml"), env=env), "missing.yaml")
    version = httpx.get(f"{dashboard.url}/api/v1/config", headers={"authorization": f"Bearer {token}"})
    assert version.json()["version"] == 1


def test_client_errors_say_what_is_wrong(running: tuple[DashboardProcess, str], mesh_file: Path) -> None:
    dashboard, _ = running
    assert_bad_input(meshgate("get", "services", "--server", dashboard.url), "no token")
    unknown = meshgate("get", "services", "--server", dashboard.url, "--token", "mgo_" + "A" * 43)
    assert_bad_input(unknown, "401", "unknown token", status=1)
    with socket_closed() as url:
        unreachable = meshgate("get", "services", "--server", url, "--token", "mgo_x")
    assert_bad_input(unreachable, "cannot reach", status=1)
    assert_bad_input(meshgate("get", "services", "--server", "ftp://x", "--token", "t"), "--server")
    assert meshgate("get", "everything").returncode == 2


def test_get_and_apply_read_the_token_from_a_file(
    running: tuple[DashboardProcess, str], tmp_path: Path, mesh_file: Path
) -> None:
    """A command line shows its arguments to every local user (`ps`): a file does not."""
    dashboard, token = running
    path = tmp_path / "operator.token"
    path.write_text(token + "\n")
    services = meshgate("get", "services", "--server", dashboard.url, "--token-file", str(path))
    assert services.returncode == 0 and services.stdout.split()[:4] == ["NAME", "GROUP", "WEIGHTS", "ENDPOINTS"]
    applied = meshgate("apply", str(mesh_file), "--server", dashboard.url, "--token-file", str(path))
    assert applied.returncode == 0, applied.stderr
    missing = meshgate("get", "services", "--server", dashboard.url, "--token-file", str(tmp_path / "nowhere"))
    assert_bad_input(missing, "--token-file", "nowhere", "No such file")
    (tmp_path / "empty").write_text("\n")
    empty = meshgate("get", "services", "--server", dashboard.url, "--token-file", str(tmp_path / "empty"))
    assert_bad_input(empty, "--token-file", "empty")
    both = meshgate("get", "services", "--server", dashboard.url, "--token-file", str(path), "--token", token)
    assert_bad_input(both, "--token-file", "once")


@contextlib.contextmanager
def socket_closed() -> Iterator[str]:
    """The URL of a loopback port nothing listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


def test_token_create_makes_working_tokens_of_each_role(running: tuple[DashboardProcess, str], tmp_path: Path) -> None:
    dashboard, operator = running
    data = str(tmp_path / "data")
    viewer = meshgate("dashboard", "token", "create", "--data", data, "--role", "viewer", "--name", "ci")
    assert viewer.returncode == 0 and re.fullmatch(r"mgv_[A-Za-z0-9_-]{43}\n", viewer.stdout)
    env = {"MESHGATE_SERVER": dashboard.url, "MESHGATE_TOKEN": viewer.stdout.strip()}
    assert meshgate("get", "services", env=env).returncode == 0
    assert_bad_input(meshgate("apply", str(tmp_path / "mesh.yaml"), env=env), "403", "operator", status=1)

    join = meshgate("dashboard", "token", "create", "--data", data, "--role", "gateway", "--group", "shop")
    assert join.returncode == 0 and join.stdout.startswith("mgj_")
    sync = httpx.get(f"{dashboard.url}/api/v1/sync", headers={"authorization": f"Bearer {join.stdout.strip()}"})
    assert sync.json()["group"] == "shop"
    audit = httpx.get(f"{dashboard.url}/api/v1/audit", headers={"authorization": f"Bearer {operator}"}).json()
    created = [entry for entry in audit if entry["action"] == "token.create"]
    assert [entry["after"]["role"] for entry in created] == ["gateway", "viewer", "operator"]
    assert created[1]["after"]["name"] == "ci" and "mgv_" not in json.dumps(audit)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--role", "gateway"], ["--group is required"]),
        (["--role", "viewer", "--group", "shop"], ["--group is for gateway"]),
        (["--role", "gateway", "--group", "Shop!"], ["Shop!"]),
        (["--role", "root"], ["invalid choice", "root"]),
    ],
)
def test_token_create_refuses_bad_input(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    result = meshgate("dashboard", "token", "create", "--data", str(tmp_path / "data"), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert not (tmp_path / "data").exists(), "nothing is written for a refused token"


def test_dashboard_refuses_bad_input_before_writing_anything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    bad = tmp_path / "mesh.yaml"
    broken = mesh()
    broken["groups"]["shop"] = ["catalog", "ghost"]
    bad.write_text(yaml.safe_dump(broken))
    assert_bad_input(
        meshgate("dashboard", "--data", str(data), "--config", str(bad)), str(bad), "groups.shop[1]", "ghost"
    )
    listen = meshgate("dashboard", "--data", str(data), "--listen", "nowhere")
    assert listen.returncode == 2 and "--listen" in listen.stderr and "Traceback" not in listen.stderr
    assert_bad_input(meshgate("dashboard", "--data", str(data), "--trust-domain", "Not A Domain"), "trust domain")
    assert not data.exists(), "refused before anything was written"


def test_dashboard_refuses_a_listen_address_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        assert_bad_input(
            meshgate("dashboard", "--data", str(tmp_path / "data"), "--listen", address), address, "in use"
        )


# `--check`, `dashboard ca`, `token create --out`, /healthz


def test_check_validates_the_command_line_without_network_or_files(tmp_path: Path, mesh_file: Path) -> None:
    data = tmp_path / "data"
    args = ["--listen", "0.0.0.0:9000", "--san", "dashboard", "--san", "10.0.0.5", "--data", str(data)]
    args += ["--store", "etcd://etcd.invalid:2379,127.0.0.1:9", "--config", str(mesh_file)]
    args += ["--prometheus", "http://prometheus:9090", "--prometheus-scrape-interval", "15s"]
    args += ["--jaeger", "http://jaeger:16686", "--cert-lifetime", "12h", "--span-store-size", "2GiB", "--check"]
    result = meshgate("dashboard", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "ok: dashboard on https://0.0.0.0:9000, store etcd://etcd.invalid:2379,127.0.0.1:9, seeds 2 groups and 2 "
        "services\n"
    )
    assert not data.exists(), "no data directory, no CA"
    plain = meshgate("dashboard", "--data", str(data), "--check")
    assert plain.stdout == f"ok: dashboard on http://127.0.0.1:9000, store {data}\n" and not data.exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--store", "etcd://etcd"], ["etcd://etcd", "host:port"]),
        (["--store", "/var/lib/store"], ["--store", "/var/lib/store"]),
        (["--san", "not a name"], ["--san", "not a name"]),
        (["--trust-domain", "Mesh!"], ["trust domain", "Mesh!"]),
    ],
)
def test_check_refuses_bad_input_in_one_line(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    assert_bad_input(meshgate("dashboard", "--data", str(tmp_path / "data"), *args, "--check"), *fragments)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--prometheus", "prometheus:9090"],
        ["--jaeger", "ftp://jaeger:16686"],
        ["--listen", "0.0.0.0"],
        ["--signals-step", "often"],
        # A zero duration used to mean the default, silently.
        ["--signals-step", "0s"],
        ["--span-max-age", "0s"],
        ["--prometheus-scrape-interval", "0"],
        ["--sync-hold", "0s"],
        ["--span-store-size", "lots"],
        ["--span-store-size", "100KiB"],  # under 1 MiB: an empty store's file is about 40 KiB
    ],
)
def test_check_refuses_malformed_flags(tmp_path: Path, args: list[str]) -> None:
    result = meshgate("dashboard", "--data", str(tmp_path / "data"), *args, "--check")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert args[0] in last and args[1] in last, last


@pytest.mark.parametrize("lifetime", ["5s", "0s", "9.9s", "500ms"])
def test_a_certificate_lifetime_under_ten_seconds_is_refused(tmp_path: Path, lifetime: str) -> None:
    """Gateways renew at half-life and at most every 5 s, so a shorter life would expire before its renewal; `0s`
    used to mean the 24 h default."""
    result = meshgate("dashboard", "--data", str(tmp_path / "data"), "--cert-lifetime", lifetime, "--check")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert "--cert-lifetime: expected at least 10s" in last and repr(lifetime) in last, last
    shortest = meshgate("dashboard", "--data", str(tmp_path / "data"), "--cert-lifetime", "10s", "--check")
    assert shortest.returncode == 0, shortest.stderr


def test_check_refuses_a_bad_mesh_file_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "mesh.yaml"
    broken = mesh()
    broken["services"]["catalog"]["subsets"]["v2"] = {"dns": "catalog-v2"}  # no port
    bad.write_text(yaml.safe_dump(broken))
    result = meshgate("dashboard", "--data", str(tmp_path / "data"), "--config", str(bad), "--check")
    assert_bad_input(result, str(bad), "services.catalog.subsets.v2.dns", "catalog-v2")


def test_ca_prints_the_hash_and_writes_the_root_once(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out" / "ca.pem"
    out.parent.mkdir()
    first = meshgate("dashboard", "ca", "--data", str(data), "--out", str(out))
    assert first.returncode == 0, first.stderr
    ca = MeshCA.load_or_create(str(data / "ca"), "meshgate.local")
    assert first.stdout == ca.ca_hash + "\n"
    assert out.read_bytes() == ca.root_pem == (data / "ca" / "root.pem").read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 and sorted(out.parent.iterdir()) == [out]
    again = meshgate("dashboard", "ca", "--data", str(data))
    assert again.stdout == first.stdout, "loaded, not made anew"
    other = meshgate("dashboard", "ca", "--data", str(tmp_path / "other"), "--trust-domain", "prod.example")
    assert other.returncode == 0 and other.stdout != first.stdout
    assert_bad_input(meshgate("dashboard", "ca", "--data", str(tmp_path / "x"), "--trust-domain", "Bad!"), "Bad!")
    missing = meshgate("dashboard", "ca", "--data", str(data), "--out", str(tmp_path / "nowhere" / "ca.pem"))
    assert_bad_input(missing, "--out", "nowhere", status=1)


def test_token_create_out_writes_a_private_file_once(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "shop.token"
    args = ["dashboard", "token", "create", "--data", str(data), "--role", "gateway", "--group", "shop"]
    first = meshgate(*args, "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"{out}: a new gateway token\n" and "mgj_" not in first.stdout + first.stderr
    token = out.read_text()
    assert re.fullmatch(r"mgj_[A-Za-z0-9_-]{43}\n", token) and stat.S_IMODE(out.stat().st_mode) == 0o600
    again = meshgate(*args, "--out", str(out))
    assert again.returncode == 0 and again.stdout == ""
    assert again.stderr == f"meshgate: {out} already holds a token; none created\n"
    assert out.read_text() == token

    async def tokens() -> list[Any]:
        store = open_store(str(data))
        try:
            return [(record.role, record.group) for record in await store.tokens()]
        finally:
            await store.close()

    assert asyncio.run(tokens()) == [("gateway", "shop")], "one token: the second run created none"


def test_healthz_answers_without_a_token(start: Any, tmp_path: Path) -> None:
    dashboard = start("--data", str(tmp_path / "data"))
    answer = httpx.get(f"{dashboard.url}/healthz")
    assert (answer.status_code, answer.text) == (200, "ok\n")


def test_version_and_help_say_what_each_option_is() -> None:
    version = meshgate("--version")
    assert version.returncode == 0 and re.fullmatch(r"meshgate \d+\.\d+\.\d+\S*\n", version.stdout), version
    dashboard = " ".join(meshgate("dashboard", "--help").stdout.split())
    assert "--listen HOST:PORT where the API, the pages and the gateways' protocol are served" in dashboard
    apply = " ".join(meshgate("apply", "--help").stdout.split())
    assert "an operator token" in apply and "viewer" not in apply  # a viewer cannot apply
    get = " ".join(meshgate("get", "--help").stdout.split())
    assert "an operator or viewer token" in get
