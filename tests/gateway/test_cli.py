"""`meshgate gateway` as users run it: `--check`, config errors and startup errors, through the real CLI.

Every error is one line on stderr naming the file, the field and the bad value, with exit status 2 and no
traceback (README, "Configuration reference").
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import StartGateway, gateway_config, listeners, wait_for

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0  # a command that should exit at once but serves instead is stopped after this


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def meshgate(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> Result:
    """Run `meshgate gateway ARGS` (from the repo root, with the host's MESHGATE_* variables only if `env` is None);
    kill its whole process group if it does not exit."""
    if env is not None:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_")}, **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshgate.cli", "gateway", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so worker processes are cleaned up with it
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        stdout, stderr = proc.communicate()
        pytest.fail(f"meshgate gateway {' '.join(args)} did not exit within {TIMEOUT}s:\n{stdout}{stderr}")
    try:
        wait_for(lambda: not _group_alive(proc.pid), 2.0, what="the command's process group to be empty")
    except AssertionError:
        _kill_group(proc.pid)
        pytest.fail(f"meshgate gateway {' '.join(args)} exited but left processes behind:\n{stdout}{stderr}")
    return Result(proc.returncode, stdout, stderr)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_group(pgid: int) -> None:
    """Kill the command and anything it started (such as worker processes), which share its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def assert_config_error(result: Result, *fragments: str) -> None:
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.output}"
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def service(**extra: object) -> dict[str, object]:
    return {"catalog": {"subsets": {"v1": {"endpoints": ["127.0.0.1:9101"]}}, **extra}}


def write(directory: Path, data: object, name: str = "gw.yaml") -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_check_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, gateway_config(service()))
    result = meshgate("--check", str(path))
    assert result.returncode == 0, result.output
    assert "ok" in result.stdout
    assert str(path) in result.stdout
    assert "Traceback" not in result.output


TWO_SUBSETS = {"subsets": {"v1": {"endpoints": ["127.0.0.1:9101"]}, "v2": {"endpoints": ["127.0.0.1:9102"]}}}

INVALID = [
    pytest.param(gateway_config(service(), grup="x"), ("gateway.grup", "unknown key"), id="unknown-key"),
    pytest.param(
        gateway_config({"catalog": {**TWO_SUBSETS, "routes": [{"name": "default", "split": {"v1": 60, "v2": 50}}]}}),
        ("services.catalog.routes[0].split", "110"),
        id="split-sum",
    ),
    pytest.param(
        gateway_config(service(), limits={"header_timeout": "10 seconds"}),
        ("gateway.limits.header_timeout", "10 seconds"),
        id="bad-duration",
    ),
    pytest.param(
        gateway_config(service(timeouts={"connect": "fast"})),
        ("services.catalog.timeouts.connect", "fast"),
        id="bad-service-duration",
    ),
    pytest.param("gateway:\n\tgroup: test\n", ("line 2, column 1", "invalid YAML"), id="yaml-syntax"),
]


@pytest.mark.parametrize(("data", "fragments"), INVALID)
def test_check_invalid_file(tmp_path: Path, data: object, fragments: tuple[str, ...]) -> None:
    path = write(tmp_path, data)
    assert_config_error(meshgate("--check", str(path)), str(path), *fragments)


def test_check_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    assert_config_error(meshgate("--check", str(path)), str(path), "No such file")


