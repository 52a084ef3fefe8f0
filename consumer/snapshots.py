"""Closing what a complete snapshot no longer lists, exactly once.

A snapshot kind (shared/snapshots.py, :class:`~shared.kinds.SnapshotRule`) says
what one account holds at one time, in parts. Its parts are appended to their
own table like any kind's rows. Then, for every snapshot a batch brought a part
of (duplicates included, so a replay after a crash finishes the job), the
finisher asks the lake whether every part of it is there; only then does it
close, in the closed kind's current table, each row of that account that is
still open, older than the snapshot and not listed: a closing observation at the
snapshot's time is appended to the closed kind's history and merged into its
current table.

Why it is exactly once and order-proof:

- the closing rows' keys are (account, identity, snapshot time); before
  appending, the history is read for exactly those keys and what is there is
  left out, and the append carries the group's app transaction (consumer/sink.py),
  so two consumers closing the same snapshot at once serialise and the second
  finds the first's rows;
- a crash after the append and before the merge replays the batch: the parts
  are duplicates, the snapshot is still complete, the same rows are found in
  the history and merged again (the merge is idempotent);
- a newer update always wins: a row newer than the snapshot is never closed, and
  an update newer than the snapshot that lands later replaces the closing row in
  the current table by the usual newer-timestamp rule;
- a part that never arrives, or was dead-lettered, leaves the snapshot
  incomplete: nothing is closed, ever, for it.

Checking completeness after the parts' own commit means that of two consumers
committing two parts of one snapshot at once, at least the later one sees both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from consumer.current import CurrentWriter
from consumer.sink import append_in_group, group_app_id, open_kind_table
from shared.errors import CommitFailed, RowsRejected
from shared.kinds import EntryKind, SnapshotRule
from shared.settings import Settings
from shared.table import UTC_MICROS

log = logging.getLogger(__name__)

SnapshotId = tuple[str, int]
"""``(account, timestamp in UTC microseconds)``: the parts of one snapshot share it."""


@dataclass(frozen=True, slots=True)
class CloseOutcome:
    complete: int  # snapshots found complete
    incomplete: int  # snapshots with a part missing: nothing closed for them
    closed: int  # closing rows appended now (not those a replay found already there)
    seconds: float


class SnapshotCloser:
    """Applies one snapshot kind's complete snapshots (the finisher thread's own)."""

    def __init__(self, settings: Settings, kind: EntryKind, current: CurrentWriter) -> None:
        if kind.snapshot is None or current.kind is not kind.snapshot.closes:
            raise ValueError(f"{kind.tag!r} does not close {current.kind.tag!r}")
        self.settings = settings
        self.kind = kind
        self.rule: SnapshotRule = kind.snapshot
        self.current = current
        self.parts = open_kind_table(settings, kind)
        self.history = open_kind_table(settings, self.rule.closes)
        self.app_id = group_app_id(settings)
        # Test hook and crash point: after the closing append, before the current merge.
        self.after_append: Callable[[], None] | None = None
        self._newest: dict[str, int] = {}
        self._newest_version = -1

    def apply(self, batch: dict[EntryKind, pa.Table]) -> CloseOutcome:
        """After a batch's current merges: close what every complete snapshot among the
        batch's parts no longer lists, and what the batch's rows of the closed kind
        reopened behind a newer complete snapshot (see :meth:`_late_rows`). Raises
        :class:`CommitConflict` / :class:`CommitFailed` like any commit: call again, it
        is idempotent."""
        started = time.perf_counter()
        complete = incomplete = closed = 0
        parts = batch.get(self.kind)
        late = batch.get(self.rule.closes)
        if (parts is None or parts.num_rows == 0) and (late is None or late.num_rows == 0):
            return CloseOutcome(0, 0, 0, 0.0)
        try:
            self.parts.update_incremental()
        except (DeltaError, OSError) as exc:
            raise CommitFailed(f"{self.kind.table}: cannot read table state: {exc}") from exc
        snapshots = _snapshots_in(parts) if parts is not None else []
        for snapshot in snapshots:
            found = self._complete_parts(snapshot)
            if found is None:
                incomplete += 1
                continue
            complete += 1
            closed += self._close(snapshot, found)
        if late is not None:
            for snapshot in self._late_rows(late):
                if snapshot in snapshots:
                    continue  # closed just above
                found = self._complete_parts(snapshot)
                if found is not None:
                    closed += self._close(snapshot, found)
        return CloseOutcome(complete, incomplete, closed, time.perf_counter() - started)

    def _late_rows(self, rows: pa.Table) -> list[SnapshotId]:
        """The newest complete snapshot of each account that ``rows`` (the closed kind's
        rows of this batch, merged already) hold a row older than.

        With several consumers, a row older than a snapshot can reach the current table
        after the snapshot's closer read it (its batch was in another consumer's hands).
        The closer reads the current table after the parts' commit; this check reads
        the parts after the rows' merge: whichever runs second sees the other's work,
        so such a row is closed either way. Rare: rows are normally newer than the
        newest snapshot, and then nothing is read but the parts' log.
        """
        newest = self._newest_complete()
        oldest: dict[str, int] = {}
        accounts = rows.column("account").to_pylist()
        stamps = rows.column(self.rule.closes.time_column).cast(pa.int64()).to_pylist()
        for account, micros in zip(accounts, stamps, strict=True):
            if micros < oldest.get(account, micros + 1):
                oldest[account] = micros
        return [
            (account, newest[account])
            for account, micros in oldest.items()
            if account in newest and micros < newest[account]
        ]

    def _newest_complete(self) -> dict[str, int]:
        """Per account, the time of its newest complete snapshot (re-read when the parts'
        table has a new version: the parts' small columns only)."""
        version = self.parts.version()
        if version != self._newest_version:
            found = self.parts.to_pyarrow_dataset().to_table(
                columns=["account", "timestamp", "part", "parts"]
            )
            numbers: dict[SnapshotId, set[int]] = {}
            counts: dict[SnapshotId, set[int]] = {}
            columns = [found.column(c).to_pylist() for c in ("account", "part", "parts")]
            stamps = found.column("timestamp").cast(pa.int64()).to_pylist()
            for account, part, parts, micros in zip(*columns, stamps, strict=True):
                numbers.setdefault((str(account), micros), set()).add(part)
                counts.setdefault((str(account), micros), set()).add(parts)
            newest: dict[str, int] = {}
            for (account, micros), held in numbers.items():
                total = counts[(account, micros)]
                if len(total) == 1 and held == set(range(1, next(iter(total)) + 1)):
                    newest[account] = max(newest.get(account, micros), micros)
            self._newest, self._newest_version = newest, version
        return self._newest

    def _complete_parts(self, snapshot: SnapshotId) -> pa.Table | None:
        """Every part of the snapshot, or None while one is missing."""
        account, micros = snapshot
        at_ts = pa.scalar(micros, UTC_MICROS)
        parts = _read(self.parts, self.kind, account, pc.field("timestamp") == at_ts)
        counts = set(parts.column("parts").to_pylist())
        numbers = set(parts.column("part").to_pylist())
        if len(counts) != 1 or numbers != set(range(1, counts.pop() + 1)):
            log.info(
                "snapshot incomplete: nothing closed yet",
                extra={"kind": self.kind.tag, "account": account, "parts_found": len(numbers)},
            )
            return None
        return parts

    def _close(self, snapshot: SnapshotId, parts: pa.Table) -> int:
        account, micros = snapshot
        rule = self.rule
        at_ts = pa.scalar(micros, UTC_MICROS)
        held = rule.held(parts)
        try:
            self.current.table.update_incremental()
        except (DeltaError, OSError) as exc:
            raise CommitFailed(f"{self.current.spec.name}: cannot read table state: {exc}") from exc
        rows = _read(self.current.table, rule.closes, account)
        stamps = rows.column(rule.closes.time_column)
        # A row newer than the snapshot wins in the current table; the history still
        # gets the snapshot's closing row when the contract was open just before it, so
        # what lands does not depend on how entries fell into batches.
        newer = rows.filter(pc.greater(stamps, at_ts))  # at it: its own closing rows
        newer = newer.take(_not_held(newer, rule.identity, held))
        before = self._state_before(account, at_ts, newer) if newer.num_rows else None
        current = rows.filter(pc.less(stamps, at_ts))
        if before is not None:
            current = pa.concat_tables([current, before])
        current = current.filter(rule.is_open(current))
        gone = _not_held(current, rule.identity, held).to_pylist()
        if not gone:
            return 0
        at: datetime = at_ts.as_py()
        last_part = parts.filter(pc.equal(parts.column("part"), parts.column("parts")))
        stream_id = last_part.column("stream_id")[0].as_py().encode()
        rows_of = current.take(pa.array(gone, pa.int64())).to_pylist()
        closing = rule.closes.to_rows(
            [rule.close(row, at) for row in rows_of], [stream_id] * len(gone)
        )
        appended = self._append_new(closing, account, at_ts)
        if self.after_append is not None:
            self.after_append()
        self.current.merge(closing)
        log.info(
            "snapshot closed what it no longer lists",
            extra={
                "kind": self.kind.tag,
                "account": account,
                "snapshot_at": at.isoformat(),
                "closed": len(gone),
                "appended": appended,
                "stream_id": stream_id.decode(),
            },
        )
        return appended

    def _state_before(self, account: str, at_ts: pa.Scalar, rows: pa.Table) -> pa.Table:
        """The newest history row before ``at_ts`` of each of ``rows``' identities (rare:
        only for contracts updated after the snapshot before it was applied)."""
        kind = self.rule.closes
        try:
            self.history.update_incremental()
        except (DeltaError, OSError) as exc:
            raise CommitFailed(f"{kind.table}: cannot read table state: {exc}") from exc
        expression = pc.field(kind.time_column) < at_ts
        for column in kind.partition_by:
            if column != "account":
                values = sorted(set(rows.column(column).to_pylist()))
                expression = expression & pc.field(column).isin(values)
        found = _read(self.history, kind, account, expression)
        wanted = set(_identities(rows, self.rule.identity))
        newest: dict[tuple[Any, ...], int] = {}
        stamps = found.column(kind.time_column).cast(pa.int64()).to_pylist()
        for at, identity in enumerate(_identities(found, self.rule.identity)):
            if identity in wanted:
                seen = newest.get(identity)
                if seen is None or stamps[seen] < stamps[at]:
                    newest[identity] = at
        return found.take(pa.array(sorted(newest.values()), pa.int64()))

    def _append_new(self, closing: pa.Table, account: str, at_ts: pa.Scalar) -> int:
        """Append the closing rows the history lacks, with the group's app transaction."""
        kind = self.rule.closes
        try:
            self.history.update_incremental()
        except (DeltaError, OSError) as exc:
            raise CommitFailed(f"{kind.table}: cannot read table state: {exc}") from exc
        expression = pc.field(kind.time_column) == at_ts
        for column in kind.partition_by:
            if column != "account":
                values = sorted(set(closing.column(column).to_pylist()))
                expression = expression & pc.field(column).isin(values)
        there = set(_identities(_read(self.history, kind, account, expression), self.rule.identity))
        fresh = [
            i for i, key in enumerate(_identities(closing, self.rule.identity)) if key not in there
        ]
        if not fresh:
            return 0
        rows = closing.take(pa.array(fresh, pa.int64()))
        try:
            append_in_group(
                self.history, rows, self.app_id, self.settings.consumer_name, kind.table,
                {"poslake.snapshot_close": self.kind.tag},
            )  # fmt: skip
        except RowsRejected as exc:
            # Rows copied from the current table: their paths exist. Never seen; retried
            # as a failure of the environment rather than dropped.
            raise CommitFailed(str(exc)) from exc
        appended: int = rows.num_rows
        return appended


def _snapshots_in(rows: pa.Table) -> list[SnapshotId]:
    """The distinct snapshots a batch's rows are parts of, in order of appearance."""
    accounts = rows.column("account").to_pylist()
    stamps = rows.column("timestamp").cast(pa.int64()).to_pylist()
    return list(dict.fromkeys(zip(accounts, stamps, strict=True)))


def _not_held(rows: pa.Table, columns: tuple[str, ...], held: set[tuple[Any, ...]]) -> pa.Array:
    """Indices of the rows whose identity the snapshot does not list."""
    return pa.array(
        [i for i, identity in enumerate(_identities(rows, columns)) if identity not in held],
        pa.int64(),
    )


def _identities(rows: pa.Table, columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
    return list(zip(*(rows.column(c).to_pylist() for c in columns), strict=True))


def _read(
    table: DeltaTable, kind: EntryKind, account: str, expression: pds.Expression | None = None
) -> pa.Table:
    """The rows of one account matching ``expression`` (partitions and file statistics
    prune), typed as the kind's schema.

    Only partition, integer and timestamp columns go into the scan's filter: the files
    delta-rs writes hold text as ``string_view``, which pyarrow's scan cannot compare
    with a ``string`` scalar; the account is filtered after the read unless it is the
    partition column.
    """
    if "account" in kind.partition_by:
        by_account = pc.field("account").isin([account])
        expression = by_account if expression is None else expression & by_account
    found = table.to_pyarrow_dataset().to_table(filter=expression)
    found = found.select(kind.schema.names).cast(kind.schema)
    return found.filter(pc.equal(found.column("account"), account))
