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
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import polars as pl
import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import TableNotFoundError

from options_model.book import BookRows, Marks, book_rows
from options_model.exposures import source_rank
from options_model.fills import Fill, Holding, fills_from_rows, held_before
from options_model.greeks_log import GreeksLog
from options_model.grouping import BookFold, BookRules
from options_model.ledger import FLAT
from options_model.overrides import Overrides, read_overrides
from options_model.tables import GREEKS, LEGS, POSITIONS, TRANSACTIONS, TableSpec
from shared import lake_names
from shared.table import (
    compact_partitions,
    partitions_to_compact,
    sql_strings,
    table_configuration,
)

log = logging.getLogger(__name__)

APP_ID = "poslake-book"
UPKEEP_EVERY_COMMITS = 50
UPKEEP_MIN_FILES = 16
UPKEEP_SMALL_FILE_BYTES = 4 * 1024 * 1024
UPKEEP_TARGET_FILE_BYTES = 16 * 1024 * 1024
FED_TABLES: tuple[TableSpec, ...] = (TRANSACTIONS, LEGS, POSITIONS)  # written in this order
Partition = tuple[str, str]  # (account, underlying symbol)
FILL_COLUMNS = [
    "exec_base", "account", "symbol", "conid", "sec_type", "right", "strike", "expiry",
    "multiplier", "side", "shares", "price", "time", "order_id", "perm_id", "order_ref",
    "commission",
]  # fmt: skip
_HOLDING_COLUMNS = [
    "account", "conid", "symbol", "sec_type", "right", "strike", "expiry", "multiplier",
    "position", "market_price", "average_cost", "timestamp",
]  # fmt: skip


