"""The demo's child processes: each in its own session and process group, output to its own log file, stopped
together with SIGTERM, then SIGKILL after a deadline, and checked gone.

A group of its own keeps a terminal's Ctrl-C away from the children (the demo stops them in order instead) and
lets one signal reach whatever a child starts itself. On Linux each child also gets SIGTERM when the demo dies
without stopping it (`PR_SET_PDEATHSIG`), so even `kill -9` of the demo leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None  # loaded before any fork


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def group_alive(self) -> bool:
        """Whether any process of the child's group is left (the child itself is reaped first)."""
        self.proc.poll()
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a member we may not signal still exists
            return True
        return True


class ChildExited(Exception):
    def __init__(self, child: Child, status: int) -> None:
        super().__init__(f"{child.name} exited with status {status}")
        self.child = child
        self.status = status


class Children:
    """Processes started for the demo and stopped together.

    >>> children = Children(Path("/tmp/demo/logs"))
    >>> children.start("dashboard", [sys.executable, "-m", "meshgate.cli", "dashboard", ...])
    >>> children.check()              # raises ChildExited if one has stopped on its own
    >>> children.stop(children.all)   # SIGTERM each group, SIGKILL after the deadline; the names it had to kill
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.all: list[Child] = []

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name.replace(' ', '-')}.log"
        with open(log, "ab") as output:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
                preexec_fn=_die_with_parent,  # safe here: the demo starts children from its only thread
            )
        child = Child(name, proc, log)
        self.all.append(child)
        return child

    def check(self) -> None:
        for child in self.all:
            status = child.proc.poll()
            if status is not None:
                raise ChildExited(child, status)

    def stop(self, children: Iterable[Child], timeout: float = 10.0) -> list[str]:
        """SIGTERM to every child's process group; SIGKILL to what is left after `timeout`. Returns the names of
        the children that had to be killed; afterwards no process of any of their groups is left."""
        children = [child for child in children if child.group_alive()]
        for child in children:
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(child.group_alive() for child in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = [child for child in children if child.group_alive()]
        for child in killed:
            _signal_group(child, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        for child in killed:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(max(0.0, deadline - time.monotonic()))
        while any(child.group_alive() for child in killed) and time.monotonic() < deadline:
            time.sleep(0.05)  # members other than the child are reaped by init
        return [child.name for child in killed]

    def left(self) -> list[str]:
        """The children with a process of their group still running."""
        return [child.name for child in self.all if child.group_alive()]


def _signal_group(child: Child, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.proc.pid, signum)
