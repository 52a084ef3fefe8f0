"""What a Redis failure means: transient (back off, stay up) or fatal (one line, exit 6).

Redis answers an error reply with a code as its first word. The codes that a
failover, a restart or a full server produce pass by themselves, the others
never do:

==============================  ==========  =========================================
reply / failure                 kind        why
==============================  ==========  =========================================
connection refused, reset,      transient   the server is away or restarting
timeout
``LOADING``                     transient   a restarted server is reading its data
``BUSY``                        transient   a script or function is running
``OOM``                         transient   ``maxmemory`` reached under ``noeviction``:
                                            frees up when consumers catch up or trim
``READONLY``, ``MASTERDOWN``,   transient   a failover is under way
``TRYAGAIN``, ``CLUSTERDOWN``
``WRONGPASS``, ``NOAUTH``,      fatal       wrong or missing credentials
``WRONGTYPE`` on AUTH
``NOPERM``                      fatal       the ACL user lacks a command or key right
``ERR unknown command``         fatal       server too old, or the command renamed
TLS: certificate not trusted,   fatal       the ``ssl_*`` URL options or the server's
client certificate missing or               TLS set-up must change
refused, no TLS on the port
any other error reply           fatal       retrying the same command cannot help
==============================  ==========  =========================================

Fatal failures become :class:`shared.errors.RedisRefused` with a message naming
the cause, the command and key where known, and the setting to check; never the
password (only :func:`infra.redis_conn.redacted_url` is ever shown).
"""

from __future__ import annotations

import re
from typing import Literal

import redis.exceptions as rex

from infra.redis_conn import tls_failure
from shared.errors import RedisRefused

Kind = Literal["transient", "fatal"]

