"""``poslake book``: keep the strategy book (``transactions``, ``legs``, ``positions``)
equal to the book of the pipeline's tables (options_model/feed.py).

- ``poslake book`` runs for ever: a step every ``POSLAKE_BOOK_INTERVAL_S`` (the
  underlyings whose fills or held quantities changed), marks every
  ``POSLAKE_BOOK_SNAPSHOT_S``; until SIGTERM/SIGINT.
- ``--once`` brings the book up to date with the tables as they are and exits 0.
- ``--rebuild`` recomputes every row from scratch and replaces the tables' rows
  (one overwrite commit per table; time travel still shows the book before).

One instance at a time: each holds a lease in Redis (``Settings.book_lease_key``,
renewed by a thread every 10 s, gone ``_LEASE_MS`` after its holder died), and a
second one waits for it. Every row a step writes is computed from the base tables alone, and
an instance starts by writing the difference between the tables and the whole
book, so whatever ran before (a crash, an instance that lost its lease while
paused) is made right by the next holder's first step; a holder that finds its
lease lost reloads the tables before it writes again.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import threading
import time
from typing import Any

import redis
from prometheus_client import CollectorRegistry

from infra.logs import configure_logging
from infra.metrics import MetricsServer, StatsCollector
from infra.redaction import scrub
from infra.redis_errors import kind_of
from infra.stopping import release_held_stops
from options_model.feed import BookFeed, StepOutcome
from options_model.grouping import BookRules
from poslake import book_overrides
from poslake.command import LAKE_ERRORS, ExitCode, one_line, redis_client
from shared.settings import Settings

log = logging.getLogger(__name__)

_LEASE_MS = 30_000
# Failures of the environment (Redis, the lake's store), not of the data: retried.
_RETRIED: tuple[type[Exception], ...] = (redis.RedisError, *LAKE_ERRORS)
_WAIT_LOG_EVERY_S = 60.0
# Renew only while the key still holds our token; release the same way.
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end"  # noqa: E501
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"  # noqa: E501


def add_arguments(parser: argparse.ArgumentParser) -> None:
    book_overrides.add_parsers(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="bring the book up to date, then exit 0")
    mode.add_argument(
        "--rebuild",
        action="store_true",
        help="recompute every row from scratch and replace the book's rows, then exit 0",
    )


def feed_of(settings: Settings) -> BookFeed:
    """The book's feed as the settings configure it."""
    commits = [0]

    def committed(table: str) -> None:
        commits[0] += 1
        if commits[0] == settings.fault_book_crash_after_commits:  # testing only
            log.warning("fault injection: SIGKILL", extra={"table": table, "count": commits[0]})
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    return BookFeed(
        settings.lake_uri,
        settings.storage_options or None,
        rules=BookRules(
            group_window_s=settings.book_group_window_s,
            roll_window_s=settings.book_roll_window_s,
        ),
        snapshot_s=settings.book_snapshot_s,
        on_commit=committed,
    )


class Lease:
    """The book's lease: one holder at a time, renewed by a thread while it is held
    (a step may take longer than the lease: a first step over a large lake)."""

    def __init__(self, client: Any, key: str) -> None:
        self._client = client
        self.key = key
        self._token = secrets.token_hex(8)
        self._renewing = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self.refused: redis.RedisError | None = None  # a fatal reply (NOPERM): not retried

    def take(self) -> bool:
        taken = bool(self._client.set(self.key, self._token, nx=True, px=_LEASE_MS))
        if taken:
            self.lost = False
            self._start_renewing()
        return taken

    def _start_renewing(self) -> None:
        self._renewing.set()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._renew, name="book-lease", daemon=True)
            self._thread.start()

    def _renew(self) -> None:
        renewed_at = time.monotonic()
        while self._renewing.is_set() and not self.lost:
            time.sleep(_LEASE_MS / 3000)
            if not self._renewing.is_set():
                return
            try:
                if self._client.eval(_RENEW, 1, self.key, self._token, _LEASE_MS):
                    renewed_at = time.monotonic()
                else:
                    self.lost = True  # expired and taken, or deleted
            except redis.RedisError as exc:
                if kind_of(exc) == "fatal":  # no right to EVAL: the main thread stops
                    self.refused, self.lost = exc, True
                elif time.monotonic() - renewed_at >= _LEASE_MS / 1000:
                    self.lost = True  # Redis away: the lease lasts its TTL, no longer

    def release_if_held(self) -> None:
        if self._renewing.is_set():
            self.release()

    def release(self) -> None:
        self._renewing.clear()
        try:
            self._client.eval(_RELEASE, 1, self.key, self._token)
        except redis.RedisError as exc:
            if kind_of(exc) == "fatal":  # no right: one line and exit 6, as everywhere
                raise
            # unreachable: the lease expires by itself


