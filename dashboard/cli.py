"""The `meshgate` command: one entry point whose subcommands live with the package they drive."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway import cli as gateway_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshgate", description="An observability-first service mesh.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gateway_cli.add_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
