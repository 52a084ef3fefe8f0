"""One consumer process: read a batch, validate, dedup, commit to Delta, then settle.

At most three batches are in hand: one merging into positions_current and
settling, one committing to the history, the next being read. Redis
failures are classified (shared/redis_errors.py): transient ones (connection
loss, OOM, LOADING, BUSY, failover replies) and, once running, a password that
stopped working are retried with backoff around each call while the process
reports itself unhealthy (the batches in hand stay in hand, unacknowledged);
fatal ones (NOPERM, a wrong password at start, an unknown command) stop the
consumer with one line and exit code 6 after every thread has stopped. A failed
Delta commit is retried with backoff without acknowledging anything.
SIGTERM/SIGINT, at any moment from the first import on, stop the reading; the
batch in hand is committed and settled before exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from functools import partial
from types import FrameType
from typing import TypeVar

import pyarrow as pa
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from consumer.current import CurrentPositions
from consumer.group import ConsumerGroup, Page, RawFields
from consumer.maintenance import TableMaintainer
from consumer.settle import DeadLetter, Settler
from consumer.sink import CommitOutcome, DeltaSink
from shared.errors import (
    CommitConflict,
    CommitFailed,
    ExitCode,
    RedisRefused,
    StreamUnavailable,
)
from shared.redis_conn import sync_client
from shared.redis_errors import is_auth_failure, kind_of, refusal
from shared.redis_health import RedisHealth
from shared.settings import Settings
from shared.stopping import take_early
from shared.table import POSITION_UPDATES_SCHEMA, updates_to_arrow
from shared.wire import decode_entries, fields_as_dict

log = logging.getLogger(__name__)

T = TypeVar("T")

_IDLE_BLOCK_S = 0.5  # longest blocking read, so a stop request is seen promptly
_DRAIN_BLOCK_MS = 50
# Pages read but not yet decoded: enough to keep the decoder busy, few enough that
# raw replies never pile up.
_PAGES_DECODING = 2
# At stop, how long to let a running compaction or vacuum finish: both are safe to
# cut short (a compaction commits atomically, a vacuum resumes at the next start).
_MAINTENANCE_STOP_WAIT_S = 20.0
_SIGNAL_CHECK_S = 0.2


@dataclass(slots=True)
class DecodedPage:
    """What one page of new entries in hand turned into."""

    rows: pa.Table | None  # the decodable entries' rows, in delivery order
    over_limit: list[DeadLetter]  # delivered more often than allowed
    poison: list[DeadLetter]


def decode_page(
    ids: list[bytes], fields: list[RawFields], counts: list[int] | None, max_deliveries: int
) -> DecodedPage:
    """Dead letters for entries delivered too often or undecodable; rows for the rest."""
    over_limit: list[DeadLetter] = []
    poison: list[DeadLetter] = []
    if counts is None:  # first deliveries
        entries = list(zip(ids, fields, strict=True))
    else:
        entries = []
        for entry_id, raw, count in zip(ids, fields, counts, strict=True):
            if count > max_deliveries:
                reason = f"delivered {count} times (limit {max_deliveries})"
                over_limit.append(DeadLetter(entry_id, fields_as_dict(raw), reason, count))
            else:
                entries.append((entry_id, raw))
    decoded = decode_entries(entries)
    del entries
    if decoded.poison:
        count_of = dict(zip(ids, counts, strict=True)) if counts is not None else {}
        poison = [
            DeadLetter(p.entry_id, p.fields, p.reason, count_of.get(p.entry_id, 1))
            for p in decoded.poison
        ]
    rows = updates_to_arrow(decoded.updates, decoded.entry_ids) if decoded.updates else None
    return DecodedPage(rows, over_limit, poison)


@dataclass(slots=True)
class Batch:
    """Entries in hand: their IDs in delivery order, their rows and their dead letters.

    Each page is decoded into Arrow rows as soon as it is added, by ``decoder``
    when given (while the reader waits for the next page) or else right away, so
    a batch holds the raw replies of a few pages at most, never of all its entries.
    """

    max_deliveries: int
    decoder: Executor | None = None
    ids: list[bytes] = field(default_factory=list)
    rows: list[pa.Table] = field(default_factory=list)
    over_limit: list[DeadLetter] = field(default_factory=list)
    poison: list[DeadLetter] = field(default_factory=list)
    vanished: list[bytes] = field(default_factory=list)
    max_count: int = 0  # most deliveries of any entry in hand
    opened_at: float = 0.0
    in_flight: frozenset[bytes] = frozenset()
    _seen: set[bytes] | None = None
    _decoding: deque[Future[DecodedPage]] = field(default_factory=deque)

    def add(self, page: Page) -> None:
        if page.deliveries is None:
            # First deliveries (XREADGROUP >): new to everyone, nothing to filter.
            if self._seen is not None:
                self._seen.update(page.ids)
            self._take(page.ids, page.fields, None)
        else:
            # A claim scan or pending re-read can hand back an entry already in hand
            # (here, or in the batch being committed meanwhile).
            if self._seen is None:
                self._seen = set(self.ids) | self.in_flight
            seen = self._seen
            ids: list[bytes] = []
            fields: list[RawFields] = []
            counts: list[int] = []
            for entry_id, raw, count in zip(page.ids, page.fields, page.deliveries, strict=True):
                if entry_id not in seen:
                    seen.add(entry_id)
                    ids.append(entry_id)
                    fields.append(raw)
                    counts.append(count)
            self._take(ids, fields, counts)
        self.vanished.extend(page.vanished)

    def _take(self, ids: list[bytes], fields: list[RawFields], counts: list[int] | None) -> None:
        if not ids:
            return
        if not self.ids:
            self.opened_at = time.monotonic()
        self.ids.extend(ids)
        self.max_count = max(self.max_count, 1 if counts is None else max(counts))
        if self.decoder is None:
            self._fold(decode_page(ids, fields, counts, self.max_deliveries))
            return
        self._decoding.append(
            self.decoder.submit(decode_page, ids, fields, counts, self.max_deliveries)
        )
        while len(self._decoding) > _PAGES_DECODING:
            self._fold(self._decoding.popleft().result())

    def _fold(self, page: DecodedPage) -> None:
        if page.rows is not None:
            self.rows.append(page.rows)
        self.over_limit.extend(page.over_limit)
        self.poison.extend(page.poison)

    def finish(self) -> Batch:
        """Wait for the pages still being decoded."""
        while self._decoding:
            self._fold(self._decoding.popleft().result())
        return self

    def table(self) -> pa.Table:
        """The rows of every decodable entry in delivery order, in one chunk.

        One chunk rather than one per page: the Delta writer splits every chunk
        by partition, so many small chunks cost it noticeably more.
        """
        self.finish()
        if not self.rows:
            return POSITION_UPDATES_SCHEMA.empty_table()
        return pa.concat_tables(self.rows).combine_chunks()

    @property
    def dead(self) -> list[DeadLetter]:
        """Dead letters: entries delivered too often, then undecodable ones."""
        self.finish()
        return self.over_limit + self.poison

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def empty(self) -> bool:
        return not self.ids and not self.vanished


@dataclass(frozen=True, slots=True)
class CommittedBatch:
    """A batch whose history commit landed, on its way to the merge and the ack."""

    number: int  # 1-based count of this process's batches
    ids: list[bytes]  # every entry to acknowledge: read ones, then vanished ones
    entries: int  # entries read (without the vanished)
    max_count: int
    rows: pa.Table
    dead: list[DeadLetter]
    outcome: CommitOutcome


@dataclass(slots=True)
class ConsumerStats:
    batches: int = 0
    entries: int = 0
    rows_written: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    commit_retries: int = 0
    current_commit_retries: int = 0
    redis_retries: int = 0


class Consumer:
    """A member of the consumer group writing to the Delta table."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.client = client or sync_client(
            settings.redis_target,
            socket_timeout=30,
            socket_connect_timeout=5,
            health_check_interval=30,
            # One immediate retry (a stale pooled connection); outages are retried by
            # _redis, which backs off, sees stop requests and reports them: redis-py's
            # own default (3 retries, seconds of backoff each call) would hide them.
            retry=Retry(NoBackoff(), 1),
        )
        self.group = ConsumerGroup(self.client, settings)
        self.settler = Settler(self.client, settings.stream, settings.group, settings.consumer_name)
        self.stats = ConsumerStats()
        self._stats_lock = threading.Lock()
        self._batches_in_hand = 0  # numbers batches for the crash points
        self.current: CurrentPositions | None = None  # opened with the sink in run()
        # For metrics and health (consumer/metrics.py): batch observer, loop heartbeat.
        self.on_batch: Callable[[int, float], None] | None = None
        self.heartbeat = time.monotonic()
        self.redis_health = RedisHealth()
        self.refused: str | None = None  # why Redis refused us for good (exit 6)
        self.maintainer: TableMaintainer | None = None
        self._started = False  # past start-up: a failing password is then waited out
        self._stopping = False
        self._next_claim_at = 0.0
        self._claim_scan_open = False
        self._claim_pages = 0

    def request_stop(self, signum: int = 0, _frame: FrameType | None = None) -> None:
        if not self._stopping:
            log.info(
                "stop requested", extra={"signal": signum, "consumer": self.settings.consumer_name}
            )
        self._stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        early = take_early()  # a signal during the imports (consumer/__main__.py)
        if early:
            self.request_stop(early)

    def run(self, drain: bool = False) -> int:
        """Consume until stopped (or, with ``drain``, until the group has nothing left).

        Returns the exit code: 0 after a stop, 1 after repeated failures while
        stopping, 6 (:attr:`refused` says why) when Redis refused us for good.
        """
        s = self.settings
        try:
            exit_code = self._start_and_consume(drain)
        except RedisRefused as exc:
            self._stopping = True  # the other threads stop reading too
            self.refused = str(exc)
            log.error("redis refused, stopping", extra={"error": self.refused})
            exit_code = ExitCode.REFUSED
        finally:
            if self.maintainer is not None:
                self.maintainer.stop(timeout=_MAINTENANCE_STOP_WAIT_S)
        log.info(
            "consumer stopped",
            extra={"consumer": s.consumer_name, "exit_code": exit_code, **_as_fields(self.stats)},
        )
        return int(exit_code)

    def background_alive(self) -> bool:
        """A maintenance run still inside delta-rs (cut short at exit: see consumer/cli.py)."""
        return self.maintainer is not None and self.maintainer.running()

    def _start_and_consume(self, drain: bool) -> int:
        s = self.settings
        try:
            if self._stopping:
                return ExitCode.OK
            self._redis(self.group.ensure_group, "XGROUP", s.stream)
            sink = self._open_sink()
        except StreamUnavailable:
            return ExitCode.OK  # stopped during start-up: nothing in hand
        if sink is None:
            return ExitCode.OK
        self._started = True
        self.maintainer = TableMaintainer(s, self.client)
        log.info(
            "consumer started",
            extra={
                "consumer": s.consumer_name,
                "stream": s.stream,
                "group": s.group,
                "drain": drain,
            },
        )
        try:
            return self._consume(sink, self.maintainer, drain)
        except StreamUnavailable as exc:
            log.error("stopped without redis", extra={"error": str(exc)})
            return ExitCode.FAILED

    def _consume(self, sink: DeltaSink, maintainer: TableMaintainer, drain: bool) -> int:
        # Three stages overlap, each in its own thread: reading batch N+2 (with a
        # fourth thread decoding its pages while the reader waits for the next one),
        # the history commit of batch N+1 (here), and the positions_current merge and
        # settlement of batch N (the finisher). The Delta writes run in Rust without
        # the GIL, so they use both cores. Batches settle in order, one at a time; a
        # crash anywhere leaves the unsettled ones pending, and their replay is a
        # no-op for the history and repairs positions_current (consumer/current.py).
        # Executors shut down in reverse: the finisher, then the reader (it may still
        # hand pages to the decoder), then the decoder.
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder") as decoder,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="reader") as reader,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="finisher") as finisher,
        ):
            try:
                return self._pipeline(sink, maintainer, drain, decoder, reader, finisher)
            finally:
                # Whatever ends the loop (an unexpected error included), the reader must
                # stop too, or shutting its executor down would wait on it for good.
                self._stopping = True

    def _pipeline(
        self,
        sink: DeltaSink,
        maintainer: TableMaintainer,
        drain: bool,
        decoder: Executor,
        reader: Executor,
        finisher: Executor,
    ) -> int:
        exit_code = 0
        collect = partial(self._collect, drain, decoder=decoder)
        upcoming: Future[Batch] | None = reader.submit(collect, frozenset())
        finishing: Future[bool] | None = None
        finishing_ids: frozenset[bytes] = frozenset()
        while upcoming is not None:
            self.heartbeat = time.monotonic()
            maintainer.poll()
            batch = _wait(upcoming)
            upcoming = None
            if batch.empty:
                # Settle what is in hand before deciding that the group is drained.
                if finishing is not None and not _wait(finishing):
                    exit_code = 1
                    break
                finishing, finishing_ids = None, frozenset()
                if self._stopping or (drain and self._drained()):
                    break
                upcoming = reader.submit(collect, frozenset())
                continue
            if not self._stopping:
                # Entries of both unsettled batches are in hand: a claim must skip them.
                in_flight = frozenset(batch.ids) | finishing_ids
                upcoming = reader.submit(collect, in_flight)
            committed = self._commit_history(batch, sink)
            previous_ok = _wait(finishing) if finishing is not None else True
            finishing, finishing_ids = None, frozenset()
            if committed is None or not previous_ok:
                exit_code = 1
                self._stopping = True  # the reader returns what it holds; left pending
                if upcoming is not None:
                    _wait(upcoming)
                break
            finishing = finisher.submit(self._finish, committed)
            finishing_ids = frozenset(batch.ids)
            maintainer.after_commit(sink.commits)
        if finishing is not None and not _wait(finishing):
            exit_code = 1
        return exit_code

    # -- reading -------------------------------------------------------------

    def _collect(
        self, drain: bool, in_flight: frozenset[bytes], decoder: Executor | None = None
    ) -> Batch:
        """Read one batch; ``in_flight`` are entries of the unsettled batches in hand."""
        s = self.settings
        batch = Batch(s.max_deliveries, decoder, in_flight=in_flight)
        read = ("XREADGROUP", s.stream)
        while len(batch) < s.batch_max_entries and not self._stopping:
            room = min(s.read_count, s.batch_max_entries - len(batch))
            if not self.group.own_pending_done:
                batch.add(self._redis(partial(self.group.read_own_pending, room), *read))
                continue
            if self._claim_scan_open or time.monotonic() >= self._next_claim_at:
                self._claim_once(batch)
                continue
            if batch.ids:
                remaining = s.batch_max_wait_s - (time.monotonic() - batch.opened_at)
                if remaining <= 0:
                    break
                block_s = min(remaining, _IDLE_BLOCK_S)
            else:
                block_s = min(s.batch_max_wait_s, _IDLE_BLOCK_S)
            block_ms = _DRAIN_BLOCK_MS if drain else max(1, int(block_s * 1000))
            page = self._redis(partial(self.group.read_new, room, block_ms), *read)
            if not page.ids and drain:
                break  # nothing new: commit what is in hand, then check if drained
            batch.add(page)
        return batch.finish()

    def _claim_once(self, batch: Batch) -> None:
        page, more = self._redis(self.group.claim_page, "XAUTOCLAIM", self.settings.stream)
        batch.add(page)
        self._claim_pages += 1
        self._claim_scan_open = more
        if not more:
            self._next_claim_at = time.monotonic() + self.settings.claim_interval_s
        else:
            self._crash_point("mid_claim", self._claim_pages)

    def _drained(self) -> bool:
        stream = self.settings.stream
        if self._redis(self.group.group_pending, "XPENDING", stream) > 0:
            # Someone else's entries: claimable once idle long enough.
            self._next_claim_at = 0.0
            time.sleep(min(0.2, max(0.01, self.settings.claim_min_idle_s / 4)))
            return False
        return not self._redis(self.group.has_undelivered, "XINFO", stream)

    # -- processing ----------------------------------------------------------

    def _commit_history(self, batch: Batch, sink: DeltaSink) -> CommittedBatch | None:
        """Append the batch's new rows to the history; None if stopping after failures."""
        self._batches_in_hand += 1
        number = self._batches_in_hand
        dead = batch.dead
        rows = batch.table()
        batch.rows.clear()
        self._crash_point("after_read", number)
        outcome = self._commit_with_retry(lambda: sink.commit_rows(rows), "commit_retries")
        if outcome is None:
            return None
        self._crash_point("after_commit", number)
        return CommittedBatch(
            number=number,
            ids=batch.ids + batch.vanished,
            entries=len(batch.ids),
            max_count=batch.max_count,
            rows=rows,
            dead=dead,
            outcome=outcome,
        )

    def _finish(self, committed: CommittedBatch) -> bool:
        """Merge into positions_current, then settle: the batch's second commit and its ack.

        Every valid row of the batch goes into the merge, replays included: after a
        crash between the two commits, the replay repairs positions_current.
        """
        current = self.current
        assert current is not None
        merged = self._commit_with_retry(
            lambda: current.merge(committed.rows), "current_commit_retries"
        )
        if merged is None:
            return False
        self._crash_point("after_current", committed.number)
        ids, dead, outcome = committed.ids, committed.dead, committed.outcome
        # One XACK, or a MULTI/EXEC with dead letters: refused as a whole (OOM, NOPERM),
        # never half done; redis-py's message names the command that was refused.
        self._redis(lambda: self.settler.settle(ids, dead), "XACK", self.settings.stream)
        entries = committed.entries
        self._count("batches")
        self._count("entries", entries)
        self._count("rows_written", outcome.rows_written)
        self._count("duplicates", outcome.duplicates)
        self._count("dead_letters", len(dead))
        if self.on_batch is not None:
            self.on_batch(entries, outcome.seconds)
        log.info(
            "batch settled",
            extra={
                "consumer": self.settings.consumer_name,
                "first_id": ids[0].decode() if ids else "",
                "last_id": ids[-1].decode() if ids else "",
                "entries": entries,
                "rows": outcome.rows_written,
                "duplicates": outcome.duplicates,
                "dead_letters": len(dead),
                "max_delivery_count": committed.max_count,
                "table_version": outcome.table_version,
                "commit_s": round(outcome.seconds, 4),
                "current_merge_s": round(merged, 4),
            },
        )
        return True

    def _commit_with_retry(self, commit: Callable[[], T], retries_stat: str) -> T | None:
        """Run a Delta commit until it lands; None if stopping after repeated failures.

        ``retries_stat`` names the :class:`ConsumerStats` counter of its retries.
        """
        s = self.settings
        failures = 0
        while True:
            try:
                return commit()
            except CommitConflict as exc:
                # Lost a race with another consumer: re-check against its rows right away.
                self._count(retries_stat)
                log.info("commit conflict, retrying", extra={"error": str(exc)})
                time.sleep(random.uniform(0, 0.05))
            except CommitFailed as exc:
                self._count(retries_stat)
                failures += 1
                if self._stopping and failures > 3:
                    log.error("giving up on stop; batch stays pending", extra={"error": str(exc)})
                    return None
                delay = _backoff(s, failures)
                log.error("commit failed, will retry", extra={"error": str(exc), "delay_s": delay})
                self._pause(delay)

    # -- helpers -------------------------------------------------------------

    def _count(self, stat: str, n: int = 1) -> None:
        # The reader, this thread and the finisher all count: += is not atomic.
        with self._stats_lock:
            setattr(self.stats, stat, getattr(self.stats, stat) + n)

    def _open_sink(self) -> DeltaSink | None:
        """Open both tables, retrying while the store fails; None if stopped meanwhile."""
        failures = 0
        while not self._stopping:
            try:
                sink = DeltaSink(self.settings)
                self.current = CurrentPositions(self.settings)
                return sink
            except Exception as exc:  # a store away, a lake not mounted yet: wait for it
                failures += 1
                delay = _backoff(self.settings, failures)
                log.error(
                    "cannot open table, retrying", extra={"error": str(exc), "delay_s": delay}
                )
                self._pause(delay)
        return None

    def _redis(
        self, call: Callable[[], T], command: str | None = None, key: str | None = None
    ) -> T:
        """Run a Redis call: transient failures are retried with backoff, fatal ones raise.

        ``command`` and ``key`` name the call for the operator where Redis's reply does
        not (a pipeline's reply names its failed command itself). Retried: connection
        loss and transient replies (OOM, LOADING, BUSY, READONLY...), and past start-up
        a password that stopped working (it may be set right again while we wait).
        Fatal: :class:`RedisRefused` with the one-line reason.
        """
        failures = regroups = 0
        where = command or "redis"
        while True:
            try:
                result = call()
            except (redis.RedisError, OSError) as exc:
                if "NOGROUP" in str(exc) and regroups < 3:
                    # The group vanished (a restart without persistence, an XGROUP
                    # DESTROY): made again from the stream's start; the dedup drops
                    # what the table holds.
                    regroups += 1
                    log.warning(
                        "consumer group missing, creating it again", extra={"command": where}
                    )
                    self._ensure_group_quietly()
                    continue
                transient = kind_of(exc) == "transient" or (self._started and is_auth_failure(exc))
                if not transient:
                    raise refusal(exc, command, key) from None
                failures += 1
                self._count("redis_retries")
                code = self.redis_health.failed(where, exc)
                if self._stopping and (failures > 5 or not self._started):
                    # Stop anyway: whatever is unacknowledged stays pending and replays.
                    raise StreamUnavailable(f"redis unavailable while stopping: {exc}") from None
                delay = _backoff(self.settings, failures)
                log.warning(
                    "redis unavailable, retrying",
                    extra={"code": code, "command": where, "error": str(exc), "delay_s": delay},
                )
                self._pause(delay)
                continue
            if failures:
                log.info(
                    "redis answering again",
                    extra={"consumer": self.settings.consumer_name, "command": where},
                )
                self.redis_health.recovered(where)
                self._ensure_group_quietly()
            return result

    def _ensure_group_quietly(self) -> None:
        # A restarted Redis without its data lost the group; the next call retries anyway.
        with contextlib.suppress(redis.RedisError, OSError):
            self.group.ensure_group()

    def _pause(self, seconds: float) -> None:
        """Sleep for a backoff, cut short by a stop request."""
        deadline = time.monotonic() + seconds
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, _SIGNAL_CHECK_S))

    def _crash_point(self, point: str, count: int) -> None:
        if self.settings.fault_crash_at == point and count == self.settings.fault_crash_on_batch:
            log.warning("fault injection: SIGKILL", extra={"point": point, "count": count})
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)


def _wait(future: Future[T]) -> T:
    """``future.result()`` in short waits.

    The kernel may deliver SIGTERM to any thread (ours, or delta-rs' runtime
    threads); Python then runs the handler only when the main thread next runs
    bytecode, and a lock wait without a timeout does not wake for it. Short waits
    let a stop request be seen within a fraction of a second.
    """
    while True:
        try:
            return future.result(timeout=_SIGNAL_CHECK_S)
        except FutureTimeout:
            continue


def _backoff(settings: Settings, failures: int) -> float:
    base = min(settings.retry_max_s, settings.retry_initial_s * 2 ** (failures - 1))
    return float(base * random.uniform(0.5, 1.0))


def _as_fields(stats: ConsumerStats) -> dict[str, int]:
    return {name: getattr(stats, name) for name in stats.__slots__}
