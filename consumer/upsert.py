"""Landing an upserted kind (executions): one Delta MERGE per batch, by the kind's rule.

The batch's rows (one per entry) are first folded to one row per key by the
kind's :class:`~shared.kinds.UpsertRule` (:func:`fold`); the MERGE applies the
same rule against the table, in SQL:

- a row whose key is new is inserted (a commission before its execution makes a
  row with only the commission; the execution fills it in later);
- the main part (the execution's details) is replaced only by a higher revision;
- the attached part (the commission) only by a higher revision that is not below
  the row's main revision; newer main columns clear an older attached part.

Replays change nothing (no new table version when no row changes), so there is
no dedup index: the MERGE is the dedup. Every commit carries the group's app
transaction (as appends do, consumer/sink.py), so two consumers' MERGEs into the
table are serialised: the loser re-reads and merges again, and a key is never
inserted twice.
"""

from __future__ import annotations

import logging
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, Transaction
from deltalake.exceptions import DeltaError

from consumer.sink import (
    NO_CHECKPOINT,
    CommitOutcome,
    commit_error,
    landed_despite_error,
    open_kind_table,
)
from shared.errors import CommitFailed, RowsRejected
from shared.kinds import EntryKind, UpsertRule
from shared.settings import Settings

log = logging.getLogger(__name__)


def _q(name: str) -> str:
    return f'"{name}"'


def merge_clauses(rule: UpsertRule) -> tuple[str, str, dict[str, str]]:
    """The MERGE's match predicate, its when-matched predicate and its column updates."""
    main_id, main_rev = _q(rule.main_id), _q(rule.main_revision)
    att_id, att_rev = _q(rule.attached_id), _q(rule.attached_revision)
    main_newer = (
        f"(s.{main_id} IS NOT NULL AND (t.{main_id} IS NULL OR s.{main_rev} > t.{main_rev}))"
    )
    attached_kept = (
        f"(s.{att_id} IS NOT NULL AND s.{att_rev} > coalesce(t.{att_rev}, -1)"
        f" AND (s.{att_rev} >= coalesce(t.{main_rev}, -1) OR {main_newer}))"
    )
    updates: dict[str, str] = {}
    for name in rule.main:
        updates[_q(name)] = f"CASE WHEN {main_newer} THEN s.{_q(name)} ELSE t.{_q(name)} END"
    for name in rule.attached:
        updates[_q(name)] = (
            f"CASE WHEN {attached_kept} THEN s.{_q(name)}"
            f" WHEN {main_newer} AND coalesce(t.{att_rev}, -1) < s.{main_rev} THEN NULL"
            f" ELSE t.{_q(name)} END"
        )
    match = f"t.{_q(rule.key)} = s.{_q(rule.key)}"
    return match, f"{main_newer} OR {attached_kept}", updates


def fold(rows: pa.Table, rule: UpsertRule) -> pa.Table:
    """One row per key from rows in stream order (a batch's pages may each hold a part
    of the same key), by the same rule as the MERGE: the source of a MERGE must not
    hold a key twice, or the key would be inserted twice."""
    if rows.num_rows <= 1:
        return rows
    keys = rows.column(rule.key)
    if pc.count_distinct(keys).as_py() == rows.num_rows:
        return rows  # the common case: nothing to fold
    main_rev, att_rev = rule.main_revision, rule.attached_revision
    folded: dict[object, dict[str, object]] = {}
    for row in rows.to_pylist():
        held = folded.get(row[rule.key])
        if held is None:
            folded[row[rule.key]] = row
            continue
        if row[rule.main_id] is not None and (
            held[rule.main_id] is None or row[main_rev] > held[main_rev]
        ):
            for name in rule.main:
                held[name] = row[name]
            if held[att_rev] is not None and held[att_rev] < row[main_rev]:
                for name in rule.attached:
                    held[name] = None
        if (
            row[rule.attached_id] is not None
            and (held[att_rev] is None or row[att_rev] > held[att_rev])
            and (held[main_rev] is None or row[att_rev] >= held[main_rev])
        ):
            for name in rule.attached:
                held[name] = row[name]
    return pa.Table.from_pylist(list(folded.values()), rows.schema)


