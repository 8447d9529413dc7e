"""Instruction counts under callgrind, for the benchmarks' `--instructions` modes: repeatable whatever else the
machine is doing, unlike seconds."""

from __future__ import annotations

import os
import re
import subprocess
import sys

_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def instructions(script: str, *args: str) -> int:
    """Instructions `python script args` executes, counted by valgrind's callgrind (hash seed fixed)."""
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, script, *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    found = _COLLECTED.search(done.stderr)
    assert found is not None, done.stderr[-2000:]
    return int(found[1])
