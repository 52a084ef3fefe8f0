"""The error hierarchy of poslake.

::

    PoslakeError
    ├── ConfigError                 a setting is wrong; the program stops at start
    ├── RetryableError              the operation may succeed if tried again
    │   ├── StreamUnavailable       Redis unreachable or the connection dropped
    │   └── CommitFailed            a Delta commit did not land (conflict, I/O, permissions)
    │       └── CommitConflict      another writer committed first; re-check and retry
    ├── PoisonEntry                 a stream entry that can never be processed;
    │                               it goes to the dead-letter stream with ``reason``
    └── RepositoryError             bad input to a table repository (a row that does not
                                    fit, a version or time the table does not have, an
                                    unknown strategy); nothing of that call is written

Retryable errors never lose data: the consumer keeps the batch in hand, does not
acknowledge it, backs off and tries again. Poison is decided per entry and only
ever moves that one entry aside.
"""

from __future__ import annotations


class PoslakeError(Exception):
    """Base of every error poslake raises on purpose."""


class ConfigError(PoslakeError):
    """A setting has a wrong value; the message names the setting."""


class RetryableError(PoslakeError):
    """A transient failure: the same operation may succeed later."""


class StreamUnavailable(RetryableError):
    """Redis could not be reached, or the connection dropped mid-command."""


class CommitFailed(RetryableError):
    """A Delta commit did not land: nothing from it is visible in the table."""


class CommitConflict(CommitFailed):
    """Another writer committed first; the batch must be re-checked against it."""


class PoisonEntry(PoslakeError):
    """A stream entry that can never be processed, with the reason why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RepositoryError(PoslakeError):
    """Bad input to a repository call (shared/repository.py); the message says what."""
