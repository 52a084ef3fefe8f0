"""Deleting the files the tables retired, once the history no longer needs them.

Two passes, both safe to run while consumers append:

1. delta-rs' *lite* vacuum: files with a tombstone older than the history
   window. Only tombstoned files are candidates, so a file a writer has not
   committed yet is never touched. (delta-rs' *full* mode is no use here: it
   deletes every unreferenced file, young tombstones included, which breaks
   time travel inside the window.)
2. An orphan sweep, for what the lite vacuum cannot see: a tombstone expires
   from the checkpoints ``TOMBSTONE_MARGIN_HOURS`` after the history window, so
   a file whose tombstone expired before any vacuum ran (consumers down for
   hours, a shortened history) would stay on disk for good, as would the file
   of a write whose commit failed. The sweep deletes data files that are
   neither live nor tombstoned in the current snapshot and are older than an
   hour (a file being written and committed right now is younger: a writer
   puts its data files and then its commit within one batch, seconds; an hour
   is far past any commit's retries). Such a file is needed by no version
   inside the window: every file retired inside it still has its tombstone.
   The sweep lists and deletes through delta-rs' own store handler, with the
   lake's storage options: a local folder and an object store alike (there the
   age is the object's last-modified time).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping
from urllib.parse import unquote

import pyarrow as pa
from deltalake import DeltaTable
from deltalake.fs import DeltaStorageHandler
from pyarrow.fs import FileSelector, FileType

from shared.settings import TOMBSTONE_MARGIN_HOURS
from shared.table import TOMBSTONE_RETENTION

log = logging.getLogger(__name__)

ORPHAN_MIN_AGE_S = 3600.0
_INTERVAL = re.compile(r"^\s*interval\s+(\d+(?:\.\d+)?)\s+([a-z]+?)s?\s*$", re.IGNORECASE)
_UNIT_S = {
    "second": 1,
    "sec": 1,
    "minute": 60,
    "min": 60,
    "hour": 3600,
    "day": 86400,
    "week": 604800,
}


def interval_seconds(text: str) -> float | None:
    """Seconds of a Delta interval property (``interval 93600 seconds``); None if unknown."""
    match = _INTERVAL.match(text)
    if match is None or match.group(2).lower() not in _UNIT_S:
        return None
    return float(match.group(1)) * _UNIT_S[match.group(2).lower()]


def history_hours(table: DeltaTable, configured: float) -> float:
    """The history window to keep: the setting, or the table's, whichever is longer.

    The table's is its tombstone retention less the margin; it is longer than the
    setting when an operator raised the history (``poslake maintain``) while this
    process still runs with the old value.
    """
    text = table.metadata().configuration.get(TOMBSTONE_RETENTION)
    seconds = interval_seconds(text) if text else None
    from_table = seconds / 3600 - TOMBSTONE_MARGIN_HOURS if seconds is not None else 0.0
    return max(configured, from_table)


def vacuum_retired(table: DeltaTable, history: float) -> list[str]:
    """Lite vacuum: delete files retired more than ``history`` hours ago."""
    removed: list[str] = table.vacuum(
        retention_hours=math.ceil(history), dry_run=False, enforce_retention_duration=False
    )
    return removed


def sweep_orphans(
    table: DeltaTable,
    storage_options: Mapping[str, str] | None = None,
    min_age_s: float = ORPHAN_MIN_AGE_S,
) -> list[str]:
    """Delete data files of the table that are neither live nor tombstoned, and old.

    Returns their paths relative to the table's root. The table is brought up to
    date first: a stale snapshot would not know the files committed since.
    """
    table.update_incremental()
    # The log holds paths URL-encoded (a folder "symbol=BRK%20B" as "BRK%2520B"):
    # decoded once, they are the names in the store.
    known = {unquote(p) for p in pa.table(table.get_add_actions()).column("path").to_pylist()}
    # Every tombstoned file still there, whatever its age: a dry run lists them, by
    # their names in the store already.
    known.update(table.vacuum(retention_hours=0, dry_run=True, enforce_retention_duration=False))
    handler = DeltaStorageHandler(table.table_uri, dict(storage_options or {}) or None)
    cutoff = time.time() - min_age_s
    swept: list[str] = []
    for info in handler.get_file_info_selector(FileSelector("", recursive=True)):
        name = info.path.lstrip("/")
        if info.type != FileType.File or not name.endswith(".parquet") or name in known:
            continue
        if name.split("/", 1)[0].startswith(("_", ".")):  # _delta_log and the like
            continue
        if info.mtime is None or info.mtime.timestamp() >= cutoff:
            continue  # maybe being written and committed right now
        try:
            handler.delete_file(name)
        except FileNotFoundError:
            continue
        swept.append(name)
    return swept


def vacuum_table(
    table: DeltaTable,
    uri: str,
    configured_history: float,
    storage_options: Mapping[str, str] | None = None,
) -> int:
    """Both passes on one table; returns the number of files deleted."""
    started = time.perf_counter()
    history = history_hours(table, configured_history)
    removed = vacuum_retired(table, history)
    swept = sweep_orphans(table, storage_options)
    log.info(
        "vacuumed",
        extra={
            "table": uri,
            "files_deleted": len(removed),
            "orphans_deleted": len(swept),
            "history_hours": history,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return len(removed) + len(swept)
