"""One consumer process: read a batch, validate, dedup, commit to Delta, then settle.

A batch holds entries of every kind (shared/kinds.py); each kind's rows go to its
own history table (one :class:`DeltaSink` per kind) and, for kinds that have one,
its current table. At most three batches are in hand: one merging into the
current tables and settling, one committing to the histories, the next being read. Redis
failures are classified (consumer/redis_calls.py): transient ones (connection
loss, OOM, LOADING, BUSY, failover replies) and, once running, a password that
stopped working are retried with backoff around each call while the process
reports itself unhealthy (the batches in hand stay in hand, unacknowledged);
fatal ones (NOPERM, a wrong password at start, an unknown command) stop the
consumer with one line and exit code 6 after every thread has stopped. A failed
Delta commit is retried with backoff without acknowledging anything; a commit
that fails because of its rows is bisected to dead-letter them (consumer/sink.py).
SIGTERM/SIGINT, at any moment from the first import on, stop the reading; the
batch in hand is committed and settled before exit. Batches and their decoding:
consumer/batch.py.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from consumer.batch import Batch
from consumer.current import CurrentWriter
from consumer.group import ConsumerGroup
from consumer.maintenance import TableMaintainer
from consumer.redis_calls import SIGNAL_CHECK_S, RedisCalls, backoff, pause
from consumer.settle import DeadLetter, Settler
from consumer.sink import CommitOutcome, DeltaSink
from consumer.snapshots import SnapshotCloser
from consumer.store_check import check_put_if_absent
from consumer.trim import StreamTrimmer
from consumer.upsert import UpsertWriter
from infra.redis_conn import sync_client
from infra.stopping import take_early
from shared.errors import (
    CommitConflict,
    CommitFailed,
    ConfigError,
    ExitCode,
    RedisRefused,
    StreamUnavailable,
)
from shared.kinds import KINDS, EntryKind
from shared.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

_IDLE_BLOCK_S = 0.5  # longest blocking read, so a stop request is seen promptly
_DRAIN_BLOCK_MS = 50
# At stop, how long to let a running compaction or vacuum finish: both are safe to
# cut short (a compaction commits atomically, a vacuum resumes at the next start).
_MAINTENANCE_STOP_WAIT_S = 20.0


@dataclass(frozen=True, slots=True)
class CommittedBatch:
    """A batch whose history commit landed, on its way to the merge and the ack."""

    number: int  # 1-based count of this process's batches
    ids: list[bytes]  # every entry to acknowledge: read ones, then vanished ones
    entries: int  # entries read (without the vanished)
    max_count: int
    rows: dict[EntryKind, pa.Table]  # per kind, every valid row (for the current merges)
    dead: list[DeadLetter]
    outcome: CommitOutcome  # of every kind's history commit together


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
    snapshots_complete: int = 0
    snapshots_incomplete: int = 0
    snapshot_closes: int = 0


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
        self.settler = Settler(
            self.client,
            settings.stream,
            settings.group,
            settings.consumer_name,
            settings.dlq_max_entries,
        )
        self.trimmer = StreamTrimmer(
            settings, lambda call: self._redis(call, "EVAL", settings.stream), self.client
        )
        self.stats = ConsumerStats()
        self._stats_lock = threading.Lock()
        self._batches_in_hand = 0  # numbers batches for the crash points
        # Opened in run(): per kind its history writer and, if it has one, current writer.
        self.sinks: dict[EntryKind, DeltaSink | UpsertWriter] = {}
        self.currents: dict[EntryKind, CurrentWriter] = {}
        self.closers: dict[EntryKind, SnapshotCloser] = {}  # per snapshot kind
        # For metrics and health (consumer/metrics.py): batch observer, loop heartbeat.
        self.on_batch: Callable[[int, float], None] | None = None
        self.heartbeat = time.monotonic()
        self.redis_calls = RedisCalls(
            settings, self.group, lambda: self._stopping, lambda: self._count("redis_retries")
        )
        self.redis_health = self.redis_calls.health
        # Why the consumer stopped for good: Redis refused us (exit 6), or the lake's
        # store cannot be written safely (exit 2). One line, printed by the entry point.
        self.refused: str | None = None
        self.maintainer: TableMaintainer | None = None
        self._stopping = False
        self._next_claim_at = 0.0
        self._claim_scan_open = False
        self._claim_pages = 0
        self._mean_entry_bytes = 0  # of the last page read; 0 until one is

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
        except ConfigError as exc:  # found out at start: the lake's store is not safe
            self._stopping = True
            self.refused = str(exc)
            log.error("cannot write to the lake, stopping", extra={"error": self.refused})
            exit_code = ExitCode.BAD_INPUT
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
            self._redis(self.settler.check_transactions, "MULTI")
            opened = self._open_tables()
        except StreamUnavailable:
            return ExitCode.OK  # stopped during start-up: nothing in hand
        if not opened:
            return ExitCode.OK
        self.redis_calls.started = True
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
            exit_code = self._consume(self.maintainer, drain)
            if exit_code == ExitCode.OK:
                self.trimmer.poll(force=True)  # what this run acknowledged, trimmed now
            return exit_code
        except StreamUnavailable as exc:
            log.error("stopped without redis", extra={"error": str(exc)})
            return ExitCode.FAILED

    def _consume(self, maintainer: TableMaintainer, drain: bool) -> int:
        # Three stages overlap, each in its own thread: reading batch N+2 (with a
        # fourth thread decoding its pages while the reader waits for the next one),
        # the history commit of batch N+1 (here), and the current tables' merges and
        # settlement of batch N (the finisher). The Delta writes run in Rust without
        # the GIL, so they use both cores. Batches settle in order, one at a time; a
        # crash anywhere leaves the unsettled ones pending, and their replay is a
        # no-op for the history and repairs the current tables (consumer/current.py).
        # Executors shut down in reverse: the finisher, then the reader (it may still
        # hand pages to the decoder), then the decoder.
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder") as decoder,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="reader") as reader,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="finisher") as finisher,
        ):
            try:
                return self._pipeline(maintainer, drain, decoder, reader, finisher)
            finally:
                # Whatever ends the loop (an unexpected error included), the reader must
                # stop too, or shutting its executor down would wait on it for good.
                self._stopping = True

    def _pipeline(
        self,
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
            self.trimmer.poll()
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
            committed = self._commit_history(batch)
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
            maintainer.after_commit(sum(sink.commits for sink in self.sinks.values()))
        if finishing is not None and not _wait(finishing):
            exit_code = 1
        return exit_code

    # -- reading -------------------------------------------------------------

    def _collect(
        self, drain: bool, in_flight: frozenset[bytes], decoder: Executor | None = None
    ) -> Batch:
        """Read one batch; ``in_flight`` are entries of the unsettled batches in hand."""
        s = self.settings
        batch = Batch(
            s.max_deliveries,
            decoder,
            s.max_entry_bytes,
            mean_entry_bytes=self._mean_entry_bytes,
            in_flight=in_flight,
        )
        read = ("XREADGROUP", s.stream)
        while (
            len(batch) < s.batch_max_entries
            and batch.size_bytes < s.batch_max_bytes
            and not self._stopping
        ):
            room = min(s.read_count, s.batch_max_entries - len(batch))
            if batch.mean_entry_bytes:
                # Big entries: read fewer at a time, so a reply stays within the batch's bytes.
                room = max(
                    1, min(room, (s.batch_max_bytes - batch.size_bytes) // batch.mean_entry_bytes)
                )
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
        self._mean_entry_bytes = batch.mean_entry_bytes  # sizes the next batch's first read
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

    def _commit_history(self, batch: Batch) -> CommittedBatch | None:
        """Append the batch's new rows to each kind's history; None if stopping after
        failures."""
        self._batches_in_hand += 1
        number = self._batches_in_hand
        dead = batch.dead
        tables = batch.tables()
        self._crash_point("after_read", number)
        outcomes: list[CommitOutcome] = []
        for kind, rows in tables.items():
            sink = self.sinks[kind]
            landed = self._commit_with_retry(partial(sink.commit_isolating, rows), "commit_retries")
            if landed is None:
                return None
            outcome, rejected = landed
            outcomes.append(outcome)
            if rejected:
                # Rows the table cannot hold: dead-lettered with the batch, kept out of the merge.
                dead = dead + self._rejected_letters(batch, rejected)
                tables[kind] = _without(rows, {entry_id for entry_id, _ in rejected})
        self._crash_point("after_commit", number)
        return CommittedBatch(
            number=number,
            ids=batch.ids + batch.vanished,
            entries=len(batch.ids),
            max_count=batch.max_count,
            rows=tables,
            dead=dead,
            outcome=_combined(outcomes),
        )

    def _finish(self, committed: CommittedBatch) -> bool:
        """Merge into the current tables, then settle: the batch's second commit and its ack.

        Every valid row of the batch goes into the merge, replays included: after a
        crash between the two commits, the replay repairs the current tables.
        """
        merged = 0.0
        ids, dead, outcome = committed.ids, committed.dead, committed.outcome
        for kind, rows in committed.rows.items():
            current = self.currents.get(kind)
            if current is None:
                continue
            result = self._commit_with_retry(
                partial(current.merge_isolating, rows), "current_commit_retries"
            )
            if result is None:
                return False
            seconds, rejected = result
            merged += seconds
            if rejected:
                # In the history already, but the current table cannot hold them: say so.
                rejected = [(i, f"{reason} (the row is in {kind.table})") for i, reason in rejected]
                dead = dead + self._rejected_letters(None, rejected)
        for closer in self.closers.values():
            closer.after_append = partial(self._crash_point, "after_close", committed.number)
            closed = self._commit_with_retry(
                partial(closer.apply, committed.rows), "current_commit_retries"
            )
            if closed is None:
                return False
            self._count("snapshots_complete", closed.complete)
            self._count("snapshots_incomplete", closed.incomplete)
            self._count("snapshot_closes", closed.closed)
        self._crash_point("after_current", committed.number)
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
                delay = backoff(s, failures)
                log.error("commit failed, will retry", extra={"error": str(exc), "delay_s": delay})
                self._pause(delay)

    def _rejected_letters(
        self, batch: Batch | None, rejected: list[tuple[str, str]]
    ) -> list[DeadLetter]:
        """Dead letters for entries whose rows the table rejected, with their original
        fields read back from the stream (rare: only after a rejected commit)."""
        letters = []
        for entry_id, reason in rejected:
            raw = entry_id.encode()
            found: Any = self._redis(
                partial(self.client.xrange, self.settings.stream, min=entry_id, max=entry_id),
                "XRANGE",
                self.settings.stream,
            )
            fields: dict[bytes, bytes] = dict(found[0][1]) if found else {}
            # Per-entry counts are not kept past decoding: the batch's highest bounds it.
            count = batch.max_count if batch is not None else 1
            letters.append(
                DeadLetter.bounded(raw, fields, reason, count, self.settings.max_entry_bytes)
            )
        return letters

    # -- helpers -------------------------------------------------------------

    def _count(self, stat: str, n: int = 1) -> None:
        # The reader, this thread and the finisher all count: += is not atomic.
        with self._stats_lock:
            setattr(self.stats, stat, getattr(self.stats, stat) + n)

    def _open_tables(self) -> bool:
        """Check the lake's store (consumer/store_check.py), then open every kind's tables,
        retrying while the store fails; False if stopped meanwhile. Raises
        :class:`ConfigError` when the store cannot be written safely."""
        failures = 0
        checked = False
        while not self._stopping:
            try:
                if not checked:
                    check_put_if_absent(self.settings.lake_uri, self.settings.storage_options)
                    checked = True
                sinks = {kind: history_writer(self.settings, kind) for kind in KINDS}
                currents = {
                    kind: CurrentWriter(self.settings, kind)
                    for kind in KINDS
                    if kind.current is not None
                }
                closers = {
                    kind: SnapshotCloser(self.settings, kind, currents[kind.snapshot.closes])
                    for kind in KINDS
                    if kind.snapshot is not None
                }
            except ConfigError:
                raise
            except Exception as exc:  # a store away, a lake not mounted yet: wait for it
                failures += 1
                delay = backoff(self.settings, failures)
                log.error(
                    "cannot open table, retrying", extra={"error": str(exc), "delay_s": delay}
                )
                self._pause(delay)
                continue
            self.sinks, self.currents, self.closers = sinks, currents, closers
            return True
        return False

    def _redis(
        self, call: Callable[[], T], command: str | None = None, key: str | None = None
    ) -> T:
        """Run a Redis call under the consumer's retry policy (consumer/redis_calls.py)."""
        return self.redis_calls.run(call, command, key)

    def _pause(self, seconds: float) -> None:
        pause(seconds, lambda: self._stopping)

    def _crash_point(self, point: str, count: int) -> None:
        if self.settings.fault_crash_at == point and count == self.settings.fault_crash_on_batch:
            log.warning("fault injection: SIGKILL", extra={"point": point, "count": count})
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)


