"""Active health checks: one probe loop per (service, endpoint) with a `health` block, using httpx.

An endpoint turns unhealthy after `unhealthy` consecutive failed probes and healthy again after `healthy`
consecutive successes; balancers skip unhealthy endpoints (together with passively ejected ones).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import httpx

from gateway.balancer import Endpoint
from gateway.config import Health
from gateway.units import Address

if TYPE_CHECKING:
    from gateway.routing import RouteTable

log = logging.getLogger("meshgate.health")


class HealthChecks:
    def __init__(
        self,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        endpoints: Mapping[tuple[str, Address], Endpoint],
        changed: Callable[[], None],
    ) -> None:
        self.spawn, self.endpoints, self.changed = spawn, endpoints, changed  # the runtime's
        self.probes: dict[tuple[str, Address], tuple[Health, asyncio.Task[Any]]] = {}
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            # trust_env=False: a probe must reach the endpoint itself, never an HTTP_PROXY
            self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        return self._client

    def reconcile(self, table: RouteTable) -> None:
        wanted: dict[tuple[str, Address], tuple[Health, Endpoint]] = {}
        for service in table.services.values():
            health = service.config.health
            if health is None:
                continue
            for subset in service.subsets.values():
                for endpoint in subset.balancer.endpoints:
                    wanted[(service.name, endpoint.address)] = (health, endpoint)
        for key, (health, task) in list(self.probes.items()):
            if key not in wanted or wanted[key][0] != health:
                task.cancel()
                del self.probes[key]
        for key, (health, endpoint) in wanted.items():
            if key not in self.probes:
                self.probes[key] = (health, self.spawn(self.probe(endpoint, health)))
        for key in self.endpoints:
            if key not in wanted:
                self.endpoints[key].healthy = True

    async def probe(self, endpoint: Endpoint, health: Health) -> None:
        url = f"http://{endpoint.address}{health.path}"
        passes = fails = 0
        while True:
            try:
                response = await self.client.get(url, timeout=health.timeout)
                ok = 200 <= response.status_code < 300
            except httpx.HTTPError:
                ok = False
            passes, fails = (passes + 1, 0) if ok else (0, fails + 1)
            if endpoint.healthy and fails >= health.unhealthy:
                endpoint.healthy = False
                log.warning("endpoint %s failed %d health checks: unhealthy", endpoint.address, fails)
                self.changed()
            elif not endpoint.healthy and passes >= health.healthy:
                endpoint.healthy = True
                log.info("endpoint %s passed %d health checks: healthy", endpoint.address, passes)
                self.changed()
            await asyncio.sleep(health.interval)

    async def close(self) -> None:
        for _, task in self.probes.values():
            task.cancel()
        self.probes.clear()
        if self._client is not None:
            await self._client.aclose()
