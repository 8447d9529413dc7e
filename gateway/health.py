"""Active health checks: one probe loop per (service, endpoint) with a `health` block, using httpx.

An HTTP endpoint passes with a 2xx to `GET health.path`. A `protocol: grpc` endpoint is asked the standard
`grpc.health.v1.Health/Check` (for the whole server, service "") over h2c, with the gateway's own HTTP/2 client,
and passes when it answers SERVING.

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
from gateway.errors import UpstreamError
from gateway.units import Address
from gateway.upstream import UpstreamProtocol

if TYPE_CHECKING:
    from gateway.h2client import H2Pool
    from gateway.routing import RouteTable

log = logging.getLogger("meshgate.health")

_GRPC_CHECK = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/grpc.health.v1.Health/Check"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]
_GRPC_REQUEST = b"\x00\x00\x00\x00\x00"  # one uncompressed gRPC message of 0 bytes: HealthCheckRequest{}
_GRPC_SERVING = b"\x00\x00\x00\x00\x02\x08\x01"  # HealthCheckResponse{status: SERVING}, framed


class _GrpcProbe:
    """What a health check's HTTP/2 stream answers to (an `upstream.ResponseSink`): the verdict, as a future."""

    max_head = 64 * 1024
    max_headers = 100
    bytes_out = 0

    def __init__(self) -> None:
        self.result: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.body = b""

    @property
    def downstream(self) -> _GrpcProbe:
        return self

    def pause_for_peer(self) -> None:
        pass

    def resume_for_peer(self) -> None:
        pass

    def on_response_head(self, upstream: UpstreamProtocol, status: int) -> None:
        self.status = status

    def on_response_body(self, chunk: bytes) -> None:
        if len(self.body) < len(_GRPC_SERVING):
            self.body += chunk

    def after_upstream_data(self, upstream: UpstreamProtocol) -> None:
        pass

    def on_response_complete(self, upstream: UpstreamProtocol) -> None:
        fields = upstream.trailers or upstream.headers  # grpc-status: in the trailers, or Trailers-Only
        status = next((fields[i + 2] for i in range(0, len(fields), 4) if fields[i] == b"grpc-status"), b"")
        self.finish(self.status == 200 and status == b"0" and self.body == _GRPC_SERVING)

    def start_tunnel(self, upstream: UpstreamProtocol, rest: bytes) -> None:
        self.finish(False)

    def upstream_lost(self, upstream: UpstreamProtocol) -> None:
        self.finish(False)

    def upstream_failed(self, error: UpstreamError) -> None:
        self.finish(False)

    def finish(self, ok: bool) -> None:
        if not self.result.done():
            self.result.set_result(ok)


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
        self.h2_pools: dict[Address, H2Pool] = {}  # gRPC endpoints' probe connections, kept between probes

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            # trust_env=False: a probe must reach the endpoint itself, never an HTTP_PROXY
            self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        return self._client

    def reconcile(self, table: RouteTable) -> None:
        wanted: dict[tuple[str, Address], tuple[Health, Endpoint, bool]] = {}
        for service in table.services.values():
            health = service.config.health
            if health is None:
                continue
            for subset in service.subsets.values():
                for endpoint in subset.balancer.endpoints:
                    wanted[(service.name, endpoint.address)] = (health, endpoint, subset.protocol == "grpc")
        for key, (health, task) in list(self.probes.items()):
            if key not in wanted or wanted[key][0] != health:
                task.cancel()
                del self.probes[key]
        for key, (health, endpoint, grpc) in wanted.items():
            if key not in self.probes:
                self.probes[key] = (health, self.spawn(self.probe(endpoint, health, grpc)))
        for key in self.endpoints:
            if key not in wanted:
                self.endpoints[key].healthy = True

    async def probe(self, endpoint: Endpoint, health: Health, grpc: bool = False) -> None:
        passes = fails = 0
        while True:
            try:
                ok = await (
                    self.grpc_check(endpoint.address, health) if grpc else self.http_check(endpoint.address, health)
                )
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

    async def http_check(self, address: Address, health: Health) -> bool:
        response = await self.client.get(f"http://{address}{health.path}", timeout=health.timeout)
        return 200 <= response.status_code < 300

    async def grpc_check(self, address: Address, health: Health) -> bool:
        """grpc.health.v1.Health/Check for service "" over h2c, on the gateway's own HTTP/2 client (h2client.py):
        an empty request message; the endpoint passes when it answers SERVING with grpc-status 0."""
        from gateway.h2client import H2Pool  # the codec is loaded only when a gRPC service is checked

        pool = self.h2_pools.get(address)
        if pool is None:
            pool = self.h2_pools[address] = H2Pool(address, None, None, 64 * 1024, 100)
        probe = _GrpcProbe()
        try:
            async with asyncio.timeout(health.timeout):
                stream = pool.acquire() or await pool.connect(health.timeout)
                stream.exchange = probe
                fields = [*_GRPC_CHECK[:3], (b":authority", str(address).encode()), *_GRPC_CHECK[3:]]
                stream.send_request(fields, [_GRPC_REQUEST], None, True)
                return await probe.result
        except (TimeoutError, UpstreamError):
            return False

    async def close(self) -> None:
        for _, task in self.probes.values():
            task.cancel()
        self.probes.clear()
        if self._client is not None:
            await self._client.aclose()
        for pool in self.h2_pools.values():
            pool.close()
        self.h2_pools.clear()
