"""`meshgate register`: list one endpoint in etcd, for gateways to discover, for as long as this process runs.

For apps without a sidecar: a start script runs it next to the app. It grants a lease with the TTL, puts
`<prefix><host:port>` under it and renews the lease every TTL/3. SIGTERM or SIGINT revokes the lease, so the
gateways drop the endpoint at once; a process that dies without doing so is dropped when its lease expires. A
lease that expired while etcd was unreachable is granted anew and the key put again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import sys
from typing import TYPE_CHECKING

from gateway.cli import duration, http_url
from gateway.units import Address, is_wildcard, parse_address

if TYPE_CHECKING:
    from gateway.etcd import EtcdClient

log = logging.getLogger("meshgate.register")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "register",
        help="list an endpoint in etcd under a lease until stopped, for gateways to discover",
        description="Puts PREFIX + HOST:PORT under a lease with --ttl and keeps the lease alive; SIGTERM or SIGINT "
        "revokes it. Gateways with a subset `etcd: PREFIX` route to the endpoint while it is listed.",
    )
    parser.add_argument("--etcd", required=True, type=_urls, metavar="URL[,URL]", help="etcd v3 client URLs")
    parser.add_argument(
        "--prefix", required=True, type=_prefix, help="the subset's key prefix, e.g. /meshgate/endpoints/catalog/v4/"
    )
    parser.add_argument(
        "--address", required=True, type=_endpoint, metavar="HOST:PORT", help="where gateways reach this endpoint"
    )
    parser.add_argument(
        "--ttl",
        type=_ttl,
        default=10,
        metavar="DURATION",
        help="the lease's time to live: how long an endpoint that died stays listed (default 10s)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Imported only now: `meshgate --help` and the other commands stay quick.
    import uvloop

    from gateway.etcd import EtcdClient

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per renewal
    return uvloop.run(_until_signalled(EtcdClient(args.etcd), args.prefix + str(args.address), args.ttl))


async def _until_signalled(etcd: EtcdClient, key: str, ttl: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    return await register(etcd, key, ttl, stop)


async def register(etcd: EtcdClient, key: str, ttl: int, stop: asyncio.Event) -> int:
    """Keep `key` under a lease until `stop` is set, then revoke the lease. 1 if etcd is unreachable at the start."""
    from gateway.etcd import EtcdError

    try:
        try:
            lease = await _put(etcd, key, ttl)
        except EtcdError as err:
            print(f"meshgate: {err}", file=sys.stderr)
            return 1
        log.info("registered %s (lease %s, ttl %ds)", key, lease, ttl)
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ttl / 3)
            if stop.is_set():
                break
            try:
                if await etcd.keep_alive(lease) == 0:
                    log.warning("lease %s expired (etcd was unreachable); registering %s again", lease, key)
                    lease = await _put(etcd, key, ttl)
                if failing:
                    log.info("etcd reachable again; %s is registered", key)
                failing = False
            except EtcdError as err:
                if not failing:  # logged once per outage, not per retry
                    log.warning("cannot renew lease %s (%s); retrying every %gs", lease, err, ttl / 3)
                failing = True
        try:
            await etcd.revoke(lease)
            log.info("unregistered %s", key)
        except EtcdError as err:
            log.warning("could not revoke lease %s (%s): %s stays listed until it expires", lease, err, key)
        return 0
    finally:
        await etcd.aclose()


async def _put(etcd: EtcdClient, key: str, ttl: int) -> str:
    lease = await etcd.grant(ttl)
    await etcd.put(key, "", lease)
    return lease


def _urls(text: str) -> list[str]:
    return [http_url(url) for url in text.split(",")]


def _prefix(text: str) -> str:
    if not text.startswith("/") or len(text) < 2:
        raise argparse.ArgumentTypeError(f"expected a key prefix starting with /, got {text!r}")
    return text


def _endpoint(text: str) -> Address:
    try:
        address = parse_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT ({err}), got {text!r}") from None
    if address.port == 0 or is_wildcard(address.host):
        raise argparse.ArgumentTypeError(f"expected an address gateways can reach (no port 0 or 0.0.0.0), got {text!r}")
    return address


def _ttl(text: str) -> int:
    seconds = duration(text)
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1s (etcd leases count whole seconds), got {text!r}")
    return math.ceil(seconds)
