"""``poslake replay``: move a group's position back so entries are delivered again.

Safe because the consumer deduplicates by key: replayed entries already in the
table are dropped. The position can be an entry ID, a point in time (the first
entry at or after it), or the beginning. Where the server has it (7.0+),
ENTRIESREAD is set too, so the group's lag stays right.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import redis

from infra.stream_lag import count_entries
from poslake.command import CommandError, ExitCode, confirm, redis_client
from poslake.query import parse_time
from shared.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-id", help="redeliver entries after this ID")
    where.add_argument("--to-time", help="redeliver entries from this time (ISO 8601)")
    where.add_argument("--beginning", action="store_true", help="redeliver the whole stream")
    parser.add_argument("--group", help="the group (default POSLAKE_GROUP)")
    parser.add_argument("--yes", action="store_true", help="do not ask")


def _parse_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        raise CommandError(f"bad entry ID {text!r}: use <ms>-<seq>", ExitCode.BAD_INPUT) from None


def count_between(client: Any, stream: str, after: str, up_to: str) -> int:
    """Entries with after < ID <= up_to."""
    if _parse_id(up_to) <= _parse_id(after):
        return 0
    return count_entries(client, stream, after, up_to).entries


def target_id(args: argparse.Namespace) -> str:
    if args.beginning:
        return "0"
    if args.to_id is not None:
        ms, seq = _parse_id(args.to_id)
        return f"{ms}-{seq}"
    moment = parse_time(args.to_time)
    ms = int(moment.timestamp() * 1000)
    # Entries at or after the time are redelivered: the position goes just before it.
    return f"{ms - 1}-18446744073709551615" if ms > 0 else "0"


def _check_replayable(client: Any, stream: str, position: str, beginning: bool) -> None:
    """Refuse a position older than what the stream still holds: the entries between
    were trimmed (consumers trim what every group acknowledged, consumer/trim.py), so
    the replay would silently miss them. ``--beginning`` replays what is kept."""
    if beginning:
        return
    info = client.xinfo_stream(stream)
    first = info.get("first-entry")
    if not first:
        return
    first_id = first[0].decode() if isinstance(first[0], bytes) else str(first[0])
    lost = _parse_id(position) < _parse_id(first_id)
    added = info.get("entries-added")  # Redis 7.0 and newer: were any ever removed?
    if added is not None:
        lost = lost and int(added) > int(info["length"])
    # 6.2 cannot tell trimmed from never written: older than the first is refused.
    if lost:
        age_s = max(0.0, time.time() - int(first_id.split("-")[0]) / 1000)
        raise CommandError(
            f"{position} is older than the replayable range: stream {stream} holds entries "
            f"from {first_id} ({age_s:.0f}s ago) on, older ones were trimmed "
            "(POSLAKE_STREAM_RETENTION_S, POSLAKE_STREAM_MAX_BYTES); replay from a later "
            "time, or use --beginning to replay what is kept",
            ExitCode.BAD_INPUT,
        )


def run(args: argparse.Namespace, settings: Settings) -> int:
    group = args.group or settings.group
    new_position = target_id(args)
    with redis_client(settings) as client:
        try:
            groups = {g["name"].decode(): g for g in client.xinfo_groups(settings.stream)}
        except redis.ResponseError as exc:
            if "no such key" not in str(exc).lower():
                raise  # NOPERM and the like: redis_client says what was refused
            raise CommandError(f"no stream {settings.stream!r}", ExitCode.NOT_FOUND) from None
        if group not in groups:
            known = ", ".join(groups) or "none"
            raise CommandError(
                f"no group {group!r} on stream {settings.stream!r} (groups: {known})",
                ExitCode.NOT_FOUND,
            )
        current = groups[group]["last-delivered-id"].decode()
        if _parse_id(new_position) > _parse_id(current):
            raise CommandError(
                f"{new_position} is ahead of group {group}'s position {current}: moving it "
                "forward would skip entries; replay only moves back",
                ExitCode.BAD_INPUT,
            )
        _check_replayable(client, settings.stream, new_position, args.beginning)
        again = count_between(client, settings.stream, new_position, current)
        confirm(
            f"Move group {group} from {current} back to {new_position}: "
            f"{again} entries will be delivered again. Go on?",
            args.yes,
        )
        version = tuple(int(p) for p in client.info("server")["redis_version"].split(".")[:2])
        if version >= (7, 0):
            # Entries ever added minus those after the new position: right after trims
            # and deletions too, where counting what is left would not be.
            added = int(client.xinfo_stream(settings.stream)["entries-added"])
            last = client.xrevrange(settings.stream, count=1)
            top = last[0][0].decode() if last else "0-0"
            read = added - count_between(client, settings.stream, new_position, top)
            client.execute_command(
                "XGROUP", "SETID", settings.stream, group, new_position, "ENTRIESREAD", read
            )
        else:
            client.xgroup_setid(settings.stream, group, new_position)
    print(
        f"group {group} moved to {new_position}; {again} entries will be delivered again "
        "(already stored ones are dropped by the consumers' dedup)"
    )
    return ExitCode.OK
