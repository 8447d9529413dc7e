from __future__ import annotations

import asyncio

from gateway.deadlines import RESOLUTION, Deadlines


class Recorder:
    def __init__(self, loop: asyncio.AbstractEventLoop, fired: asyncio.Queue[tuple[str, float]], name: str) -> None:
        self.loop = loop
        self.fired = fired
        self.name = name

    def on_deadline(self) -> None:
        self.fired.put_nowait((self.name, self.loop.time()))


async def _fire_order_and_cancel() -> None:
    loop = asyncio.get_running_loop()
    fired: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
    deadlines = Deadlines()
    start = loop.time()
    deadlines.add(start + 0.08, Recorder(loop, fired, "late"))
    bucket, index = deadlines.add(start + 0.05, Recorder(loop, fired, "cancelled"))
    deadlines.add(start + 0.03, Recorder(loop, fired, "early"))
    bucket[index] = None
    first = await asyncio.wait_for(fired.get(), 2)
    second = await asyncio.wait_for(fired.get(), 2)
    assert [first[0], second[0]] == ["early", "late"]
    assert first[1] >= start + 0.03  # never early
    assert second[1] >= start + 0.08
    assert second[1] < start + 0.08 + 0.5  # and not wildly late
    assert fired.empty() and not deadlines.slots and not deadlines.heap
    deadlines.close()


def test_fires_in_order_never_early_and_skips_cancelled() -> None:
    asyncio.run(_fire_order_and_cancel())


async def _rearm_from_callback() -> None:
    loop = asyncio.get_running_loop()
    fired: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
    deadlines = Deadlines()

    class Rearming(Recorder):
        def on_deadline(self) -> None:
            super().on_deadline()
            if self.name == "first":
                self.name = "second"
                deadlines.add(self.loop.time() + RESOLUTION, self)  # a retry arming its next deadline

    deadlines.add(loop.time() + 0.02, Rearming(loop, fired, "first"))
    names = [(await asyncio.wait_for(fired.get(), 2))[0] for _ in range(2)]
    assert names == ["first", "second"]
    deadlines.close()


def test_a_deadline_armed_while_firing_fires_too() -> None:
    asyncio.run(_rearm_from_callback())
