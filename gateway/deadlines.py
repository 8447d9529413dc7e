"""Timeouts for the hot path, kept in 10 ms slots instead of one event-loop timer per request.

Arming and cancelling a `TimerHandle` costs about 2.8 µs of the gateway's ~12 µs of Python per request
(bench/hotpath.py). Here arming is a list append, and cancelling blanks that entry, so the owner is not kept
alive until its deadline. One loop timer wakes up for the earliest slot that holds anything. A deadline fires
up to 10 ms late, never early.
"""

from __future__ import annotations

import asyncio
import heapq
from typing import Protocol

RESOLUTION = 0.01  # seconds per slot


class Owner(Protocol):
    def on_deadline(self) -> None: ...


class Deadlines:
    """A coarse timer wheel.

    >>> bucket, index = deadlines.add(loop.time() + 1.0, exchange)   # about 1 s later: exchange.on_deadline()
    >>> bucket[index] = None   # cancelled
    """

    __slots__ = ("loop", "slots", "heap", "handle", "scheduled")

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.slots: dict[int, list[Owner | None]] = {}
        self.heap: list[int] = []  # slot numbers that hold entries, earliest first
        self.handle: asyncio.TimerHandle | None = None
        self.scheduled = 0  # the slot the loop timer is set for (0: none)

    def add(self, when: float, owner: Owner) -> tuple[list[Owner | None], int]:
        slot = int(when / RESOLUTION) + 1  # rounded up: never early
        bucket = self.slots.get(slot)
        if bucket is None:
            bucket = self.slots[slot] = []
            heapq.heappush(self.heap, slot)
            if not self.scheduled or slot < self.scheduled:
                self._schedule(slot)
        bucket.append(owner)
        return bucket, len(bucket) - 1

    def _schedule(self, slot: int) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        if self.handle is not None:
            self.handle.cancel()
        self.scheduled = slot
        self.handle = self.loop.call_at(slot * RESOLUTION, self._fire)

    def _fire(self) -> None:
        assert self.loop is not None
        self.handle = None
        self.scheduled = 0
        now_slot = int(self.loop.time() / RESOLUTION)
        heap, slots = self.heap, self.slots
        while heap and heap[0] <= now_slot:
            for owner in slots.pop(heapq.heappop(heap)):
                if owner is not None:
                    owner.on_deadline()
        if heap and not self.scheduled:
            self._schedule(heap[0])

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.slots.clear()
        self.heap.clear()
        self.scheduled = 0
