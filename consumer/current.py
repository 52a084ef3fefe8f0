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
from collections.abc import Sequence

from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from shared.errors import CommitConflict, CommitFailed
from shared.model import PositionUpdate
from shared.settings import Settings
from shared.table import (
    PARTITION_COLUMNS,
    POSITION_UPDATES_SCHEMA,
    table_configuration,
    updates_to_arrow,
)

log = logging.getLogger(__name__)

CURRENT_TABLE = "positions_current"
MERGE_PREDICATE = "t.symbol = s.symbol AND t.account = s.account AND t.conid = s.conid"


def open_or_create_current(settings: Settings) -> DeltaTable:
    uri = f"{settings.lake_uri.rstrip('/')}/{CURRENT_TABLE}"
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
            configuration=table_configuration(settings.checkpoint_interval),
            storage_options=options,
        )


def newest_per_contract(
    updates: Sequence[PositionUpdate], entry_ids: Sequence[bytes]
) -> tuple[list[PositionUpdate], list[bytes]]:
    """The newest update of each (account, conid) in a batch, with its entry ID."""
    newest: dict[tuple[str, int], int] = {}
    for index, update in enumerate(updates):
        key = (update.account, update.conid)
        seen = newest.get(key)
        if seen is None or updates[seen].timestamp < update.timestamp:
            newest[key] = index
    chosen = sorted(newest.values())
    return [updates[i] for i in chosen], [entry_ids[i] for i in chosen]


class CurrentPositions:
    """The consumer's writer to ``positions_current``."""

    def __init__(self, settings: Settings) -> None:
        self.table = open_or_create_current(settings)

    def merge(self, updates: Sequence[PositionUpdate], entry_ids: Sequence[bytes]) -> float:
        """Upsert, newest timestamp wins; returns seconds taken.

        Raises :class:`CommitConflict` when another consumer's merge landed first (call
        again) and :class:`CommitFailed` for other failures; a merge is all or nothing.
        """
        if not updates:
            return 0.0
        started = time.perf_counter()
        chosen, ids = newest_per_contract(updates, entry_ids)
        source = updates_to_arrow(chosen, ids)
        try:
            self.table.update_incremental()
            metrics = (
                self.table.merge(source, MERGE_PREDICATE, source_alias="s", target_alias="t")
                .when_matched_update_all(predicate="s.timestamp > t.timestamp")
                .when_not_matched_insert_all()
                .execute()
            )
        except CommitFailedError as exc:
            raise CommitConflict(f"positions_current: concurrent merge: {exc}") from exc
        except (DeltaError, OSError) as exc:
            raise CommitFailed(f"positions_current: merge failed: {exc}") from exc
        elapsed = time.perf_counter() - started
        log.debug(
            "positions_current merged",
            extra={
                "contracts": len(chosen),
                "inserted": metrics.get("num_target_rows_inserted"),
                "updated": metrics.get("num_target_rows_updated"),
                "merge_s": round(elapsed, 4),
            },
        )
        return elapsed
