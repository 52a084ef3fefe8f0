"""Latency: from the simulator sending an update to its row being visible in the table.

Processes: the gateway simulator (steady ``--rate`` updates/s to one account,
recording when it sent each message), the producer, one consumer with
``POSLAKE_BATCH_MAX_WAIT_S`` (default 1 s), and this process polling the Delta
table for new versions (``--lake seaweedfs``: the lake on a private SeaweedFS,
``weed mini`` on loopback, instead of a local folder). Message i of the
portfolio stream is stream entry i (checked field by field); a row's visible
time is when the poller first saw a table version holding its ``stream_id``.
Updates sent in the first ``--warmup`` seconds are left out. Also printed: the
producer's share (send to the stream entry's server time) and the batch wait as
a baseline.

    python -m bench.latency [--rate 2000] [--seconds 30] [--lake seaweedfs] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import redis
from deltalake import DeltaTable
from deltalake.fs import DeltaStorageHandler
from pyarrow.fs import PyFileSystem

from bench.common import (
    log,
    median,
    parse_log,
    private_redis,
    private_seaweed,
    start_simulator,
    storage_env,
    verdict,
    work_dir,
)
from shared.wire import decode_entry

GOAL_P99_S = 1.5


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=out, stderr=out)


def poll_table(
    uri: str, until_s: float, seen: dict[str, float], options: dict[str, str] | None = None
) -> int:
    """Record the first time each stream_id is visible; returns versions seen."""
    table: DeltaTable | None = None
    known_files: set[str] = set()
    versions = 0
    files_in: PyFileSystem | None = None
    while time.time() < until_s:
        time.sleep(0.02)
        try:
            if table is None:
                table = DeltaTable(uri, storage_options=options or None)
                # Files are read through delta-rs' store handler: a folder or a store alike.
                files_in = PyFileSystem(DeltaStorageHandler(uri, options or None))
            else:
                table.update_incremental()
        except Exception:
            continue  # not created yet
        now = time.time()
        files = set(table.file_uris())
        new = files - known_files
        if not new:
            continue
        versions += 1
        for path in new:
            if options:  # on a store: through the handler, by the path under the table
                relative = path.removeprefix(table.table_uri.rstrip("/") + "/")
                ids = pq.read_table(relative, columns=["stream_id"], filesystem=files_in)
            else:
                ids = pq.read_table(path, columns=["stream_id"])
            for stream_id in ids.column(0).to_pylist():
                seen.setdefault(stream_id, now)
        known_files = files
    return versions


def _kill_all(*processes: subprocess.Popen[Any]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="updates/s the simulator sends")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured run length")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--batch-wait", type=float, default=1.0)
    parser.add_argument("--positions", type=int, default=2000)
    parser.add_argument("--lake", choices=["local", "seaweedfs"], default="local")
    parser.add_argument("--quick", action="store_true", help="10 s run")
    args = parser.parse_args(argv)
    seconds = 10.0 if args.quick else args.seconds

    with (
        work_dir("latency") as folder,
        private_redis(folder / "redis") as server,
        contextlib.ExitStack() as stack,
    ):
        lake_uri, options = str(folder / "lake"), {}
        if args.lake == "seaweedfs":
            store = stack.enter_context(private_seaweed(folder / "seaweedfs"))
            lake_uri, options = "s3://lake/latency", store.storage_options()
        table_uri = f"{lake_uri}/position_updates"
        record = folder / "record.jsonl"
        sim, port = start_simulator(
            ["--accounts", "DU100001", "--positions", str(args.positions),
             "--rate", str(args.rate), "--record", str(record)]
        )  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSLAKE_")}
        env.update(
            {
                "POSLAKE_REDIS_URL": server.url,
                "POSLAKE_LAKE_URI": lake_uri,
                **storage_env(options),
                "POSLAKE_IB_PORT": str(port),
                "POSLAKE_PRODUCER_SPOOL_DIR": str(folder / "spool"),
                "POSLAKE_BATCH_MAX_WAIT_S": str(args.batch_wait),
                "POSLAKE_CONSUMER_NAME": "latency",
                "POSLAKE_LOG_LEVEL": "INFO",
            }
        )
        consumer = start(["consumer"], env, folder / "consumer.log")
        producer = start(["producer"], env, folder / "producer.log")
        # Whatever happens here, no part may outlive the run (a 2,000/s simulator would).
        stack.callback(_kill_all, sim, producer, consumer)
        started = time.time()
        log(f"running {seconds:.0f}s at {args.rate:.0f} updates/s, batch wait {args.batch_wait}s")
        seen: dict[str, float] = {}
        versions = poll_table(table_uri, started + seconds, seen, options)
        sim.send_signal(signal.SIGTERM)
        sim.wait(30)
        # Let the last batch land before stopping the pipeline.
        poll_table(table_uri, time.time() + 3 * args.batch_wait, seen, options)
        for process in (producer, consumer):
            process.send_signal(signal.SIGTERM)
            process.wait(30)

        batch_lines = [
            line
            for line in parse_log((folder / "consumer.log").read_text())
            if line.message.startswith("batch settled")
        ]
        commit_s = [float(line.field("commit_s") or 0) for line in batch_lines]
        merge_s = [float(line.field("current_merge_s") or 0) for line in batch_lines]
        client: Any = redis.Redis.from_url(server.url)
        # Position entries only: the stream also carries executions and option Greeks.
        entries = [(i, f) for i, f in client.xrange("positions") if b"kind" not in f]
        sent = [json.loads(line) for line in record.read_text().splitlines()]
        portfolio = [s for s in sent if s["kind"] == "portfolio"]
        pairs = list(zip(portfolio, entries, strict=False))
        for message, (_, fields) in pairs:
            update = decode_entry(fields)
            assert (update.conid, update.position) == (message["conid"], message["position"])

    measured_from = started + args.warmup
    end_to_end: list[float] = []
    to_stream: list[float] = []
    for message, (entry_id, _) in pairs:
        sent_s = message["sent_ns"] / 1e9
        if sent_s < measured_from:
            continue
        stream_id = entry_id.decode()
        to_stream.append(int(stream_id.split("-")[0]) / 1000 - sent_s)
        if stream_id in seen:
            end_to_end.append(seen[stream_id] - sent_s)
    missing = sum(1 for m, (e, _) in pairs if m["sent_ns"] / 1e9 >= measured_from
                  and e.decode() not in seen)  # fmt: skip
    if not end_to_end:
        raise SystemExit("no measured rows")
    p50, p99 = percentile(end_to_end, 0.5), percentile(end_to_end, 0.99)
    window = seconds - args.warmup
    print(f"latency, simulator send -> row visible ({args.lake} lake): "
          f"{len(end_to_end)} updates at {args.rate:.0f}/s over {window:.0f}s, "
          f"batch wait {args.batch_wait}s")  # fmt: skip
    print(
        f"  table versions seen by the poller: {versions}; rows not visible at the end: {missing}"
    )
    print(f"  p50 {p50:.3f}s  p90 {percentile(end_to_end, 0.9):.3f}s  p99 {p99:.3f}s  "
          f"max {max(end_to_end):.3f}s")  # fmt: skip
    print(f"  producer share (send -> stream entry): p50 {percentile(to_stream, 0.5) * 1000:.1f}ms"
          f"  p99 {percentile(to_stream, 0.99) * 1000:.1f}ms")  # fmt: skip
    if commit_s:
        print(
            f"  consumer per batch: history commit median {median(commit_s):.3f}s "
            f"(max {max(commit_s):.3f}), positions_current merge median "
            f"{median(merge_s):.3f}s (max {max(merge_s):.3f}), {len(commit_s)} batches"
        )
    print(f"  baseline: the batch wait alone is {args.batch_wait:.3f}s; "
          f"p99 / batch wait = {p99 / args.batch_wait:.2f}")  # fmt: skip
    print(f"  p99: {verdict(p99, GOAL_P99_S, higher_is_better=False)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
