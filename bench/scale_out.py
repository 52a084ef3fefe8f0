"""The lake on SeaweedFS against a local folder, and drain throughput with 1, 2 and 3
consumers on each.

1. Append and open: ``--commits`` appends of a consumer-sized batch (``--rows``
   rows over 50 symbols, one commit each, with the group's app transaction) into
   a fresh table, then opening the table, on a local folder and on SeaweedFS
   (``weed mini`` on loopback) in the same run; medians and the ratio.
2. Drain: ``--entries`` position updates in a stream, drained by 1, 2 and 3
   ``python -m consumer --drain`` processes started together, for each lake;
   entries/s, history commits/s and the table checked to hold every entry once.
   The baseline is one consumer on the local folder, in the same run.

Commits to one table are serialised by the group's transaction (consumer/sink.py):
more consumers bring availability and claiming, not more commits per second.

    python -m bench.scale_out [--entries 200000] [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import redis
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from bench.common import (
    REPO_ROOT,
    consumer_env,
    median,
    private_redis,
    private_seaweed,
    ratio,
    rows_for,
    storage_env,
    updates_for,
    work_dir,
)
from infra.publisher import StreamPublisher
from shared.table import open_or_create_table


def append_and_open(
    uri: str, options: dict[str, str], commits: int, rows: int
) -> tuple[float, float]:
    """Median seconds of an append commit and of an open at ``commits`` versions."""
    table = open_or_create_table(uri, options or None)
    appends: list[float] = []
    for i in range(commits):
        batch = rows_for(i * rows, rows)
        started = time.perf_counter()
        write_deltalake(
            table,
            batch,
            mode="append",
            commit_properties=CommitProperties(app_transactions=[Transaction("bench", i + 1)]),
        )
        appends.append(time.perf_counter() - started)
    opens: list[float] = []
    for _ in range(7):
        started = time.perf_counter()
        DeltaTable(uri, storage_options=options or None).version()
        opens.append(time.perf_counter() - started)
    return median(appends), median(opens)


def drain(
    redis_url: str, stream: str, lake_uri: str, options: dict[str, str], consumers: int,
    entries: int, logs: Path,
) -> tuple[float, int]:  # fmt: skip
    """Wall seconds for ``consumers`` processes to drain the stream; history commits."""
    processes = []
    started = time.perf_counter()
    for n in range(consumers):
        env = consumer_env(
            redis_url, Path("."), f"c{n}", stream,
            batch_max_entries=5_000, batch_max_wait_s=0.5, log_level="WARNING",
        )  # fmt: skip
        env.update({"POSLAKE_LAKE_URI": lake_uri, **storage_env(options)})
        out = (logs / f"{stream}-c{n}.log").open("wb")
        args = [sys.executable, "-m", "consumer", "--drain"]
        processes.append(subprocess.Popen(args, env=env, cwd=REPO_ROOT, stdout=out, stderr=out))
    codes = [p.wait(timeout=1_800) for p in processes]
    wall = time.perf_counter() - started
    if any(codes):
        raise SystemExit(f"a consumer failed: exit codes {codes}; logs in {logs}")
    table = DeltaTable(f"{lake_uri}/position_updates", storage_options=options or None)
    rows = table.count()
    if rows != entries:
        raise SystemExit(f"{lake_uri}: {rows} rows for {entries} entries")
    history_commits = sum(1 for c in table.history() if c.get("poslake.commit_id"))
    return wall, history_commits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_out", description=__doc__)
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--commits", type=int, default=30, help="appends in part 1")
    parser.add_argument("--rows", type=int, default=2_000, help="rows per append in part 1")
    parser.add_argument("--quick", action="store_true", help="30k entries, 15 appends")
    args = parser.parse_args(argv)
    if args.quick:
        args.entries, args.commits = 30_000, 15

    with (
        work_dir("scale-out") as folder,
        private_redis(folder / "redis") as server,
        private_seaweed(folder / "seaweedfs") as store,
    ):
        lakes = {
            "local": (str(folder / "lake"), {}),
            "seaweedfs": ("s3://lake/bench", store.storage_options()),
        }
        print(f"append and open: {args.commits} appends of {args.rows} rows over 50 symbols")
        timings = {
            name: append_and_open(f"{uri}/append_probe", options, args.commits, args.rows)
            for name, (uri, options) in lakes.items()
        }
        (local_append, local_open), (s3_append, s3_open) = timings["local"], timings["seaweedfs"]
        print(f"  append median: local {local_append * 1000:.1f} ms, SeaweedFS "
              f"{s3_append * 1000:.1f} ms (x{ratio(s3_append, local_append):.2f})")  # fmt: skip
        print(f"  open at {args.commits} versions: local {local_open * 1000:.1f} ms, SeaweedFS "
              f"{s3_open * 1000:.1f} ms (x{ratio(s3_open, local_open):.2f})")  # fmt: skip

        client = redis.Redis.from_url(server.url)
        updates = updates_for(10_000_000, args.entries)
        print(f"drain: {args.entries:,} entries, 1, 2 and 3 consumers, batches of 5,000")
        baseline = 0.0
        for name, (uri, options) in lakes.items():
            for consumers in (1, 2, 3):
                stream = f"{name}-{consumers}"
                StreamPublisher(client, stream).publish(updates)
                lake_uri = f"{uri}/drain-{consumers}"
                wall, commits = drain(
                    server.url, stream, lake_uri, options, consumers, args.entries, folder
                )
                rate = args.entries / wall
                baseline = baseline or rate
                print(
                    f"  {name:9} {consumers} consumer{'s' if consumers > 1 else ' '}: "
                    f"{rate:9,.0f} entries/s in {wall:5.1f}s, {commits} history commits "
                    f"({commits / wall:4.1f}/s), x{ratio(rate, baseline):.2f} of 1 on local; "
                    "every entry once"
                )
                client.delete(stream)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