@pytest.fixture
def occupied() -> Iterator[str]:
    """A loopback address another socket is already listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("listener", ["inbound", "admin"])
def test_listen_address_in_use(tmp_path: Path, occupied: str, listener: str, workers: str) -> None:
    listen = {"inbound": "127.0.0.1:0", "outbound": "127.0.0.1:0", "admin": "127.0.0.1:0", listener: occupied}
    path = write(tmp_path, gateway_config(service(), listen=listen))
    result = meshgate("--config", str(path), "--workers", workers)
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.output}"
    assert "Traceback" not in result.output, result.output
    assert occupied in result.stderr, result.stderr
    assert "meshgate:" in result.stderr


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_workers_must_be_positive(tmp_path: Path, workers: str) -> None:
    path = write(tmp_path, gateway_config(service()))
    result = meshgate("--config", str(path), "--workers", workers)
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.output}"
    assert "usage:" in result.stderr
    assert "--workers" in result.stderr
    assert workers in result.stderr.splitlines()[-1], result.stderr
    assert "Traceback" not in result.output


# `--check` without FILE: the whole command line, without serving, reading secrets or writing files

CA_HASH = "sha256:" + "ab" * 32
JOINED = ("--control", "https://dashboard.example:9000", "--group", "shop")


def joined_file(directory: Path, **section: object) -> Path:
    listen = {"inbound": "0.0.0.0:15006", "outbound": "0.0.0.0:15001", "metrics": "0.0.0.0:15090"}
    return write(directory, {"gateway": {"listen": listen, **section}}, "joined.yaml")


def test_check_accepts_a_standalone_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, gateway_config(service()))
    result = meshgate("--config", str(path), "--advertise", "gw-1.example:15006", "--workers", "2", "--check")
    assert result.returncode == 0, result.output
    assert result.stdout == f"ok: standalone gateway, {path} (1 services)\n"


@pytest.mark.parametrize(
    "secrets",
    [
        ("--token-file", "/run/secrets/not-yet/token", "--ca", "/run/secrets/not-yet/ca.pem"),
        ("--token", "mgj_x", "--ca-hash", CA_HASH),
    ],
    ids=["files", "values"],
)
def test_check_accepts_a_joined_command_line_without_its_secret_files(tmp_path: Path, secrets: tuple[str, ...]) -> None:
    config = joined_file(tmp_path)
    before = sorted(tmp_path.iterdir())
    args = (*JOINED, *secrets, "--config", str(config), "--advertise", "10.0.0.7:15006", "--check")
    result = meshgate(*args, cwd=tmp_path, env={})
    assert result.returncode == 0, result.output
    assert result.stdout == "ok: joined gateway of group shop at https://dashboard.example:9000\n"
    assert sorted(tmp_path.iterdir()) == before, "no data directory, no files"


def test_check_takes_the_join_token_from_the_environment(tmp_path: Path) -> None:
    result = meshgate(*JOINED, "--ca-hash", CA_HASH, "--check", cwd=tmp_path, env={"MESHGATE_JOIN_TOKEN": "mgj_x"})
    assert result.returncode == 0, result.output
    # The environment is only the fallback: a flag given alongside it is no conflict.
    both = meshgate(*JOINED, "--ca-hash", CA_HASH, "--token-file", "t", "--check", env={"MESHGATE_JOIN_TOKEN": "x"})
    assert both.returncode == 0, both.output


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        pytest.param(("--token", "t"), ("--control https://dashboard.example:9000", "--ca FILE"), id="unpinned"),
        pytest.param(("--ca-hash", CA_HASH), ("join token", "--token-file"), id="no-token"),
        pytest.param(("--token", "t", "--token-file", "f", "--ca", "c"), ("--token-file", "--token"), id="two-tokens"),
        pytest.param(("--token", "t", "--ca", "c", "--ca-hash", CA_HASH), ("--ca", "--ca-hash"), id="two-pins"),
        pytest.param(("--token", "t", "--ca-hash", "sha256:ab"), ("--ca-hash", "'sha256:ab'"), id="hash-form"),
        pytest.param(
            ("--token", "t", "--ca", "c", "--advertise", "0.0.0.0:15006"),
            ("--advertise", "gateway.listen.advertise", "0.0.0.0:15006"),
            id="wildcard-advertise",
        ),
        pytest.param(
            ("--token", "t", "--ca", "c", "--advertise", "gw:99999"),
            ("--advertise", "gw:99999"),
            id="bad-port",
        ),
    ],
)
def test_check_refuses_a_joined_command_line_naming_the_flag(
    tmp_path: Path, args: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    result = meshgate(*JOINED, *args, "--check", cwd=tmp_path, env={})
    assert_config_error(result, *fragments)
    assert not list(tmp_path.iterdir())


def test_check_refuses_plaintext_control_beyond_loopback(tmp_path: Path) -> None:
    result = meshgate("--control", "http://10.0.0.5:9000", "--group", "shop", "--token", "t", "--check", env={})
    assert_config_error(result, "http://10.0.0.5:9000", "https")


def test_check_loads_the_joined_gateway_file(tmp_path: Path) -> None:
    config = write(tmp_path, gateway_config(service()), "joined.yaml")  # services: not for a joined gateway
    result = meshgate(*JOINED, "--token", "t", "--ca", "c", "--config", str(config), "--check", env={})
    assert_config_error(result, str(config), "only a gateway: section")
    bad = joined_file(tmp_path, limits={"header_timeout": "soon"})
    result = meshgate(*JOINED, "--token", "t", "--ca", "c", "--config", str(bad), "--check", env={})
    assert_config_error(result, str(bad), "gateway.limits.header_timeout", "soon")


def test_check_refuses_join_flags_on_a_standalone_gateway(tmp_path: Path) -> None:
    path = write(tmp_path, gateway_config(service()))
    result = meshgate("--config", str(path), "--token-file", "t", "--check", env={})
    assert result.returncode == 2 and "Traceback" not in result.output
    assert "--token-file: only for a joined gateway" in result.stderr.splitlines()[-1]
    mixed = meshgate("--check", str(path), "--control", "https://x:9000")
    assert mixed.returncode == 2 and "--check FILE takes no other mode" in mixed.stderr


# Secrets from files, read at start


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        pytest.param(lambda d: d / "missing", ("--token-file", "missing", "No such file"), id="missing"),
        pytest.param(lambda d: write(d, " \n\t\n", "empty"), ("--token-file", "empty", "is empty"), id="empty"),
    ],
)
def test_an_unusable_token_file_stops_the_start(
    tmp_path: Path, make: Callable[[Path], Path], fragments: tuple[str, ...]
) -> None:
    path = make(tmp_path)
    result = meshgate("--control", "http://127.0.0.1:9", "--group", "shop", "--token-file", str(path), cwd=tmp_path)
    assert_config_error(result, *fragments)
    assert not (tmp_path / "meshgate-gateway-shop").exists(), "nothing is written before the secrets are read"


def test_a_ca_file_that_is_not_a_certificate_stops_the_start(tmp_path: Path) -> None:
    path = write(tmp_path, "not a certificate\n", "ca.pem")
    result = meshgate(*JOINED, "--token", "t", "--ca", str(path), cwd=tmp_path, env={})
    assert_config_error(result, "--ca", str(path), "not a PEM certificate")
    assert not (tmp_path / "meshgate-gateway-shop").exists()


def test_advertise_overrides_the_file(start_gateway: StartGateway, tmp_path: Path) -> None:
    config = gateway_config(service(), listen={**listeners(), "advertise": "10.0.0.1:15006"})
    gateway = start_gateway(config, "--advertise", "gw-7.example:15006")
    live = httpx.get(gateway.url("admin") + "/config", timeout=5).json()["config"]
    assert live["gateway"]["listen"]["advertise"] == "gw-7.example:15006"
    # A reload keeps the flag's value, and so does not warn that listen would change only on restart.
    gateway.config_path.write_text(gateway.config_path.read_text().replace("10.0.0.1:15006", "10.0.0.2:15006"))
    gateway.signal(signal.SIGHUP)
    gateway.wait_log("config version 2 applied (SIGHUP)")
    live = httpx.get(gateway.url("admin") + "/config", timeout=5).json()["config"]
    assert live["gateway"]["listen"]["advertise"] == "gw-7.example:15006"
    assert "change only on restart" not in gateway.output()