TRANSIENT_CODES = frozenset(
    {"LOADING", "BUSY", "OOM", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN"}
)
AUTH_CODES = frozenset({"WRONGPASS", "NOAUTH"})
URL_SETTING = "POSLAKE_REDIS_URL"

# redis-py wraps a pipeline's failure as "Command # 3 (XADD positions ...) of
# pipeline caused error: <reply>"; the arguments may be whole payloads.
_PIPELINE_ERROR = re.compile(
    r"^Command # \d+ \((?P<command>\S+)(?: (?P<key>\S+))?[^)]*\) of pipeline caused error: "
    r"(?P<reply>.*)$",
    re.DOTALL,
)
_UNKNOWN_COMMAND = re.compile(r"unknown (?:sub)?command '?(?P<command>[^' ,]+)", re.IGNORECASE)
# NOPERM text of Redis 6.2/7.x: "... no permissions to run the 'xack' command".
_DENIED_COMMAND = re.compile(r"permissions to run the '(?P<command>[^']+)' command", re.IGNORECASE)
# redis-py strips the code off the replies it maps to its own exception types.
_CODE_OF_TYPE: tuple[tuple[type[BaseException], str], ...] = (
    (rex.NoPermissionError, "NOPERM"),
    (rex.AuthenticationWrongNumberOfArgsError, "WRONGPASS"),
    (rex.AuthenticationError, "WRONGPASS"),
    (rex.OutOfMemoryError, "OOM"),
    (rex.BusyLoadingError, "LOADING"),
    (rex.ReadOnlyError, "READONLY"),
    (rex.TimeoutError, "TIMEOUT"),
    (TimeoutError, "TIMEOUT"),
    (rex.ConnectionError, "CONNECTION"),
    (OSError, "CONNECTION"),
)
_MAX_REPLY_CHARS = 200

TRANSIENT_REDIS_ERRORS: tuple[type[BaseException], ...] = (
    rex.ConnectionError,
    rex.TimeoutError,
    ConnectionError,
    OSError,
)
"""Failures of the connection itself (not error replies); see :func:`kind_of` for those."""


def reply_code(exc: BaseException) -> str:
    """The error reply's code (``NOPERM``, ``OOM``, ``ERR``...), or ``""`` for none."""
    text = _reply_text(exc)
    code = text.split(" ", 1)[0] if text else ""
    return code if code.isupper() else ""


def error_code(exc: BaseException) -> str:
    """A short name of the failure for metrics and logs: the reply's code where Redis
    sent one (``OOM``, ``NOPERM``, ``WRONGPASS``...), ``CONNECTION`` or ``TIMEOUT`` for
    a failed connection, else ``ERR``."""
    code = reply_code(exc)
    if code:
        return code
    if isinstance(exc, rex.AuthenticationError) and "required" in str(exc).lower():
        return "NOAUTH"
    for kind, name in _CODE_OF_TYPE:
        if isinstance(exc, kind):
            return name
    return "ERR"


def is_auth_failure(exc: BaseException) -> bool:
    """Wrong or missing credentials (the password may change while a process runs)."""
    return isinstance(exc, rex.AuthenticationError) or reply_code(exc) in AUTH_CODES


def reply_kind(reply: BaseException | str) -> Kind:
    """``transient`` or ``fatal`` for an error reply read without redis-py (the
    producer's RESP writer): by its code alone."""
    text = reply if isinstance(reply, str) else _reply_text(reply)
    code = text.split(" ", 1)[0] if text else ""
    return "transient" if code in TRANSIENT_CODES else "fatal"


def kind_of(exc: BaseException) -> Kind | None:
    """``transient``, ``fatal``, or ``None`` for an exception that is not Redis's."""
    # Authentication failures are ConnectionError subclasses in redis-py: test first.
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        return "fatal"
    if tls_failure(exc) is not None:  # a certificate not trusted, refused or missing
        return "fatal"
    if isinstance(exc, rex.BusyLoadingError | rex.ReadOnlyError | rex.OutOfMemoryError):
        return "transient"
    if isinstance(exc, rex.NoPermissionError | rex.AuthenticationWrongNumberOfArgsError):
        return "fatal"
    if isinstance(exc, rex.ResponseError):
        code = reply_code(exc)
        return "transient" if code in TRANSIENT_CODES else "fatal"
    if isinstance(exc, TRANSIENT_REDIS_ERRORS):
        return "transient"
    if isinstance(exc, rex.RedisError):
        return "fatal"
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying after a backoff can help."""
    return kind_of(exc) == "transient"


def refusal(exc: BaseException, command: str | None = None, key: str | None = None) -> RedisRefused:
    """A one-line :class:`RedisRefused` for a fatal failure: cause, command, key, setting."""
    tls = tls_failure(exc)
    if tls is not None:
        return RedisRefused(f"Redis TLS set-up failed: {tls}")
    text = _reply_text(exc)
    if "EXEC without MULTI" in text:
        # redis-py goes on after a refused MULTI: the transaction's commands ran one by
        # one and only EXEC's reply is raised. The refusal is MULTI's (an ACL right).
        return RedisRefused(
            f"Redis refused to MULTI ({_one_line(text)}): grant +multi to the ACL user of "
            f"{URL_SETTING} (README: Access control lists the rights of each role)"
        )
    match = _PIPELINE_ERROR.match(text)
    if match:
        # What Redis says beats the caller's guess (a call may send several commands).
        command = match.group("command")
        key = match.group("key") or key
        text = match.group("reply")
    denied = _DENIED_COMMAND.search(text)
    if denied:
        named = denied.group("command").replace("|", " ")  # xinfo|groups: XINFO GROUPS
        # Redis 6.2 names only the container ('xinfo'): keep the caller's subcommand.
        if not command or not command.upper().startswith(named.upper()):
            command = named
    code = text.split(" ", 1)[0] if text else ""
    unknown = _UNKNOWN_COMMAND.search(text)
    if unknown and not command:
        command = unknown.group("command")
    where = ""
    if is_auth_failure(exc) or code in AUTH_CODES:
        command = key = None  # the login failed, not the command it came with
        where = " the login"
    if command:
        where += f" to {command.upper()}"
    if key:
        where += f" on key {key!r}"
    if isinstance(exc, rex.AuthenticationError) or code in AUTH_CODES or "AUTH" in code:
        hint = f"check the user and password in {URL_SETTING}"
    elif isinstance(exc, rex.NoPermissionError) or code == "NOPERM":
        hint = (
            f"grant the right to the ACL user of {URL_SETTING} "
            "(README: Access control lists the rights of each role)"
        )
    elif unknown:
        hint = "poslake needs Redis 6.2 or newer with the stream commands not renamed"
    else:
        hint = "Redis will refuse this again; the message above says why"
    line = _one_line(text) or type(exc).__name__
    named = error_code(exc)
    if named in ("NOPERM", "WRONGPASS", "NOAUTH", "OOM") and not line.startswith(named):
        line = f"{named} {line}"  # the code redis-py took off, for the operator to look up
    return RedisRefused(f"Redis refused{where}: {line} ({hint})")


def _reply_text(exc: BaseException) -> str:
    return str(exc.args[0]) if exc.args else str(exc)


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    if len(flat) > _MAX_REPLY_CHARS:
        flat = flat[: _MAX_REPLY_CHARS - 3] + "..."
    return flat
