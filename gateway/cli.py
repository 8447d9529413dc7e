"""`meshgate gateway`: run or check a gateway, standalone (`--config`) or joined to a mesh (`--control`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from gateway.config import Config, ConfigError, read_yaml, with_advertise
from gateway.units import parse_duration

if TYPE_CHECKING:
    from gateway.control import JoinSettings
    from gateway.sources import Source


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="run a gateway: standalone with --config, or joined to a mesh with --control",
        description="Standalone: --config FILE. Joined: --control URL --group NAME --token T (or --token-file FILE) "
        "[--config FILE with only a gateway: section]. --check alone validates the whole command line and exits.",
    )
    parser.add_argument("--config", metavar="FILE", help="the YAML config (joined: only its gateway: section)")
    parser.add_argument(
        "--check",
        nargs="?",
        const=True,
        default=False,
        metavar="FILE",
        help="validate a config FILE and exit; without FILE, validate this whole command line (status 2 if invalid)",
    )
    parser.add_argument("--control", metavar="URL", help="join the mesh of the dashboard at URL")
    parser.add_argument("--group", metavar="NAME", help="joined: the service group this gateway fronts")
    parser.add_argument("--token", metavar="T", help="joined: the group's join token (default $MESHGATE_JOIN_TOKEN)")
    parser.add_argument("--token-file", metavar="FILE", help="joined: read the join token from FILE at start")
    parser.add_argument("--ca-hash", metavar="sha256:HEX", help="joined: pin the mesh CA (needed beyond loopback)")
    parser.add_argument("--ca", metavar="FILE", help="joined: pin the mesh CA by its root certificate (PEM) instead")
    parser.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="how peers reach the inbound listener; overrides gateway.listen.advertise in the file",
    )
    parser.add_argument(
        "--data", metavar="DIR", help="joined: key, certificate and last good config (default ./meshgate-gateway-GROUP)"
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="worker processes sharing the data listeners (SO_REUSEPORT); default 1",
    )
    parser.add_argument(
        "--drain-timeout",
        type=duration,
        default=15.0,
        metavar="DURATION",
        help="on SIGTERM, how long requests in flight may take to finish (default 15s)",
    )
    parser.set_defaults(run=run, parser=parser)


JOIN_ONLY = ("group", "token", "token_file", "ca_hash", "ca", "data")


def run(args: argparse.Namespace) -> int:
    if isinstance(args.check, str):
        if args.config or args.control:
            args.parser.error("--check FILE takes no other mode (--check without FILE checks the whole command line)")
        return _check(args.check)
    # The modules that serve are imported only now: `--check FILE` and `--help` stay quick.
    from gateway.control import ControlError, ControlSource
    from gateway.sources import FileSource

    source: Source
    try:
        if args.advertise is not None:  # by the rule of the key it overrides, in an error that names the flag
            Config.parse({"gateway": {"listen": {"advertise": args.advertise}}}, source="--advertise")
        if args.control:
            settings = _join_settings(args)
            settings.check()
            config = Config.parse({"gateway": {**(settings.gateway or {}), "group": settings.group}}, settings.source)
            checked = f"joined gateway of group {settings.group} at {settings.url}"
        elif args.config:
            given = [f"--{name.replace('_', '-')}" for name in JOIN_ONLY if getattr(args, name) is not None]
            if given:
                args.parser.error(f"{', '.join(given)}: only for a joined gateway (--control URL)")
            config = Config.load(args.config, args.advertise)
            checked = f"standalone gateway, {args.config} ({len(config.services)} services)"
        else:
            args.parser.error("one of --config FILE (standalone), --control URL (joined) or --check FILE is required")
        if args.check:
            print(f"ok: {checked}")
            return 0
        # Secrets are read only now: `--check` validates a command line whose files may come later.
        source = (
            ControlSource(settings.read_secrets()) if args.control else FileSource(args.config, config, args.advertise)
        )
    except (ConfigError, ControlError) as exc:
        print(f"meshgate: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per heartbeat and long-poll
    try:
        if args.workers == 1:
            import uvloop

            from gateway.server import serve

            uvloop.run(serve(config, args.drain_timeout, source))
        else:
            from gateway.supervisor import supervise

            supervise(config, args.workers, args.drain_timeout, source)
    except ConfigError as exc:  # e.g. a listen address already in use
        print(f"meshgate: {exc}", file=sys.stderr)
        return 2
    return 0


def _check(path: str) -> int:
    try:
        config = Config.load(path)
    except ConfigError as exc:
        print(f"meshgate: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: ok ({len(config.services)} services)")
    return 0


def _join_settings(args: argparse.Namespace) -> JoinSettings:
    from gateway.control import JoinSettings

    if not args.group:
        args.parser.error("--control needs --group NAME")
    gateway: dict[str, object] = {}
    base_dir = None
    if args.config:
        data = read_yaml(args.config)
        if not isinstance(data, dict) or set(data) - {"gateway"}:
            raise ConfigError(
                f"{args.config}: a joined gateway's file holds only a gateway: section "
                "(services come from the control server)"
            )
        gateway = dict(data.get("gateway") or {})
        group = gateway.get("group", args.group)
        if group != args.group:
            raise ConfigError(f"{args.config}: gateway.group: expected {args.group} (from --group), got {group}")
        base_dir = os.path.dirname(os.path.abspath(args.config))
    # The environment is the fallback only when neither flag names the token.
    token = args.token if args.token or args.token_file else os.environ.get("MESHGATE_JOIN_TOKEN")
    return JoinSettings(
        url=args.control,
        group=args.group,
        token=token or "",
        data_dir=args.data or f"meshgate-gateway-{args.group}",
        ca_hash=args.ca_hash,
        gateway=with_advertise(gateway, args.advertise),
        source=args.config or "--control",
        base_dir=base_dir,
        token_file=args.token_file,
        ca_file=args.ca,
    )


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` (up to `high`)."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            expected = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return convert


positive_int = whole_number(1)


def http_url(text: str) -> str:
    """An argparse type: an http:// or https:// URL with a host (Prometheus, Jaeger, a gateway, an OTLP endpoint)."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL with a host, got {text!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, got {text!r}") from None
    return text


def duration(text: str) -> float:
    """An argparse type: `250ms`, `2s`, `1m`, `24h` as seconds."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
