"""``poslake``: the operator command line (a thin layer over the packages)."""

from __future__ import annotations

import argparse
import sys

from consumer import cli as consumer_cli
from poslake import run as pipeline


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poslake",
        description="IB position history into Delta Lake through a Redis Stream.",
        epilog="Settings come from POSLAKE_* environment variables (see README).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    consume = commands.add_parser("consume", help="run one consumer of the group")
    consumer_cli.build_parser(consume)
    consume.set_defaults(handler=consumer_cli.run)
    run = commands.add_parser(
        "run", help="run the whole pipeline locally (private Redis, demo source, consumers)"
    )
    pipeline.add_arguments(run)
    run.set_defaults(handler=pipeline.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
