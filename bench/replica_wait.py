"""What waiting for a replica costs the producer: its outbox publishing N updates to a
master with one replica (loopback), with and without ``POSLAKE_PRODUCER_WAIT_REPLICAS``.

The updates are queued at once, so the writer sends full pipelines of 500 XADDs;
each run is timed from the first put to the last update counted as published,
and alternates: without waiting (the baseline), then ``WAIT 1 500`` after each
pipeline, ``--rounds`` times. The replica's stream is checked to hold every
entry at the end of a waiting run.

    python -m bench.replica_wait [--updates 200000] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from bench.common import log, median, ratio, updates_for, work_dir
from infra.redis_conn import sync_client
from infra.redis_server import RedisServer, find_redis_server
from producer.outbox import Outbox
from producer.replica_wait import ReplicaWait


async def publish(url: str, stream: str, updates: list[Any], spool: Path, wait: int) -> float:
    outbox = Outbox(url, stream, spool_path=spool, memory_limit=len(updates) + 1,
                    wait=ReplicaWait(wait, 500))  # fmt: skip
    outbox.start()
    started = time.perf_counter()
    for i, update in enumerate(updates):
        outbox.put(1_800_000_000_000_000 + i, update)
    while outbox.stats.published < len(updates):
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - started
    await outbox.close(10)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replica_wait", description=__doc__)
    parser.add_argument("--updates", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="50,000 updates, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.updates, args.rounds = 50_000, 2
    binary = find_redis_server()
    if binary is None:
        raise SystemExit("no redis-server binary")
    updates = updates_for(0, args.updates)
    with work_dir("replica-wait") as folder:
        master = RedisServer(binary, folder / "master").start()
        replica = RedisServer(
            binary, folder / "replica", extra_args=["--replicaof", "127.0.0.1", str(master.port)]
        ).start()
        try:
            times: dict[int, list[float]] = {0: [], 1: []}
            for n in range(args.rounds):
                for wait in (0, 1):
                    stream = f"bench-{n}-{wait}"
                    spool = folder / f"{stream}.spool"
                    seconds = asyncio.run(publish(master.url, stream, updates, spool, wait))
                    times[wait].append(seconds)
                    log(f"round {n + 1}, wait {wait}: {args.updates / seconds:,.0f} updates/s")
                    if wait:
                        copy = sync_client(replica.url)
                        assert copy.xlen(stream) == args.updates, "the replica lacks entries"
                        copy.close()
        finally:
            replica.stop()
            master.stop()
    base, waited = median(times[0]), median(times[1])
    pipelines = -(-args.updates // 500)
    print(f"replica wait: {args.updates:,} updates in pipelines of 500, median of {args.rounds}")
    print(f"  no wait (baseline): {args.updates / base:,.0f} updates/s")
    print(f"  WAIT 1 after each pipeline: {args.updates / waited:,.0f} updates/s "
          f"(x{ratio(waited, base):.2f} the time; "
          f"+{(waited - base) / pipelines * 1000:.3f} ms per pipeline)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
