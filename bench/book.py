"""The strategy book's cost: a rebuild over a large lake, and the incremental step as the
tables grow.

A synthetic lake in the pipeline's schemas (shared/): ``--strategies`` iron condors
(4 legs each, ``--accounts`` accounts x ``--symbols`` underlyings), each opened under
its order reference and then adjusted in ``--rounds`` rounds of one unit out and one
unit in, 4 fills a round: 25,000 strategies x 40 fills = 1,000,000 executions and
100,000 legs at full size; ``positions_current``, the first position rows and one
Greek per option.

- rebuild: ``BookFeed.step(full)`` into an empty book, in a fresh process (its peak
  RSS is the rebuild's), against the baseline of reading the same executions columns
  with polars in another fresh process (what any rebuild must at least do);
- incremental: one new strategy's 4 fills appended on one underlying, then one step
  (marks not due), on lakes of growing size: flat means the step's cost does not
  grow with the tables.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from deltalake import write_deltalake

from bench.common import log, ratio, work_dir
from options_model.feed import FILL_COLUMNS, BookFeed
from shared import lake_names
from shared.executions import EXECUTIONS_SCHEMA
from shared.greeks import OPTION_GREEKS_SCHEMA
from shared.table import POSITION_UPDATES_SCHEMA

T0 = datetime(2026, 11, 2, 14, 30, tzinfo=UTC)
EXPIRY = date(2027, 1, 15)
OFFSETS = ((-4, "P", 1), (-2, "P", -1), (2, "C", -1), (4, "C", 1))  # strike steps, right, sign


def _strategy_rows(
    first: int, count: int, accounts: int, symbols: int, rounds: int
) -> pl.DataFrame:
    """Executions of strategies ``first .. first+count-1`` (4 legs, ``rounds`` rounds)."""
    rows: dict[str, list[Any]] = {k: [] for k in (
        "exec_base", "account", "conid", "symbol", "right", "strike", "side", "shares",
        "price", "time", "perm_id", "order_ref",
    )}  # fmt: skip
    for s in range(first, first + count):
        account, symbol = f"DU{s % accounts:06d}", f"S{(s // accounts) % symbols:03d}"
        for r in range(rounds):
            for leg, (steps, right, sign) in enumerate(OFFSETS):
                size = 10.0 if r == 0 else 1.0
                opening = r == 0 or r % 2 == 0
                signed = sign * size * (1 if opening else -1)
                rows["exec_base"].append(f"{s:08x}.{r:04x}.{leg}")
                rows["account"].append(account)
                rows["conid"].append(10_000_000 + s * 4 + leg)
                rows["symbol"].append(symbol)
                rows["right"].append(right)
                rows["strike"].append(100.0 + steps)
                rows["side"].append("BOT" if signed > 0 else "SLD")
                rows["shares"].append(abs(signed))
                rows["price"].append(round(1.0 + leg * 0.25 + (r % 7) * 0.01, 2))
                rows["time"].append(T0 + timedelta(seconds=s * 7 + r * 600 + leg))
                rows["perm_id"].append(s * 1_000 + r * 4 + leg)
                rows["order_ref"].append(f"IC-{s}")
    frame = pl.DataFrame(rows).with_columns(
        exec_id=pl.col("exec_base") + ".01",
        sec_type=pl.lit("OPT"),
        expiry=pl.lit(EXPIRY),
        multiplier=pl.lit(100.0),
        currency=pl.lit("USD"),
        order_id=pl.col("perm_id"),
        commission=pl.col("shares") * 0.65,
        commission_currency=pl.lit("USD"),
    )
    return frame


def _as(frame: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    """``frame`` in ``schema``: its columns cast, the others null."""
    table = frame.to_arrow()
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]  # fmt: skip
    return pa.Table.from_arrays(columns, schema=schema.with_metadata(None))


def _held(executions: pl.DataFrame, first_seen: bool) -> pl.DataFrame:
    """One row per contract: its final position (positions_current) or the position
    after the opening round (the first rows of position_updates)."""
    signed = pl.when(pl.col("side") == "BOT").then(pl.col("shares")).otherwise(-pl.col("shares"))
    frame = executions.with_columns(signed=signed)
    if first_seen:
        frame = frame.filter(pl.col("exec_base").str.contains(r"\.0000\."))
    return (
        frame.group_by("account", "conid", "symbol", "right", "strike", "expiry")
        .agg(
            position=pl.col("signed").sum(),
            average_cost=pl.col("price").mean() * 100,
            timestamp=pl.col("time").max() + pl.duration(seconds=1),
        )
        .with_columns(
            sec_type=pl.lit("OPT"),
            multiplier=pl.lit(100.0),
            currency=pl.lit("USD"),
            market_price=pl.col("average_cost") / 100 + 0.05,
            date=pl.col("timestamp").dt.date(),
            stream_id=pl.lit("0-1"),
        )
    )


def build_lake(lake: Path, strategies: int, accounts: int, symbols: int, rounds: int) -> int:
    """Write the synthetic lake; returns its executions."""
    executions = _strategy_rows(0, strategies, accounts, symbols, rounds)
    uri = str(lake / lake_names.EXECUTIONS)
    for start in range(0, executions.height, 250_000):
        part = executions.slice(start, 250_000)
        write_deltalake(uri, _as(part, EXECUTIONS_SCHEMA), mode="append", partition_by=["symbol"])
    for name, first in ((lake_names.POSITIONS_CURRENT, False), (lake_names.POSITION_UPDATES, True)):
        held = _as(_held(executions, first), POSITION_UPDATES_SCHEMA)
        write_deltalake(str(lake / name), held, partition_by=["symbol"])
    options = _held(executions, False).select("conid", "symbol", "right", "strike", "expiry")
    greeks = options.with_columns(
        sec_type=pl.lit("OPT"), currency=pl.lit("USD"), multiplier=pl.lit(100.0),
        source=pl.lit("model"), tick_type=pl.lit(13), data_type=pl.lit(1),
        timestamp=pl.lit(T0 + timedelta(days=1)), delta=pl.lit(0.3), gamma=pl.lit(0.01),
        theta=pl.lit(-0.02), vega=pl.lit(0.1), stream_id=pl.lit("0-1"),
    )  # fmt: skip
    write_deltalake(str(lake / lake_names.OPTION_GREEKS_CURRENT), _as(greeks, OPTION_GREEKS_SCHEMA))
    return executions.height


def _rebuild_child(lake: str, out: str, queue: Any) -> None:
    started = time.perf_counter()
    outcome = BookFeed(lake, book_uri=out, snapshot_s=3600).step(0.0, full=True)
    took = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((took, peak, outcome.written))


def _read_child(lake: str, queue: Any) -> None:
    started = time.perf_counter()
    frame = pl.scan_delta(f"{lake}/{lake_names.EXECUTIONS}").select(FILL_COLUMNS).collect()
    rows = frame.to_dicts()
    took = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((took, peak, {"rows": len(rows)}))


def _in_child(target: Any, *args: Any) -> tuple[float, float, dict[str, int]]:
    context = multiprocessing.get_context("spawn")  # deltalake must not run in a fork
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result: tuple[float, float, dict[str, int]] = queue.get(timeout=3600)
    process.join()
    return result


def incremental_step(lake: Path, strategies: int, accounts: int, symbols: int) -> float:
    """Seconds of one step after one new strategy's 4 fills (median of 3)."""
    out = lake.parent / f"{lake.name}-book"
    feed = BookFeed(str(lake), book_uri=str(out), snapshot_s=86_400)
    feed.step(0.0, full=True)
    samples = []
    for extra in range(3):
        fills = _strategy_rows(strategies + extra * accounts * symbols, 1, accounts, symbols, 1)
        write_deltalake(
            str(lake / lake_names.EXECUTIONS), _as(fills, EXECUTIONS_SCHEMA), mode="append",
            partition_by=["symbol"],
        )  # fmt: skip
        started = time.perf_counter()
        outcome = feed.step(1.0)
        samples.append(time.perf_counter() - started)
        assert outcome.written.get("transactions") == 4, outcome.written
    shutil.rmtree(out)
    return sorted(samples)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", type=int, default=25_000)
    parser.add_argument("--rounds", type=int, default=10, help="4 fills each")
    parser.add_argument("--accounts", type=int, default=4)
    parser.add_argument("--symbols", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="2,500 strategies (100k executions)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    strategies = 2_500 if args.quick else args.strategies
    with work_dir("book", args.keep) as work:
        lake = work / "lake"
        log(f"building a lake of {strategies} strategies x {args.rounds * 4} fills")
        executions = build_lake(lake, strategies, args.accounts, args.symbols, args.rounds)
        legs = strategies * 4
        took, peak, written = _in_child(_rebuild_child, str(lake), str(work / "book"))
        base_took, base_peak, _ = _in_child(_read_child, str(lake))
        rows = sum(written.values())
        print(f"rebuild: {executions:,} executions, {legs:,} legs -> rows written {written}")
        print(
            f"  {took:.1f} s ({executions / took:,.0f} executions/s, {rows / took:,.0f} rows/s), "
            f"peak RSS {peak:,.0f} MB"
        )
        print(
            f"  baseline (read the executions' columns into Python rows): {base_took:.1f} s, "
            f"peak RSS {base_peak:,.0f} MB; ratio time {ratio(took, base_took):.2f}, "
            f"memory {ratio(peak, base_peak):.2f}"
        )

        # The step recomputes the underlyings that changed: its cost must not grow with
        # the rest of the lake (more underlyings and accounts), and grows with the changed
        # underlying's own history (it is folded again).
        def wider(n: int) -> int:
            return max(int(args.symbols) * n // strategies, 1)

        def same(n: int) -> int:
            return int(args.symbols)

        series: list[tuple[str, Callable[[int], int]]] = [
            ("more underlyings, each the same size", wider),
            ("the same underlyings, each with more history", same),
        ]
        for label, symbols_of in series:
            steps: list[tuple[int, float]] = []
            for size in sorted({max(strategies // 10, 1), max(strategies // 3, 1), strategies}):
                small = work / f"lake-{size}"
                symbols = symbols_of(size)
                build_lake(small, size, args.accounts, symbols, args.rounds)
                steps.append((size, incremental_step(small, size, args.accounts, symbols)))
                shutil.rmtree(small)
            shown = ", ".join(
                f"{n * args.rounds * 4:,} executions {t * 1000:.0f} ms" for n, t in steps
            )
            growth = ratio(steps[-1][1], steps[0][1])
            print(f"incremental step, {label}: {shown}; growth {growth:.2f}x (flat is 1)")


if __name__ == "__main__":
    main()
