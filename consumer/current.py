"""A kind's "current" table: one row per match key, the newest observation wins.

For positions this is ``positions_current``, one row per (account, conid); each
kind declares its own (shared/kinds.py, :class:`~shared.kinds.CurrentTable`).
The consumer keeps it in the same batch as the history append: after the
history commit, before the XACK, it MERGEs the batch's newest row per key into
this table, updating a row only when the incoming ``newer_by`` value (the
timestamp) is newer and inserting keys it has not seen. That makes the merge
idempotent and order-proof: a replayed, duplicated or older row never
overwrites a newer one, and a position that closes keeps its row with position
0. The merge uses every valid row of the batch, including the ones the history
dedup dropped, so a crash between the two commits is repaired by the replay
that follows it.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from consumer.sink import NO_CHECKPOINT, commit_error, open_kind_table
from shared.errors import RowsRejected
from shared.kinds import POSITIONS, CurrentTable, EntryKind
from shared.settings import Settings

log = logging.getLogger(__name__)


def _current_of(kind: EntryKind) -> CurrentTable:
    if kind.current is None:
        raise ValueError(f"kind {kind.tag!r} has no current table")
    return kind.current


def merge_predicate(current: CurrentTable) -> str:
    """The MERGE's match: the current table's match columns. For positions no symbol:
    a contract whose underlying changes ticker (same conid) moves to its new partition
    instead of leaving its old row behind (the default streamed MERGE prunes no
    partitions anyway)."""
    return " AND ".join(f"t.{name} = s.{name}" for name in current.match)


def open_or_create_current(settings: Settings, kind: EntryKind = POSITIONS) -> DeltaTable:
    current = _current_of(kind)
    return open_kind_table(settings, kind, current.name)


def newest_per_contract(rows: pa.Table, kind: EntryKind = POSITIONS) -> pa.Table:
    """The newest row of each match key (positions: (account, conid)) among ``rows``; of
    rows with equal timestamps the first, as in the history, where the first occurrence
    of a key lands.

    Pure Arrow: a stable sort of the keys (text as its dictionary index, so the sort
    is numeric; newest first), then the first row of each run of equal keys. The
    consumer does not load polars, whose import alone costs ~40 MB.
    """
    n = rows.num_rows
    if n == 0:
        return rows
    current = _current_of(kind)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {}
    for name in current.match:
        column = rows.column(name)
        if pa.types.is_string(column.type):
            column = pc.dictionary_encode(column).combine_chunks().indices
        columns[name] = column
    columns["__newer"] = rows.column(current.newer_by)
    keys = pa.table(columns)
    order = pc.sort_indices(
        keys,
        sort_keys=[*((name, "ascending") for name in current.match), ("__newer", "descending")],
    )
    ordered = keys.take(order)
    # Row i of the sorted keys is its key's newest when row i - 1 has another key.
    key_changes: pa.Array | None = None
    for name in current.match:
        column = ordered.column(name).combine_chunks()
        changed = pc.not_equal(column.slice(1), column.slice(0, n - 1))
        key_changes = changed if key_changes is None else pc.or_(key_changes, changed)
    assert key_changes is not None
    newest = pc.filter(order, pa.concat_arrays([pa.array([True]), key_changes]))
    return rows.take(newest)


class CurrentWriter:
    """The consumer's writer to a kind's current table (positions: ``positions_current``)."""

    def __init__(self, settings: Settings, kind: EntryKind = POSITIONS) -> None:
        self.kind = kind
        self.spec = _current_of(kind)
        self.table = open_or_create_current(settings, kind)

    def merge(self, rows: pa.Table) -> float:
        """Upsert the newest of ``rows`` per contract (the batch's rows, before history
        dedup), newest timestamp wins; returns seconds taken.

        Raises :class:`CommitConflict` when another consumer's merge landed first (call
        again) and :class:`CommitFailed` for other failures; a merge is all or nothing.
        """
        if rows.num_rows == 0:
            return 0.0
        started = time.perf_counter()
        source = newest_per_contract(rows, self.kind)
        try:
            self.table.update_incremental()
            metrics = (
                self.table.merge(
                    source,
                    merge_predicate(self.spec),
                    source_alias="s",
                    target_alias="t",
                    post_commithook_properties=NO_CHECKPOINT,
                )
                .when_matched_update_all(
                    predicate=f"s.{self.spec.newer_by} > t.{self.spec.newer_by}"
                )
                .when_not_matched_insert_all()
                .execute()
            )
        except (DeltaError, OSError) as exc:
            raise commit_error(exc, self.spec.name) from exc
        elapsed = time.perf_counter() - started
        log.debug(
            "current table merged",
            extra={
                "table": self.spec.name,
                "keys": source.num_rows,
                "inserted": metrics.get("num_target_rows_inserted"),
                "updated": metrics.get("num_target_rows_updated"),
                "merge_s": round(elapsed, 4),
            },
        )
        return elapsed

    def merge_isolating(self, rows: pa.Table) -> tuple[float, list[tuple[str, str]]]:
        """:meth:`merge`, and when the rows are rejected, in halves until each rejected
        row is found alone; returns seconds and ``(stream_id, reason)`` of those rows.

        Merging a batch in pieces gives the same table as merging it whole: each
        piece updates a row only with a newer timestamp, so the newest wins either way.
        """
        try:
            return self.merge(rows), []
        except RowsRejected as exc:
            if rows.num_rows <= 1:
                stream_id = str(rows.column("stream_id")[0].as_py()) if rows.num_rows else ""
                return 0.0, [(stream_id, exc.reason)]
        half = rows.num_rows // 2
        first, rejected_first = self.merge_isolating(rows.slice(0, half))
        second, rejected_second = self.merge_isolating(rows.slice(half))
        return first + second, rejected_first + rejected_second
