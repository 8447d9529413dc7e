"""The demo shop: storefront, catalog, inventory and payments, one small Starlette app per process.

    python -m meshgate.demoapps.shop catalog --port 19052 --version v2 --gateway http://127.0.0.1:19021 \\
        --otlp http://127.0.0.1:19000/v1/traces --latency 60ms --fail-every 33

`--host` is 127.0.0.1 by default (`meshgate demo` runs everything on one machine); in a container of its own a
service listens on 0.0.0.0. `--check` validates the command line and exits.

- storefront: `GET /` (catalog's products and categories), `GET /products/{id}` (a product and related ones),
  `POST /checkout` (`{"product", "quantity"}`: the price from catalog, then a charge from payments).
- catalog: `GET /products` and `GET /products/{id}` (stock from inventory), `GET /categories`,
  `GET /products/{id}/related`.
- inventory: `GET /stock`, `GET /stock/{id}`.   payments: `POST /charge`.

`--grpc payments` (given to every service, as the mesh document's `protocol: grpc` is to every gateway) makes
payments a gRPC service: `meshgate.demo.Payments/Charge` with JSON messages, and grpc.health.v1 (`rpc`); storefront
then charges through a grpcio channel to its gateway, and a failed call is its own 502.

Every HTTP service answers `GET /healthz` (not traced, not counted). `--latency` is the mean time a request takes
here (±50 %), `--fail-every N` answers every Nth request with a 503 (a gRPC call with UNAVAILABLE): the catalog v2
canary's deterministic ~3 %.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import random
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc  # type: ignore[import-untyped]
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway.cli import duration, http_url, whole_number
from gateway.units import is_hostname
from meshgate.demoapps import rpc
from meshgate.demoapps.otel import Tracing, record_grpc_status, record_status, tracer_provider

SERVICES = ("storefront", "catalog", "inventory", "payments")
GRPC_SERVICES = ("payments",)  # the services that can speak gRPC (`--grpc`)
PAYMENTS_RPC = "meshgate.demo.Payments"
CHARGE = f"/{PAYMENTS_RPC}/Charge"
CALL_TIMEOUT = 5.0  # seconds for a call to another service, through the gateway
GRACE = 3  # seconds for calls in flight at SIGTERM


@dataclass(frozen=True)
class Product:
    id: int
    name: str
    category: str
    price_cents: int


PRODUCTS = {
    p.id: p
    for p in (
        Product(1, "Espresso cup", "kitchen", 900),
        Product(2, "Pour-over kettle", "kitchen", 4900),
        Product(3, "Grinder", "kitchen", 12900),
        Product(4, "Linen apron", "textiles", 3200),
        Product(5, "Tea towel", "textiles", 1100),
        Product(6, "Oak tray", "home", 5800),
        Product(7, "Candle", "home", 1900),
        Product(8, "Notebook", "paper", 1500),
    )
}


@dataclass(frozen=True)
class Options:
    service: str
    port: int
    version: str = "v1"
    host: str = "127.0.0.1"
    gateway: str = "http://127.0.0.1:15001"  # this group's gateway, outbound listener
    otlp: str | None = None
    latency: float = 0.003
    fail_every: int = 0
    grpc: tuple[str, ...] = ()  # the services that speak gRPC, this one perhaps among them


Handler = Callable[[Request], Awaitable[Response]]


class Service:
    """One demo service: its routes, its calls to others through the gateway, its latency and failures.

    >>> app = Service(Options("inventory", 19053), tracing).app()
    """

    def __init__(self, options: Options, tracing: Tracing) -> None:
        self.options = options
        self.tracing = tracing
        self.client = httpx.AsyncClient(base_url=options.gateway, timeout=CALL_TIMEOUT, trust_env=False)
        self.served = itertools.count(1)
        self.random = random.Random()
        self.charge_rpc: rpc.JsonMethod | None = None  # made on the server's event loop, which grpc.aio binds to

    def app(self) -> Starlette:
        routes = getattr(self, f"_{self.options.service}_routes")()
        traced = [
            Route(path, self._traced(f"{method} {path.replace(':int', '')}", handler), methods=[method])
            for method, path, handler in routes
        ]
        return Starlette(routes=[Route("/healthz", _healthz), *traced], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.options.service == "storefront" and "payments" in self.options.grpc:
            self.charge_rpc = rpc.JsonMethod(httpx.URL(self.options.gateway).netloc.decode(), "payments", CHARGE)
        try:
            yield
        finally:
            await self.client.aclose()
            if self.charge_rpc is not None:
                await self.charge_rpc.close()

    def _traced(self, name: str, handler: Handler) -> Handler:
        async def traced(request: Request) -> Response:
            with self.tracing.server(name, request.method, request.url.path, request.headers) as span:
                answer = await self._serve(handler, request)
                record_status(span, answer.status_code)
                return answer

        return traced

    async def _serve(self, handler: Handler, request: Request) -> Response:
        error = await self._fault()
        if error is not None:
            return JSONResponse({"error": error}, 503)
        try:
            return await handler(request)
        except Unavailable as err:
            return JSONResponse({"error": str(err)}, 502)

    async def _fault(self) -> str | None:
        """The injected latency, then why this request fails (`--fail-every`), or None."""
        count = next(self.served)
        mean = self.options.latency
        await asyncio.sleep(self.random.uniform(mean * 0.5, mean * 1.5))
        if self.options.fail_every and count % self.options.fail_every == 0:
            every = self.options.fail_every
            return f"{self.options.service} {self.options.version}: request {count} fails (one in {every} does)"
        return None

    async def _call(self, service: str, method: str, path: str, body: object = None) -> Any:
        """The JSON answer of `service`; any other outcome raises `Unavailable`."""
        try:
            answer = await self.tracing.call(self.client, service, method, path, body)
        except httpx.HTTPError as err:
            raise Unavailable(f"{service}: {type(err).__name__}") from None
        if answer.status_code != 200:
            raise Unavailable(f"{service} answered {answer.status_code}")
        return answer.json()

    # storefront

    def _storefront_routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/", self.home),
            ("GET", "/products/{id:int}", self.product),
            ("POST", "/checkout", self.checkout),
        ]

    async def home(self, request: Request) -> Response:
        products, categories = await asyncio.gather(
            self._call("catalog", "GET", "/products"), self._call("catalog", "GET", "/categories")
        )
        return JSONResponse({"page": "home", "categories": categories, "products": products})

    async def product(self, request: Request) -> Response:
        product_id = request.path_params["id"]
        product, related = await asyncio.gather(
            self._call("catalog", "GET", f"/products/{product_id}"),
            self._call("catalog", "GET", f"/products/{product_id}/related"),
        )
        return JSONResponse({"page": "product", "product": product, "related": related})

    async def checkout(self, request: Request) -> Response:
        try:
            order = await request.json()
            product_id, quantity = int(order["product"]), int(order.get("quantity", 1))
        except (ValueError, TypeError, KeyError):
            return JSONResponse({"error": 'expected {"product": ID, "quantity": N}'}, 400)
        product = await self._call("catalog", "GET", f"/products/{product_id}")
        total = int(product["price_cents"]) * quantity
        payment = await self._charge({"amount_cents": total, "currency": "EUR"})
        return JSONResponse({"page": "order", "product": product, "quantity": quantity, "payment": payment})

    async def _charge(self, charge: dict[str, object]) -> Any:
        if self.charge_rpc is None:
            return await self._call("payments", "POST", "/charge", charge)
        attributes = {"rpc.system": "grpc", "rpc.service": PAYMENTS_RPC, "rpc.method": "Charge"}
        with self.tracing.client(f"{PAYMENTS_RPC}/Charge", "payments", attributes) as (span, metadata):
            try:
                answer = await self.charge_rpc(charge, metadata, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as err:
                record_grpc_status(span, err.code().value[0], err.code().name)
                raise Unavailable(f"payments: {err.code().name} {err.details() or ''}".rstrip()) from None
            record_grpc_status(span, 0, "OK")
            return answer

    # catalog

    def _catalog_routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/products", self.products),
            ("GET", "/categories", self.categories),
            ("GET", "/products/{id:int}", self.catalog_product),
            ("GET", "/products/{id:int}/related", self.related),
        ]

    async def products(self, request: Request) -> Response:
        stock = await self._call("inventory", "GET", "/stock")
        listed = [_product_json(p, stock.get(str(p.id), 0), self.options.version) for p in PRODUCTS.values()]
        return JSONResponse(listed)

    async def categories(self, request: Request) -> Response:
        return JSONResponse(sorted({p.category for p in PRODUCTS.values()}))

    async def catalog_product(self, request: Request) -> Response:
        product = PRODUCTS.get(request.path_params["id"])
        if product is None:
            return JSONResponse({"error": "no such product"}, 404)
        stock = await self._call("inventory", "GET", f"/stock/{product.id}")
        return JSONResponse(_product_json(product, stock["in_stock"], self.options.version))

    async def related(self, request: Request) -> Response:
        product = PRODUCTS.get(request.path_params["id"])
        if product is None:
            return JSONResponse({"error": "no such product"}, 404)
        same = [p.id for p in PRODUCTS.values() if p.category == product.category and p.id != product.id]
        return JSONResponse({"product": product.id, "related": same})

    # inventory

    def _inventory_routes(self) -> list[tuple[str, str, Handler]]:
        return [("GET", "/stock", self.stock), ("GET", "/stock/{id:int}", self.stock_of)]

    async def stock(self, request: Request) -> Response:
        return JSONResponse({str(product_id): _in_stock(product_id) for product_id in PRODUCTS})

    async def stock_of(self, request: Request) -> Response:
        product_id = request.path_params["id"]
        return JSONResponse({"product": product_id, "in_stock": _in_stock(product_id)})

    # payments

    def _payments_routes(self) -> list[tuple[str, str, Handler]]:
        return [("POST", "/charge", self.charge)]

    async def charge(self, request: Request) -> Response:
        return JSONResponse(_approved(await request.json()))

    async def charge_call(self, charge: Any, context: Any) -> Any:
        """Charge over gRPC (a `grpc.aio` handler): the HTTP route's answer, or UNAVAILABLE as `--fail-every` says."""
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        with self.tracing.server(f"{PAYMENTS_RPC}/Charge", "POST", CHARGE, metadata) as span:
            span.set_attributes({"rpc.system": "grpc", "rpc.service": PAYMENTS_RPC, "rpc.method": "Charge"})
            error = await self._fault()
            code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNAVAILABLE
            record_grpc_status(span, code.value[0], code.name)
        if error is not None:
            await context.abort(code, error)
        return _approved(charge)

    async def serve_grpc(self) -> bool:
        """Serve payments over gRPC until SIGTERM or SIGINT; whether it could listen."""
        try:
            server = rpc.server(PAYMENTS_RPC, {"Charge": self.charge_call}, self.options.host, self.options.port)
        except RuntimeError as err:
            print(f"payments: cannot listen on {self.options.host}:{self.options.port}: {err}", file=sys.stderr)
            return False
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await server.start()
        await stop.wait()
        await server.stop(GRACE)
        return True


