"""One consumer process: read a batch, validate, dedup, commit to Delta, then settle.

At most two batches are in hand: one committing, the next being read. Redis
errors are retried with backoff around each call (the batches in hand stay in
hand); a failed Delta commit is retried with backoff without acknowledging
anything. SIGTERM/SIGINT stop the
reading; the batch in hand is committed and settled before exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from types import FrameType
from typing import TypeVar

import redis

from consumer.current import CurrentPositions
from consumer.group import ConsumerGroup, Page, RawFields
from consumer.maintenance import TableMaintainer
from consumer.settle import DeadLetter, Settler
from consumer.sink import DeltaSink
from shared.errors import CommitConflict, CommitFailed, StreamUnavailable
from shared.publisher import TRANSIENT_REDIS_ERRORS
from shared.settings import Settings
from shared.table import updates_to_arrow
from shared.wire import decode_entries, fields_as_dict

log = logging.getLogger(__name__)

T = TypeVar("T")

_IDLE_BLOCK_S = 0.5  # longest blocking read, so a stop request is seen promptly
_DRAIN_BLOCK_MS = 50


@dataclass(slots=True)
class Batch:
    """Entries in hand, as parallel lists in delivery order."""

    ids: list[bytes] = field(default_factory=list)
    fields: list[RawFields] = field(default_factory=list)
    deliveries: list[int] = field(default_factory=list)
    vanished: list[bytes] = field(default_factory=list)
    opened_at: float = 0.0
    in_flight: frozenset[bytes] = frozenset()
    _seen: set[bytes] | None = None

    def add(self, page: Page) -> None:
        if page.deliveries is None:
            # First deliveries (XREADGROUP >): new to everyone, nothing to filter.
            if page.ids and not self.ids:
                self.opened_at = time.monotonic()
            self.ids.extend(page.ids)
            self.fields.extend(page.fields)
            self.deliveries.extend([1] * len(page.ids))
            if self._seen is not None:
                self._seen.update(page.ids)
        else:
            # A claim scan or pending re-read can hand back an entry already in hand
            # (here, or in the batch being committed meanwhile).
            if self._seen is None:
                self._seen = set(self.ids) | self.in_flight
            seen = self._seen
            for entry_id, fields, count in zip(page.ids, page.fields, page.deliveries, strict=True):
                if entry_id not in seen:
                    if not self.ids:
                        self.opened_at = time.monotonic()
                    seen.add(entry_id)
                    self.ids.append(entry_id)
                    self.fields.append(fields)
                    self.deliveries.append(count)
        self.vanished.extend(page.vanished)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def empty(self) -> bool:
        return not self.ids and not self.vanished


@dataclass(slots=True)
class ConsumerStats:
    batches: int = 0
    entries: int = 0
    rows_written: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    commit_retries: int = 0
    redis_retries: int = 0


class Consumer:
    """A member of the consumer group writing to the Delta table."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.client = client or redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=30,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        self.group = ConsumerGroup(self.client, settings)
        self.settler = Settler(self.client, settings.stream, settings.group, settings.consumer_name)
        self.stats = ConsumerStats()
        self.current: CurrentPositions | None = None  # opened with the sink in run()
        # For metrics and health (consumer/metrics.py): batch observer, loop heartbeat.
        self.on_batch: Callable[[int, float], None] | None = None
        self.heartbeat = time.monotonic()
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

    def run(self, drain: bool = False) -> int:
        """Consume until stopped (or, with ``drain``, until the group has nothing left)."""
        s = self.settings
        self._redis(self.group.ensure_group)
        sink = self._open_sink()
        maintainer = TableMaintainer(s, self.client)
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
            exit_code = self._consume(sink, maintainer, drain)
        except StreamUnavailable as exc:
            log.error("stopped without redis", extra={"error": str(exc)})
            exit_code = 1
        maintainer.wait()
        log.info(
            "consumer stopped",
            extra={"consumer": s.consumer_name, "exit_code": exit_code, **_as_fields(self.stats)},
        )
        return exit_code

    def _consume(self, sink: DeltaSink, maintainer: TableMaintainer, drain: bool) -> int:
        exit_code = 0
        # The next batch is read in a second thread while this one commits: the Delta
        # write runs in Rust without the GIL, so reading and writing overlap on two cores.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reader") as reader:
            upcoming: Future[Batch] | None = reader.submit(self._collect, drain, frozenset())
            while upcoming is not None:
                self.heartbeat = time.monotonic()
                batch = upcoming.result()
                upcoming = None
                if batch.empty:
                    if self._stopping or (drain and self._drained()):
                        break
                    upcoming = reader.submit(self._collect, drain, frozenset())
                    continue
                if not self._stopping:
                    in_flight = frozenset(batch.ids)
                    upcoming = reader.submit(self._collect, drain, in_flight)
                if not self._process(batch, sink):
                    exit_code = 1
                    self._stopping = True  # the reader returns what it holds; left pending
                    if upcoming is not None:
                        upcoming.result()
                    break
                maintainer.after_commit(sink.commits)
        return exit_code

    # -- reading -------------------------------------------------------------

    def _collect(self, drain: bool, in_flight: frozenset[bytes]) -> Batch:
        """Read one batch; ``in_flight`` are entries of the batch being committed meanwhile."""
        s = self.settings
        batch = Batch(in_flight=in_flight)
        while len(batch) < s.batch_max_entries and not self._stopping:
            room = min(s.read_count, s.batch_max_entries - len(batch))
            if not self.group.own_pending_done:
                batch.add(self._redis(partial(self.group.read_own_pending, room)))
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
            page = self._redis(partial(self.group.read_new, room, block_ms))
            if not page.ids and drain:
                break  # nothing new: commit what is in hand, then check if drained
            batch.add(page)
        return batch

    def _claim_once(self, batch: Batch) -> None:
        page, more = self._redis(self.group.claim_page)
        batch.add(page)
        self._claim_pages += 1
        self._claim_scan_open = more
        if not more:
            self._next_claim_at = time.monotonic() + self.settings.claim_interval_s
        else:
            self._crash_point("mid_claim", self._claim_pages)

    def _drained(self) -> bool:
        if self._redis(self.group.group_pending) > 0:
            # Someone else's entries: claimable once idle long enough.
            self._next_claim_at = 0.0
            time.sleep(min(0.2, max(0.01, self.settings.claim_min_idle_s / 4)))
            return False
        return not self._redis(self.group.has_undelivered)

    # -- processing ----------------------------------------------------------

    def _process(self, batch: Batch, sink: DeltaSink) -> bool:
        s = self.settings
        self.stats.batches += 1
        dead: list[DeadLetter] = []
        limit = s.max_deliveries
        max_count = max(batch.deliveries, default=0)
        if max_count > limit:
            keep = [i for i, n in enumerate(batch.deliveries) if n <= limit]
            dead = [
                DeadLetter(
                    batch.ids[i],
                    fields_as_dict(batch.fields[i]),
                    f"delivered {n} times (limit {limit})",
                    n,
                )
                for i, n in enumerate(batch.deliveries)
                if n > limit
            ]
            entries = [(batch.ids[i], batch.fields[i]) for i in keep]
        else:
            entries = list(zip(batch.ids, batch.fields, strict=True))
        decoded = decode_entries(entries)
        # The raw replies are no longer needed (poison keeps its own copy): free them
        # before the commit, while the next batch is being read.
        del entries
        batch.fields.clear()
        if decoded.poison:
            counts = dict(zip(batch.ids, batch.deliveries, strict=True))
            dead.extend(
                DeadLetter(p.entry_id, p.fields, p.reason, counts[p.entry_id])
                for p in decoded.poison
            )
        self._crash_point("after_read", self.stats.batches)

        rows = updates_to_arrow(decoded.updates, decoded.entry_ids)
        outcome = self._commit_with_retry(lambda: sink.commit_rows(rows))
        if outcome is None:
            return False
        self._crash_point("after_commit", self.stats.batches)
        # Every valid update of the batch, replays included: after a crash between the
        # two commits, the replay repairs positions_current (consumer/current.py).
        current = self.current
        assert current is not None
        merged = self._commit_with_retry(lambda: current.merge(rows))
        if merged is None:
            return False
        self._crash_point("after_current", self.stats.batches)

        ids = batch.ids + batch.vanished
        self._redis(lambda: self.settler.settle(ids, dead))
        self.stats.entries += len(batch.ids)
        self.stats.rows_written += outcome.rows_written
        self.stats.duplicates += outcome.duplicates
        self.stats.dead_letters += len(dead)
        if self.on_batch is not None:
            self.on_batch(len(batch.ids), outcome.seconds)
        log.info(
            "batch settled",
            extra={
                "consumer": s.consumer_name,
                "first_id": ids[0].decode() if ids else "",
                "last_id": ids[-1].decode() if ids else "",
                "entries": len(batch.ids),
                "rows": outcome.rows_written,
                "duplicates": outcome.duplicates,
                "dead_letters": len(dead),
                "max_delivery_count": max_count,
                "table_version": outcome.table_version,
                "commit_s": round(outcome.seconds, 4),
                "current_merge_s": round(merged, 4),
            },
        )
        return True

    def _commit_with_retry(self, commit: Callable[[], T]) -> T | None:
        """Run a Delta commit until it lands; None if stopping after repeated failures."""
        s = self.settings
        failures = 0
        while True:
            try:
                return commit()
            except CommitConflict as exc:
                # Lost a race with another consumer: re-check against its rows right away.
                self.stats.commit_retries += 1
                log.info("commit conflict, retrying", extra={"error": str(exc)})
                time.sleep(random.uniform(0, 0.05))
            except CommitFailed as exc:
                self.stats.commit_retries += 1
                failures += 1
                if self._stopping and failures > 3:
                    log.error("giving up on stop; batch stays pending", extra={"error": str(exc)})
                    return None
                delay = _backoff(s, failures)
                log.error("commit failed, will retry", extra={"error": str(exc), "delay_s": delay})
                time.sleep(delay)

    # -- helpers -------------------------------------------------------------

    def _open_sink(self) -> DeltaSink:
        failures = 0
        while True:
            try:
                sink = DeltaSink(self.settings)
                self.current = CurrentPositions(self.settings)
                return sink
            except (CommitFailed, OSError, Exception) as exc:
                failures += 1
                if self._stopping:
                    raise
                delay = _backoff(self.settings, failures)
                log.error(
                    "cannot open table, retrying", extra={"error": str(exc), "delay_s": delay}
                )
                time.sleep(delay)

    def _redis(self, call: Callable[[], T]) -> T:
        """Run a Redis call, reconnecting with backoff while the server is away."""
        failures = 0
        while True:
            try:
                result = call()
                if failures:
                    log.info(
                        "redis reachable again", extra={"consumer": self.settings.consumer_name}
                    )
                    self._ensure_group_quietly()
                return result
            except TRANSIENT_REDIS_ERRORS as exc:
                failures += 1
                self.stats.redis_retries += 1
                if self._stopping and failures > 5:
                    # Stop anyway: whatever is unacknowledged stays pending and replays.
                    raise StreamUnavailable(f"redis unavailable while stopping: {exc}") from exc
                delay = _backoff(self.settings, failures)
                log.warning(
                    "redis unavailable, retrying", extra={"error": str(exc), "delay_s": delay}
                )
                time.sleep(delay)

    def _ensure_group_quietly(self) -> None:
        with contextlib.suppress(*TRANSIENT_REDIS_ERRORS):
            self.group.ensure_group()  # the next call retries anyway

    def _crash_point(self, point: str, count: int) -> None:
        if self.settings.fault_crash_at == point and count == self.settings.fault_crash_on_batch:
            log.warning("fault injection: SIGKILL", extra={"point": point, "count": count})
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)


def _backoff(settings: Settings, failures: int) -> float:
    base = min(settings.retry_max_s, settings.retry_initial_s * 2 ** (failures - 1))
    return float(base * random.uniform(0.5, 1.0))


def _as_fields(stats: ConsumerStats) -> dict[str, int]:
    return {name: getattr(stats, name) for name in stats.__slots__}
