"""Small files: a table after many small consumer commits vs a freshly compacted copy.

``--commits`` commits through ``DeltaSink.commit``, each of ``--rows-per-commit``
updates over all 50 symbols (so each commit adds 50 files), with the consumer's
upkeep: ``TableMaintainer.run_once()`` every ``maintenance_every_commits`` commits
(synchronously). Then, on that table and on a copy compacted with
``optimize.compact()`` + ``create_checkpoint()``: table open time and the time to
commit one 5,000-row batch across 50 partitions. A reference table gets
``--ref-commits`` commits and no upkeep at all.

    python -m bench.small_files                 # 10,000 commits (many minutes)
    python -m bench.small_files --quick         # 300 commits
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from deltalake import DeltaTable, write_deltalake

from bench.common import (
    active_files,
    checkpoint_summary,
    log,
    median,
    private_redis,
    ratio,
    row_count,
    rows_for,
    sink_settings,
    stream_id_of,
    timed_median,
    updates_at,
    verdict,
    work_dir,
)
from consumer.maintenance import TableMaintainer
from consumer.sink import DeltaSink
from shared.table import open_or_create_table

GOAL_RATIO = 1.5
TABLE = "position_updates"


@dataclass(slots=True)
class BuildStats:
    commits: int
    seconds: float
    maintenance_runs: int
    maintenance_s: float
    partitions_compacted: int
    last_100_commit_s: float  # mean seconds per commit over the last 100 commits


@dataclass(slots=True)
class Figures:
    files: int
    rows: int
    checkpoints: str
    opens: list[float]
    sink_open_s: float
    appends: list[float]


def build(lake: Path, commits: int, rows_per_commit: int, client: redis.Redis | None) -> BuildStats:
    """``commits`` small commits; with ``client``, the consumer's maintenance too."""
    settings = sink_settings(lake)
    sink = DeltaSink(settings)
    maintainer = TableMaintainer(settings, client) if client is not None else None
    every = settings.maintenance_every_commits
    began = time.perf_counter()
    maintenance_s = 0.0
    compacted = 0
    recent: list[float] = []
    for n in range(1, commits + 1):
        first = (n - 1) * rows_per_commit
        indices = range(first, first + rows_per_commit)
        updates = updates_at(indices)
        ids = [stream_id_of(i) for i in indices]
        started = time.perf_counter()
        sink.commit(updates, ids)
        recent.append(time.perf_counter() - started)
        recent = recent[-100:]
        if maintainer is not None and n % every == 0:
            started = time.perf_counter()
            compacted += len(maintainer.run_once())
            maintenance_s += time.perf_counter() - started
        if n % 1_000 == 0 or n == commits:
            log(
                f"{lake.name}: {n:,}/{commits:,} commits, {time.perf_counter() - began:.0f}s, "
                f"last 100 at {median(recent) * 1000:.0f} ms/commit"
            )
    return BuildStats(
        commits=commits,
        seconds=time.perf_counter() - began,
        maintenance_runs=maintainer.runs if maintainer is not None else 0,
        maintenance_s=maintenance_s,
        partitions_compacted=compacted,
        last_100_commit_s=sum(recent) / max(1, len(recent)),
    )


def compacted_copy(lake: Path, target: Path) -> float:
    """Copy the lake, compact the copy and checkpoint it; returns seconds spent on the copy."""
    shutil.copytree(lake, target)
    began = time.perf_counter()
    table = DeltaTable(str(target / TABLE))
    table.optimize.compact()
    table.create_checkpoint()
    return time.perf_counter() - began


def fresh_table(lake: Path, rows: int) -> None:
    """The same rows as the built tables, written in one commit: no history at all."""
    uri = str(lake / TABLE)
    open_or_create_table(uri)
    for start in range(0, rows, 1_000_000):
        write_deltalake(uri, rows_for(start, min(1_000_000, rows - start)), mode="append")


def measure(lake: Path, runs: int, batch: int, first_index: int) -> Figures:
    uri = str(lake / TABLE)
    figures = Figures(active_files(uri), row_count(uri), checkpoint_summary(uri), [], 0.0, [])
    DeltaTable(uri)  # one untimed open: the same page cache state for every table
    for _ in range(runs):
        began = time.perf_counter()
        DeltaTable(uri)
        figures.opens.append(time.perf_counter() - began)
    began = time.perf_counter()
    sink = DeltaSink(sink_settings(lake))
    figures.sink_open_s = time.perf_counter() - began
    for r in range(runs):
        indices = range(first_index + r * batch, first_index + (r + 1) * batch)
        updates = updates_at(indices)
        ids = [stream_id_of(i) for i in indices]
        began = time.perf_counter()
        sink.commit(updates, ids)
        figures.appends.append(time.perf_counter() - began)
    return figures


