"""Snapshot burst: N positions from the gateway simulator through the producer into the stream.

The simulator (its own process) holds N positions in one account and sends
nothing live (rate 0). The producer (its own process, the real ib_async client
over TCP) connects; IB's snapshot at connect is N position messages and N
portfolio messages. Measured: from the first snapshot message the simulator
sent (its record) to the last entry in the stream (the entry ID's server
time), as updates/s. Baselines in the same run, on the same payloads read back
from the stream: redis-py's pipelined XADD (chunks of 500) and the producer's
own RESP writer alone. Also the same burst with ib_async's generic decoders
(``POSLAKE_IB_FAST_DECODE=false``) for comparison.

    python -m bench.producer_burst [--positions 20000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.common import log, private_redis, ratio, verdict, work_dir
from infra.redis_conn import RedisTarget
from producer.resp import RespConnection, pack_command
from shared.settings import Settings
from shared.wire import decode_entry

GOAL_RATE = 50_000
CHUNK = 500


@dataclass
class BurstResult:
    entries: int
    snapshot_rate: float  # first snapshot message sent -> last entry in the stream
    portfolio_rate: float  # first portfolio message sent -> last entry in the stream
    seconds: float


def start_simulator(folder: Path, positions: int) -> tuple[subprocess.Popen[str], int, Path]:
    # The full record costs the simulator time per message; the stats file is enough here.
    stats = folder / f"stats-{positions}-{time.monotonic_ns()}.json"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "gateway_sim", "--port", "0",
            "--accounts", "DU100001", "--positions", str(positions), "--rate", "0",
            "--stats", str(stats),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise SystemExit(f"simulator did not start: {line!r}")
    return process, int(line.rsplit(":", 1)[1]), stats


def run_burst(
    redis_url: str, folder: Path, positions: int, stream: str, fast: bool, chunk: int
) -> BurstResult:
    simulator, port, stats_path = start_simulator(folder, positions)
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSLAKE_")}
    env.update(
        {
            "POSLAKE_REDIS_URL": redis_url,
            "POSLAKE_STREAM": stream,
            "POSLAKE_IB_PORT": str(port),
            "POSLAKE_IB_CLIENT_ID": "7",
            "POSLAKE_IB_FAST_DECODE": str(fast).lower(),
            "POSLAKE_IB_CONNECT_TIMEOUT_S": "60",
            "POSLAKE_PRODUCER_SPOOL_DIR": str(folder / f"spool-{stream}"),
            "POSLAKE_PUBLISH_CHUNK": str(chunk),
            "POSLAKE_LOG_LEVEL": "WARNING",
        }
    )
    client: Any = redis.Redis.from_url(redis_url)  # replies typed loosely by redis-py
    producer = subprocess.Popen([sys.executable, "-m", "producer"], env=env)
    deadline = time.monotonic() + 120
    try:
        while client.xlen(stream) < positions:
            if time.monotonic() > deadline or producer.poll() is not None:
                raise SystemExit(f"burst did not arrive: {client.xlen(stream)} of {positions}")
            time.sleep(0.002)
    finally:
        producer.send_signal(signal.SIGTERM)
        code = producer.wait(30)
        simulator.send_signal(signal.SIGTERM)
        simulator.wait(30)
    if code != 0:
        raise SystemExit(f"producer exited {code}")
    last_id = client.xrevrange(stream, count=1)[0][0]
    last_s = int(last_id.split(b"-")[0]) / 1000
    stats = json.loads(stats_path.read_text())
    first_snapshot_s = min(stats["first_ns"].values()) / 1e9
    first_portfolio_s = stats["first_ns"]["portfolio"] / 1e9
    entries = client.xlen(stream)
    return BurstResult(
        entries=entries,
        snapshot_rate=entries / (last_s - first_snapshot_s),
        portfolio_rate=entries / (last_s - first_portfolio_s),
        seconds=last_s - first_snapshot_s,
    )


def redis_py_baseline(client: redis.Redis, payloads: list[bytes], stream: str) -> float:
    started = time.perf_counter()
    for start in range(0, len(payloads), CHUNK):
        pipe = client.pipeline(transaction=False)
        for payload in payloads[start : start + CHUNK]:
            pipe.xadd(stream, {"v": b"1", "payload": payload})
        pipe.execute()
    return len(payloads) / (time.perf_counter() - started)


async def resp_baseline(redis_url: str, payloads: list[bytes], stream: str) -> float:
    connection = await RespConnection.open(RedisTarget.parse(redis_url))
    name = stream.encode()
    started = time.perf_counter()
    for start in range(0, len(payloads), CHUNK):
        await connection.execute(
            [
                pack_command(b"XADD", name, b"*", b"v", b"1", b"payload", payload)
                for payload in payloads[start : start + CHUNK]
            ]
        )
    rate = len(payloads) / (time.perf_counter() - started)
    connection.close()
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="2,000 positions")
    parser.add_argument(
        "--chunk",
        type=int,
        default=Settings().publish_chunk,
        help="the producer's POSLAKE_PUBLISH_CHUNK (default: the setting's)",
    )
    parser.add_argument("--skip-standard", action="store_true",
                        help="do not also run ib_async's generic decoders")  # fmt: skip
    args = parser.parse_args(argv)
    positions = 2_000 if args.quick else args.positions

    with work_dir("burst") as folder, private_redis(folder / "redis") as server:
        client: Any = redis.Redis.from_url(server.url)
        log(f"burst of {positions} positions, direct decoders")
        fast = run_burst(server.url, folder, positions, "burst-fast", True, args.chunk)
        standard = None
        if not args.skip_standard:
            log("the same burst with ib_async's generic decoders")
            standard = run_burst(server.url, folder, positions, "burst-standard", False, args.chunk)
        entries = client.xrange("burst-fast")
        for _, fields in entries:
            decode_entry(fields)  # every entry is a valid update
        payloads = [fields[b"payload"] for _, fields in entries]
        log("baselines: redis-py pipelined XADD and the RESP writer, same payloads")
        redis_py_rate = redis_py_baseline(client, payloads, "baseline-redis-py")
        resp_rate = asyncio.run(resp_baseline(server.url, payloads, "baseline-resp"))

    print(
        f"snapshot burst: {positions} positions, one account, producer in its own process, "
        f"XADD pipelines of up to {args.chunk}"
    )
    print(f"  entries in the stream:                {fast.entries}")
    print(f"  first snapshot message -> last entry:  {fast.seconds:.3f}s")
    print(f"  rate (from first snapshot message):    {fast.snapshot_rate:,.0f} updates/s")
    print(f"  rate (from first portfolio message):   {fast.portfolio_rate:,.0f} updates/s")
    if standard is not None:
        speedup = ratio(fast.snapshot_rate, standard.snapshot_rate)
        print(f"  ib_async generic decoders, same burst: {standard.snapshot_rate:,.0f} updates/s "
              f"(direct decoders are {speedup:.2f}x)")  # fmt: skip
    print(f"  baseline redis-py pipelined XADD:      {redis_py_rate:,.0f} XADD/s")
    print(f"  baseline RESP writer alone:            {resp_rate:,.0f} XADD/s")
    print(
        f"  ratio burst / redis-py pipeline:       {ratio(fast.snapshot_rate, redis_py_rate):.2f}"
    )
    print(f"  ratio burst / RESP writer alone:       {ratio(fast.snapshot_rate, resp_rate):.2f}")
    print(f"  {verdict(fast.snapshot_rate, GOAL_RATE, higher_is_better=True)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
