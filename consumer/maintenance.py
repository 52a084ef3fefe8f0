"""Table upkeep the consumer does by itself: compaction, checkpoints, vacuum.

Each batch adds one small file to every symbol partition it touches; a 3-second
batch over 50 symbols makes ~1.4M files a day, and every open, append and read
slows with the file count. Every few commits one consumer of the group (the one
holding a short Redis lease) compacts the partitions that have gathered small
files, in a background thread with its own table handle: compaction commits
carry no app transaction and never conflict with the appends. Each run then
writes a checkpoint of every table (the consumers' commits write none: a
checkpoint holds every tombstone of the history window, too slow to write
inline) and drops log files past their retention. Once an hour
(``POSLAKE_VACUUM_INTERVAL_S``) the run also vacuums every table: files retired
longer ago than the history (``POSLAKE_HISTORY_RETENTION_HOURS``) are deleted.

The lease (``Settings.maintenance_lease_key``) needs SET, GET and DEL on its key;
without them maintenance never runs, or the lease stays held for its full
10 minutes. Such a failure is logged once (then every 10 minutes while it
lasts), counted (``poslake_consumer_maintenance_lease_errors_total``) and shown
by ``poslake status``. At stop the run is asked to end after its current step
and joined (a thread left inside delta-rs at interpreter exit crashes it).
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from consumer.vacuum import vacuum_table
from infra.redis_errors import refusal
from shared.kinds import KINDS, all_tables
from shared.settings import Settings
from shared.table import compact_partitions, partitions_to_compact

log = logging.getLogger(__name__)

LEASE_MS = 10 * 60 * 1000
_LEASE_WARNING_EVERY_S = 600.0


class TableMaintainer:
    """Runs compaction every ``maintenance_every_commits`` commits and vacuum every
    ``vacuum_interval_s`` seconds, in a background thread, one consumer at a time."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self._settings = settings
        self._client = client
        self._lease_key = settings.maintenance_lease_key
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.lease_errors = 0
        self.lease_error: str | None = None  # the last lease failure, one line
        self._lease_warned_at: float | None = None
        self.runs = 0
        self._last_trigger = 0
        self._next_vacuum_at = 0.0  # right after start, then on the interval
        self._checkpointed: dict[str, int] = {}  # table uri -> version of our last checkpoint
        self.last_error: str | None = None

    def after_commit(self, commits: int) -> None:
        """Call after each commit: compaction is due every few commits."""
        if commits - self._last_trigger < self._settings.maintenance_every_commits:
            return
        self._last_trigger = commits
        self._start(compact=True)

    def poll(self) -> None:
        """Call every loop turn, busy or idle: vacuum runs on the clock, not on commits,
        because a tombstone it has not seen within its margin is gone from the log."""
        if time.monotonic() >= self._next_vacuum_at:
            self._start(compact=False)

    def _start(self, compact: bool) -> None:
        if self._stop.is_set() or self.running():
            return
        vacuum = time.monotonic() >= self._next_vacuum_at
        if not (compact or vacuum):
            return
        if vacuum:  # retried in a minute unless it succeeds (a lost lease, a failure)
            self._next_vacuum_at = time.monotonic() + 60.0
        self._thread = threading.Thread(
            target=self._run, args=(compact, vacuum), name="table-maintenance", daemon=True
        )
        self._thread.start()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("stopping while table maintenance runs; it resumes after restart")

    def stop(self, timeout: float | None = None) -> None:
        """No new runs; the current one ends after its step; wait up to ``timeout``."""
        self._stop.set()
        self.wait(timeout)

    def _run(self, compact: bool, vacuum: bool) -> None:
        token = self._settings.consumer_name
        try:
            if not self._client.set(self._lease_key, token, nx=True, px=LEASE_MS):
                return  # another consumer is at it
        except (redis.RedisError, OSError) as exc:
            self._lease_failed(exc, "SET")
            return
        try:
            # Vacuum first: the compaction's checkpoint drops expired tombstones.
            if vacuum and not self._stop.is_set() and self.vacuum():
                self._next_vacuum_at = time.monotonic() + self._settings.vacuum_interval_s
            if compact and not self._stop.is_set():
                self.run_once()
        finally:
            command = "GET"
            try:
                if self._client.get(self._lease_key) == token.encode():
                    command = "DEL"
                    self._client.delete(self._lease_key)
                self.lease_error = None
            except (redis.RedisError, OSError) as exc:
                self._lease_failed(exc, command)  # it expires by itself, in 10 minutes

    def _lease_failed(self, exc: Exception, command: str) -> None:
        """Count a lease failure; warn on the first one, then every 10 minutes."""
        self.lease_errors += 1
        self.lease_error = str(refusal(exc, command, self._lease_key))
        now = time.monotonic()
        if self._lease_warned_at is None or now - self._lease_warned_at >= _LEASE_WARNING_EVERY_S:
            self._lease_warned_at = now
            log.warning(
                "maintenance lease failed: table maintenance cannot run as it should",
                extra={
                    "key": self._lease_key,
                    "command": command,
                    "error": self.lease_error,
                    "failures": self.lease_errors,
                },
            )

    def run_once(self) -> list[str]:
        """Compact every kind's history where it needs it now, then checkpoint every
        table; returns the partitions compacted. Each step stands alone: a failed
        compaction still checkpoints."""
        s = self._settings
        tables: dict[str, DeltaTable] = {}
        for name in all_tables():
            uri = s.lake_table_uri(name)
            try:
                tables[uri] = DeltaTable(uri, storage_options=s.storage_options or None)
            except TableNotFoundError:
                continue
            except Exception as exc:  # a background thread: log it, keep the other steps
                self._failed("open", uri, exc)
        symbols: list[str] = []
        for kind in KINDS:
            # Current tables are rewritten by their merges: only the histories pile up.
            uri = s.lake_table_uri(kind.table)
            if uri not in tables or self._stop.is_set():
                continue
            try:
                symbols += self._compact(tables[uri], kind.partition_by[0])
            except Exception as exc:
                self._failed("compaction", uri, exc)
        for uri, table in tables.items():
            if self._stop.is_set():
                break
            try:
                self._checkpoint(table, uri)
            except Exception as exc:
                self._failed("checkpoint", uri, exc)
        self.runs += 1
        return symbols

    def _compact(self, table: DeltaTable, column: str) -> list[str]:
        s = self._settings
        started = time.perf_counter()
        symbols = partitions_to_compact(
            table, s.compact_small_file_bytes, s.compact_min_small_files, column
        )
        if symbols:
            # A concurrent compaction of the same files loses; the next run retries.
            metrics = compact_partitions(table, symbols, s.compact_target_file_bytes, column)
            log.info(
                "compacted partitions",
                extra={
                    "partitions": len(symbols),
                    "files_removed": metrics.get("numFilesRemoved"),
                    "files_added": metrics.get("numFilesAdded"),
                    "table_version": table.version(),
                    "seconds": round(time.perf_counter() - started, 3),
                },
            )
        return symbols

    def _failed(self, step: str, uri: str, exc: Exception) -> None:
        self.last_error = f"{step}: {exc}"
        log.warning(
            "maintenance step failed", extra={"step": step, "table": uri, "error": str(exc)}
        )

    def _checkpoint(self, table: DeltaTable, uri: str) -> None:
        # The consumers' own commits write no checkpoints (consumer/sink.py): every run
        # writes one, so an open replays at most a run's worth of commits (and never a
        # compaction's thousands of removes), and drops the log files past retention.
        version = table.version()
        if self._checkpointed.get(uri) == version:
            return
        started = time.perf_counter()
        table.create_checkpoint()
        table.cleanup_metadata()
        self._checkpointed[uri] = version
        log.info(
            "checkpoint written",
            extra={
                "table": uri,
                "table_version": version,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )

    def vacuum(self) -> bool:
        """Vacuum every table (consumer/vacuum.py); False if any failed."""
        s = self._settings
        done = True
        for uri in map(s.lake_table_uri, all_tables()):
            if self._stop.is_set():
                return False
            try:
                table = DeltaTable(uri, storage_options=s.storage_options or None)
                vacuum_table(table, uri, s.history_retention_hours, s.storage_options)
            except TableNotFoundError:
                continue
            except Exception as exc:  # a background thread: log it, retry next time
                self._failed("vacuum", uri, exc)
                done = False
        return done
