"""The error hierarchy of poslake, and the one table of exit codes.

::

    PoslakeError
    ├── ConfigError                 a setting is wrong; the program stops at start (exit 2)
    │   └── UnsafeStore             the lake's store ignores put-if-absent: commits of two
    │                               writers would overwrite each other
    ├── RetryableError              the environment failed; the same operation may succeed
    │   │                           later: back off, keep the batch, never acknowledge it
    │   ├── StreamUnavailable       Redis unreachable, the connection dropped, or a
    │   │                           transient error reply (OOM, LOADING, BUSY, READONLY,
    │   │                           MASTERDOWN, TRYAGAIN)
    │   └── CommitFailed            a Delta commit did not land (I/O, network, permissions)
    │       └── CommitConflict      another writer committed first; re-check and retry
    ├── RedisRefused                Redis refused us for good: wrong password, missing ACL
    │                               right, unknown command; one line, then exit 6
    ├── PoisonEntry                 a stream entry that can never be processed;
    │                               it goes to the dead-letter stream with ``reason``
    ├── RowsRejected                a Delta commit failed because of the rows it carries
    │                               (a path too long, a value the writer cannot hold): the
    │                               consumer bisects the batch, dead-letters the culprits
    └── RepositoryError             bad input to a table repository (a row that does not
        │                           fit, a version or time the table does not have, an
        │                           unknown strategy); nothing of that call is written
        └── TableMissing            the table asked for does not exist (yet)

Retryable errors never lose data: the consumer keeps the batch in hand, does not
acknowledge it, backs off and tries again. Poison (``PoisonEntry``, ``RowsRejected``)
is decided per entry and only ever moves those entries aside; it is never retried.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of every poslake program (operator commands, consumer, producer, run).

    ====  =====================================================================
    0     done
    1     failed: the program ran but hit a problem it reports
    2     bad input: an argument, an ID, a time, a setting
    3     something named does not exist: the table, the group, a dead letter
    4     unreachable: Redis, the IB gateway or the lake's store did not answer
    5     cancelled at the confirmation prompt
    6     refused: Redis or the store denied access (wrong password, missing ACL
          right, 403) or does not know a command; the message names what to check
    7     behind: the consumers did not catch up in time, nothing was compared
          (``poslake reconcile``)
    ====  =====================================================================
    """

    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    NOT_FOUND = 3
    UNREACHABLE = 4
    CANCELLED = 5
    REFUSED = 6
    BEHIND = 7


class PoslakeError(Exception):
    """Base of every error poslake raises on purpose."""


class ConfigError(PoslakeError):
    """A setting has a wrong value; the message names the setting (never a secret)."""


class UnsafeStore(ConfigError):
    """The lake's object store accepted a second put-if-absent of one key."""


class RetryableError(PoslakeError):
    """A transient failure: the same operation may succeed later."""


class StreamUnavailable(RetryableError):
    """Redis could not be reached, dropped the connection, or answered a transient error."""


class CommitFailed(RetryableError):
    """A Delta commit did not land: nothing from it is visible in the table."""


class CommitConflict(CommitFailed):
    """Another writer committed first; the batch must be re-checked against it."""


class RedisRefused(PoslakeError):
    """A non-transient Redis error reply: retrying cannot help.

    The message is one line naming the cause, the command and key where Redis
    says them, and the setting to check; it never holds a password.
    """


class PoisonEntry(PoslakeError):
    """A stream entry that can never be processed, with the reason why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RowsRejected(PoslakeError):
    """A commit failed because of the rows it carries, not the environment.

    Retrying the same rows fails the same way; the caller splits the batch to
    find the offending entries and dead-letters them with this reason.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RepositoryError(PoslakeError):
    """Bad input to a repository call (options_model/repository.py); the message says what."""


class TableMissing(RepositoryError):
    """The table asked for does not exist (yet)."""
