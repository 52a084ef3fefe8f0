"""``poslake dlq``: list dead letters with their reasons, requeue them after a fix, purge.

A dead letter holds the original entry's fields plus ``dlq:*`` fields (reason,
source ID, stream, group, consumer, deliveries, time; see consumer/settle.py).
Requeueing XADDs the original fields to the main stream and deletes the dead
letter, in one MULTI/EXEC so an entry is never in both or neither.

A truncated dead letter (``dlq:truncated``: the entry was too big, or had too many
fields, to be kept whole) cannot be requeued: its fields are only part of the
entry, and putting them back would make a different entry. Named by ID, it makes
the command refuse (exit 2, nothing changed); with ``--all`` it is left in the
dead-letter stream and counted. ``purge`` removes it.
"""

from __future__ import annotations

import argparse
from typing import Any

import redis

from consumer.settle import DLQ_PREFIX, TRUNCATED_FIELD
from infra.redaction import scrub
from infra.redis_conn import check_transactions
from poslake.command import CommandError, ExitCode, confirm, redis_client
from shared.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    action = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = action.add_parser("list", help="dead letters, oldest first, with their reasons")
    listing.add_argument("--limit", type=int, default=50)
    for name, text in (
        ("requeue", "put dead letters back on the stream"),
        ("purge", "delete dead letters"),
    ):
        sub = action.add_parser(name, help=text)
        chosen = sub.add_mutually_exclusive_group(required=True)
        chosen.add_argument("ids", nargs="*", default=[], help="dead-letter entry IDs")
        chosen.add_argument("--all", action="store_true")
        sub.add_argument("--yes", action="store_true", help="do not ask")


def _text(value: bytes) -> str:
    return value.decode(errors="replace")


def _chosen(
    client: Any, dlq: str, args: argparse.Namespace
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    if args.all:
        return list(client.xrange(dlq))
    entries = []
    for entry_id in args.ids:
        try:
            found = client.xrange(dlq, min=entry_id, max=entry_id)
        except redis.ResponseError as exc:
            if "invalid stream id" not in str(exc).lower():
                raise  # NOPERM and the like: redis_client says what was refused
            raise CommandError(f"bad entry ID {entry_id!r}", ExitCode.BAD_INPUT) from None
        if not found:
            raise CommandError(f"no dead letter {entry_id} in {dlq}", ExitCode.NOT_FOUND)
        entries.extend(found)
    return entries


def run(args: argparse.Namespace, settings: Settings) -> int:
    dlq = settings.dlq_stream
    if args.action == "list" and args.limit < 1:
        raise CommandError(f"--limit must be at least 1, not {args.limit}", ExitCode.BAD_INPUT)
    with redis_client(settings) as client:
        if args.action == "list":
            entries = client.xrange(dlq, count=args.limit)
            total = client.xlen(dlq)
            for entry_id, fields in entries:
                # A reason may quote a library's error, and that a secret: mask it.
                reason = scrub(_text(fields.get(f"{DLQ_PREFIX}reason".encode(), b"?")))
                source = _text(fields.get(f"{DLQ_PREFIX}source_id".encode(), b"?"))
                deliveries = _text(fields.get(f"{DLQ_PREFIX}deliveries".encode(), b"?"))
                print(f"{_text(entry_id)}  from {source}  deliveries {deliveries}  {reason}")
            print(f"{len(entries)} of {total} dead letters shown")
            return ExitCode.OK
        entries = _chosen(client, dlq, args)
        kept: list[bytes] = []
        if args.action == "requeue":
            truncated = [e for e, f in entries if TRUNCATED_FIELD.encode() in f]
            if truncated and not args.all:
                shown = ", ".join(_text(e) for e in truncated)
                raise CommandError(
                    f"cannot requeue {shown}: a truncated copy, not the original entry "
                    "(purge it, or have the producer send the entry again)",
                    ExitCode.BAD_INPUT,
                )
            kept = truncated
            entries = [(e, f) for e, f in entries if e not in set(truncated)]
        if not entries:
            print("no dead letters" if not kept else f"{len(kept)} truncated dead letters kept")
            return ExitCode.OK
        verb = "Requeue" if args.action == "requeue" else "Delete"
        confirm(f"{verb} {len(entries)} dead letters of {dlq}?", args.yes)
        check_transactions(client)  # all or nothing, never a half-done requeue
        pipe = client.pipeline(transaction=True)
        for entry_id, fields in entries:
            if args.action == "requeue":
                original = {
                    k: v
                    for k, v in fields.items()
                    if not k.decode(errors="replace").startswith(DLQ_PREFIX)
                }
                pipe.xadd(settings.stream, original)
            pipe.xdel(dlq, entry_id)
        pipe.execute()
    done = "requeued to " + settings.stream if args.action == "requeue" else "deleted"
    print(f"{len(entries)} dead letters {done}")
    if kept:
        print(f"{len(kept)} truncated dead letters kept (a truncated copy cannot be requeued)")
    return ExitCode.OK
