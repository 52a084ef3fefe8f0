"""Appending a batch to a kind's history table exactly once, even with several consumers.

One :class:`DeltaSink` per entry kind (shared/kinds.py): the writer is generic
over the kind's table, schema and dedup key.

Every commit carries a Delta app transaction (``txn``) under one id shared by
the whole consumer group. Delta rejects a commit whose snapshot is older than
another commit carrying the same app id, so consumer commits are serialised:
a consumer that lost the race re-reads what the winner added, deduplicates
against it, and tries again. Compaction commits carry no ``txn`` and never
conflict with appends.

A commit that fails because of the rows it carries (:class:`RowsRejected`: a
partition folder name too long for the file system, say) is retried in halves
(:meth:`DeltaSink.commit_isolating`): halves that commit are fine, the rows that
fail alone are returned to be dead-lettered. Each piece is an ordinary commit
with its own ``txn`` version and dedup, so a batch landed in several pieces, or
retried after some of them landed, still lands every row once.

A commit whose reply was lost (an object store that stored the log file, then
timed out or answered 503; delta-rs' retry of the PUT then meets its own file and
reports a conflict) is not taken as failed: after any commit error the table is
refreshed and, if the group's transaction version reached the one this commit
carried, the versions since the snapshot are searched for this commit's id
(:func:`landed_despite_error`). Found, the commit counts as done; not found, the
error stands and the retry's dedup sees whatever did land.
"""

from __future__ import annotations

import errno
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from deltalake import (
    CommitProperties,
    DeltaTable,
    PostCommitHookProperties,
    Transaction,
    write_deltalake,
)
from deltalake.exceptions import CommitFailedError, DeltaError

from consumer.dedup import CommittedKeyIndex
from shared.errors import CommitConflict, CommitFailed, RowsRejected
from shared.kinds import POSITIONS, EntryKind
from shared.settings import Settings
from shared.table import open_or_create_table

log = logging.getLogger(__name__)

# The consumers' commits never write checkpoints or clean the log themselves: a
# checkpoint carries every tombstone of the history window, and writing it inline
# would stall a batch for seconds. consumer/maintenance.py does it in the background.
NO_CHECKPOINT = PostCommitHookProperties(create_checkpoint=False, cleanup_expired_logs=False)


def group_app_id(settings: Settings) -> str:
    """The app id of every commit the group's consumers make to a kind's tables: one per
    table log, shared by the group, so their commits serialise."""
    return f"poslake:{settings.stream}:{settings.group}"


def open_kind_table(settings: Settings, kind: EntryKind, name: str | None = None) -> DeltaTable:
    """A kind's table (its history unless ``name`` says another of its tables), created
    with the kind's schema and partitions on first use."""
    name = name or kind.table
    return open_or_create_table(
        settings.lake_table_uri(name),
        settings.storage_options or None,
        settings.checkpoint_interval,
        settings.history_retention_hours,
        schema=kind.schema,
        partition_by=kind.partition_by,
        name=name,
    )


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    """What one batch did to the table."""

    rows_written: int
    duplicates: int
    table_version: int
    seconds: float
    cold_keys_checked: int = 0

    def then(self, later: CommitOutcome) -> CommitOutcome:
        """This outcome followed by ``later`` (a batch landed in pieces)."""
        return CommitOutcome(
            self.rows_written + later.rows_written,
            self.duplicates + later.duplicates,
            later.table_version,
            self.seconds + later.seconds,
        )


