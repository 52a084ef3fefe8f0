"""``positions_current``: one row per (account, conid), the newest observation wins.

The consumer keeps it in the same batch as the history append: after the
``position_updates`` commit, before the XACK, it MERGEs the batch's newest
update per contract into this table, updating a row only when the incoming
timestamp is newer and inserting contracts it has not seen. That makes the
merge idempotent and order-proof: a replayed, duplicated or older update never
overwrites a newer row, and a position that closes keeps its row with
position 0. The merge uses every valid update of the batch, including the ones
the history dedup dropped, so a crash between the two commits is repaired by
the replay that follows it.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError, TableNotFoundError

from consumer.sink import NO_CHECKPOINT, commit_error
from shared.errors import RowsRejected
from shared.settings import Settings
from shared.table import (
    PARTITION_COLUMNS,
    POSITION_UPDATES_SCHEMA,
    table_configuration,
)

log = logging.getLogger(__name__)

CURRENT_TABLE = "positions_current"
# No symbol in the match: a contract whose underlying changes ticker (same conid) moves
# to its new partition instead of leaving its old row behind. Nothing is lost: the
# default streamed MERGE prunes no partitions anyway.
MERGE_PREDICATE = "t.account = s.account AND t.conid = s.conid"


def open_or_create_current(settings: Settings) -> DeltaTable:
    uri = settings.current_table_uri
    options = settings.storage_options or None
    try:
        return DeltaTable(uri, storage_options=options)
    except TableNotFoundError:
        return DeltaTable.create(
            uri,
            POSITION_UPDATES_SCHEMA,
            mode="ignore",
            partition_by=PARTITION_COLUMNS,
            name=CURRENT_TABLE,
            configuration=table_configuration(
                settings.checkpoint_interval, settings.history_retention_hours
            ),
            storage_options=options,
        )


def newest_per_contract(rows: pa.Table) -> pa.Table:
    """The newest row of each (account, conid) among ``rows``; of rows with equal
    timestamps the first, as in the history, where the first occurrence of a key lands.

    Pure Arrow: a stable sort of the keys (account as its dictionary index, so the
    sort is numeric; newest first), then the first row of each run of equal
    contracts. The consumer does not load polars, whose import alone costs ~40 MB.
    """
    n = rows.num_rows
    if n == 0:
        return rows
    keys = pa.table(
        {
            "account": pc.dictionary_encode(rows.column("account")).combine_chunks().indices,
            "conid": rows.column("conid"),
            "timestamp": rows.column("timestamp"),
        }
    )
    order = pc.sort_indices(
        keys,
        sort_keys=[("account", "ascending"), ("conid", "ascending"), ("timestamp", "descending")],
    )
    ordered = keys.take(order)
    accounts = ordered.column("account").combine_chunks()
    conids = ordered.column("conid").combine_chunks()
    # Row i of the sorted keys is its contract's newest when row i - 1 is another one.
    key_changes = pc.or_(
        pc.not_equal(accounts.slice(1), accounts.slice(0, n - 1)),
        pc.not_equal(conids.slice(1), conids.slice(0, n - 1)),
    )
    newest = pc.filter(order, pa.concat_arrays([pa.array([True]), key_changes]))
    return rows.take(newest)


class CurrentPositions:
    """The consumer's writer to ``positions_current``."""

    def __init__(self, settings: Settings) -> None:
        self.table = open_or_create_current(settings)

    def merge(self, rows: pa.Table) -> float:
        """Upsert the newest of ``rows`` per contract (the batch's rows, before history
        dedup), newest timestamp wins; returns seconds taken.

        Raises :class:`CommitConflict` when another consumer's merge landed first (call
        again) and :class:`CommitFailed` for other failures; a merge is all or nothing.
        """
        if rows.num_rows == 0:
            return 0.0
        started = time.perf_counter()
        source = newest_per_contract(rows)
        try:
            self.table.update_incremental()
            metrics = (
                self.table.merge(
                    source,
                    MERGE_PREDICATE,
                    source_alias="s",
                    target_alias="t",
                    post_commithook_properties=NO_CHECKPOINT,
                )
                .when_matched_update_all(predicate="s.timestamp > t.timestamp")
                .when_not_matched_insert_all()
                .execute()
            )
        except (DeltaError, OSError) as exc:
            raise commit_error(exc, CURRENT_TABLE) from exc
        elapsed = time.perf_counter() - started
        log.debug(
            "positions_current merged",
            extra={
                "contracts": source.num_rows,
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
