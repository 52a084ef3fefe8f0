"""What every operator command shares: the error that carries an exit code, and the
translation of Redis and object-store failures into one line and that code.

The exit codes are one table for every program: :class:`shared.errors.ExitCode`.
Every message passes :func:`infra.redaction.scrub` before it is printed.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import redis
from deltalake.exceptions import DeltaError
from polars.exceptions import PolarsError
from redis.backoff import ConstantBackoff
from redis.retry import Retry

from infra.redaction import scrub
from infra.redis_conn import sync_client
from infra.redis_errors import kind_of, refusal, reply_code
from shared.errors import ExitCode
from shared.settings import Settings

__all__ = [
    "LAKE_ERRORS",
    "CommandError",
    "ExitCode",
    "confirm",
    "lake_failure",
    "one_line",
    "redis_client",
    "redis_failure",
]

# What delta-rs and polars raise when the lake's store fails (object store errors
# arrive as OSError).
LAKE_ERRORS: tuple[type[Exception], ...] = (OSError, DeltaError, PolarsError)

# Commands whose second word is a subcommand, and commands that name no key.
_CONTAINERS = frozenset({"XINFO", "XGROUP", "CONFIG", "CLIENT", "ACL", "OBJECT", "MEMORY"})
_KEYLESS = frozenset({"INFO", "PING", "HELLO", "AUTH", "CLIENT", "ACL", "CONFIG", "COMMAND"})
_MAX_CHARS = 400
_PIPELINE_ERROR = re.compile(
    r"^Command # \d+ \((?P<command>\S+)[^)]*\) of pipeline caused error: (?P<reply>.*)$", re.DOTALL
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# How delta-rs / object_store word a denial and an unreachable store.
_REFUSED_MARKS = (
    "403",
    "forbidden",
    "401 ",
    "unauthorized",
    "lacked the necessary privileges",
    "accessdenied",
    "access denied",
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "permission denied",
)
_UNREACHABLE_MARKS = (
    "connection refused",
    "tcp connect error",
    "error sending request",
    "timed out",
    "timeout",
    "dns error",
    "failed to lookup address",
    "connection reset",
    "network is unreachable",
    "http error",
)


class CommandError(Exception):
    """Stops a command with a message for the operator and an exit code."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code


class OperatorRedis(redis.Redis):
    """A redis-py client whose errors remember the command and key they were for."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except redis.RedisError as exc:
            exc.poslake_command = _command_and_key(args)  # type: ignore[attr-defined]
            raise


def _command_and_key(args: tuple[Any, ...]) -> tuple[str | None, str | None]:
    words = [a.decode(errors="replace") if isinstance(a, bytes) else str(a) for a in args]
    if not words:
        return None, None
    head = words[0].split()
    command = head[0].upper()
    rest = head[1:] + words[1:]
    if command in _CONTAINERS and rest:
        command, rest = f"{command} {rest[0].upper()}", rest[1:]
    if command in ("EVAL", "EVALSHA"):  # script, numkeys, keys...: name the first key
        return command, rest[2] if len(rest) > 2 and rest[1] != "0" else None
    key = rest[0] if rest and command.split()[0] not in _KEYLESS else None
    return command, key


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


def one_line(text: str) -> str:
    """A library's (multi-line, coloured) error as one line of bounded length."""
    parts = [line.strip().lstrip("↳").strip() for line in _ANSI.sub("", text).splitlines()]
    flat = ": ".join(part for part in parts if part)
    return flat if len(flat) <= _MAX_CHARS else flat[: _MAX_CHARS - 3] + "..."


def redis_failure(exc: redis.RedisError, settings: Settings) -> CommandError:
    """One line and the exit code for a Redis failure (see infra/redis_errors.py)."""
    command, key = getattr(exc, "poslake_command", (None, None))
    where = settings.redis_url_redacted
    if isinstance(exc, redis.DataError):  # refused by redis-py before it was sent
        return CommandError(scrub(f"bad argument: {exc}"), ExitCode.BAD_INPUT)
    kind = kind_of(exc)
    if kind == "fatal":
        if isinstance(exc, redis.AuthenticationError):
            # Refused while connecting, whatever the command was going to be.
            command = key = None
        message = str(refusal(exc, command, key))
        return CommandError(scrub(f"{message} [{where}]"), ExitCode.REFUSED)
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        text = one_line(str(exc))
        return CommandError(scrub(f"cannot reach Redis at {where}: {text}"), ExitCode.UNREACHABLE)
    reply = str(exc.args[0]) if exc.args else str(exc)
    wrapped = _PIPELINE_ERROR.match(reply)
    if wrapped:  # "Command # 1 (XADD key * fields...) of pipeline caused error: <reply>"
        command, reply = wrapped.group("command").upper(), wrapped.group("reply")
    code = getattr(exc, "status_code", None) or reply_code(exc) or type(exc).__name__
    doing = f" {command}" if command else ""
    return CommandError(
        scrub(
            f"Redis at {where} cannot serve{doing} right now: {code} {one_line(reply)} "
            "(this passes by itself: a full server frees up as consumers trim, a restarted "
            "one finishes loading, a failover ends; try again)"
        ),
        ExitCode.UNREACHABLE,
    )


@contextlib.contextmanager
def redis_client(settings: Settings) -> Iterator[Any]:
    """A client for one command; failures become one line and their exit code:
    unreachable or transient 4, refused (password, ACL, unknown command) 6."""
    client: Any = sync_client(
        settings.redis_target,
        client_class=OperatorRedis,
        socket_connect_timeout=5,
        # One quick retry: an operator wants the answer now, not redis-py's default
        # backoff (seconds), which also retries a wrong password.
        retry=Retry(ConstantBackoff(0.2), 1),
    )
    try:
        yield client
    except redis.RedisError as exc:
        raise redis_failure(exc, settings) from None
    finally:
        client.close()


def lake_failure(exc: BaseException, settings: Settings) -> CommandError:
    """One line and the exit code for a failure of the lake's store."""
    text = one_line(scrub(str(exc))) or type(exc).__name__
    lowered = text.lower()
    where = scrub(settings.lake_uri)
    if any(mark in lowered for mark in _REFUSED_MARKS):
        return CommandError(
            f"the lake's store refused access to {where}: {text} (check the credentials "
            "in POSLAKE_STORAGE_OPTIONS and the store's permissions)",
            ExitCode.REFUSED,
        )
    if any(mark in lowered for mark in _UNREACHABLE_MARKS):
        return CommandError(
            f"cannot reach the lake's store at {where}: {text} (check POSLAKE_LAKE_URI and "
            "the endpoint in POSLAKE_STORAGE_OPTIONS)",
            ExitCode.UNREACHABLE,
        )
    return CommandError(f"reading the lake at {where} failed: {text}", ExitCode.FAILED)
