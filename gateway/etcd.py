"""A small etcd v3 client over etcd's HTTP/JSON gateway, through httpx, so there is no gRPC dependency.

The gateway's endpoint discovery and `meshgate register` use it, and so does the dashboard's etcd store
(dashboard/store/etcd.py). On the wire, keys and values are base64 and 64-bit numbers (revisions, lease IDs, TTLs) are
strings; etcd's JSON leaves out empty and zero fields, so a missing `kvs` means none and a missing `TTL` means 0.
Every failure raises one `EtcdError` whose text says what failed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

ETCD_REQUEST_TIMEOUT = 5.0  # seconds for every request to etcd
WATCH_IDLE = 30.0  # an idle watch stream ends after this long, so a dead connection is noticed
KV = dict[str, Any]


class EtcdError(Exception):
    """etcd could not be used: unreachable, an error answer, or a broken watch stream."""


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def key_of(kv: KV) -> str:
    return base64.b64decode(kv["key"]).decode("utf-8", "replace")


def value_of(kv: KV) -> bytes:
    return base64.b64decode(kv.get("value", ""))


def prefix_end(prefix: str) -> str:
    """The range end that makes a range cover every key starting with `prefix`."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class EtcdClient:
    """etcd's v3 API over HTTP. Endpoints are tried in order while a connection cannot be made.

    >>> etcd = EtcdClient(["http://10.0.0.5:2379", "http://10.0.0.6:2379"])  # doctest: +SKIP
    >>> kvs, revision = await etcd.range("/meshgate/endpoints/", prefix_end("/meshgate/endpoints/"))
    """

    def __init__(self, endpoints: Sequence[str], timeout: float = ETCD_REQUEST_TIMEOUT) -> None:
        self.endpoints = [endpoint.rstrip("/") for endpoint in endpoints]
        self.timeout = timeout
        self.http = httpx.AsyncClient(timeout=timeout)

    async def call(self, path: str, body: KV) -> KV:
        """POST `body` to `/v3/<path>` and return the answer, or raise EtcdError."""
        failures = []
        for _ in self.endpoints:
            try:
                response = await self.http.post(f"{self.endpoints[0]}/v3/{path}", json=body)
            except httpx.ConnectError as err:  # nothing was sent: safe to try the next endpoint
                failures.append(f"{self.endpoints[0]}: {err}")
                self.endpoints.append(self.endpoints.pop(0))
                continue
            except httpx.HTTPError as err:  # a write may or may not have happened: the caller must not retry blindly
                raise EtcdError(f"etcd {path}: {type(err).__name__}: {err}") from None
            return _result(path, response)
        raise EtcdError(f"etcd is unreachable: {'; '.join(failures)}")

    async def range(
        self, key: str, range_end: str | None = None, *, limit: int = 0, keys_only: bool = False
    ) -> tuple[list[KV], int]:
        """The keys from `key` up to `range_end` (just `key` without one), and the store's revision then."""
        body: KV = {"key": b64(key), "limit": str(limit), "keys_only": keys_only}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        answer = await self.call("kv/range", body)
        return answer.get("kvs", []), int(answer["header"]["revision"])

    async def put(self, key: str, value: str, lease: str | None = None) -> None:
        body: KV = {"key": b64(key), "value": b64(value)}
        if lease is not None:
            body["lease"] = lease
        await self.call("kv/put", body)

    async def grant(self, ttl: int) -> str:
        """A new lease with `ttl` seconds to live; its ID."""
        return str((await self.call("lease/grant", {"TTL": str(ttl)}))["ID"])

    async def keep_alive(self, lease: str) -> int:
        """Renew a lease; the seconds it now has to live, 0 if it has already expired (its keys are gone)."""
        return int((await self.call("lease/keepalive", {"ID": lease})).get("result", {}).get("TTL", 0))

    async def revoke(self, lease: str) -> None:
        """End a lease now, deleting the keys attached to it."""
        await self.call("lease/revoke", {"ID": lease})

    async def watch(
        self, key: str, range_end: str | None, start_revision: int, idle: float = WATCH_IDLE
    ) -> AsyncIterator[KV]:
        """Each watch response (`events`, `header`, ...) from `start_revision` on.

        It ends after a response with `canceled` (for example when `start_revision` was compacted) and when the
        stream was idle for `idle` seconds; either way the caller reads again and watches from there.
        """
        request: KV = {"key": b64(key), "start_revision": str(start_revision)}
        if range_end is not None:
            request["range_end"] = b64(range_end)
        timeout = httpx.Timeout(self.timeout, read=idle)
        url = f"{self.endpoints[0]}/v3/watch"
        try:
            async with self.http.stream("POST", url, json={"create_request": request}, timeout=timeout) as stream:
                if stream.status_code != 200:
                    raise EtcdError(f"etcd watch: HTTP {stream.status_code}")
                async for line in stream.aiter_lines():
                    message = json.loads(line) if line.strip() else {}
                    if message.get("error"):
                        raise EtcdError(f"etcd watch: {message['error']}")
                    result: KV = message.get("result", {})
                    yield result
                    if result.get("canceled"):
                        return
        except httpx.ReadTimeout:
            return  # idle: the caller reopens the watch
        except httpx.HTTPError as err:
            raise EtcdError(f"etcd watch: {type(err).__name__}: {err}") from None
        except ValueError as err:
            raise EtcdError(f"etcd watch: not JSON: {err}") from None

    async def aclose(self) -> None:
        await self.http.aclose()


def _result(path: str, response: httpx.Response) -> KV:
    try:
        data: KV = response.json()
    except ValueError:
        raise EtcdError(f"etcd {path}: HTTP {response.status_code}, not JSON") from None
    if response.status_code != 200 or data.get("error"):
        raise EtcdError(f"etcd {path}: {data.get('message') or data.get('error') or response.status_code}")
    return data
