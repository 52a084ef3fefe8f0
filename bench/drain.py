"""Drain throughput: N stream entries through one ``python -m consumer --drain`` process.

The table starts with ``--prefill`` rows (older timestamps, compacted); the stream
holds ``--entries`` newer updates with unique keys. The baseline, measured in
the same run over the same entries, is a bare sync redis-py loop of XREADGROUP
+ XACK on a second consumer group of the same stream.

    python -m bench.drain              # 1M entries into a 5M-row table
    python -m bench.drain --quick      # 50k entries into a 200k-row table
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    REPO_ROOT,
    consumer_env,
    copy_table,
    log,
    parse_log,
    prefilled_table,
    private_redis,
    ratio,
    row_count,
    stream_index_start,
    updates_for,
    verdict,
    work_dir,
)
from infra.publisher import StreamPublisher

STREAM = "positions"
GOAL_RATIO = 0.35
GOAL_RATE = 100_000.0
GOAL_RSS_MB = 500.0


@dataclass(slots=True)
class ConsumerRun:
    exit_code: int
    wall_s: float
    peak_rss_mb: float
    cpu_s: float  # user + system CPU seconds of the consumer process (wait4)
    loop_s: float | None  # "consumer started" .. "consumer stopped", from its log
    commit_s: float  # sum of the sink's commit_s over all batches
    batches: int
    log_path: Path


def publish(url: str, start: int, count: int, chunk: int = 50_000) -> float:
    """XADD ``count`` updates (generated in chunks); returns seconds spent in XADD."""
    client = redis.Redis.from_url(url)
    publisher = StreamPublisher(client, STREAM, chunk=500)
    spent = 0.0
    try:
        for offset in range(0, count, chunk):
            updates = updates_for(start + offset, min(chunk, count - offset))
            began = time.perf_counter()
            publisher.publish(updates)
            spent += time.perf_counter() - began
    finally:
        client.close()
    return spent


def raw_read_ack(url: str, group: str, count: int) -> tuple[int, float]:
    """XREADGROUP COUNT ``count`` + XACK until the group has read everything."""
    client = redis.Redis.from_url(url)
    try:
        client.xgroup_create(STREAM, group, id="0")
        entries_read = 0
        began = time.perf_counter()
        while True:
            reply: Any = client.xreadgroup(group, "raw", {STREAM: ">"}, count=count)
            if not reply:
                break
            entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1]
            if not entries:
                break
            client.xack(STREAM, group, *[entry_id for entry_id, _ in entries])
            entries_read += len(entries)
        return entries_read, time.perf_counter() - began
    finally:
        client.close()


def _vm_hwm_kib(pid: int) -> int:
    """The process's peak resident set size so far (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_consumer(
    env: dict[str, str],
    log_path: Path,
    timeout_s: float,
    profile_path: Path | None,
    root: Path = REPO_ROOT,
) -> ConsumerRun:
    args = [sys.executable]
    if profile_path is not None:
        args += ["-m", "cProfile", "-o", str(profile_path)]
    args += ["-m", "consumer", "--drain"]
    with open(log_path, "wb") as out:
        began = time.perf_counter()
        # ``-m`` puts the working directory first on sys.path: ``root``'s code runs.
        proc = subprocess.Popen(args, env=env, cwd=root, stdout=out, stderr=out)
        deadline = began + timeout_s
        peak_kib = 0
        while True:
            # VmHWM, polled: wait4's ru_maxrss is not usable here, because a child
            # started with vfork+exec inherits the parent's high-water mark.
            peak_kib = max(peak_kib, _vm_hwm_kib(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                log("consumer timed out and was killed")
                break
            time.sleep(0.005)
        wall = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = parse_log(log_path.read_text(errors="replace"))
    started = next((ln.at for ln in lines if ln.message.startswith("consumer started")), None)
    stopped = next((ln.at for ln in lines if ln.message.startswith("consumer stopped")), None)
    settled = [ln for ln in lines if ln.message.startswith("batch settled")]
    commit_s = sum(float(ln.field("commit_s") or 0) for ln in settled)
    loop_s = (stopped - started).total_seconds() if started and stopped else None
    return ConsumerRun(
        exit_code=proc.returncode,
        wall_s=wall,
        peak_rss_mb=peak_kib / 1024.0,
        cpu_s=usage.ru_utime + usage.ru_stime,
        loop_s=loop_s,
        commit_s=commit_s,
        batches=len(settled),
        log_path=log_path,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000, help="stream entries to drain")
    parser.add_argument("--prefill", type=int, default=5_000_000, help="rows already in the table")
    parser.add_argument(
        "--batch-max-entries",
        type=int,
        default=35_000,
        help="consumer batch size (35k: two batches in hand stay under 500 MB)",
    )
    parser.add_argument("--read-count", type=int, default=5_000)
    parser.add_argument(
        "--raw-counts",
        default="1000,5000",
        help="XREADGROUP COUNTs for the baseline (the fastest is the baseline)",
    )
    parser.add_argument("--timeout", type=float, default=1_800.0, help="consumer time limit, s")
    parser.add_argument("--profile", type=Path, help="run the consumer under cProfile into FILE")
    parser.add_argument(
        "--consumer-root",
        type=Path,
        default=REPO_ROOT,
        help="run the consumer from this checkout (e.g. a `git archive` of another commit)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--quick", action="store_true", help="50k entries, 200k prefill")
    args = parser.parse_args(argv)
    if args.quick:
        args.entries, args.prefill = 50_000, 200_000
        args.batch_max_entries = min(args.batch_max_entries, 20_000)
    raw_counts = [int(c) for c in args.raw_counts.split(",")]

    source = prefilled_table(args.prefill)
    with work_dir("drain", keep=args.keep) as scratch:
        lake = scratch / "lake"
        uri = copy_table(source, lake)
        with private_redis(scratch / "redis") as server:
            first = stream_index_start(args.prefill)
            log(f"publishing {args.entries:,} entries")
            publish_s = publish(server.url, first, args.entries)

            raw: dict[int, float] = {}
            for count in raw_counts:
                n, seconds = raw_read_ack(server.url, f"raw-{count}", count)
                raw[count] = n / seconds
                log(f"raw COUNT {count}: {n:,} entries in {seconds:.2f}s")

            env = consumer_env(
                server.url,
                lake,
                "bench-drain",
                STREAM,
                batch_max_entries=args.batch_max_entries,
                batch_max_wait_s=10,
                read_count=args.read_count,
            )
            log("running the consumer")
            run = run_consumer(
                env, scratch / "consumer.log", args.timeout, args.profile, args.consumer_root
            )
        rows = row_count(uri)

        expected = args.prefill + args.entries
        rate_wall = args.entries / run.wall_s
        rate_loop = args.entries / run.loop_s if run.loop_s else float("nan")
        best_count = max(raw, key=lambda c: raw[c])
        baseline = raw[best_count]
        print(f"== drain: {args.entries:,} entries into a {args.prefill:,}-row table ==")
        print(
            f"settings: batch_max_entries={args.batch_max_entries} "
            f"read_count={args.read_count}; {os.cpu_count()} CPUs; "
            f"consumer code from {args.consumer_root}"
        )
        print(
            f"publish (pipelined XADD, 500/round trip): {args.entries / publish_s:,.0f} entries/s"
        )
        for count, rate in raw.items():
            print(f"raw XREADGROUP COUNT {count} + XACK (sync redis-py): {rate:,.0f} entries/s")
        print(
            f"consumer exit code {run.exit_code}; {run.batches} batches; "
            f"wall {run.wall_s:.2f}s (start-up+open {run.wall_s - (run.loop_s or 0):.2f}s, "
            f"loop {run.loop_s or float('nan'):.2f}s, of which sink.commit {run.commit_s:.2f}s)"
        )
        print(
            f"consumer CPU: {run.cpu_s:.2f}s user+sys in {run.wall_s:.2f}s wall "
            f"({run.cpu_s / run.wall_s:.2f} cores busy on average)"
        )
        print(f"consumer end to end (process start to exit): {rate_wall:,.0f} entries/s")
        print(f"consumer own loop (log 'started'..'stopped'): {rate_loop:,.0f} entries/s")
        print(
            f"ratio consumer/raw (end to end, vs COUNT {best_count}): "
            f"{ratio(rate_wall, baseline):.3f}  "
            f"{verdict(ratio(rate_wall, baseline), GOAL_RATIO, True)}"
        )
        print(
            f"ratio consumer/raw (own loop): {ratio(rate_loop, baseline):.3f}  "
            f"{verdict(ratio(rate_loop, baseline), GOAL_RATIO, True)}"
        )
        print(f"absolute (end to end): {verdict(rate_wall, GOAL_RATE, True)}")
        print(
            f"consumer peak RSS (VmHWM, polled every 5 ms): {run.peak_rss_mb:.0f} MB  "
            f"{verdict(run.peak_rss_mb, GOAL_RSS_MB, False)}"
        )
        print(
            f"table rows at end: {rows:,} (expected {expected:,}): "
            f"{'OK' if rows == expected else 'MISMATCH'}"
        )
        if run.exit_code != 0:
            print(f"consumer log tail:\n{run.log_path.read_text(errors='replace')[-2000:]}")
        if args.profile is not None:
            print(f"== cProfile of the consumer ({args.profile}), top 25 by cumulative time ==")
            sys.stdout.flush()
            stats = pstats.Stats(str(args.profile), stream=sys.stdout)
            stats.sort_stats("cumulative").print_stats(25)
        return 0 if run.exit_code == 0 and rows == expected else 1


if __name__ == "__main__":
    raise SystemExit(main())
