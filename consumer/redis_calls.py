"""How the consumer runs a Redis call: what it retries, what stops it, what it reports.

Every Redis call of the consumer (reads, claims, settling, the drained check,
creating the group) goes through :meth:`RedisCalls.run`:

- transient failures (connection loss, OOM, LOADING, BUSY, READONLY...; see
  infra/redis_errors.py) and, once started, a password that stopped working
  are retried with backoff; meanwhile :attr:`RedisCalls.health` says what fails
  (``/healthz`` 503, ``poslake_consumer_redis_ok`` 0);
- a vanished group (NOGROUP) is made again and the call repeated;
- anything else raises :class:`shared.errors.RedisRefused` with one line naming
  the cause, the command, the key and the setting to check (exit 6).

Backoffs are cut short by a stop request; while stopping, a call that keeps
failing raises :class:`StreamUnavailable` (what is in hand stays pending).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from consumer.group import ConsumerGroup
from infra.backoff import backoff_s
from infra.redis_errors import is_auth_failure, kind_of, refusal
from infra.redis_health import RedisHealth
from shared.errors import StreamUnavailable
from shared.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

SIGNAL_CHECK_S = 0.2  # how soon a sleeping or waiting thread sees a stop request
_STOPPING_ATTEMPTS = 5
_REGROUP_ATTEMPTS = 3


def backoff(settings: Settings, failures: int) -> float:
    """Exponential backoff with jitter, from ``POSLAKE_RETRY_INITIAL_S`` to ``_MAX_S``."""
    return backoff_s(failures - 1, settings.retry_initial_s, settings.retry_max_s)


def pause(seconds: float, stopping: Callable[[], bool]) -> None:
    """Sleep for a backoff, cut short by a stop request."""
    deadline = time.monotonic() + seconds
    while not stopping():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, SIGNAL_CHECK_S))


class RedisCalls:
    """The retry policy of one consumer's Redis calls (thread-safe: reader, finisher
    and main thread share it)."""

    def __init__(
        self,
        settings: Settings,
        group: ConsumerGroup,
        stopping: Callable[[], bool],
        on_retry: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._group = group
        self._stopping = stopping
        self._on_retry = on_retry
        self.health = RedisHealth()
        self.started = False  # past start-up: a failing password is then waited out

    def run(self, call: Callable[[], T], command: str | None = None, key: str | None = None) -> T:
        """``call()``, retried as the module says.

        ``command`` and ``key`` name the call for the operator where Redis's reply
        does not (a pipeline's reply names its failed command itself).
        """
        failures = regroups = 0
        where = command or "redis"
        while True:
            try:
                result = call()
            except (redis.RedisError, OSError) as exc:
                if "NOGROUP" in str(exc) and regroups < _REGROUP_ATTEMPTS:
                    # The group vanished (a restart without persistence, an XGROUP
                    # DESTROY): made again from the stream's start; the dedup drops
                    # what the table holds.
                    regroups += 1
                    log.warning(
                        "consumer group missing, creating it again", extra={"command": where}
                    )
                    self.ensure_group_quietly()
                    continue
                auth_later = self.started and is_auth_failure(exc)
                if kind_of(exc) != "transient" and not auth_later:
                    raise refusal(exc, command, key) from None
                failures += 1
                self._on_retry()
                code = self.health.failed(where, exc)
                if self._stopping() and (failures > _STOPPING_ATTEMPTS or not self.started):
                    # Stop anyway: whatever is unacknowledged stays pending and replays.
                    raise StreamUnavailable(f"redis unavailable while stopping: {exc}") from None
                delay = backoff(self._settings, failures)
                log.warning(
                    "redis unavailable, retrying",
                    extra={"code": code, "command": where, "error": str(exc), "delay_s": delay},
                )
                pause(delay, self._stopping)
                continue
            if failures:
                log.info(
                    "redis answering again",
                    extra={"consumer": self._settings.consumer_name, "command": where},
                )
                self.health.recovered(where)
                self.ensure_group_quietly()
            return result

    def ensure_group_quietly(self) -> None:
        # A restarted Redis without its data lost the group; the next call retries anyway.
        with contextlib.suppress(redis.RedisError, OSError):
            self._group.ensure_group()
