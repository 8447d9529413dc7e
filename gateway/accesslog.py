"""The access log: one JSON line per request, to stdout or a file, written in batches off the hot path.

The hot path appends the request's hop record to a bounded buffer; `run()` formats and writes what has gathered
every 200 ms. When the buffer is full (the disk or pipe cannot keep up), lines are dropped and counted rather than
letting a slow log slow the requests.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from gateway.tracing import HOP, hop_to_dict

FLUSH_INTERVAL = 0.2
MAX_BUFFERED = 50_000


class AccessLog:
    """>>> log = AccessLog("stdout"); log.add(hop); await log.run()  # a task, until cancelled"""

    def __init__(self, target: str) -> None:
        self.target = target
        self.stream: IO[str] = sys.stdout if target == "stdout" else open(target, "a", encoding="utf-8")  # noqa: SIM115
        self.buffer: list[tuple[Any, ...]] = []
        self.dropped = 0

    def add(self, hop: tuple[Any, ...]) -> None:
        if len(self.buffer) < MAX_BUFFERED:
            self.buffer.append(hop)
        else:
            self.dropped += 1

    def flush(self) -> None:
        if not self.buffer:
            return
        hops, self.buffer = self.buffer, []
        self.stream.write("".join(json.dumps(line_of(hop), separators=(",", ":")) + "\n" for hop in hops))
        self.stream.flush()

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL)
                self.flush()
        finally:
            self.flush()
            if self.stream is not sys.stdout:
                self.stream.close()


def line_of(hop: tuple[Any, ...]) -> dict[str, Any]:
    record = hop_to_dict(hop)
    record["time"] = datetime.fromtimestamp(hop[HOP["start"]], UTC).isoformat(timespec="milliseconds")
    record["retries"] = max(0, hop[HOP["tries"]] - 1)
    del record["start"], record["sampled"]
    return record
