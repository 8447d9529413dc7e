"""The `meshgate` command: one entry point whose subcommands live with the package they drive.

- `gateway`: gateway/cli.py.
- `dashboard`, `dashboard ca`, `dashboard token create`: arguments here, run by `dashboard.serve`.
- `apply`, `get`: arguments here, run by `meshgate.client`.
- `demo`: arguments here, run by `meshgate.demo`.

Each command imports what it runs only when it runs, so `meshgate gateway` (and its worker processes) never load
the control server.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import version as package_version
from typing import TypeAlias

from gateway import cli as gateway_cli
from gateway import register as register_cli
from gateway.units import Address, parse_address, parse_size

DEFAULT_DATA = "./meshgate-data"
DEFAULT_LISTEN = "127.0.0.1:9000"  # the dashboard's
DEFAULT_SERVER = f"http://{DEFAULT_LISTEN}"  # where `apply` and `get` find it
MIN_CERT_LIFETIME = 10.0  # seconds: gateways renew at half-life and at most every 5 s (gateway.tls.renew_at)
MIN_SPAN_STORE_SIZE = 1 << 20  # an empty span store's file takes about 40 KiB
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshgate", description="An observability-first service mesh.")
    parser.add_argument("--version", action="version", version=f"meshgate {package_version('meshgate')}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gateway_cli.add_parser(subparsers)
    register_cli.add_parser(subparsers)
    add_dashboard_parser(subparsers)
    add_client_parsers(subparsers)
    add_demo_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


def add_dashboard_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("dashboard", help="run the control server (config store, CA, API)")
    parser.add_argument(
        "--listen",
        type=_address,
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"where the API, the pages and the gateways' protocol are served (default {DEFAULT_LISTEN}; HTTPS "
        "beyond loopback)",
    )
    _store_arguments(parser)
    parser.add_argument("--config", metavar="FILE", help="mesh YAML that seeds an empty store (ignored otherwise)")
    _trust_domain_argument(parser)
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve HTTPS with a certificate from the mesh CA on loopback too (always beyond loopback)",
    )
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name or IP address gateways use to reach the dashboard (repeatable)",
    )
    parser.add_argument(
        "--cert-lifetime",
        type=_cert_lifetime,
        metavar="DURATION",
        help="how long gateway certificates live, at least 10s; gateways renew at about half-life (default 24h)",
    )
    parser.add_argument(
        "--sync-hold",
        type=_positive_duration,
        metavar="DURATION",
        help="answer a quiet /sync long-poll with 304 after at most DURATION (default: the gateway's 30s); "
        "shorter behind a proxy that closes idle connections sooner",
    )
    parser.add_argument(
        "--jaeger", type=gateway_cli.http_url, metavar="URL", help="look sampled traces up in Jaeger's query API at URL"
    )
    parser.add_argument(
        "--prometheus",
        type=gateway_cli.http_url,
        metavar="URL",
        help="read golden-signal history from Prometheus at URL",
    )
    parser.add_argument(
        "--prometheus-scrape-interval",
        type=_positive_duration,
        metavar="DURATION",
        help="the scrape interval Prometheus uses for the gateways (default 15s)",
    )
    parser.add_argument(
        "--signals-step",
        type=_positive_duration,
        metavar="DURATION",
        help="how often the embedded history samples the gateways' heartbeats (default 5s)",
    )
    parser.add_argument(
        "--webhook-secret-file",
        metavar="FILE",
        help="rollout webhooks carry x-meshgate-signature: sha256=HMAC of the body with this file's contents",
    )
    parser.add_argument(
        "--webhook-allow",
        action="append",
        metavar="HOST",
        help="a loopback, private or link-local host rollout webhooks may call (refused otherwise); repeatable",
    )
    parser.add_argument(
        "--max-spans",
        type=gateway_cli.positive_int,
        metavar="N",
        help="spans kept in the embedded store, oldest traces dropped first (default 200000)",
    )
    parser.add_argument(
        "--span-store-size",
        type=_size,
        metavar="SIZE",
        help="the embedded span store's size on disk (its file's pages in use, e.g. 512MiB or 2GB), oldest traces "
        "dropped first; freed space goes back to the file system (default 512MiB)",
    )
    parser.add_argument(
        "--span-max-age",
        type=_positive_duration,
        metavar="DURATION",
        help="how long the embedded store keeps spans (default 24h)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=gateway_cli.duration,
        default=10.0,
        metavar="DURATION",
        help="on SIGTERM, how long requests in flight may take to finish (default 10s)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate this command line and the --config file, then exit: no network, nothing written",
    )
    parser.set_defaults(run=_run_dashboard)
    commands = parser.add_subparsers(dest="dashboard_command", metavar="COMMAND")
    ca = commands.add_parser(
        "ca",
        help="load or create the mesh CA in DIR/ca and print its sha256: hash (gateways pin it)",
        description="Loads the mesh CA from DIR/ca, creating it there first if there is none (as the dashboard does "
        "at start), and prints its hash for `meshgate gateway --ca-hash`. --out also writes its root certificate, "
        "for `meshgate gateway --ca FILE`.",
    )
    _data_argument(ca)
    _trust_domain_argument(ca)
    ca.add_argument("--out", metavar="FILE", help="also write the root certificate (PEM, mode 0644) to FILE")
    ca.set_defaults(run=_run_ca)
    token = commands.add_parser("token", help="API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    create = token_commands.add_parser("create", help="create a token and print it on stdout (shown only once)")
    _store_arguments(create)
    create.add_argument("--role", required=True, choices=("operator", "viewer", "gateway"))
    create.add_argument("--group", help="the group a gateway join token is bound to (required for --role gateway)")
    create.add_argument("--name", help="a label for the audit log (default: role and id)")
    create.add_argument(
        "--out",
        metavar="FILE",
        help="write the token to FILE (mode 0600) instead of stdout; if FILE already holds one, create none",
    )
    create.set_defaults(run=_run_token_create)


def add_client_parsers(subparsers: Subparsers) -> None:
    apply = subparsers.add_parser("apply", help="replace the mesh config on the dashboard with a mesh YAML file")
    apply.add_argument("file", metavar="FILE")
    apply.add_argument("--reason", help="recorded in the history and audit log (default: the file name)")
    _connection_arguments(apply, "an operator")
    apply.set_defaults(run=_run_apply)
    get = subparsers.add_parser("get", help="show services, gateways, rollouts or the config history")
    get.add_argument("what", choices=("services", "gateways", "rollouts", "history"))
    get.add_argument("-o", "--output", choices=("table", "json"), default="table")
    get.add_argument("--limit", type=int, default=20, help="history: how many versions (default 20)")
    _connection_arguments(get)
    get.set_defaults(run=_run_get)
    add_rollout_parser(subparsers)


def add_rollout_parser(subparsers: Subparsers) -> None:
    rollout = subparsers.add_parser(
        "rollout",
        help="automated canary rollouts: start, status, pause, resume, promote, abort, approve",
        description="A rollout steps a service's canary subset up by itself while the canary's errors, first "
        "attempts and latency are no worse than the primary's, holds while there is not evidence enough, and rolls "
        "back at once on harm. Every decision is explained: `meshgate rollout status SERVICE`.",
    )
    actions = rollout.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = actions.add_parser("start", help="start a rollout of SERVICE's canary subset")
    start.add_argument("service", metavar="SERVICE")
    start.add_argument("--canary", required=True, metavar="SUBSET", help="the subset to roll out")
    start.add_argument("--primary", metavar="SUBSET", help="compared with (default: the subset with most weight now)")
    start.add_argument(
        "--steps", type=_steps, metavar="N,N,...", help="the canary's weights, rising (default 5,10,25,50); 100 follows"
    )
    start.add_argument("--step-weight", type=gateway_cli.whole_number(1, 99), metavar="N", help="with --max-weight")
    start.add_argument("--max-weight", type=gateway_cli.whole_number(1, 99), metavar="N", help="with --step-weight")
    start.add_argument(
        "--interval", type=_positive_duration, metavar="DURATION", help="least time between steps (default 1m)"
    )
    start.add_argument(
        "--max-hold",
        type=_positive_duration,
        metavar="DURATION",
        help="how long a step may hold for evidence before the rollout pauses and alerts (default 30m)",
    )
    start.add_argument("--approval", action="store_true", help="wait for `meshgate rollout approve` before 100 %%")
    start.add_argument("--gate", metavar="URL", help="a webhook that must answer 2xx before each step")
    start.add_argument("--events", metavar="URL", help="a webhook that gets each event (started, step, ...) as JSON")
    start.add_argument("--max-error-rate", type=_share, metavar="SHARE", help="absolute limit, e.g. 0.05")
    start.add_argument("--max-p99", type=_positive_duration, metavar="DURATION", help="absolute limit, e.g. 500ms")
    start.add_argument("--no-latency", action="store_true", help="do not judge latency")
    start.add_argument("--reason", default="", help="recorded in the audit log and the config history")
    _connection_arguments(start, "an operator")
    start.set_defaults(run=_run_rollout)
    for name, text in (
        ("status", "the rollout's state, latest verdict and decision log"),
        ("pause", "pause it (weights stay as they are)"),
        ("resume", "resume it at its current step"),
        ("promote", "promote the canary to 100 %% now, skipping the analysis"),
        ("abort", "abort it: the primary back to 100 %%"),
        ("approve", "approve the promotion (a rollout started with --approval)"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("service", metavar="SERVICE")
        if name != "status":
            action.add_argument("--reason", default="", help="recorded in the audit log")
        else:
            action.add_argument("-o", "--output", choices=("text", "json"), default="text")
        _connection_arguments(action, "an operator or viewer" if name == "status" else "an operator")
        action.set_defaults(run=_run_rollout)


def add_demo_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a whole demo mesh: dashboard, four groups with their gateways, a shop, and traffic",
        description="Starts a dashboard, a gateway per service group (shop, catalog, inventory, payments), a small "
        "shop whose catalog has a worse v2 canary, and steady traffic; prints the dashboard URL and an operator "
        "token. Ctrl-C or SIGTERM stops every process it started.",
    )
    parser.add_argument(
        "--port-base",
        type=gateway_cli.whole_number(1024, 65535 - 80),  # the demo uses N to N+80
        default=19000,
        metavar="N",
        help="every port is N plus an offset: dashboard N, gateways N+10..N+42, services N+50..N+54, edge N+80 "
        "(default 19000)",
    )
    parser.add_argument("--rate", type=_rate, default=5.0, metavar="N", help="requests a second (default 5)")
    parser.add_argument(
        "--duration", type=_positive_duration, metavar="DURATION", help="stop by itself after DURATION, e.g. 60s"
    )
    parser.add_argument(
        "--data", metavar="DIR", help="state and logs (default: a temporary directory, removed at exit)"
    )
    parser.add_argument("--no-access-log", action="store_true", help="no access logs (default: DIR/logs/access-*.log)")
    parser.add_argument(
        "--rollout",
        action="store_true",
        help="once traffic flows, start an automated canary rollout of catalog v2 (steps 10, 25, 50; every 30s), "
        "which v2's faults roll back by itself",
    )
    parser.set_defaults(run=_run_demo)


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    _data_argument(parser)
    parser.add_argument("--store", metavar="URL", help="etcd://host:port[,host:port] (default: SQLite in --data)")


def _data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=DEFAULT_DATA, metavar="DIR", help=f"state directory (default {DEFAULT_DATA})")


def _trust_domain_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-domain", default="meshgate.local", metavar="TD", help="SPIFFE trust domain")


def _connection_arguments(parser: argparse.ArgumentParser, role: str = "an operator or viewer") -> None:
    """--server and the token; `role`: whose token the command needs."""
    help_text = f"dashboard URL (env MESHGATE_SERVER, default {DEFAULT_SERVER})"
    server = os.environ.get("MESHGATE_SERVER") or DEFAULT_SERVER
    parser.add_argument("--server", metavar="URL", default=server, help=help_text)
    parser.add_argument("--token", help=f"{role} token (env MESHGATE_TOKEN; the env keeps it out of ps)")
    parser.add_argument("--token-file", metavar="FILE", help=f"read {role} token from FILE")


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT ({err}), got {text!r}") from None


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests a second, got {text!r}") from None
    if not 0 < value <= 10_000:
        raise argparse.ArgumentTypeError(f"expected more than 0 and at most 10000, got {text}")
    return value


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value < MIN_SPAN_STORE_SIZE:
        raise argparse.ArgumentTypeError(f"expected at least 1MiB, got {text!r}")
    return value


def _positive_duration(text: str) -> float:
    value = gateway_cli.duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration above zero, got {text!r}")
    return value


def _cert_lifetime(text: str) -> float:
    value = gateway_cli.duration(text)
    if value < MIN_CERT_LIFETIME:
        raise argparse.ArgumentTypeError(
            f"expected at least {MIN_CERT_LIFETIME:g}s (gateways renew at half-life, at most every 5s), got {text!r}"
        )
    return value


def _run_dashboard(args: argparse.Namespace) -> int:
    from dashboard import serve

    return serve.run(args)


def _run_ca(args: argparse.Namespace) -> int:
    from dashboard import serve

    return serve.run_ca(args)


def _run_token_create(args: argparse.Namespace) -> int:
    from dashboard import serve

    return serve.run_token_create(args)


def _run_apply(args: argparse.Namespace) -> int:
    from meshgate import client

    return client.run_apply(args)


def _run_rollout(args: argparse.Namespace) -> int:
    from meshgate.client import run_rollout

    return run_rollout(args)


def _steps(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole percents such as 5,10,25,50, got {text!r}") from None


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1 such as 0.05, got {text!r}")
    return value


def _run_get(args: argparse.Namespace) -> int:
    from meshgate import client

    return client.run_get(args)


def _run_demo(args: argparse.Namespace) -> int:
    from meshgate import demo

    return demo.run(args)


if __name__ == "__main__":
    sys.exit(main())
