"""The demo's gRPC: JSON messages over grpcio's generic handlers (no generated code, no protoc at run time), the
standard `grpc.health.v1.Health/Check`, and a readiness check for `meshgate demo`.

- `server(methods, host, port)`: a `grpc.aio` server for one service's unary methods (JSON in, JSON out) plus
  Health/Check, which answers SERVING for the whole server and for each service it serves.
- `JsonMethod`: a caller's unary method on a channel to its group's gateway outbound listener (h2c), with the
  callee's name as the `:authority` the gateway routes by.
- `python -m meshgate.demoapps.rpc check HOST:PORT --timeout 20` exits 0 once Health/Check answers SERVING.
  `meshgate demo` runs it as a child so that the demo itself, which forks every other process, starts no gRPC
  threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc  # type: ignore[import-untyped]

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}
JsonHandler = Callable[[Any, Any], Awaitable[Any]]  # (message, grpc.aio.ServicerContext) -> answer


def _encode(message: object) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def server(service: str, methods: Mapping[str, JsonHandler], host: str, port: int) -> Any:
    """A grpc.aio server (not started) with `service`'s methods at `/{service}/{method}` and Health/Check.

    >>> rpc = server("meshgate.demo.Payments", {"Charge": charge}, "127.0.0.1", 19054)
    >>> await rpc.start(); await rpc.wait_for_termination()
    """
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(handler, request_deserializer=json.loads, response_serializer=_encode)
        for name, handler in methods.items()
    }
    known = {"", service}

    async def check(request: bytes, context: Any) -> bytes:
        asked = _health_service(request)
        if asked not in known:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {asked!r}")
        return SERVING

    health = {"Check": grpc.unary_unary_rpc_method_handler(check)}  # bytes in, bytes out
    rpc = grpc.aio.server(
        handlers=[
            grpc.method_handlers_generic_handler(service, handlers),
            grpc.method_handlers_generic_handler("grpc.health.v1.Health", health),
        ]
    )
    rpc.add_insecure_port(f"{host}:{port}")  # raises RuntimeError when it cannot listen
    return rpc


def _health_service(request: bytes) -> str:
    """HealthCheckRequest's `service` (field 1, a short string); "" for the empty message."""
    if len(request) >= 2 and request[0] == 0x0A and request[1] < 0x80:
        return request[2 : 2 + request[1]].decode(errors="replace")
    return ""


class JsonMethod:
    """One unary method of `service`, called through this group's gateway (its outbound listener, h2c).

    >>> charge = JsonMethod("127.0.0.1:19041", "payments", "/meshgate.demo.Payments/Charge")
    >>> answer = await charge({"amount_cents": 900}, {"x-request-id": "..."}, timeout=5.0)
    >>> await charge.close()
    """

    def __init__(self, gateway: str, service: str, path: str) -> None:
        # One channel per process, reused: the gateway multiplexes the calls over one HTTP/2 connection.
        self.channel = grpc.aio.insecure_channel(gateway, options=[("grpc.default_authority", service)])
        self.call = self.channel.unary_unary(path, request_serializer=_encode, response_deserializer=json.loads)

    async def __call__(self, message: object, metadata: Mapping[str, str], timeout: float) -> Any:
        """The answer; a call that fails raises `grpc.aio.AioRpcError` (its `code()` says why)."""
        return await self.call(message, metadata=tuple(metadata.items()), timeout=timeout)

    async def close(self) -> None:
        await self.channel.close()


def check(address: str, timeout: float) -> bool:
    """Whether `address` answers Health/Check with SERVING within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        probe = channel.unary_unary(HEALTH_CHECK)
        while (left := deadline - time.monotonic()) > 0:
            try:
                # wait_for_ready: the call waits for the server to listen instead of failing at once.
                if probe(b"", timeout=left, wait_for_ready=True) == SERVING:
                    return True
            except grpc.RpcError:
                pass  # not serving yet, or the deadline: the loop decides
            time.sleep(0.05)  # after a refusal, not before each try: wait_for_ready does the waiting
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshgate.demoapps.rpc", description="the demo's gRPC check")
    commands = parser.add_subparsers(dest="command", required=True)
    checking = commands.add_parser("check", help="wait until HOST:PORT answers grpc.health.v1 Check with SERVING")
    checking.add_argument("address", metavar="HOST:PORT")
    checking.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    args = parser.parse_args(argv)
    if check(args.address, args.timeout):
        print(f"{args.address}: SERVING")
        return 0
    print(f"{args.address}: not SERVING after {args.timeout:g}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