def run(args: argparse.Namespace, settings: Settings) -> int:
    if getattr(args, "action", None):
        return book_overrides.run(args, settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    release_held_stops()  # held if `poslake run` started it (infra/stopping.py)
    with redis_client(settings) as client:
        lease = Lease(client, settings.book_lease_key)
        if not _wait_for(lease, stop):
            return ExitCode.OK  # stopped while waiting
        try:
            feed = feed_of(settings)
            if args.rebuild:
                outcome = feed.rebuild(time.monotonic())
                _note_progress(client, settings, outcome)
                _report("rebuilt", outcome)
                return ExitCode.OK
            if args.once:
                outcome = feed.step(time.monotonic(), full=True)
                _note_progress(client, settings, outcome)
                _report("up to date", outcome)
                return ExitCode.OK
            configure_logging(settings.log_level, settings.log_json)  # a service from here
            return _loop(feed, lease, client, settings, stop)
        except BaseException:
            with contextlib.suppress(redis.RedisError):  # the first failure is the one told
                lease.release()
            raise
        finally:
            lease.release_if_held()


def _wait_for(lease: Lease, stop: threading.Event) -> bool:
    """Take the lease, waiting while another instance holds it; False if stopped."""
    logged_at: float | None = None
    while not lease.take():
        now = time.monotonic()
        if logged_at is None or now - logged_at >= _WAIT_LOG_EVERY_S:
            logged_at = now
            log.warning("another book instance holds the lease: waiting", extra={"key": lease.key})
        if stop.wait(1.0):
            return False
    return True


class _Gauges:
    """What ``/metrics`` shows of the book's loop, and whether ``/healthz`` is ok."""

    def __init__(self, settings: Settings) -> None:
        self.values: dict[str, float] = {
            "steps": 0, "rows_written": 0, "failures": 0, "executions_version": -1,
        }  # fmt: skip
        self.last_ok = time.monotonic()
        # healthy while steps succeed: a few intervals, and never less than two minutes
        self.stale_after_s = max(120.0, 10 * settings.book_interval_s)

    def read(self) -> dict[str, float]:
        return self.values | {"last_step_age_s": time.monotonic() - self.last_ok}

    def health(self) -> tuple[bool, str]:
        age = time.monotonic() - self.last_ok
        if age > self.stale_after_s:
            return False, f"no successful book step for {age:.0f}s"
        return True, "ok"

    def registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(
            StatsCollector(
                "poslake_book",
                self.read,
                {
                    "steps": "book steps done",
                    "rows_written": "rows the book wrote (upserts and deletes)",
                    "failures": "steps that failed (the lake or Redis unreachable), retried",
                },
                {
                    "executions_version": "executions version the last step reflected",
                    "last_step_age_s": "seconds since the last successful step",
                },
            )
        )
        return registry


def _loop(
    feed: BookFeed, lease: Lease, client: Any, settings: Settings, stop: threading.Event
) -> int:
    gauges = _Gauges(settings)
    server = MetricsServer(gauges.registry(), gauges.health)
    server.start(settings.metrics_host, settings.metrics_port)
    delay = 0.0  # the first step (the whole book) at once
    try:
        while not stop.wait(delay):
            try:
                if lease.refused is not None:
                    raise lease.refused
                if lease.lost:
                    log.warning("the book lease was lost: waiting to take it again")
                    if not _wait_for(lease, stop):
                        break
                    feed = feed_of(settings)  # another instance wrote: start from the tables
                began = time.monotonic()
                outcome = feed.step(began)
                took = time.monotonic() - began
                _note_progress(client, settings, outcome)
            except _RETRIED as exc:
                if kind_of(exc) == "fatal":  # no right, wrong password: not retried
                    raise
                # The environment, not the data: retried, from the tables as they are
                # (a step cut short may have left the feed's view of them behind).
                gauges.values["failures"] += 1
                log.warning(
                    "book step failed: retrying",
                    extra={"error": one_line(scrub(str(exc))), "retry_in_s": delay},
                )
                feed = feed_of(settings)
                delay = min(max(delay, settings.book_interval_s) * 2, 30.0)
                continue
            delay = settings.book_interval_s
            gauges.last_ok = time.monotonic()
            gauges.values["steps"] += 1
            gauges.values["rows_written"] += sum(outcome.written.values())
            if outcome.executions_version is not None:
                gauges.values["executions_version"] = outcome.executions_version
            if outcome.changed:
                log.info(
                    "book step",
                    extra={
                        "underlyings": outcome.partitions,
                        "executions_version": outcome.executions_version,
                        "step_s": round(took, 3),
                        **outcome.written,
                    },
                )
    finally:
        server.stop()
    return ExitCode.OK


def _note_progress(client: Any, settings: Settings, outcome: StepOutcome) -> None:
    """The executions version a step reflected, for ``poslake status``: a step with
    nothing to write commits nothing, so the tables' app transaction may be older."""
    if outcome.executions_version is not None:
        client.set(settings.book_progress_key, f"{outcome.executions_version} {time.time():.3f}")


def _report(what: str, outcome: StepOutcome) -> None:
    written = ", ".join(f"{name} {n}" for name, n in outcome.written.items() if n)
    print(
        f"book {what}: {outcome.partitions} account/underlyings, rows written: "
        f"{written or 'none'} (executions version {outcome.executions_version})"
    )
