"""Checking a deployment's command lines with the real CLI: each container's argv, run here with `--check`.

A container runs `meshgate ...` or `python -m module ...`; `check_command` runs the same argv through this venv
(`sys.executable -m meshgate.cli ...` / `sys.executable -m module ...`) with `--check` appended, after rewriting
the container paths that fall under a mount to the host files the deployment mounts there. `--check` parses and
validates the whole command line without serving, reaching the network or writing files: the run happens in an
empty temporary directory that must still be empty afterwards.

    check_command(["meshgate", "gateway", "--config", "/etc/meshgate/gateway.yaml"],
                  {"/etc/meshgate": Path("compose")})

The cross-reference helpers (`flag_values`, `host_port`, `url_host_port`) read the same argv the way argparse does,
so a deployment test compares the addresses and files its services name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import pytest

DEFAULT_PORTS = {"http": 80, "https": 443, "etcd": 2379}
CHECK_TIMEOUT = 30.0  # seconds; a check imports the CLI and reads a few small files


def check_command(argv: Sequence[str], mounts: Mapping[str, Path], env: Mapping[str, str] | None = None) -> None:
    """Fail the test unless `argv --check` exits 0 and prints `ok`, showing the command's stderr otherwise.

    `mounts` maps a container path (a file or a directory) to the host path mounted there. `env` is the
    container's environment (e.g. `MESHGATE_JOIN_TOKEN`); the host's MESHGATE_* variables never leak in.
    """
    # Only the container's arguments are rewritten: this venv's interpreter may itself live under a mounted path
    # (a checkout in /tmp, where a pod mounts an emptyDir).
    command = [*python_command([argv[0], *(rewrite_paths(arg, mounts) for arg in argv[1:])]), "--check"]
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MESHGATE_")}
    environment.update(env or {})
    with tempfile.TemporaryDirectory(prefix="meshgate-check-") as cwd:
        done = subprocess.run(
            command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=CHECK_TIMEOUT, check=False
        )
        written = sorted(os.listdir(cwd))
    shown = " ".join(argv)
    if done.returncode != 0 or "ok" not in done.stdout:
        pytest.fail(f"{shown} --check: exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}")
    assert not written, f"{shown} --check wrote {written} in its working directory"


def python_command(argv: Sequence[str]) -> list[str]:
    """The container's argv as this venv runs it: `meshgate X` or `python -m M X` (python3 too)."""
    if not argv:
        raise ValueError("an empty command")
    program = os.path.basename(argv[0])
    if program == "meshgate":
        return [sys.executable, "-m", "meshgate.cli", *argv[1:]]
    if program in ("python", "python3") and len(argv) >= 3 and argv[1] == "-m":
        return [sys.executable, "-m", *argv[2:]]
    raise ValueError(f"not a meshgate or `python -m` command: {' '.join(argv)}")


def rewrite_paths(arg: str, mounts: Mapping[str, Path]) -> str:
    """`arg` with a container path under a mount replaced by the host path; `--flag=PATH` forms too."""
    flag, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    for container in sorted(mounts, key=len, reverse=True):  # the most specific mount wins
        inside = container.rstrip("/")
        if value == inside or value.startswith(inside + "/"):
            return f"{flag}{equals}{mounts[container]}{value[len(inside) :]}"
    return arg


def flag_values(argv: Sequence[str], flag: str) -> list[str]:
    """Every value given to `flag` in argv, in order, in both `--flag VALUE` and `--flag=VALUE` forms."""
    values = []
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            values.append(argv[index + 1])
        elif arg.startswith(flag + "="):
            values.append(arg[len(flag) + 1 :])
    return values


def flag_value(argv: Sequence[str], flag: str) -> str:
    """The one value of `flag` in argv; fails the test when it is missing or repeated."""
    values = flag_values(argv, flag)
    assert len(values) == 1, f"expected {flag} once in {' '.join(argv)}, got {values}"
    return values[0]


def host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[V6]:PORT`) as (host, port)."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def url_host_port(url: str) -> tuple[str, int]:
    """A URL's host and port, the scheme's default port when none is written (`etcd://` is 2379)."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"expected a URL with a host, got {url!r}")
    return parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme]
