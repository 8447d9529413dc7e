"""`meshgate gateway`: run or check a standalone gateway."""

from __future__ import annotations

import argparse
import logging
import sys

from gateway.config import Config, ConfigError
from gateway.units import parse_duration


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("gateway", help="run a gateway (standalone with --config)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--config", metavar="FILE", help="standalone mode: serve the services in this YAML file")
    mode.add_argument("--check", metavar="FILE", help="validate a config file and exit (status 2 if invalid)")
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="worker processes sharing the data listeners (SO_REUSEPORT); default 1",
    )
    parser.add_argument(
        "--drain-timeout",
        type=_duration,
        default=15.0,
        metavar="DURATION",
        help="on SIGTERM, how long requests in flight may take to finish (default 15s)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = args.check or args.config
    try:
        config = Config.load(path)
    except ConfigError as exc:
        print(f"meshgate: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{path}: ok ({len(config.services)} services)")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.workers == 1:
            import uvloop

            from gateway.server import serve

            uvloop.run(serve(path, config, args.drain_timeout))
        else:
            from gateway.supervisor import supervise

            supervise(path, config, args.workers, args.drain_timeout)
    except ConfigError as exc:  # e.g. a listen address already in use
        print(f"meshgate: {exc}", file=sys.stderr)
        return 2
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
