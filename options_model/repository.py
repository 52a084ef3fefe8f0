"""Repositories for the options data model: applications read and write these tables
without touching Delta directly.

Reads go through polars' lazy Delta scan: a symbol filter prunes partitions and
key filters are pushed into the Parquet scan (statistics), so no call loads a
whole table to answer for one symbol or strategy. "Latest" means the newest
row per key (``TableSpec.key``) at the version read. Time travel: by version or
by time; a version that does not exist and a time before the table existed are
errors (not version 0). Appends are validated against the schema and the
allowed codes first (a row that does not fit is refused with its index and
field) and written in one commit, streamed in record batches: a call writes
all of its rows or none. Transactions are deduplicated
by ``transaction_id`` with a MERGE (insert when not matched), so a retried
append does not double a fill, even when two writers race.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeAlias

import polars as pl
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from infra.time_travel import open_table_at
from options_model.tables import GREEKS, LEGS, POSITIONS, TRANSACTIONS, TableSpec
from shared.errors import RepositoryError, TableMissing
from shared.table import table_configuration

Rows: TypeAlias = Sequence[Mapping[str, Any]] | pa.Table
MERGE_ATTEMPTS = 8


class TableRepository:
    """Reads and appends for one table of the options data model."""

    def __init__(
        self,
        lake_uri: str,
        spec: TableSpec,
        storage_options: dict[str, str] | None = None,
        batch_rows: int = 50_000,
    ) -> None:
        self.spec = spec
        self.uri = f"{lake_uri.rstrip('/')}/{spec.name}"
        self._storage = storage_options or None
        self._batch_rows = batch_rows

    # --- the table ------------------------------------------------------------

    def _open(self, version: int | None = None, at: datetime | None = None) -> DeltaTable:
        try:
            return open_table_at(self.uri, self._storage, version=version, at=at)
        except TableMissing:
            raise TableMissing(f"table {self.spec.name} does not exist yet ({self.uri})") from None
        except RepositoryError as exc:
            raise RepositoryError(f"{self.spec.name}: {exc}") from None

    def _create(self) -> DeltaTable:
        try:
            return DeltaTable(self.uri, storage_options=self._storage)
        except TableNotFoundError:
            return DeltaTable.create(
                self.uri,
                self.spec.schema,
                mode="ignore",
                partition_by=["symbol"],
                name=self.spec.name,
                configuration=table_configuration(100),
                storage_options=self._storage,
            )

    @property
    def version(self) -> int:
        version: int = self._open().version()
        return version

    # --- writing ----------------------------------------------------------------

    def to_arrow(self, rows: Rows) -> pa.Table:
        """Validate rows against the schema and codes; raise RepositoryError naming the row."""
        schema = self.spec.schema
        if isinstance(rows, pa.Table):
            for column in schema:  # a column the caller left out is null, if it may be
                if column.name not in rows.column_names and column.nullable:
                    rows = rows.append_column(column, pa.nulls(rows.num_rows, column.type))
            try:
                table = rows.select(schema.names).cast(schema)
            except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
                raise RepositoryError(
                    f"{self.spec.name}: rows do not fit the schema: {exc}"
                ) from None
            records: Sequence[Mapping[str, Any]] = table.to_pylist()
        else:
            records = rows
            for index, row in enumerate(records):
                unknown = set(row) - set(schema.names)
                if unknown:
                    raise RepositoryError(
                        f"{self.spec.name}: row {index} has unknown fields {sorted(unknown)}"
                    )
                for column in schema:
                    single = pa.schema([column])
                    try:
                        pa.Table.from_pylist([{column.name: row.get(column.name)}], schema=single)
                    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
                        raise RepositoryError(
                            f"{self.spec.name}: row {index}, field {column.name!r}: {exc}"
                        ) from None
            table = pa.Table.from_pylist(list(records), schema=schema)
        for index, row in enumerate(records):
            for column in schema:
                if not column.nullable and row.get(column.name) is None:
                    raise RepositoryError(
                        f"{self.spec.name}: row {index}, field {column.name!r} is required"
                    )
            for column, allowed in self.spec.codes.items():
                if row.get(column) is not None and row[column] not in allowed:
                    raise RepositoryError(
                        f"{self.spec.name}: row {index}, field {column!r}: "
                        f"{row[column]!r} is not one of {sorted(allowed)}"
                    )
        return table

    def append(self, rows: Rows) -> int:
        """Validate, then write in batches; returns the rows written."""
        table = self.to_arrow(rows)
        if table.num_rows == 0:
            return 0
        self._create()
        if self.spec.unique is not None:
            return self._append_unique(table, self.spec.unique)
        # One commit for the whole call (the writer streams it in record batches of
        # ``batch_rows``): a failure leaves nothing behind, so a retry cannot double rows.
        write_deltalake(
            self.uri,
            pa.RecordBatchReader.from_batches(
                table.schema, table.to_batches(max_chunksize=self._batch_rows)
            ),
            mode="append",
            partition_by=["symbol"],
            storage_options=self._storage,
        )
        return int(table.num_rows)

    def _append_unique(self, table: pa.Table, column: str) -> int:
        # Within the call: the first row of each value wins.
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        fresh = frame.unique(subset=[column], keep="first", maintain_order=True).to_arrow()
        before = self._row_count()
        for attempt in range(MERGE_ATTEMPTS):
            try:
                (
                    self._create()
                    .merge(
                        fresh,
                        predicate=f"t.symbol = s.symbol AND t.{column} = s.{column}",
                        source_alias="s",
                        target_alias="t",
                    )
                    .when_not_matched_insert_all()
                    .execute()
                )
                break
            except CommitFailedError:
                if attempt == MERGE_ATTEMPTS - 1:
                    raise
        return self._row_count() - before

    def _row_count(self) -> int:
        actions = self._create().get_add_actions(flatten=True)
        return sum(n or 0 for n in actions.column("num_records").to_pylist())

    # --- reading ----------------------------------------------------------------

    def _scan(
        self, table: DeltaTable, symbol: str | None, filters: Mapping[str, Any]
    ) -> pl.LazyFrame:
        frame = pl.scan_delta(table)
        if symbol is not None:
            frame = frame.filter(pl.col("symbol") == symbol)  # partition pruning
        for column, value in filters.items():
            if column not in self.spec.schema.names:
                raise RepositoryError(f"{self.spec.name}: no column {column!r}")
            frame = frame.filter(pl.col(column) == value)
        return frame

    def _latest(self, frame: pl.LazyFrame) -> pl.DataFrame:
        key = list(self.spec.key)
        newest = frame.filter(pl.col("timestamp") == pl.col("timestamp").max().over(key))
        return newest.sort(key).collect()

    def latest(self, symbol: str | None = None, **filters: Any) -> pl.DataFrame:
        """Newest row per key now."""
        return self._latest(self._scan(self._open(), symbol, filters))

    def at_version(self, version: int, symbol: str | None = None, **filters: Any) -> pl.DataFrame:
        """Newest row per key as the table was at ``version``."""
        return self._latest(self._scan(self._open(version=version), symbol, filters))

    def at_time(self, moment: datetime, symbol: str | None = None, **filters: Any) -> pl.DataFrame:
        """Newest row per key as the table was at ``moment``."""
        return self._latest(self._scan(self._open(at=moment), symbol, filters))

    def by_symbol(self, symbol: str) -> pl.DataFrame:
        return self.latest(symbol=symbol)

    def history(
        self, symbol: str | None = None, version: int | None = None, **filters: Any
    ) -> pl.DataFrame:
        """Every row (optionally of one symbol, at a version), oldest first."""
        frame = self._scan(self._open(version=version), symbol, filters)
        return frame.sort([*self.spec.key, "timestamp"]).collect()


class StrategyPositionRepository(TableRepository):
    """Strategy positions, with open positions and an in-place field update (MERGE)."""

    def __init__(self, lake_uri: str, storage_options: dict[str, str] | None = None) -> None:
        super().__init__(lake_uri, POSITIONS, storage_options)

    def open_positions(self, symbol: str | None = None) -> pl.DataFrame:
        latest = self.latest(symbol=symbol)
        return latest.filter(pl.col("status") == "open")

    def update(self, strategy_id: str, **fields: Any) -> None:
        """Change fields of one strategy's latest row with a Delta MERGE.

        The row's timestamp becomes the time of the change (or ``timestamp=`` if given);
        earlier versions keep the old values for time travel.
        """
        names = set(self.spec.schema.names) - {"strategy_id", "symbol"}
        unknown = set(fields) - names
        if unknown or not fields:
            raise RepositoryError(
                f"positions: cannot update {sorted(unknown) or 'nothing'}; "
                f"updatable: {sorted(names)}"
            )
        current = self.latest(strategy_id=strategy_id)
        if current.is_empty():
            raise RepositoryError(f"positions: unknown strategy {strategy_id!r}")
        if current.height > 1:
            raise RepositoryError(
                f"positions: strategy {strategy_id!r} has {current.height} rows at its latest "
                "timestamp; cannot tell which to update"
            )
        row = current.row(0, named=True)
        changed = {**row, "timestamp": datetime.now(UTC), **fields}
        source = self.to_arrow([changed])
        predicate = (
            "t.symbol = s.symbol AND t.strategy_id = s.strategy_id "
            f"AND t.timestamp = '{row['timestamp'].isoformat()}'"
        )
        updates = {name: f"s.{name}" for name in [*fields, "timestamp"]}
        for attempt in range(MERGE_ATTEMPTS):
            try:
                metrics = (
                    self._open()
                    .merge(source, predicate=predicate, source_alias="s", target_alias="t")
                    .when_matched_update(updates=updates)
                    .execute()
                )
                break
            except CommitFailedError:
                if attempt == MERGE_ATTEMPTS - 1:
                    raise
        if metrics.get("num_target_rows_updated", 0) != 1:
            raise RepositoryError(f"positions: strategy {strategy_id!r} changed meanwhile; retry")


def legs(lake_uri: str, storage_options: dict[str, str] | None = None) -> TableRepository:
    return TableRepository(lake_uri, LEGS, storage_options)


def greeks(lake_uri: str, storage_options: dict[str, str] | None = None) -> TableRepository:
    return TableRepository(lake_uri, GREEKS, storage_options)


def transactions(lake_uri: str, storage_options: dict[str, str] | None = None) -> TableRepository:
    return TableRepository(lake_uri, TRANSACTIONS, storage_options)
