"""What every operator command shares: the error that carries an exit code.

The exit codes are one table for every program: :class:`shared.errors.ExitCode`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis

from shared.errors import ExitCode
from shared.redis_conn import sync_client
from shared.settings import Settings

__all__ = ["CommandError", "ExitCode", "confirm", "redis_client"]


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
    client: Any = sync_client(settings.redis_target, socket_connect_timeout=5)
    try:
        yield client
    except redis.ConnectionError as exc:
        raise CommandError(
            f"cannot reach Redis at {settings.redis_url_redacted}: {exc}", ExitCode.UNREACHABLE
        ) from None
    finally:
        client.close()
