"""``poslake``: the operator command line (a thin layer over the packages).

Every command reads the settings once (``POSLAKE_*``), and ends with an exit
code from the one table, :class:`shared.errors.ExitCode` (:data:`EXIT_CODES`).
A failure is one line on stderr, never a traceback, and never shows a secret.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from consumer import cli as consumer_cli
from infra.redaction import scrub
from poslake import book, dlq, maintain, query, reconcile, replay, status
from poslake import run as pipeline
from poslake.command import LAKE_ERRORS, CommandError, ExitCode, lake_failure
from producer import cli as producer_cli
from shared.settings import Settings, load_settings_or_report

OperatorCommand = Callable[[argparse.Namespace, Settings], int]

ArgumentAdder = Callable[[argparse.ArgumentParser], None]
OPERATOR_COMMANDS: dict[str, tuple[str, ArgumentAdder, OperatorCommand]] = {
    "status": (
        "stream, groups, pending per consumer, dead letters, table",
        status.add_arguments,
        status.run,
    ),
    "replay": (
        "move a group back to an entry ID, a time or the beginning",
        replay.add_arguments,
        replay.run,
    ),
    "dlq": ("list, requeue or purge dead letters", dlq.add_arguments, dlq.run),
    "maintain": ("compact, checkpoint and vacuum the table", maintain.add_arguments, maintain.run),
    "query": (
        "current positions or a contract's history, now or in the past",
        query.add_arguments,
        query.run,
    ),
    "book": (
        "feed the strategy book from the lake's tables: for ever, --once or --rebuild",
        book.add_arguments,
        book.run,
    ),
    "reconcile": (
        "compare the lake with IB: positions, executions, account values, fills",
        reconcile.add_arguments,
        reconcile.run,
    ),
}


EXIT_CODES = (
    f"{ExitCode.OK} done, {ExitCode.FAILED} failed, {ExitCode.BAD_INPUT} bad input "
    f"(argument, ID, time, setting), {ExitCode.NOT_FOUND} not found (table, group, dead "
    f"letter), {ExitCode.UNREACHABLE} unreachable or temporarily unavailable (Redis, "
    f"IB, the lake's store), {ExitCode.CANCELLED} cancelled at the prompt, "
    f"{ExitCode.REFUSED} refused (password, ACL right, 403, unknown command), "
    f"{ExitCode.BEHIND} consumers behind, nothing compared (reconcile)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poslake",
        description="IB position history into Delta Lake through a Redis Stream.",
        epilog="Settings come from POSLAKE_* environment variables (see README). "
        f"Exit codes of every command: {EXIT_CODES}.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run", help="the whole pipeline locally (private Redis, simulator, producer, consumers)"
    )
    pipeline.add_arguments(run)
    run.set_defaults(handler=pipeline.run)
    consume = commands.add_parser("consume", help="run one consumer of the group")
    consumer_cli.build_parser(consume)
    consume.set_defaults(handler=consumer_cli.run)
    produce = commands.add_parser("produce", help="run the IB producer")
    producer_cli.build_parser(produce)
    produce.set_defaults(handler=producer_cli.run)
    for name, (text, add_arguments, command) in OPERATOR_COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=text)
        add_arguments(sub)
        sub.set_defaults(handler=_operator(name, command))
    return parser


def _operator(name: str, command: OperatorCommand) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        settings = load_settings_or_report(f"poslake {name}")
        if settings is None:
            return ExitCode.BAD_INPUT
        try:
            try:
                return command(args, settings)
            except LAKE_ERRORS as exc:
                raise lake_failure(exc, settings) from None
        except CommandError as exc:
            print(f"poslake {name}: {scrub(str(exc))}", file=sys.stderr)
            return exc.code
        except KeyboardInterrupt:  # Ctrl-C, at the prompt or while it works
            print(f"poslake {name}: cancelled", file=sys.stderr)
            return ExitCode.CANCELLED

    return handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
