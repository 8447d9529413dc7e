"""`meshgate gateway` as users run it: `--check`, config errors and startup errors, through the real CLI.

Every error is one line on stderr naming the file, the field and the bad value, with exit status 2 and no
traceback (DESIGN.md, "Configuration model").
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import gateway_config, wait_for

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


def meshgate(*args: str) -> Result:
    """Run `meshgate gateway ARGS` from the repo root; kill its whole process group if it does not exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dashboard.cli", "gateway", *args],
        cwd=ROOT,
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