def _key_range(rows: pa.Table, key: str) -> str:
    """`` AND t.key BETWEEN <min> AND <max>`` of the batch's keys: the target files whose
    statistics lie outside it are skipped (IB's execution IDs grow over a day), so a MERGE
    reads the recent files, not the whole table. Exact: no key outside it can match."""
    bounds = pc.min_max(rows.column(key)).as_py()
    low, high = bounds["min"], bounds["max"]
    if low is None:
        return ""

    def literal(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    return f" AND t.{_q(key)} >= {literal(low)} AND t.{_q(key)} <= {literal(high)}"


def _row_id(rows: pa.Table, position: int, rule: UpsertRule) -> str:
    """The stream entry a row came from: its main part's, else its attached part's."""
    main, attached = rule.main[-1], rule.attached[-1]  # the parts' stream_id columns
    ids = pc.coalesce(rows.column(main), rows.column(attached))
    value = ids[position].as_py()
    return str(value) if value is not None else ""


class UpsertWriter:
    """The consumer's writer to an upserted kind's table."""

    def __init__(self, settings: Settings, kind: EntryKind) -> None:
        if kind.upsert is None:
            raise ValueError(f"kind {kind.tag!r} is not upserted")
        self._settings = settings
        self.kind = kind
        self.rule = kind.upsert
        self.table = open_kind_table(settings, kind)
        self.app_id = f"poslake:{settings.stream}:{settings.group}"
        self._match, self._when, self._updates = merge_clauses(self.rule)
        self.commits = 0

    def commit_rows(self, rows: pa.Table) -> CommitOutcome:
        """MERGE the batch's rows (one per key); raises as :meth:`DeltaSink.commit_rows`."""
        started = time.perf_counter()
        if rows.num_rows == 0:
            return CommitOutcome(0, 0, self.table.version(), 0.0)
        entries = rows.num_rows
        rows = fold(rows, self.rule)
        try:
            self.table.update_incremental()
        except (DeltaError, OSError) as exc:
            raise CommitFailed(f"cannot read table state: {exc}") from exc
        txn_version = max(self.table.transaction_version(self.app_id) or 0, 0) + 1
        commit_id = uuid.uuid4().hex
        snapshot_version = self.table.version()
        properties = CommitProperties(
            app_transactions=[Transaction(self.app_id, txn_version)],
            custom_metadata={
                "poslake.commit_id": commit_id,
                "poslake.consumer": self._settings.consumer_name,
                "poslake.first_entry": _row_id(rows, 0, self.rule),
                "poslake.last_entry": _row_id(rows, -1, self.rule),
            },
        )
        try:
            metrics = (
                self.table.merge(
                    rows,
                    self._match + _key_range(rows, self.rule.key),
                    source_alias="s",
                    target_alias="t",
                    commit_properties=properties,
                    post_commithook_properties=NO_CHECKPOINT,
                )
                .when_matched_update(self._updates, predicate=self._when)
                .when_not_matched_insert_all()
                .execute()
            )
        except (DeltaError, OSError) as exc:
            if not landed_despite_error(
                self.table, self.app_id, txn_version, commit_id, snapshot_version, exc
            ):
                raise commit_error(exc, self.kind.table) from exc
            # Landed, its reply lost: the merge's counts went with it; replaying the
            # merge would change nothing, so none of its rows count as changed.
            metrics = {}
        changed = int(metrics.get("num_target_rows_inserted", 0)) + int(
            metrics.get("num_target_rows_updated", 0)
        )
        if changed:
            self.commits += 1
        elapsed = time.perf_counter() - started
        log.debug(
            "upserted",
            extra={"table": self.kind.table, "rows": rows.num_rows, "changed": changed},
        )
        return CommitOutcome(changed, entries - changed, self.table.version(), elapsed)

    def commit_isolating(self, rows: pa.Table) -> tuple[CommitOutcome, list[tuple[str, str]]]:
        """:meth:`commit_rows`, in halves when rows are rejected (as
        :meth:`DeltaSink.commit_isolating`); merging in pieces gives the same table."""
        try:
            return self.commit_rows(rows), []
        except RowsRejected as exc:
            if rows.num_rows <= 1:
                row_id = _row_id(rows, 0, self.rule) if rows.num_rows else ""
                log.warning("row rejected by the table", extra={"entry_id": row_id})
                return CommitOutcome(0, 0, self.table.version(), 0.0), [(row_id, exc.reason)]
        half = rows.num_rows // 2
        first, rejected_first = self.commit_isolating(rows.slice(0, half))
        second, rejected_second = self.commit_isolating(rows.slice(half))
        return first.then(second), rejected_first + rejected_second
