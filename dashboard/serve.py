"""`meshgate dashboard`: run the control server on uvicorn; `meshgate dashboard ca` and `meshgate dashboard token
create` (arguments in `meshgate.cli`).

Start-up, in order: check the command line and the `--config` mesh file (exit 2 on bad input, before anything is
written; `--check` stops there); bind the listen socket; make DIR (0700) or tighten it and the files in it
(`dashboard.datadir`); open the CA in DIR/ca (with an etcd store too: replicas share those files) and the store;
seed an empty store from the mesh file; make the bootstrap operator token if the store has none (saved to
DIR/operator-token, 0600, and printed once when standard output is a terminal); serve, and log `listening http=HOST:PORT
url=http://HOST:PORT`. SIGTERM or SIGINT stops accepting, answers waiting long-polls at once, lets requests in
flight finish up to `--drain-timeout`, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from prometheus_client import CollectorRegistry

from dashboard.api.auth import TokenError, new_token
from dashboard.app import create_app
from dashboard.datadir import private_directory, sqlite_files
from dashboard.guard import GuardedHttpProtocol
from dashboard.identity import IdentityError, MeshCA, check_trust_domain, is_dns_name
from dashboard.mesh import Mesh
from dashboard.settings import CERT_LIFETIME, PROMETHEUS_SCRAPE_INTERVAL, SIGNALS_STEP, SYNC_HOLD, Settings
from dashboard.spans.store import DB_FILE as SPANS_FILE
from dashboard.spans.store import MAX_AGE as MAX_SPAN_AGE
from dashboard.spans.store import MAX_BYTES as MAX_SPAN_STORE_BYTES
from dashboard.spans.store import MAX_SPANS, SpanStore
from dashboard.store import open_store
from dashboard.store.model import DB_FILE, Store, StoreError
from gateway.config import ConfigError
from gateway.units import Address, is_loopback, is_wildcard, write_private

log = logging.getLogger("meshgate.dashboard")

TOKEN_FILE = "operator-token"
DATA_FILES = ("ca", "tls", TOKEN_FILE, *sqlite_files(DB_FILE, SPANS_FILE))  # what start-up keeps private in --data
HTTPS_LIFETIME = 90 * 86400.0  # the dashboard's own HTTPS certificate, made anew at every start


def _fail(message: str, status: int = 2) -> int:
    print(f"meshgate: {message}", file=sys.stderr)
    return status


@dataclass(frozen=True)
class Startup:
    """What `run` checked and opened before the event loop starts."""

    settings: Settings
    sock: socket.socket
    mesh: Mesh | None
    config_path: str | None
    data: str
    drain_timeout: float
    tls: tuple[str, str] | None = None  # (certificate file, key file) when serving HTTPS


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        mesh = check_arguments(args)
    except (ConfigError, IdentityError, StoreError) as err:
        return _fail(str(err))
    if args.check:
        scheme = "https" if args.tls or not is_loopback(args.listen.host) else "http"
        seeds = f", seeds {len(mesh.groups)} groups and {len(mesh.services)} services" if mesh else ""
        print(f"ok: dashboard on {scheme}://{args.listen}, store {args.store or args.data}{seeds}")
        return 0
    try:
        sock = _bind(args.listen)
    except OSError as err:
        return _fail(f"--listen {args.listen}: {err.strerror or err}")
    try:
        private_directory(args.data, DATA_FILES)  # before anything in it: `ca/` would make it with the umask's mode
    except OSError as err:
        sock.close()
        return _fail(f"--data {args.data}: {err.strerror or err}", 1)
    try:
        ca = MeshCA.load_or_create(os.path.join(args.data, "ca"), args.trust_domain)
        tls = (
            https_certificate(ca, args.data, args.listen, args.san)
            if args.tls or not is_loopback(args.listen.host)
            else None
        )
    except IdentityError as err:
        sock.close()
        return _fail(str(err))
    secret = None
    if args.webhook_secret_file:
        try:
            with open(args.webhook_secret_file, "rb") as file:
                secret = file.read().strip()
        except OSError as err:
            sock.close()
            return _fail(f"--webhook-secret-file {args.webhook_secret_file}: {err.strerror or err}")
        if not secret:
            sock.close()
            return _fail(f"--webhook-secret-file {args.webhook_secret_file}: the file is empty")
    try:
        store = open_store(args.store or args.data)
    except StoreError as err:
        sock.close()
        return _fail(str(err), 1)
    # With Jaeger, sampled traces live there; otherwise in the embedded span store next to the config.
    spans = (
        None
        if args.jaeger
        else SpanStore(
            os.path.join(args.data, SPANS_FILE),
            max_spans=args.max_spans or MAX_SPANS,
            max_bytes=args.span_store_size or MAX_SPAN_STORE_BYTES,
            max_age=args.span_max_age or MAX_SPAN_AGE,
        )
    )
    settings = Settings(
        store=store,
        ca=ca,
        registry=CollectorRegistry(),
        trust_domain=args.trust_domain,
        cert_lifetime=args.cert_lifetime or CERT_LIFETIME,
        sync_hold=args.sync_hold or SYNC_HOLD,
        spans=spans,
        jaeger=args.jaeger,
        prometheus=args.prometheus,
        prometheus_scrape_interval=args.prometheus_scrape_interval or PROMETHEUS_SCRAPE_INTERVAL,
        signals_step=args.signals_step or SIGNALS_STEP,
        webhook_secret=secret,
        webhook_allow=tuple(args.webhook_allow or ()),
    )
    startup = Startup(settings, sock, mesh, args.config, args.data, args.drain_timeout, tls)
    import uvloop

    try:
        return uvloop.run(serve(startup))
    except StoreError as err:
        return _fail(str(err), 1)
    except OSError as err:  # e.g. the operator token file cannot be written
        return _fail(f"{err.filename or 'dashboard'}: {err.strerror or err}", 1)


def check_arguments(args: argparse.Namespace) -> Mesh | None:
    """What `run` refuses before it reaches the network or writes a file, and all that `--check` does: the mesh
    file (parsed as for seeding the store), the trust domain, the --san names and the --store URL. Listen
    address, URLs and durations were checked by argparse."""
    mesh = Mesh.load(args.config) if args.config else None
    check_trust_domain(args.trust_domain)
    for name in args.san:
        if not _is_ip(name) and not is_dns_name(name):
            raise IdentityError(f"--san {name!r}: expected a DNS name or an IP address")
    if args.store is not None:
        if not args.store.startswith("etcd://"):
            raise StoreError(f"--store: expected etcd://host:port[,host:port], got {args.store!r}")
        from dashboard.store.etcd import EtcdStore

        EtcdStore.from_url(args.store)  # parses the endpoints; connects only on first use
    return mesh


def _bind(address: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def serve(startup: Startup) -> int:
    settings = startup.settings
    store = settings.store
    try:
        if startup.mesh is not None:
            await seed(store, startup.mesh, startup.config_path or "")
        token = await bootstrap_operator(store, startup.data)
        if token is not None:
            show_token(token, os.path.join(startup.data, TOKEN_FILE))
        log.info("mesh CA %s, trust domain %s", settings.ca.ca_hash, settings.ca.trust_domain)
        app = create_app(settings)
        signals = app.state.signals.source  # golden-signal history (or Prometheus), sampled in the background
        sampler = asyncio.ensure_future(signals.run())
        driver = asyncio.ensure_future(app.state.rollouts.run())  # automated canary rollouts
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            http=GuardedHttpProtocol,  # header, body and head-size limits uvicorn lacks
            timeout_graceful_shutdown=max(1, round(startup.drain_timeout)),
            ssl_certfile=startup.tls[0] if startup.tls else None,
            ssl_keyfile=startup.tls[1] if startup.tls else None,
        )
        server = DashboardServer(config, settings.stopping, startup.sock, "https" if startup.tls else "http")
        try:
            await server.serve(sockets=[startup.sock])
        finally:
            for task in (sampler, driver):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await signals.close()
        log.info("stopped")
    finally:
        startup.sock.close()
        await store.close()
        if settings.spans is not None:
            await settings.spans.close()
    return 0


def https_certificate(ca: MeshCA, data: str, listen: Address, extra: list[str]) -> tuple[str, str]:
    """A server certificate from the mesh CA for every name gateways may use: the listen address, this host's
    names and addresses, loopback, and `--san`. Gateways verify it against the CA they pinned by hash."""
    names = {"localhost", socket.gethostname().lower(), socket.getfqdn().lower(), *extra}
    if not is_wildcard(listen.host):
        names.add(listen.host)
    names.update(("127.0.0.1", "::1"))
    with contextlib.suppress(OSError):
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    names.update(_routed_addresses())
    ips = sorted(name for name in names if _is_ip(name))
    dns = sorted(name for name in names if not _is_ip(name))
    key_pem, chain_pem, _ = ca.issue(ca.dashboard_id, dns, ips, lifetime=HTTPS_LIFETIME)
    directory = os.path.join(data, "tls")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    paths = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    for path, content in zip(paths, (chain_pem, key_pem), strict=True):
        write_private(path, content)
    return paths


def _routed_addresses() -> set[str]:
    """The addresses this host sends from by default, IPv4 and IPv6: what peers on other hosts usually dial, even
    where the host name maps to loopback only (Debian's /etc/hosts gives it 127.0.1.1). A UDP connect sends
    nothing; with no route it fails and adds nothing."""
    found = set()
    for family, target in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):  # documentation ranges
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))
            found.add(probe.getsockname()[0])
    return found


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


async def seed(store: Store, mesh: Mesh, source: str) -> None:
    """Commit the mesh file as version 1 when the store is empty; an existing config always wins."""
    current = await store.current()
    if current.version > 0:
        log.info("the store holds config version %d; --config %s is not applied", current.version, source)
        return
    revision = await store.commit(
        mesh.to_dict(),
        author="meshgate dashboard --config",
        reason=f"seeded from {source}",
        action="config.seed",
        target="mesh",
        expect_version=0,
    )
    log.info("seeded config version %d from %s", revision.version, source)


async def bootstrap_operator(store: Store, data: str) -> str | None:
    """The first operator token, when the store has none; saved to DATA/operator-token (0600)."""
    if any(record.role == "operator" for record in await store.tokens()):
        return None
    token, record = new_token("operator", name="bootstrap")
    os.makedirs(data, mode=0o700, exist_ok=True)
    path = os.path.join(data, TOKEN_FILE)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale file from a wiped store: never reuse its mode or owner
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    await store.add_token(record)
    await store.record_audit(
        who="meshgate dashboard (bootstrap)",
        action="token.create",
        target=f"tokens/{record.id}",
        before=None,
        after=_token_audit(record.id, record.name, record.role, record.group),
        reason=f"first start: no operator token existed; saved to {path}",
    )
    return token


def show_token(token: str, path: str) -> None:
    """The bootstrap token goes to a person, never to a log: printed once when standard output is a terminal, else
    only its file is named (under systemd, docker or a pipe, standard output is the log)."""
    if sys.stdout.isatty():
        print(f"operator token (shown once, saved to {path}): {token}", flush=True)
    else:
        log.info("made the first operator token: read it from %s (0600); it is printed only to a terminal", path)


def _token_audit(token_id: str, name: str, role: str, group: str | None) -> dict[str, object]:
    return {"id": token_id, "name": name, "role": role, "group": group}


class DashboardServer(uvicorn.Server):
    """uvicorn's server with meshgate's lifecycle: our "listening" line once the socket serves, and signals
    handled on the loop without being re-raised afterwards (uvicorn re-raises them, which would make a clean
    SIGTERM exit look like a kill)."""

    def __init__(self, config: uvicorn.Config, stopping: asyncio.Event, sock: socket.socket, scheme: str) -> None:
        super().__init__(config)
        self.stopping = stopping
        self.sock = sock
        self.scheme = scheme

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # embedded (tests): the owner stops us
            yield
            return
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        try:
            yield
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    def stop(self) -> None:
        if self.should_exit:  # a second signal: stop waiting for requests in flight
            self.force_exit = True
        self.should_exit = True
        self.stopping.set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.sock.getsockname()[:2]
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            log.info("meshgate dashboard listening %s=%s url=%s://%s", self.scheme, address, self.scheme, address)


def run_ca(args: argparse.Namespace) -> int:
    """`meshgate dashboard ca`: the CA as the dashboard would load or create it at start, its hash on stdout."""
    try:
        private_directory(args.data)
    except OSError as err:
        return _fail(f"--data {args.data}: {err.strerror or err}", 1)
    try:
        ca = MeshCA.load_or_create(os.path.join(args.data, "ca"), args.trust_domain)
    except IdentityError as err:
        return _fail(str(err))
    if args.out:
        try:
            write_private(args.out, ca.root_pem)
            os.chmod(args.out, 0o644)  # a public certificate, read by gateways that may run as other users
        except OSError as err:
            return _fail(f"--out {args.out}: {err.strerror or err}", 1)
    print(ca.ca_hash)
    return 0


def run_token_create(args: argparse.Namespace) -> int:
    try:
        token, record = new_token(args.role, args.group, args.name)
    except TokenError as err:
        return _fail(str(err))
    if args.out and _holds_token(args.out):
        print(f"meshgate: {args.out} already holds a token; none created", file=sys.stderr)
        return 0  # a bootstrap that runs again changes nothing
    try:
        store = open_store(args.store or args.data)
    except StoreError as err:
        return _fail(str(err), 1)

    async def create() -> None:
        try:
            await store.add_token(record)
            await store.record_audit(
                who=f"{os.environ.get('USER') or 'unknown'} (meshgate dashboard token create)",
                action="token.create",
                target=f"tokens/{record.id}",
                before=None,
                after=_token_audit(record.id, record.name, record.role, record.group),
                reason="created on the command line",
            )
        finally:
            await store.close()

    try:
        asyncio.run(create())
    except StoreError as err:
        return _fail(str(err), 1)
    if not args.out:
        print(token)
        return 0
    try:
        write_private(args.out, (token + "\n").encode())
    except OSError as err:
        return _fail(f"--out {args.out}: {err.strerror or err}; the token was created but not saved", 1)
    print(f"{args.out}: a new {args.role} token")
    return 0


def _holds_token(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False
