"""What every operator command shares: exit codes and the error that carries one.

Exit codes, for scripts:

====  =====================================================================
0     done
1     the command ran but found a problem it reports (e.g. a failed part)
2     bad input: an argument, an ID, a time, a setting
3     something named does not exist: the table, the group, a dead letter
4     Redis could not be reached
5     cancelled at the confirmation prompt
====  =====================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import IntEnum
from typing import Any

import redis

from shared.settings import Settings


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    NOT_FOUND = 3
    UNREACHABLE = 4
    CANCELLED = 5


class CommandError(Exception):
    """Stops a command with a message for the operator and an exit code."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code


def confirm(question: str, assume_yes: bool) -> None:
    """Ask on the terminal unless ``--yes``; raise CANCELLED on anything but yes."""
    if assume_yes:
        return
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise CommandError("cancelled", ExitCode.CANCELLED)


@contextlib.contextmanager
def redis_client(settings: Settings) -> Iterator[Any]:
    """A client for one command; an unreachable server becomes exit code 4."""
    client: Any = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    try:
        yield client
    except redis.ConnectionError as exc:
        raise CommandError(
            f"cannot reach Redis at {settings.redis_url}: {exc}", ExitCode.UNREACHABLE
        ) from None
    finally:
        client.close()
