"""`meshgate gateway`: run or check a gateway, standalone (`--config`) or joined to a mesh (`--control`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from gateway.config import Config, ConfigError, read_yaml
from gateway.units import parse_duration

if TYPE_CHECKING:
    from gateway.control import JoinSettings
    from gateway.server import Source


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="run a gateway: standalone with --config, or joined to a mesh with --control",
        description="Standalone: --config FILE. Joined: --control URL --group NAME --token T [--config FILE with "
        "only a gateway: section].",
    )
    parser.add_argument("--config", metavar="FILE", help="the YAML config (joined: only its gateway: section)")
    parser.add_argument("--check", metavar="FILE", help="validate a config file and exit (status 2 if invalid)")
    parser.add_argument("--control", metavar="URL", help="join the mesh of the dashboard at URL")
    parser.add_argument("--group", metavar="NAME", help="joined: the service group this gateway fronts")
    parser.add_argument(
        "--token",
        metavar="T",
        default=os.environ.get("MESHGATE_JOIN_TOKEN"),
        help="joined: a join token for the group (default $MESHGATE_JOIN_TOKEN)",
    )
    parser.add_argument("--ca-hash", metavar="sha256:HEX", help="joined: pin the mesh CA (needed beyond loopback)")
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


def run(args: argparse.Namespace) -> int:
    if args.check:
        if args.config or args.control:
            args.parser.error("--check takes no other mode")
        return _check(args.check)
    # The modules that serve are imported only now: `--check` and `--help` stay quick.
    from gateway.control import ControlError, ControlSource
    from gateway.server import FileSource

    source: Source
    try:
        if args.control:
            settings = _join_settings(args)
            settings.check()
            config = Config.parse({"gateway": {**(settings.gateway or {}), "group": settings.group}}, settings.source)
            source = ControlSource(settings)
        elif args.config:
            config = Config.load(args.config)
            source = FileSource(args.config, config)
        else:
            args.parser.error("one of --config FILE (standalone), --control URL (joined) or --check FILE is required")
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

    if not args.group or not args.token:
        args.parser.error("--control needs --group NAME and --token T (or $MESHGATE_JOIN_TOKEN)")
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
    return JoinSettings(
        url=args.control,
        group=args.group,
        token=args.token,
        data_dir=args.data or f"meshgate-gateway-{args.group}",
        ca_hash=args.ca_hash,
        gateway=gateway,
        source=args.config or "--control",
        base_dir=base_dir,
    )


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def duration(text: str) -> float:
    """An argparse type: `250ms`, `2s`, `1m`, `24h` as seconds."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
