"""Table upkeep the consumer does by itself: compaction of small files.

Each batch adds one small file to every symbol partition it touches; a 3-second
batch over 50 symbols makes ~1.4M files a day, and every open, append and read
slows with the file count. Every few commits one consumer of the group (the one
holding a short Redis lease) compacts the partitions that have gathered small
files, in a background thread with its own table handle: compaction commits
carry no app transaction and never conflict with the appends. Checkpoints are
written by the appends themselves every ``delta.checkpointInterval`` commits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import pyarrow as pa
import redis
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from shared.settings import Settings

log = logging.getLogger(__name__)

_LEASE_MS = 10 * 60 * 1000


def partitions_to_compact(table: DeltaTable, small_bytes: int, min_files: int) -> list[str]:
    """Symbols whose partition holds at least ``min_files`` files under ``small_bytes``."""
    actions = pa.table(table.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return []
    symbols = actions.column("partition.symbol").to_pylist()
    sizes = actions.column("size_bytes").to_pylist()
    small = Counter(s for s, size in zip(symbols, sizes, strict=True) if size < small_bytes)
    return sorted(s for s, n in small.items() if n >= min_files)


def compact_partitions(
    table: DeltaTable, symbols: list[str], target_bytes: int
) -> dict[str, object]:
    """Compact the given symbol partitions in one commit (insertion order is kept)."""
    metrics: dict[str, object] = table.optimize.compact(
        partition_filters=[("symbol", "in", symbols)], target_size=target_bytes
    )
    return metrics


class TableMaintainer:
    """Runs compaction in the background every ``maintenance_every_commits`` commits."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self._settings = settings
        self._client = client
        self._lease_key = f"poslake:{settings.stream}:{settings.group}:maintenance"
        self._thread: threading.Thread | None = None
        self.runs = 0
        self._last_trigger = 0
        self.last_error: str | None = None

    def after_commit(self, commits: int) -> None:
        if commits - self._last_trigger < self._settings.maintenance_every_commits:
            return
        self._last_trigger = commits
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._run, name="table-maintenance", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        token = self._settings.consumer_name
        try:
            if not self._client.set(self._lease_key, token, nx=True, px=_LEASE_MS):
                return  # another consumer is at it
        except redis.RedisError as exc:
            log.warning("maintenance lease unavailable", extra={"error": str(exc)})
            return
        try:
            self.run_once()
        finally:
            try:
                if self._client.get(self._lease_key) == token.encode():
                    self._client.delete(self._lease_key)
            except redis.RedisError:
                pass  # the lease expires by itself

    def run_once(self) -> list[str]:
        """Compact what needs it now; returns the symbols compacted."""
        s = self._settings
        started = time.perf_counter()
        try:
            table = DeltaTable(s.table_uri, storage_options=s.storage_options or None)
            symbols = partitions_to_compact(
                table, s.compact_small_file_bytes, s.compact_min_small_files
            )
            if symbols:
                metrics = compact_partitions(table, symbols, s.compact_target_file_bytes)
                log.info(
                    "compacted partitions",
                    extra={
                        "partitions": len(symbols),
                        "files_removed": metrics.get("numFilesRemoved"),
                        "files_added": metrics.get("numFilesAdded"),
                        "seconds": round(time.perf_counter() - started, 3),
                    },
                )
            self.runs += 1
            return symbols
        except (DeltaError, OSError) as exc:
            # A concurrent compaction of the same files loses; the next run retries.
            self.last_error = str(exc)
            log.warning("maintenance failed", extra={"error": str(exc)})
            return []
