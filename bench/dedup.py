"""Dedup cost: one 5,000-entry batch with 20% replays through ``DeltaSink.commit``.

Steady state: the sink has been running, so the replays are keys it committed
in the previous batch (a producer retry or a redelivery). Measured on an empty
table and on a ``--big``-row table; their ratio is the figure of merit.

Also measured: the cold path (a sink just opened on the big table, whose
replays are older keys from the prefill) and the "seed plan" (read the whole
table's keys, anti-join, append) at ``--seed-size`` rows against the sink at
the same size.

    python -m bench.dedup            # empty vs 5M rows; seed plan at 1M rows
    python -m bench.dedup --quick    # empty vs 200k rows; seed plan at 100k rows
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from deltalake import DeltaTable, write_deltalake

from bench.common import (
    KEY_COLUMNS,
    copy_table,
    log,
    median,
    prefilled_table,
    ratio,
    sink_settings,
    stream_id_of,
    stream_index_start,
    timed_median,
    updates_at,
    verdict,
    work_dir,
)
from consumer.sink import DeltaSink
from shared.model import PositionUpdate
from shared.table import updates_to_arrow

GOAL_RATIO = 1.5

# (updates, entry IDs) -> (rows written, duplicates dropped)
CommitFn = Callable[[Sequence[PositionUpdate], Sequence[bytes]], tuple[int, int]]


@dataclass(slots=True)
class Shape:
    batch: int
    replays: int
    warmups: int
    runs: int


@dataclass(slots=True)
class Series:
    seconds: list[float]
    wrong: int  # batches whose written/duplicate counts were not the expected ones


def sink_commit(sink: DeltaSink) -> CommitFn:
    def commit(updates: Sequence[PositionUpdate], ids: Sequence[bytes]) -> tuple[int, int]:
        outcome = sink.commit(updates, ids)
        return outcome.rows_written, outcome.duplicates

    return commit


def seed_plan_commit(table: DeltaTable) -> CommitFn:
    """Read every committed key, anti-join the batch on the key, append the rest."""

    def commit(updates: Sequence[PositionUpdate], ids: Sequence[bytes]) -> tuple[int, int]:
        rows = updates_to_arrow(updates, ids)
        table.update_incremental()
        # polars' reader: ~5x faster here than DeltaTable.to_pyarrow_table.
        existing = pl.read_delta(table, columns=KEY_COLUMNS)
        batch_keys = pl.DataFrame(rows.select(KEY_COLUMNS))
        fresh = (
            batch_keys.with_row_index("row")
            .unique(subset=KEY_COLUMNS, keep="first", maintain_order=True)
            .join(existing, on=KEY_COLUMNS, how="anti")
            .get_column("row")
            .sort()
        )
        if fresh.len():
            write_deltalake(table, rows.take(fresh.to_arrow()), mode="append")
        return fresh.len(), rows.num_rows - fresh.len()

    return commit


def steady_state(commit: CommitFn, first_index: int, shape: Shape, seed: int) -> Series:
    """Warm-up batches, then timed ones; each replays keys of the batch before it."""
    rng = random.Random(seed)
    cursor = first_index
    previous: list[int] = []
    series = Series([], 0)
    for n in range(shape.warmups + shape.runs):
        replays = rng.sample(previous, shape.replays) if previous else []
        new = list(range(cursor, cursor + shape.batch - len(replays)))
        cursor += len(new)
        indices = new + replays
        rng.shuffle(indices)
        updates = updates_at(indices)
        ids = [stream_id_of(i) for i in indices]
        began = time.perf_counter()
        written, duplicates = commit(updates, ids)
        elapsed = time.perf_counter() - began
        if (written, duplicates) != (len(new), len(replays)):
            series.wrong += 1
            log(
                f"batch {n}: wrote {written} dropped {duplicates}, "
                f"expected {len(new)}/{len(replays)}"
            )
        if n >= shape.warmups:
            series.seconds.append(elapsed)
        previous = new
    return series


def cold_path(
    lake: Path, pool: range, first_index: int, shape: Shape, seed: int
) -> tuple[Series, list[float]]:
    """A sink opened just now; its replays are prefilled keys drawn from ``pool``."""
    rng = random.Random(seed)
    cursor = first_index
    series = Series([], 0)
    opens: list[float] = []
    for _ in range(shape.runs):
        began = time.perf_counter()
        sink = DeltaSink(sink_settings(lake))
        opens.append(time.perf_counter() - began)
        replays = rng.sample(pool, shape.replays)
        new = list(range(cursor, cursor + shape.batch - shape.replays))
        cursor += len(new)
        indices = new + replays
        rng.shuffle(indices)
        updates = updates_at(indices)
        ids = [stream_id_of(i) for i in indices]
        began = time.perf_counter()
        outcome = sink.commit(updates, ids)
        series.seconds.append(time.perf_counter() - began)
        if (outcome.rows_written, outcome.duplicates) != (len(new), len(replays)):
            series.wrong += 1
    return series, opens


def _wrong(series: Series) -> str:
    return "" if series.wrong == 0 else f"  [{series.wrong} batches with WRONG dedup counts]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dedup", description=__doc__)
    parser.add_argument("--big", type=int, default=5_000_000, help="rows of the big table")
    parser.add_argument("--seed-size", type=int, default=1_000_000, help="rows for the seed plan")
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--replays", type=int, default=1_000)
    parser.add_argument("--warmups", type=int, default=3)
    parser.add_argument("--runs", type=int, default=7, help="timed batches per figure (>= 5)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--quick", action="store_true", help="200k big table, 100k seed table")
    args = parser.parse_args(argv)
    if args.quick:
        args.big, args.seed_size, args.runs = 200_000, 100_000, 5
    shape = Shape(args.batch, args.replays, args.warmups, max(args.runs, 5))
    # Same new-key timestamps for every size: just after the biggest prefill.
    first = stream_index_start(max(args.big, args.seed_size))

    big_source = prefilled_table(args.big)
    seed_source = prefilled_table(args.seed_size)
    with work_dir("dedup", keep=args.keep) as scratch:
        log("steady state, empty table")
        empty = steady_state(
            sink_commit(DeltaSink(sink_settings(scratch / "empty"))), first, shape, 1
        )

        log(f"steady state, {args.big:,} rows")
        copy_table(big_source, scratch / "big")
        big = steady_state(sink_commit(DeltaSink(sink_settings(scratch / "big"))), first, shape, 1)

        log(f"cold path, {args.big:,} rows")
        copy_table(big_source, scratch / "cold")
        recent_pool = range(max(0, args.big - shape.batch), args.big)
        cold_recent, opens = cold_path(scratch / "cold", recent_pool, first, shape, 2)
        cold_spread, _ = cold_path(scratch / "cold", range(args.big), first + 1_000_000, shape, 3)

        log(f"sink vs seed plan, {args.seed_size:,} rows")
        copy_table(seed_source, scratch / "seed-sink")
        at_seed = steady_state(
            sink_commit(DeltaSink(sink_settings(scratch / "seed-sink"))), first, shape, 1
        )
        seed_uri = copy_table(seed_source, scratch / "seed-plan")
        seed = steady_state(seed_plan_commit(DeltaTable(seed_uri)), first, shape, 1)

    big_ratio = ratio(median(big.seconds), median(empty.seconds))
    print(
        f"== dedup: {shape.batch:,}-entry batch, {shape.replays:,} replays "
        f"({shape.warmups} warm-up batches, median of {shape.runs}) =="
    )
    print("steady state (replays = keys the running sink committed in the previous batch):")
    print(f"  empty table:        {timed_median(empty.seconds)}{_wrong(empty)}")
    print(f"  {args.big:>9,} rows:     {timed_median(big.seconds)}{_wrong(big)}")
    print(f"  ratio {args.big:,}/empty: {big_ratio:.2f}  {verdict(big_ratio, GOAL_RATIO, False)}")
    print(f"cold path ({args.big:,} rows, sink opened just before; open {timed_median(opens)}):")
    print(
        f"  replays from the newest {len(recent_pool):,} prefilled rows (restart after a crash): "
        f"{timed_median(cold_recent.seconds)}{_wrong(cold_recent)}"
    )
    print(
        f"  replays spread over all {args.big:,} prefilled rows (worst case): "
        f"{timed_median(cold_spread.seconds)}{_wrong(cold_spread)}"
    )
    print(
        f"  ratio cold-recent/steady-empty: "
        f"{ratio(median(cold_recent.seconds), median(empty.seconds)):.2f}; "
        f"cold-spread/steady-empty: {ratio(median(cold_spread.seconds), median(empty.seconds)):.2f}"
    )
    print(f"seed plan vs sink at {args.seed_size:,} rows (steady state, compacted table):")
    print(
        f"  DeltaSink.commit:                          "
        f" {timed_median(at_seed.seconds)}{_wrong(at_seed)}"
    )
    print(
        f"  read all keys + polars anti-join + append:  {timed_median(seed.seconds)}{_wrong(seed)}"
    )
    print(
        f"  DeltaSink is {ratio(median(seed.seconds), median(at_seed.seconds)):.1f}x faster "
        "(the seed plan here reads only the 3 key columns: a lower bound on its cost)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
