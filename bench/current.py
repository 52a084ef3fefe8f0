"""Current positions and time travel on a 5M-row history.

1. Current positions for the 5,000 contracts: read from ``positions_current``
   (built by the consumer's own MERGE from the history's newest row per contract)
   versus computed from the 5M-row ``position_updates`` (newest row per
   (account, conid) over the whole table), both with polars' Delta scan, in one run.
2. Time travel: one symbol's history at a past version (the 5M-row state, before
   one more append) versus a full-table read at the latest version.

    python -m bench.current [--rows 5000000] [--runs 5] [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import polars as pl
from deltalake import DeltaTable, write_deltalake

from bench.common import (
    SYMBOLS,
    copy_table,
    log,
    median,
    prefilled_table,
    ratio,
    rows_for,
    sink_settings,
    timed_median,
    work_dir,
)
from consumer.current import CurrentWriter
from shared.lake_names import POSITIONS_CURRENT as CURRENT_TABLE
from shared.table import POSITION_UPDATES_SCHEMA

KEY = ["account", "conid"]


def timed(action: Callable[[], pl.DataFrame], runs: int) -> tuple[list[float], pl.DataFrame]:
    samples, result = [], pl.DataFrame()
    for _ in range(runs):
        started = time.perf_counter()
        result = action()
        samples.append(time.perf_counter() - started)
    return samples, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="200,000 rows, 3 runs")
    args = parser.parse_args(argv)
    rows, runs = (200_000, 3) if args.quick else (args.rows, args.runs)

    source = prefilled_table(rows)
    with work_dir("current") as folder:
        uri = copy_table(source, folder / "lake")
        history = DeltaTable(uri)

        log("building positions_current with the consumer's MERGE")
        newest = (
            pl.scan_delta(history)
            .filter(pl.col("timestamp") == pl.col("timestamp").max().over(KEY))
            .collect()
        )
        settings = sink_settings(folder / "lake")
        current = CurrentWriter(settings)
        current.merge(newest.to_arrow().cast(POSITION_UPDATES_SCHEMA))
        current_uri = f"{folder / 'lake'}/{CURRENT_TABLE}"

        def from_current() -> pl.DataFrame:
            return pl.read_delta(current_uri).sort(KEY)

        def from_history() -> pl.DataFrame:
            frame = pl.scan_delta(DeltaTable(uri))
            latest = frame.filter(pl.col("timestamp") == pl.col("timestamp").max().over(KEY))
            return latest.sort(KEY).collect()

        log(f"current positions: {runs} runs each")
        current_s, current_rows = timed(from_current, runs)
        history_s, history_rows = timed(from_history, runs)
        columns = ["account", "conid", "position", "market_price", "timestamp"]
        assert current_rows.select(columns).equals(history_rows.select(columns))

        log("time travel: one more append, then the 5M-row version and the latest")
        past_version = DeltaTable(uri).version()
        write_deltalake(uri, rows_for(rows, 100_000), mode="append")
        symbol = SYMBOLS[7]

        def symbol_at_past_version() -> pl.DataFrame:
            table = DeltaTable(uri, version=past_version)
            return pl.scan_delta(table).filter(pl.col("symbol") == symbol).collect()

        def full_table() -> pl.DataFrame:
            return pl.read_delta(uri)

        travel_s, travel_rows = timed(symbol_at_past_version, runs)
        full_s, full_rows = timed(full_table, runs)

    print(f"current positions of {current_rows.height:,} contracts (history {rows:,} rows)")
    print(f"  from positions_current:            {timed_median(current_s)}")
    print(f"  computed from the history:         {timed_median(history_s)}")
    print(
        f"  ratio history / current:           {ratio(median(history_s), median(current_s)):.1f}x"
    )
    print(f"time travel: symbol {symbol} at version {past_version} ({rows:,}-row state)")
    print(
        f"  one symbol at the past version:    {timed_median(travel_s)} "
        f"({travel_rows.height:,} rows)"
    )
    print(
        f"  full table at the latest version:  {timed_median(full_s)} ({full_rows.height:,} rows)"
    )
    print(f"  ratio full / one symbol past:      {ratio(median(full_s), median(travel_s)):.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