class DeltaSink:
    """The consumer's one writer to a kind's history table, with its dedup index."""

    def __init__(self, settings: Settings, kind: EntryKind = POSITIONS) -> None:
        self._settings = settings
        self.kind = kind
        self.table = open_kind_table(settings, kind)
        # One app id per table, shared by the group: each table's log serialises its own.
        self.app_id = group_app_id(settings)
        self.index = CommittedKeyIndex(
            settings.dedup_index_max_keys, settings.storage_options or None, kind
        )
        self.index.bootstrap(self.table)
        self._own_commit_ids: set[str] = set()
        self.commits = 0
        # Test hook: runs between the dedup check and the write, to force a race.
        self.before_write: Callable[[], object] | None = None

    def commit(self, updates: Sequence[Any], entry_ids: Sequence[bytes]) -> CommitOutcome:
        """Append the observations (of this sink's kind) whose keys the table lacks, in
        one commit.

        Raises :class:`CommitConflict` when another consumer committed first (call
        again: the retry sees its rows), :class:`RowsRejected` when the rows
        themselves cannot be written (see :meth:`commit_isolating`) and
        :class:`CommitFailed` for any other failure. Either way nothing of this
        batch is in the table, or, if the outcome was unknown, the next call finds
        out and does not write it twice.
        """
        return self.commit_rows(self.kind.to_rows(updates, entry_ids))

    def commit_rows(self, rows: pa.Table) -> CommitOutcome:
        """:meth:`commit` for rows already built by the kind's row builder.

        ``rows`` may be several such tables concatenated; their ``stream_id``
        column names the entries (first and last go into the commit's metadata).
        """
        started = time.perf_counter()
        first_entry, last_entry = _stream_id(rows, 0), _stream_id(rows, -1)
        try:
            self.table.update_incremental()
        except (DeltaError, OSError) as exc:
            raise CommitFailed(f"cannot read table state: {exc}") from exc
        try:
            self.index.sync(self.table, self._own_commit_ids)
        except (DeltaError, OSError, pa.ArrowException) as exc:
            # E.g. the files of a version were vacuumed: starting the index afresh is
            # always correct (older keys are then checked in the table).
            log.warning("dedup index re-bootstrapped", extra={"error": str(exc)})
            try:
                self.index.bootstrap(self.table)
            except (DeltaError, OSError) as again:
                raise CommitFailed(f"cannot read table state: {again}") from again
        keys = self.index.keys_for(rows)
        fresh = self.index.split_new(keys, rows, self.table)
        duplicates = rows.num_rows - len(fresh)
        if not fresh:
            return CommitOutcome(0, duplicates, self.table.version(), time.perf_counter() - started)
        if len(fresh) < rows.num_rows:
            rows = rows.take(pa.array(fresh, pa.int64()))
        metadata = {"poslake.first_entry": first_entry, "poslake.last_entry": last_entry}
        commit_id = append_in_group(
            self.table, rows, self.app_id, self._settings.consumer_name, self.kind.table,
            metadata, self.before_write,
        )  # fmt: skip
        self._own_commit_ids.add(commit_id)
        self.index.add_committed(keys, fresh)
        self.commits += 1
        elapsed = time.perf_counter() - started
        log.debug(
            "committed",
            extra={
                "rows": rows.num_rows,
                "duplicates": duplicates,
                "commit_id": commit_id,
            },
        )
        return CommitOutcome(rows.num_rows, duplicates, self.table.version(), elapsed)

    def commit_isolating(self, rows: pa.Table) -> tuple[CommitOutcome, list[tuple[str, str]]]:
        """:meth:`commit_rows`, and when the rows are rejected, in halves until every
        rejected row is found alone: returns what landed and ``(stream_id, reason)`` of
        each row that did not. Retryable errors propagate (some pieces may have
        landed; a retry of the same rows finds them and skips them)."""
        try:
            return self.commit_rows(rows), []
        except RowsRejected as exc:
            if rows.num_rows <= 1:
                log.warning(
                    "row rejected by the table",
                    extra={"entry_id": _stream_id(rows, 0), "reason": exc.reason},
                )
                empty = CommitOutcome(0, 0, self.table.version(), 0.0)
                return empty, [(_stream_id(rows, 0), exc.reason)]
            log.info("commit rejected, bisecting", extra={"rows": rows.num_rows})
        half = rows.num_rows // 2
        first, rejected_first = self.commit_isolating(rows.slice(0, half))
        second, rejected_second = self.commit_isolating(rows.slice(half))
        return first.then(second), rejected_first + rejected_second