def report(title: str, stats: BuildStats, raw: Figures, compact: Figures, compact_s: float) -> None:
    per_commit = stats.seconds / max(1, stats.commits)
    print(f"-- {title} --")
    print(
        f"build: {stats.commits:,} commits in {stats.seconds:.0f}s "
        f"({per_commit * 1000:.0f} ms/commit "
        f"on average, {stats.last_100_commit_s * 1000:.0f} ms over the last 100); "
        f"maintenance runs {stats.maintenance_runs}, {stats.partitions_compacted} partition "
        f"compactions, {stats.maintenance_s:.0f}s in maintenance"
    )
    for name, fig in (("as left", raw), ("compacted copy", compact)):
        print(
            f"  {name:>14}: {fig.files:,} active files, {fig.rows:,} rows; {fig.checkpoints}; "
            f"DeltaSink open {fig.sink_open_s:.3f}s"
        )
        print(f"  {'':>14}  open DeltaTable(uri): {timed_median(fig.opens)}")
        print(f"  {'':>14}  commit 5,000 rows / 50 partitions: {timed_median(fig.appends)}")
    open_ratio = ratio(median(raw.opens), median(compact.opens))
    append_ratio = ratio(median(raw.appends), median(compact.appends))
    print(f"  compacting the copy took {compact_s:.1f}s")
    print(
        f"  ratio open as-left/compacted:   {open_ratio:.2f}  "
        f"{verdict(open_ratio, GOAL_RATIO, False)}"
    )
    print(
        f"  ratio commit as-left/compacted: {append_ratio:.2f}  "
        f"{verdict(append_ratio, GOAL_RATIO, False)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.small_files", description=__doc__)
    parser.add_argument("--commits", type=int, default=10_000, help="commits with maintenance")
    parser.add_argument(
        "--ref-commits",
        type=int,
        default=1_000,
        help="commits of the no-maintenance reference (each commit there gets slower: "
        "10,000 would take hours)",
    )
    parser.add_argument("--rows-per-commit", type=int, default=50, help="spread over 50 symbols")
    parser.add_argument("--batch", type=int, default=5_000, help="rows of the timed commit")
    parser.add_argument("--runs", type=int, default=7, help="timed opens/commits (>= 5)")
    parser.add_argument("--skip-reference", action="store_true", help="no reference table")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--quick", action="store_true", help="300 commits each")
    args = parser.parse_args(argv)
    if args.quick:
        args.commits, args.ref_commits, args.runs = 300, 300, 5
    runs = max(args.runs, 5)
    first_timed = (max(args.commits, args.ref_commits) + 1) * args.rows_per_commit

    with work_dir("small-files", keep=args.keep) as scratch:
        results: list[tuple[str, BuildStats, Figures, Figures, float]] = []
        with private_redis(scratch / "redis") as server:
            client = redis.Redis.from_url(server.url)
            try:
                log(f"building: {args.commits:,} commits with maintenance")
                stats = build(scratch / "maintained", args.commits, args.rows_per_commit, client)
            finally:
                client.close()
        compact_s = compacted_copy(scratch / "maintained", scratch / "maintained-compacted")
        raw = measure(scratch / "maintained", runs, args.batch, first_timed)
        compact = measure(scratch / "maintained-compacted", runs, args.batch, first_timed)
        fresh_table(scratch / "fresh", args.commits * args.rows_per_commit)
        fresh = measure(scratch / "fresh", runs, args.batch, first_timed)
        results.append(
            (
                f"{args.commits:,} commits WITH the consumer's maintenance",
                stats,
                raw,
                compact,
                compact_s,
            )
        )
        if not args.skip_reference:
            log(f"building: {args.ref_commits:,} commits without maintenance (reference)")
            ref = build(scratch / "reference", args.ref_commits, args.rows_per_commit, None)
            ref_compact_s = compacted_copy(scratch / "reference", scratch / "reference-compacted")
            ref_raw = measure(scratch / "reference", runs, args.batch, first_timed)
            ref_compact = measure(scratch / "reference-compacted", runs, args.batch, first_timed)
            note = "" if args.ref_commits == args.commits else " (FEWER commits than above)"
            results.append(
                (
                    f"reference: {args.ref_commits:,} commits, NO maintenance{note}",
                    ref,
                    ref_raw,
                    ref_compact,
                    ref_compact_s,
                )
            )

    print(
        f"== small files: commits of {args.rows_per_commit} rows over 50 partitions; "
        f"timed: median of {runs} =="
    )
    for title, build_stats, as_left, compacted, seconds in results:
        report(title, build_stats, as_left, compacted, seconds)
    # The compacted copy keeps the table's history (checkpoint tombstones, log files):
    # a table that never had small files shows what that history costs.
    _, _, maintained, maintained_compacted, _ = results[0]
    print(
        f"-- no history: the same {fresh.rows:,} rows written in one commit "
        f"({fresh.files} files; {fresh.checkpoints}) --"
    )
    print(f"  open DeltaTable(uri): {timed_median(fresh.opens)}")
    print(f"  commit 5,000 rows / 50 partitions: {timed_median(fresh.appends)}")
    for name, fig in (
        ("maintained as left", maintained),
        ("its compacted copy", maintained_compacted),
    ):
        print(
            f"  {name}/no-history: open {ratio(median(fig.opens), median(fresh.opens)):.2f}, "
            f"commit {ratio(median(fig.appends), median(fresh.appends)):.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