def history_writer(settings: Settings, kind: EntryKind) -> DeltaSink | UpsertWriter:
    """The writer of a kind's history table: appended with dedup, or upserted by its rule."""
    return DeltaSink(settings, kind) if kind.upsert is None else UpsertWriter(settings, kind)


def _wait(future: Future[T]) -> T:
    """``future.result()`` in short waits.

    The kernel may deliver SIGTERM to any thread (ours, or delta-rs' runtime
    threads); Python then runs the handler only when the main thread next runs
    bytecode, and a lock wait without a timeout does not wake for it. Short waits
    let a stop request be seen within a fraction of a second.
    """
    while True:
        try:
            return future.result(timeout=SIGNAL_CHECK_S)
        except FutureTimeout:
            continue


def _without(rows: pa.Table, stream_ids: set[str]) -> pa.Table:
    """``rows`` without those of the given entries."""
    keep = pc.invert(pc.is_in(rows.column("stream_id"), pa.array(sorted(stream_ids))))
    return rows.filter(keep)


def _combined(outcomes: list[CommitOutcome]) -> CommitOutcome:
    """One outcome for a batch's commits to several tables (the first one's version)."""
    if len(outcomes) == 1:
        return outcomes[0]
    return CommitOutcome(
        sum(o.rows_written for o in outcomes),
        sum(o.duplicates for o in outcomes),
        outcomes[0].table_version if outcomes else -1,
        sum(o.seconds for o in outcomes),
    )


def _as_fields(stats: ConsumerStats) -> dict[str, int]:
    return {name: getattr(stats, name) for name in stats.__slots__}
