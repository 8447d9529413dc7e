"""Steady traffic for the demo: shoppers at the shop gateway's edge listener, `--rate` requests a second.

    python -m meshgate.demoapps.traffic --url http://127.0.0.1:19080 --rate 5

`--check` validates the command line and exits.

Open loop, like real users: requests start on schedule whether or not earlier ones have finished (at most
`MAX_IN_FLIGHT` at once; beyond that a tick is skipped and counted). Half the requests open the home page, three in
ten a product page, two in ten check out. A summary line goes to stdout every 10 s and at exit (SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence

import httpx

from gateway.cli import http_url

MAX_IN_FLIGHT = 64
REQUEST_TIMEOUT = 10.0
REPORT_EVERY = 10.0
PRODUCTS = range(1, 9)


class Shoppers:
    """Sends the request mix to `url` (Host: storefront) and counts the outcomes by status class.

    >>> await Shoppers("http://127.0.0.1:19080", rate=5.0).run(stop_event)
    """

    def __init__(self, url: str, rate: float) -> None:
        self.url = url
        self.rate = rate
        self.outcomes: Counter[str] = Counter()
        self.random = random.Random()
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.started = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=16)
        async with (
            httpx.AsyncClient(base_url=self.url, timeout=REQUEST_TIMEOUT, limits=limits, trust_env=False) as client,
            asyncio.TaskGroup() as tasks,
        ):
            tick = loop.time()
            report_at = tick + REPORT_EVERY
            while not stop.is_set():
                if self.slots.locked():
                    self.outcomes["skipped"] += 1
                else:
                    await self.slots.acquire()
                    tasks.create_task(self.shop(client))
                if loop.time() >= report_at:
                    self.report()
                    report_at += REPORT_EVERY
                tick += 1 / self.rate
                # Sleeping until the next tick, or until told to stop; the loop then waits for requests in flight.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, tick - loop.time()))

    async def shop(self, client: httpx.AsyncClient) -> None:
        try:
            method, path, body = self.pick()
            answer = await client.request(method, path, headers={"host": "storefront"}, json=body)
            self.outcomes[f"{answer.status_code // 100}xx"] += 1
        except httpx.HTTPError as err:  # counted, not raised: one failed request must not stop the traffic
            self.outcomes[type(err).__name__] += 1
        finally:
            self.slots.release()

    def pick(self) -> tuple[str, str, object]:
        roll = self.random.random()
        product = self.random.choice(PRODUCTS)
        if roll < 0.5:
            return "GET", "/", None
        if roll < 0.8:
            return "GET", f"/products/{product}", None
        return "POST", "/checkout", {"product": product, "quantity": self.random.randint(1, 3)}

    def report(self) -> None:
        sent = sum(count for outcome, count in self.outcomes.items() if outcome != "skipped")
        outcomes = ", ".join(f"{count} {outcome}" for outcome, count in sorted(self.outcomes.items()))
        elapsed = time.monotonic() - self.started
        print(f"traffic: {sent} requests in {elapsed:.0f}s ({outcomes or 'none yet'})", flush=True)


async def generate(url: str, rate: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    shoppers = Shoppers(url, rate)
    await shoppers.run(stop)
    shoppers.report()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meshgate.demoapps.traffic", description="steady traffic for meshgate demo"
    )
    parser.add_argument(
        "--url", type=http_url, required=True, help="the shop gateway's edge listener, e.g. http://127.0.0.1:19080"
    )
    parser.add_argument("--rate", type=float, default=5.0, help="requests a second (default 5)")
    parser.add_argument("--check", action="store_true", help="validate the command line and exit")
    args = parser.parse_args(argv)
    if not args.rate > 0:
        parser.error(f"--rate: expected a positive number, got {args.rate}")
    if args.check:
        print(f"ok: {args.rate:g} requests a second at {args.url}")
        return 0
    asyncio.run(generate(args.url, args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