_EMPTY_HELD = pl.DataFrame(
    schema={"account": pl.String, "conid": pl.Int64, "symbol": pl.String, "position": pl.Float64}
)


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
        on_commit: Callable[[str], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.base = lake_uri.rstrip("/")
        self.out = (book_uri or lake_uri).rstrip("/")  # the book's tables (default: beside)
        self.storage = storage_options or None
        self.rules = rules or BookRules()
        self.snapshot_s = snapshot_s
        self._rows: dict[str, dict[str, dict[str, Any]]] = {}  # table -> key -> row
        self._by_symbol: dict[str, dict[str, set[str]]] = {}  # table -> symbol -> keys
        self._exec_files: set[str] | None = None
        self._held = _EMPTY_HELD  # account, conid, symbol, position at the last step
        self._first_held: dict[tuple[str, int], dict[str, Any]] = {}  # first position rows
        self._marked_at: float | None = None
        self._overrides = Overrides()
        self._greeks: dict[int, dict[str, float | None]] | None = None  # of the last marks
        self._commits: dict[str, int] = {}  # per table, for upkeep
        self._dirty: dict[str, set[str]] = {}  # partitions written since the last upkeep
        self._upserted: dict[str, list[dict[str, Any]]] = {}  # by the last write, per table
        self._greeks_log = GreeksLog(snapshot_s, clock or time.time)
        self._handles: dict[str, DeltaTable] = {}  # by URI (_open)
        self._on_commit = on_commit or (lambda _table: None)  # after each commit (tests crash here)

    # --- the inputs ----------------------------------------------------------------

    def _table(self, name: str) -> DeltaTable | None:
        return self._open(f"{self.base}/{name}")

    def _open(self, uri: str) -> DeltaTable | None:
        """A table at its newest version; each is opened once and then brought up to
        date (a log replay on every open would cost each step more as logs grow)."""
        table = self._handles.get(uri)
        try:
            if table is None:
                table = self._handles[uri] = DeltaTable(uri, storage_options=self.storage)
            else:
                table.update_incremental()
        except TableNotFoundError:
            return None
        return table

    def _fills(self, executions: DeltaTable, symbols: set[str] | None) -> list[Fill]:
        frame = pl.scan_delta(executions)
        if symbols is not None:
            frame = frame.filter(pl.col("symbol").is_in(sorted(symbols)))
        rows = frame.select(FILL_COLUMNS).filter(pl.col("side").is_not_null()).collect()
        return fills_from_rows(rows.to_dicts())

    def _holdings(self, symbols: set[str] | None) -> list[dict[str, Any]]:
        """``positions_current``'s rows (of ``symbols`` only, if given: partitions pruned)."""
        table = self._table(lake_names.POSITIONS_CURRENT)
        if table is None:
            return []
        frame = pl.scan_delta(table)
        if symbols is not None:
            frame = frame.filter(pl.col("symbol").is_in(sorted(symbols)))
        return frame.select(_HOLDING_COLUMNS).collect().to_dicts()

    def _marks(self, holdings: list[dict[str, Any]], fresh: bool) -> Marks:
        """Prices from the holdings read; Greeks read again only when marks are due
        (``fresh``: the whole table), else those of the last marks."""
        prices = {
            int(r["conid"]): float(r["market_price"])
            for r in holdings
            if r.get("market_price") is not None
        }
        if not fresh and self._greeks is not None:
            return Marks(prices, self._greeks)
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
        self._greeks = greeks
        return Marks(prices, greeks)

    def _first_held_of(self, wanted: set[tuple[str, int]]) -> None:
        """The first non-zero position the lake recorded of each wanted contract (what
        the account held when the pipeline first saw it), cached: it never changes."""
        missing = wanted - self._first_held.keys()
        table = self._table(lake_names.POSITION_UPDATES) if missing else None
        if table is None:
            return
        conids = sorted({conid for _, conid in missing})
        accounts = sorted({account for account, _ in missing})
        frame = (
            pl.scan_delta(table)
            .filter(
                pl.col("conid").is_in(conids)
                & pl.col("account").is_in(accounts)
                & (pl.col("position") != 0)
            )
            .select(_HOLDING_COLUMNS)
            .sort("timestamp")
            .group_by("account", "conid", maintain_order=True)
            .first()
            .collect()
        )
        for row in frame.to_dicts():
            key = (str(row["account"]), int(row["conid"]))
            if key in missing:
                self._first_held[key] = row

    # --- a step ------------------------------------------------------------------

    def step(self, now: float, full: bool = False) -> StepOutcome:
        """Bring the tables up to date with the inputs as they are; ``now`` (a monotonic
        clock) decides when marks are due."""
        outcome = StepOutcome()
        if not self._rows:
            self._load()
            full = True
        executions, symbols = self._observe(full)
        marks_due = full or self._marked_at is None or now - self._marked_at >= self.snapshot_s
        if symbols is not None and not symbols and not marks_due:
            return outcome
        version = executions.version() if executions is not None else None
        outcome.executions_version = version
        scope = None if marks_due else symbols
        fills = self._fills(executions, scope) if executions else []
        rows = self._compute(fills, self._holdings(scope), fresh_marks=marks_due)
        outcome.partitions = len({(r["account"], r["symbol"]) for r in rows.positions})
        for spec, produced in zip(
            FED_TABLES, (rows.transactions, rows.legs, rows.positions), strict=True
        ):
            outcome.written[spec.name] = self._write(spec, produced, scope, version)
        changed = self._upserted.get(POSITIONS.name, [])
        outcome.written[GREEKS.name] = self._snapshot(changed, marks_due, version)
        if marks_due:
            self._marked_at = now
        return outcome

    def _observe(self, full: bool) -> tuple[DeltaTable | None, set[str] | None]:
        """Read what tells a step what changed (the executions' files, held quantities,
        overrides) and keep it for the next; the underlyings changed since the last
        step, or None (``full``: everything)."""
        executions = self._table(lake_names.EXECUTIONS)
        held = self._held_now()
        overrides = read_overrides(self.base, self.storage)
        symbols: set[str] | None = None
        if full:
            self._exec_files = set(_files(executions)) if executions is not None else set()
        else:
            symbols = self._changed_symbols(executions, held)
            symbols |= _changed_overrides(self._overrides, overrides)
        self._held, self._overrides = held, overrides
        return executions, symbols

    def _held_now(self) -> pl.DataFrame:
        """Every contract's position now (account, conid, symbol, position): the only
        columns read of the whole table each step (prices move all the time; held
        quantities seldom)."""
        table = self._table(lake_names.POSITIONS_CURRENT)
        if table is None:
            return _EMPTY_HELD
        return pl.scan_delta(table).select(_EMPTY_HELD.columns).collect()

    def _changed_symbols(self, executions: DeltaTable | None, held: pl.DataFrame) -> set[str]:
        """Underlyings with new executions files (by partition), or whose held
        quantities changed since the last step."""
        symbols: set[str] = set()
        if executions is not None:
            files = _files(executions)
            added = files.keys() - (self._exec_files or set())
            self._exec_files = set(files)
            symbols |= {files[path] for path in added}
        before = self._held.rename({"position": "before", "symbol": "symbol_before"})
        moved = (
            held.join(before, on=["account", "conid"], how="full", coalesce=True)
            .filter(pl.col("position").fill_null(0.0) != pl.col("before").fill_null(0.0))
            .select(pl.coalesce("symbol", "symbol_before"))
        )
        symbols |= set(moved.to_series().drop_nulls().to_list())
        return {s for s in symbols if s}

    def _compute(
        self, fills: list[Fill], holdings_rows: list[dict[str, Any]], fresh_marks: bool = True
    ) -> BookRows:
        given = self._overrides
        fills = [
            replace(f, group=label) if (label := given.fills.get((f.account, f.exec_base))) else f
            for f in fills
        ]
        by_partition: dict[Partition, list[Fill]] = defaultdict(list)
        for one in fills:
            by_partition[(one.account, one.symbol)].append(one)
        # Held before every known fill (opened before the pipeline ran): the position now
        # less the fills, described by the contract's first row (its first sight).
        now = {(str(r["account"]), int(r["conid"])): r for r in holdings_rows}
        residual: dict[tuple[str, int], float] = defaultdict(float)
        for key, row in now.items():
            residual[key] += float(row["position"] or 0.0)
        for one in fills:
            residual[(one.account, one.contract.conid)] -= one.signed
        before = {k: q for k, q in residual.items() if abs(q) > FLAT and k in now}
        self._first_held_of(set(before))
        holdings = [
            held_before(self._first_held.get(key, now[key]), quantity)
            for key, quantity in sorted(before.items())
        ]
        holdings = [
            replace(h, group=label)
            if (label := given.held.get((h.account, h.contract.conid)))
            else h
            for h in holdings
        ]
        held_by: dict[Partition, list[Holding]] = defaultdict(list)
        for holding in holdings:
            held_by[(holding.account, holding.symbol)].append(holding)
        seen_at: dict[Partition, list[datetime]] = defaultdict(list)
        for row in holdings_rows:
            seen_at[(str(row["account"]), str(row["symbol"]))].append(row["timestamp"])
        marks = self._marks(holdings_rows, fresh_marks)
        rows = BookRows()
        names = given.names
        for account, symbol in sorted(by_partition.keys() | held_by.keys()):
            partition_fills = by_partition.get((account, symbol), [])
            partition_held = held_by.get((account, symbol), [])
            times = [f.time for f in partition_fills] + [h.first_seen for h in partition_held]
            times += seen_at.get((account, symbol), [])
            fold = BookFold(account, symbol, self.rules)
            strategies = fold.run(partition_fills, partition_held, max(times))
            part = book_rows(strategies, marks, names)
            rows.transactions += part.transactions
            rows.legs += part.legs
            rows.positions += part.positions
        return rows

    def rebuild(self, now: float) -> StepOutcome:
        """Recompute the whole book and replace each table's rows in one overwrite commit
        (its history stays: time travel still shows the book as it was)."""
        outcome = StepOutcome()
        executions, _ = self._observe(full=True)
        version = executions.version() if executions is not None else None
        outcome.executions_version = version
        rows = self._compute(
            self._fills(executions, None) if executions else [], self._holdings(None)
        )
        outcome.partitions = len({(r["account"], r["symbol"]) for r in rows.positions})
        for spec, produced in zip(
            FED_TABLES, (rows.transactions, rows.legs, rows.positions), strict=True
        ):
            wanted = [{n: r.get(n) for n in spec.schema.names} for r in produced]
            self._create(spec)
            write_deltalake(
                f"{self.out}/{spec.name}",
                pa.Table.from_pylist(wanted, schema=spec.schema),
                mode="overwrite",
                partition_by=["symbol"],
                storage_options=self.storage,
                commit_properties=CommitProperties(
                    app_transactions=[Transaction(APP_ID, version if version is not None else 0)]
                ),
            )
            self._keep(spec, wanted)
            outcome.written[spec.name] = len(wanted)
            self._on_commit(spec.name)
        self._marked_at = now
        return outcome

    # --- the tables --------------------------------------------------------------

    def _load(self) -> None:
        for spec in FED_TABLES:
            table = self._book_table(spec)
            frame = pl.scan_delta(table).collect() if table is not None else None
            self._keep(spec, frame.to_dicts() if frame is not None else [])

    def _keep(self, spec: TableSpec, rows: list[dict[str, Any]]) -> None:
        """The table's rows as the feed knows them, indexed by underlying."""
        key = spec.key[0]
        self._rows[spec.name] = {str(r[key]): r for r in rows}
        index: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            index[str(row["symbol"])].add(str(row[key]))
        self._by_symbol[spec.name] = index

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
        index = self._by_symbol.setdefault(spec.name, defaultdict(set))
        wanted = {str(r[key]): {n: r.get(n) for n in names} for r in produced}
        in_scope = (
            list(current)
            if symbols is None
            else [k for symbol in symbols for k in index.get(symbol, ())]
        )
        upserts = [r for k, r in wanted.items() if current.get(k) != r]
        deletes = [current[k] for k in in_scope if k not in wanted]
        self._upserted[spec.name] = []
        if not upserts and not deletes:
            return 0
        source = pa.Table.from_pylist(
            [{**r, "_delete": False} for r in upserts] + [{**r, "_delete": True} for r in deletes],
            schema=spec.schema.append(pa.field("_delete", pa.bool_())),
        )
        touched = sorted({str(r["symbol"]) for r in upserts + deletes})
        quoted = sql_strings(touched)
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
        self._upserted[spec.name] = upserts
        for row in upserts:
            current[str(row[key])] = row
            index[str(row["symbol"])].add(str(row[key]))
        for row in deletes:
            current.pop(str(row[key]), None)
            index[str(row["symbol"])].discard(str(row[key]))
        self._on_commit(spec.name)
        self._upkeep(spec.name, target, touched)
        return len(upserts) + len(deletes)

    def _upkeep(self, name: str, table: DeltaTable, symbols: list[str]) -> None:
        """Every step adds a file to each partition it touches (one a second, all day):
        every ``UPKEEP_EVERY_COMMITS`` commits of a table, its partitions with many small
        files are compacted (no app transaction: it rewrites, never changes, rows) and
        a checkpoint written, so a MERGE's cost stays that of the partition's rows."""
        self._commits[name] = self._commits.get(name, 0) + 1
        self._dirty.setdefault(name, set()).update(symbols)
        if self._commits[name] % UPKEEP_EVERY_COMMITS:
            return
        table.update_incremental()
        crowded = [
            s
            for s in partitions_to_compact(table, UPKEEP_SMALL_FILE_BYTES, UPKEEP_MIN_FILES)
            if s in self._dirty[name]
        ]
        if crowded:
            compact_partitions(table, crowded, UPKEEP_TARGET_FILE_BYTES)
        table.create_checkpoint()
        table.cleanup_metadata()
        self._dirty[name] = set()

    def _snapshot(self, changed: list[dict[str, Any]], marks_due: bool, version: int | None) -> int:
        """The Greeks log's rows of this step (options_model/greeks_log.py), one commit."""
        book = self._rows.get(POSITIONS.name, {}).values()
        rows, grid = self._greeks_log.rows(book, changed, marks_due)
        if not rows:
            return 0
        target = self._create(GREEKS)
        written, touched = self._greeks_log.write(target, rows, grid, APP_ID, version)
        self._on_commit(GREEKS.name)
        self._upkeep(GREEKS.name, target, touched)
        return written

    def _book_table(self, spec: TableSpec) -> DeltaTable | None:
        return self._open(f"{self.out}/{spec.name}")

    def _create(self, spec: TableSpec) -> DeltaTable:
        table = self._book_table(spec)
        if table is not None:
            return table
        uri = f"{self.out}/{spec.name}"
        self._handles[uri] = DeltaTable.create(
            uri,
            spec.schema,
            mode="ignore",
            partition_by=["symbol"],
            name=spec.name,
            configuration=table_configuration(100),
            storage_options=self.storage,
        )
        return self._handles[uri]


def _changed_overrides(before: Overrides, after: Overrides) -> set[str]:
    """The underlyings whose overrides changed (given, changed or withdrawn)."""
    old, new = before.in_force, after.in_force
    symbols = before.symbols | after.symbols
    return {symbols.get(k, "") for k in old.keys() | new.keys() if old.get(k) != new.get(k)} - {""}


def book_progress(
    lake_uri: str, storage_options: dict[str, str] | None = None
) -> tuple[int | None, int | None]:
    """(executions version the book last committed at, executions' own version); None
    where a table does not exist yet."""
    base = lake_uri.rstrip("/")
    try:
        executions: int | None = DeltaTable(
            f"{base}/{lake_names.EXECUTIONS}", storage_options=storage_options
        ).version()
    except TableNotFoundError:
        executions = None
    reflected: int | None = None
    for spec in FED_TABLES:
        try:
            table = DeltaTable(f"{base}/{spec.name}", storage_options=storage_options)
        except TableNotFoundError:
            continue
        version = table.transaction_version(APP_ID)
        if version is not None:
            reflected = version if reflected is None else max(reflected, version)
    return reflected, executions


def _files(table: DeltaTable) -> dict[str, str]:
    """The table's data files and each one's symbol partition."""
    actions = pa.table(table.get_add_actions(flatten=True))
    paths = actions.column("path").to_pylist()
    parts = actions.column("partition.symbol").to_pylist()
    return dict(zip(paths, parts, strict=True))
