"""The strategy book's Greeks over time: the ``greeks`` table (options_model/tables.py).

Two kinds of rows, told apart by ``trigger``:

- ``interval``: every open strategy at each time of the ``POSLAKE_BOOK_SNAPSHOT_S``
  grid, when the feed's marks are due;
- ``change``: one strategy at the time of the fill or position that changed it.

Each row carries its account's ``portfolio_delta``/``portfolio_gamma``: the sums over
the account's open strategies. Keyed by (strategy, time, trigger): a step redone after
a crash adds nothing twice; a change keeps its first record; a grid time written again
(a restart within one interval) holds the newest step's view, whole (rows of it the
newest step no longer has are deleted), so its portfolio sums agree. The log is what
the book saw when it saw it: a rebuild of the book leaves it as it is.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction

from options_model.tables import GREEKS
from shared.table import sql_strings

Row = dict[str, Any]
RowKey = tuple[str, datetime, bool]  # strategy, time, on the grid


class GreeksLog:
    """Builds and writes the log's rows; remembers the last grid's underlyings."""

    def __init__(self, snapshot_s: float, clock: Callable[[], float]) -> None:
        self.snapshot_s = snapshot_s
        self._clock = clock  # wall time: the grid is of the clock, not of the data
        self._grid_symbols: set[str] = set()  # of the last grid written

    def rows(
        self, book: Iterable[Mapping[str, Any]], changed: list[Row], marks_due: bool
    ) -> tuple[dict[RowKey, Row], datetime | None]:
        """The rows for the book's strategy rows now (``book``) and those a step changed,
        and the grid time if marks are due."""
        book = list(book)
        totals: dict[str, dict[str, float]] = defaultdict(lambda: {"delta": 0.0, "gamma": 0.0})
        for row in book:
            if row["status"] != "closed":
                for greek in ("delta", "gamma"):
                    totals[row["account"]][greek] += row[greek] or 0.0
        rows: dict[RowKey, Row] = {}
        for row in changed:
            moment = row["timestamp"]
            rows[(row["strategy_id"], moment, False)] = _row(row, moment, totals, grid=False)
        grid: datetime | None = None
        if marks_due:
            grid = datetime.fromtimestamp(self.snapshot_s * (self._clock() // self.snapshot_s), UTC)
            for row in book:
                if row["status"] != "closed":
                    rows[(row["strategy_id"], grid, True)] = _row(row, grid, totals, grid=True)
        return rows, grid

    def write(
        self,
        table: DeltaTable,
        rows: dict[RowKey, Row],
        grid: datetime | None,
        app_id: str,
        version: int | None,
    ) -> tuple[int, list[str]]:
        """One MERGE; returns the rows inserted, updated or deleted and the underlyings
        it touched."""
        source = pa.Table.from_pylist(
            list(rows.values()), schema=GREEKS.schema.append(pa.field("_grid", pa.bool_()))
        )
        symbols = {str(r["symbol"]) for r in rows.values()}
        touched = sorted(symbols | (self._grid_symbols if grid is not None else set()))
        quoted = sql_strings(touched)
        columns = {n: f"s.{n}" for n in GREEKS.schema.names}
        merge = (
            table.merge(
                source,
                predicate=f"t.symbol IN ({quoted}) AND t.symbol = s.symbol "
                "AND t.strategy_id = s.strategy_id AND t.timestamp = s.timestamp "
                "AND t.trigger = s.trigger",
                source_alias="s",
                target_alias="t",
                streamed_exec=False,
                commit_properties=CommitProperties(
                    app_transactions=[Transaction(app_id, version if version is not None else 0)]
                ),
            )
            .when_matched_update(updates=columns, predicate="s._grid")
            .when_not_matched_insert(updates=columns)
        )
        if grid is not None:
            self._grid_symbols = {str(r["symbol"]) for k, r in rows.items() if k[2]}
            merge = merge.when_not_matched_by_source_delete(
                predicate=f"t.symbol IN ({quoted}) AND t.timestamp = '{grid.isoformat()}' "
                "AND t.trigger = 'interval'"
            )
        metrics = merge.execute()
        written = sum(
            int(metrics.get(f"num_target_rows_{what}", 0))
            for what in ("inserted", "updated", "deleted")
        )
        return written, touched


def _row(
    row: Mapping[str, Any],
    moment: datetime,
    totals: Mapping[str, Mapping[str, float]],
    grid: bool,
) -> dict[str, Any]:
    account = row["account"]
    return {
        "strategy_id": row["strategy_id"],
        "account": account,
        "symbol": row["symbol"],
        **{g: row[g] for g in ("delta", "gamma", "theta", "vega")},
        "portfolio_delta": totals[account]["delta"] if account in totals else None,
        "portfolio_gamma": totals[account]["gamma"] if account in totals else None,
        "timestamp": moment,
        "trigger": "interval" if grid else "change",
        "_grid": grid,
    }