def append_in_group(
    table: DeltaTable,
    rows: pa.Table,
    app_id: str,
    consumer: str,
    name: str,
    metadata: dict[str, str],
    before_write: Callable[[], object] | None = None,
) -> str:
    """Append ``rows`` in one commit carrying the group's app transaction; its commit ID.

    Raises :class:`CommitConflict` when another writer of the group committed first
    (the caller re-reads and retries), :class:`RowsRejected` / :class:`CommitFailed`
    otherwise; a commit whose reply was lost but which landed counts as done.
    """
    commit_id = uuid.uuid4().hex
    snapshot_version = table.version()
    txn_version = max(table.transaction_version(app_id) or 0, 0) + 1
    properties = CommitProperties(
        app_transactions=[Transaction(app_id, txn_version)],
        custom_metadata={"poslake.commit_id": commit_id, "poslake.consumer": consumer,
                         **metadata},
    )  # fmt: skip
    if before_write is not None:
        before_write()
    try:
        write_deltalake(
            table,
            rows,
            mode="append",
            commit_properties=properties,
            post_commithook_properties=NO_CHECKPOINT,
        )
    except (DeltaError, OSError) as exc:
        # A lost race did not land: the winner's rows are read on the next try. Any
        # other failure's outcome is unknown until the table says.
        if not landed_despite_error(table, app_id, txn_version, commit_id, snapshot_version, exc):
            raise commit_error(exc, name) from exc
    return commit_id


def landed_despite_error(
    table: DeltaTable,
    app_id: str,
    txn_version: int,
    commit_id: str,
    snapshot_version: int,
    error: BaseException,
) -> bool:
    """Whether the commit that raised ``error`` is in the table all the same.

    It is when the group's transaction reached ``txn_version`` and a version after
    ``snapshot_version`` carries ``commit_id``; ``table`` is refreshed to see it.
    False when the table cannot be read now (the retry's own checks decide then).
    """
    try:
        table.update_incremental()
        if (table.transaction_version(app_id) or 0) < txn_version:
            return False
        newer = table.version() - snapshot_version
        found = newer > 0 and any(
            c.get("poslake.commit_id") == commit_id for c in table.history(limit=newer)
        )
    except (DeltaError, OSError) as exc:
        log.info("cannot tell whether a failed commit landed", extra={"error": str(exc)})
        return False
    if found:
        log.warning(
            "commit landed although its reply was an error",
            extra={"commit_id": commit_id, "table_version": table.version(), "error": str(error)},
        )
    return found


def _stream_id(rows: pa.Table, position: int) -> str:
    """The stream ID of the row at ``position`` (``""`` for no rows)."""
    ids = rows.column("stream_id")
    if len(ids) == 0:
        return ""
    value: str = ids[position].as_py()
    return value


# OS errors a row's own values cause: a path built from a partition value that is too
# long, or that the file system cannot name. Every other OS error (EACCES, ENOSPC, EROFS,
# EIO, network) is the environment's and is retried.
_ROW_ERRNOS = {errno.ENAMETOOLONG: "File name too long", errno.EILSEQ: "Illegal byte sequence"}
_OS_ERROR = re.compile(r"os error (\d+)")


def commit_error(
    exc: DeltaError | OSError, table: str
) -> CommitConflict | CommitFailed | RowsRejected:
    """What a failed Delta commit means to the caller: a race lost to another writer
    (retry at once), rows the table cannot hold (find them, dead-letter them) or a
    failure of the environment (back off and retry)."""
    text = str(exc)
    lowered = text.lower()
    if isinstance(exc, CommitFailedError) and ("concurrent" in lowered or "conflict" in lowered):
        return CommitConflict(f"{table}: a concurrent commit won: {exc}")
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        match = _OS_ERROR.search(text)
        code = int(match.group(1)) if match else None
    if code in _ROW_ERRNOS or any(m.lower() in lowered for m in _ROW_ERRNOS.values()):
        return RowsRejected(f"{table} cannot hold the row: {text}")
    return CommitFailed(f"{table}: commit failed: {exc}")