class Unavailable(Exception):
    """A service this one depends on failed: the caller gets a 502 with the reason."""


def _approved(charge: dict[str, object]) -> dict[str, object]:
    return {"payment": str(uuid.uuid4()), "status": "approved", **charge}


def _product_json(product: Product, in_stock: int, version: str) -> dict[str, object]:
    return {**dataclasses.asdict(product), "in_stock": in_stock, "catalog_version": version}


def _in_stock(product_id: int) -> int:
    return (product_id * 7) % 23


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


def parse_args(argv: Sequence[str] | None) -> tuple[Options, bool]:
    """The options, and whether `--check` asked only to validate them."""
    parser = argparse.ArgumentParser(prog="python -m meshgate.demoapps.shop", description="a meshgate demo service")
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("--host", default=Options.host, help=f"the address to listen on (default {Options.host})")
    parser.add_argument("--port", type=whole_number(1, 65535), required=True)
    parser.add_argument("--version", default="v1")
    parser.add_argument(
        "--gateway", type=http_url, default=Options.gateway, metavar="URL", help="this group's outbound listener"
    )
    parser.add_argument(
        "--otlp", type=http_url, metavar="URL", help="OTLP/HTTP traces endpoint (default: spans are not exported)"
    )
    parser.add_argument("--latency", type=duration, default=Options.latency, metavar="DURATION")
    parser.add_argument(
        "--fail-every", type=whole_number(0), default=0, metavar="N", help="answer every Nth request with 503"
    )
    parser.add_argument(
        "--grpc",
        action="append",
        choices=GRPC_SERVICES,
        default=[],
        metavar="SERVICE",
        help=f"a service that speaks gRPC (one of: {', '.join(GRPC_SERVICES)}); repeatable",
    )
    parser.add_argument("--check", action="store_true", help="validate the command line and exit")
    args = parser.parse_args(argv)
    if not is_hostname(args.host):
        parser.error(f"--host: expected a host name or an IPv4 address, got {args.host!r}")
    keys = ("service", "port", "version", "host", "gateway", "otlp", "latency", "fail_every")
    options = Options(**{key: getattr(args, key) for key in keys}, grpc=tuple(sorted(set(args.grpc))))
    return options, args.check


def main(argv: Sequence[str] | None = None) -> int:
    options, check = parse_args(argv)
    if check:
        print(f"ok: {options.service} {options.version} on {options.host}:{options.port}, gateway {options.gateway}")
        return 0
    provider = tracer_provider(options.service, options.version, options.otlp)
    service = Service(options, Tracing(provider.get_tracer("meshgate-demo")))
    if options.service in options.grpc:
        try:
            return 0 if asyncio.run(service.serve_grpc()) else 1
        finally:
            provider.shutdown()  # export what is batched
    config = uvicorn.Config(
        service.app(),
        host=options.host,
        port=options.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACE,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        provider.shutdown()  # export what is batched
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
