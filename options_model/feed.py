"""Feeding the strategy book from the pipeline's tables, incrementally and exactly once.

The book is a function of ``executions``, ``positions_current`` and
``option_greeks_current`` (options_model/book.py). A :class:`BookFeed` keeps the
book's tables equal to that function:

- at start it computes every (account, underlying) and writes only what differs
  from the tables as they are (so a restart after a crash at any point converges:
  nothing is lost, nothing doubled; from empty tables this is the rebuild);
- then each :meth:`step` recomputes only the underlyings whose fills changed
  (files the executions table added since the last step, by their partition) or
  whose held quantities changed, and, every ``snapshot_s``, the marks (prices,
  Greeks, unrealized P&L) of every strategy;
- a table's changes are one MERGE (insert, update, delete by key, pruned to the
  changed underlyings) carrying the app transaction ``poslake-book`` at the
  executions version it reflects; a table without a change gets no commit.

Rows are compared exactly (the fold is deterministic), so a step over unchanged
inputs writes nothing, and a rebuild gives the same rows.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import polars as pl
import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import TableNotFoundError

from options_model.book import BookRows, Marks, book_rows
from options_model.exposures import source_rank
from options_model.fills import Fill, Holding, fills_from_rows, holdings_from_rows
from options_model.grouping import BookFold, BookRules
from options_model.tables import LEGS, POSITIONS, TRANSACTIONS, TableSpec
from shared import lake_names
from shared.table import table_configuration

log = logging.getLogger(__name__)

APP_ID = "poslake-book"
FED_TABLES: tuple[TableSpec, ...] = (TRANSACTIONS, LEGS, POSITIONS)  # written in this order
Partition = tuple[str, str]  # (account, underlying symbol)
_FILL_COLUMNS = [
    "exec_base", "account", "symbol", "conid", "sec_type", "right", "strike", "expiry",
    "multiplier", "side", "shares", "price", "time", "order_id", "perm_id", "order_ref",
    "commission",
]  # fmt: skip
_HOLDING_COLUMNS = [
    "account", "conid", "symbol", "sec_type", "right", "strike", "expiry", "multiplier",
    "position", "market_price", "average_cost", "timestamp",
]  # fmt: skip


@dataclass
class StepOutcome:
    """What one step did: underlyings recomputed, rows written per table."""

    partitions: int = 0
    written: dict[str, int] = field(default_factory=dict)
    executions_version: int | None = None

    @property
    def changed(self) -> bool:
        return any(self.written.values())


class BookFeed:
    """Keeps the book's tables equal to the book of the tables it comes from."""

    def __init__(
        self,
        lake_uri: str,
        storage_options: dict[str, str] | None = None,
        rules: BookRules | None = None,
        snapshot_s: float = 60.0,
        book_uri: str | None = None,
    ) -> None:
        self.base = lake_uri.rstrip("/")
        self.out = (book_uri or lake_uri).rstrip("/")  # the book's tables (default: beside)
        self.storage = storage_options or None
        self.rules = rules or BookRules()
        self.snapshot_s = snapshot_s
        self._rows: dict[str, dict[str, dict[str, Any]]] = {}  # table -> key -> row
        self._exec_files: set[str] | None = None
        self._held: dict[tuple[str, int], float] = {}
        self._first_seen: dict[tuple[str, int], datetime] = {}
        self._marked_at: float | None = None

    # --- the inputs ----------------------------------------------------------------

    def _table(self, name: str) -> DeltaTable | None:
        try:
            return DeltaTable(f"{self.base}/{name}", storage_options=self.storage)
        except TableNotFoundError:
            return None

    def _fills(self, executions: DeltaTable, symbols: set[str] | None) -> list[Fill]:
        frame = pl.scan_delta(executions)
        if symbols is not None:
            frame = frame.filter(pl.col("symbol").is_in(sorted(symbols)))
        rows = frame.select(_FILL_COLUMNS).filter(pl.col("side").is_not_null()).collect()
        return fills_from_rows(rows.to_dicts())

    def _holdings(self) -> list[dict[str, Any]]:
        table = self._table(lake_names.POSITIONS_CURRENT)
        if table is None:
            return []
        return pl.scan_delta(table).select(_HOLDING_COLUMNS).collect().to_dicts()

    def _marks(self, holdings: list[dict[str, Any]]) -> Marks:
        prices = {
            int(r["conid"]): float(r["market_price"])
            for r in holdings
            if r.get("market_price") is not None
        }
        table = self._table(lake_names.OPTION_GREEKS_CURRENT)
        greeks: dict[int, dict[str, float | None]] = {}
        if table is not None:
            frame = (
                pl.scan_delta(table)
                .select("conid", "source", "timestamp", "delta", "gamma", "theta", "vega")
                .with_columns(source_rank())
                .sort("conid", "rank", pl.col("timestamp"), descending=[False, False, True])
                .unique("conid", keep="first", maintain_order=True)
                .collect()
            )
            for row in frame.to_dicts():
                greeks[int(row["conid"])] = {g: row[g] for g in ("delta", "gamma", "theta", "vega")}
        return Marks(prices, greeks)

    def _first_seen_of(self, wanted: set[tuple[str, int]]) -> None:
        missing = wanted - self._first_seen.keys()
        table = self._table(lake_names.POSITION_UPDATES) if missing else None
        if table is None:
            return
        conids = sorted({conid for _, conid in missing})
        frame = (
            pl.scan_delta(table)
            .filter(pl.col("conid").is_in(conids) & (pl.col("position") != 0))
            .group_by("account", "conid")
            .agg(pl.col("timestamp").min())
            .collect()
        )
        for row in frame.to_dicts():
            self._first_seen[(row["account"], int(row["conid"]))] = row["timestamp"]

    # --- a step ------------------------------------------------------------------

    def step(self, now: float, full: bool = False) -> StepOutcome:
        """Bring the tables up to date with the inputs as they are; ``now`` (a monotonic
        clock) decides when marks are due."""
        outcome = StepOutcome()
        executions = self._table(lake_names.EXECUTIONS)
        if not self._rows:
            self._load()
            full = True
        holdings_rows = self._holdings()
        held = {
            (str(r["account"]), int(r["conid"])): float(r["position"])
            for r in holdings_rows
            if r["position"]
        }
        symbols: set[str] | None = None
        if not full:
            symbols = self._changed_symbols(executions, holdings_rows, held)
        else:
            self._exec_files = set(_files(executions)) if executions is not None else set()
        self._held = held
        marks_due = full or self._marked_at is None or now - self._marked_at >= self.snapshot_s
        if symbols is not None and not symbols and not marks_due:
            return outcome
        version = executions.version() if executions is not None else None
        outcome.executions_version = version
        fills = self._fills(executions, None if marks_due else symbols) if executions else []
        if not marks_due and symbols is not None:
            holdings_rows = [r for r in holdings_rows if r["symbol"] in symbols]
        rows = self._compute(fills, holdings_rows)
        outcome.partitions = len({(r["account"], r["symbol"]) for r in rows.positions})
        scope = None if marks_due else symbols
        for spec, produced in zip(
            FED_TABLES, (rows.transactions, rows.legs, rows.positions), strict=True
        ):
            outcome.written[spec.name] = self._write(spec, produced, scope, version)
        if marks_due:
            self._marked_at = now
        return outcome

    def _changed_symbols(
        self,
        executions: DeltaTable | None,
        holdings: list[dict[str, Any]],
        held: dict[tuple[str, int], float],
    ) -> set[str]:
        symbols: set[str] = set()
        if executions is not None:
            files = _files(executions)
            added = files.keys() - (self._exec_files or set())
            self._exec_files = set(files)
            symbols |= {files[path] for path in added}
        symbol_of = {(str(r["account"]), int(r["conid"])): str(r["symbol"]) for r in holdings}
        for key in held.keys() | self._held.keys():
            if held.get(key) != self._held.get(key):
                symbols.add(symbol_of.get(key) or self._symbol_of_old(key))
        return {s for s in symbols if s}

    def _symbol_of_old(self, key: tuple[str, int]) -> str:
        for row in self._rows.get(LEGS.name, {}).values():
            if (row["account"], row["conid"]) == key:
                return str(row["symbol"])
        return ""

    def _compute(self, fills: list[Fill], holdings_rows: list[dict[str, Any]]) -> BookRows:
        by_partition: dict[Partition, list[Fill]] = defaultdict(list)
        for one in fills:
            by_partition[(one.account, one.symbol)].append(one)
        filled = {(f.account, f.contract.conid) for f in fills}
        self._first_seen_of(
            {(str(r["account"]), int(r["conid"])) for r in holdings_rows if r["position"]} - filled
        )
        holdings = holdings_from_rows(holdings_rows, self._first_seen)
        held_by: dict[Partition, list[Holding]] = defaultdict(list)
        for holding in holdings:
            held_by[(holding.account, holding.symbol)].append(holding)
        marks = self._marks(holdings_rows)
        rows = BookRows()
        names = {
            k: r["name"] for k, r in self._rows.get(POSITIONS.name, {}).items() if r.get("name")
        }
        for account, symbol in sorted(by_partition.keys() | held_by.keys()):
            partition_fills = by_partition.get((account, symbol), [])
            partition_held = held_by.get((account, symbol), [])
            times = [f.time for f in partition_fills] + [h.timestamp for h in partition_held]
            fold = BookFold(account, symbol, self.rules)
            strategies = fold.run(partition_fills, partition_held, max(times))
            part = book_rows(strategies, marks, names)
            rows.transactions += part.transactions
            rows.legs += part.legs
            rows.positions += part.positions
        return rows

    # --- the tables --------------------------------------------------------------

    def _load(self) -> None:
        for spec in FED_TABLES:
            table = self._book_table(spec)
            frame = pl.scan_delta(table).collect() if table is not None else None
            key = spec.key[0]
            self._rows[spec.name] = (
                {str(r[key]): r for r in frame.to_dicts()} if frame is not None else {}
            )

    def _write(
        self,
        spec: TableSpec,
        produced: Iterable[Mapping[str, Any]],
        symbols: set[str] | None,
        version: int | None,
    ) -> int:
        key = spec.key[0]
        names = spec.schema.names
        current = self._rows.setdefault(spec.name, {})
        wanted = {str(r[key]): {n: r.get(n) for n in names} for r in produced}
        in_scope = [k for k, r in current.items() if symbols is None or r["symbol"] in symbols]
        upserts = [r for k, r in wanted.items() if current.get(k) != r]
        deletes = [current[k] for k in in_scope if k not in wanted]
        if not upserts and not deletes:
            return 0
        source = pa.Table.from_pylist(
            [{**r, "_delete": False} for r in upserts] + [{**r, "_delete": True} for r in deletes],
            schema=spec.schema.append(pa.field("_delete", pa.bool_())),
        )
        touched = sorted({str(r["symbol"]) for r in upserts + deletes})
        quoted = ", ".join("'" + s.replace("'", "''") + "'" for s in touched)
        target = self._create(spec)
        columns = {n: f"s.{n}" for n in names}
        (
            target.merge(
                source,
                predicate=f"t.symbol IN ({quoted}) AND t.symbol = s.symbol AND t.{key} = s.{key}",
                source_alias="s",
                target_alias="t",
                streamed_exec=False,
                commit_properties=CommitProperties(
                    app_transactions=[Transaction(APP_ID, version if version is not None else 0)]
                ),
            )
            .when_matched_delete(predicate="s._delete")
            .when_matched_update(updates=columns, predicate="NOT s._delete")
            .when_not_matched_insert(updates=columns, predicate="NOT s._delete")
            .execute()
        )
        for row in upserts:
            current[str(row[key])] = row
        for row in deletes:
            current.pop(str(row[key]), None)
        return len(upserts) + len(deletes)

    def _book_table(self, spec: TableSpec) -> DeltaTable | None:
        try:
            return DeltaTable(f"{self.out}/{spec.name}", storage_options=self.storage)
        except TableNotFoundError:
            return None

    def _create(self, spec: TableSpec) -> DeltaTable:
        uri = f"{self.out}/{spec.name}"
        try:
            return DeltaTable(uri, storage_options=self.storage)
        except TableNotFoundError:
            return DeltaTable.create(
                uri,
                spec.schema,
                mode="ignore",
                partition_by=["symbol"],
                name=spec.name,
                configuration=table_configuration(100),
                storage_options=self.storage,
            )


def _files(table: DeltaTable) -> dict[str, str]:
    """The table's data files and each one's symbol partition."""
    actions = pa.table(table.get_add_actions(flatten=True))
    paths = actions.column("path").to_pylist()
    parts = actions.column("partition.symbol").to_pylist()
    return dict(zip(paths, parts, strict=True))
