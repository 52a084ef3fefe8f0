"""Fill to visible in the strategy book: from the simulator sending an execution to the
book's ``positions`` table holding it.

Processes: the gateway simulator (``--rate`` events/s, position updates mostly and
at most ``--fills-per-s`` position changes made by fills, recording when it sent
each execution), the producer, one consumer, ``poslake book`` (a step every
``--interval`` s) and this process polling the book's tables. A fill is visible
when the book's ``positions`` table has a version committed after the
``transactions`` version that first holds it (the same step writes both, in that
order). Fills sent in the first ``--warmup`` seconds are left out. Baseline: the
waits the configuration puts in the path (the consumer's batch wait and the book's
step interval); the ratio shows what the work adds to them.

    python -m bench.book_latency [--rate 2000] [--seconds 60] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import time

import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from bench.common import consumer_env, log, private_redis, start_simulator, verdict, work_dir
from bench.latency import _kill_all, percentile, start

GOAL_P99_S = 2.0


def poll_book(lake: str, until_s: float, seen: dict[str, float]) -> int:
    """Record when each execution is first visible in ``positions`` (see the module)."""
    transactions: DeltaTable | None = None
    positions: DeltaTable | None = None
    known: set[str] = set()
    waiting: list[tuple[int, list[str]]] = []  # (positions version when seen, exec bases)
    steps = 0
    while time.time() < until_s:
        time.sleep(0.02)
        try:  # each opened once it exists (one step creates them one after the other)
            if transactions is None:
                transactions = DeltaTable(f"{lake}/transactions")
            else:
                transactions.update_incremental()
            if positions is None:
                positions = DeltaTable(f"{lake}/positions")
            else:
                positions.update_incremental()
        except TableNotFoundError:
            continue  # not created yet
        now, version = time.time(), positions.version()
        files = set(transactions.file_uris())
        new = files - known
        known = files
        if new:
            steps += 1
            bases = [
                base
                for path in new
                for base in pq.read_table(path, columns=["exec_base"]).column(0).to_pylist()
            ]
            waiting.append((version, bases))
        still = []
        for at, bases in waiting:
            if version > at:
                for base in bases:
                    seen.setdefault(base, now)
            else:
                still.append((at, bases))
        waiting = still
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="simulator events/s")
    parser.add_argument("--fills-per-s", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured run length")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--batch-wait", type=float, default=1.0)
    parser.add_argument("--interval", type=float, default=0.5, help="POSLAKE_BOOK_INTERVAL_S")
    parser.add_argument("--positions", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="20 s run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs)")
    args = parser.parse_args(argv)
    seconds = 20.0 if args.quick else args.seconds

    with (
        work_dir("book-latency", args.keep) as folder,
        private_redis(folder / "redis") as server,
        contextlib.ExitStack() as stack,
    ):
        lake = str(folder / "lake")
        record = folder / "record.jsonl"
        sim, port = start_simulator(
            ["--accounts", "DU100001", "--positions", str(args.positions),
             "--rate", str(args.rate), "--position-changes-per-s", str(args.fills_per_s),
             "--record", str(record)]
        )  # fmt: skip
        env = consumer_env(
            server.url, folder / "lake", "book-latency", "positions",
            ib_port=port, producer_spool_dir=folder / "spool",
            batch_max_wait_s=args.batch_wait, book_interval_s=args.interval,
        )  # fmt: skip
        parts = [
            start(["consumer"], env, folder / "consumer.log"),
            start(["producer"], env, folder / "producer.log"),
            start(["poslake", "book"], env, folder / "book.log"),
        ]
        stack.callback(_kill_all, sim, *parts)
        started = time.time()
        log(f"running {seconds:.0f}s at {args.rate:.0f} events/s, {args.fills_per_s}/s fills")
        seen: dict[str, float] = {}
        steps = poll_book(lake, started + seconds, seen)
        sim.send_signal(signal.SIGTERM)
        sim.wait(30)
        poll_book(lake, time.time() + 3 * args.batch_wait + 2 * args.interval, seen)
        for process in parts:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        sent = [json.loads(line) for line in record.read_text().splitlines()]

    measured_from = started + args.warmup
    fills = [s for s in sent if s["kind"] == "fill" and s["sent_ns"] / 1e9 >= measured_from]
    latencies = [
        seen[base] - f["sent_ns"] / 1e9
        for f in fills
        if (base := f["exec_id"].rpartition(".")[0]) in seen
    ]
    missing = len({f["exec_id"].rpartition(".")[0] for f in fills} - seen.keys())
    if not latencies:
        raise SystemExit("no measured fills")
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    print(
        f"fill -> visible in the book's positions: {len(latencies)} fills over "
        f"{seconds - args.warmup:.0f}s at {args.rate:.0f} events/s (batch wait "
        f"{args.batch_wait}s, book step every {args.interval}s; {steps} book steps seen)"
    )
    print(
        f"  p50 {p50:.3f}s  p90 {percentile(latencies, 0.9):.3f}s  p99 {p99:.3f}s  "
        f"max {max(latencies):.3f}s; fills not visible at the end: {missing}"
    )
    print(
        f"  baseline: batch wait {args.batch_wait}s + book interval {args.interval}s = "
        f"{args.batch_wait + args.interval:.2f}s; p99 / baseline = "
        f"{p99 / (args.batch_wait + args.interval):.2f}"
    )
    print(f"  p99: {verdict(p99, GOAL_P99_S, higher_is_better=False)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
