"""``poslake reconcile`` on a big account: its time, against a bare ib_async connect.

The gateway simulator (in this process's thread) holds ``--positions`` positions over
four accounts and ``--executions`` executions of the day (with their commissions);
``python -m producer`` and ``python -m consumer`` put them in the lake; then the
producer stops and reconcile runs ``--rounds`` times in this process: IB's read
(connect, positions, values, executions), the wait for the consumers, and the
comparison with the lake, each timed. The baseline, in the same run, is what any
client pays: ib_async's ``connectAsync`` with the same start-up requests.

    python -m bench.reconcile [--positions 10000] [--executions 50000] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import time
from types import SimpleNamespace

import polars as pl
from ib_async import IB

from bench.common import consumer_env, log, median, private_redis, start_module, work_dir
from gateway_sim.simulator import SimulatorConfig, SimulatorThread
from poslake.reconcile import reconcile_once
from shared.settings import load_settings

ACCOUNTS = ["DU100001", "DU100002", "DU100003", "DU100004"]


async def bare_connect(port: int, client_id: int) -> float:
    ib = IB()
    started = time.perf_counter()
    await ib.connectAsync("127.0.0.1", port, clientId=client_id, readonly=True, timeout=120)
    elapsed = time.perf_counter() - started
    ib.disconnect()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reconcile", description=__doc__)
    parser.add_argument("--positions", type=int, default=10_000)
    parser.add_argument("--executions", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.positions, args.executions, args.rounds = 1_000, 5_000, 2
    thread = SimulatorThread(SimulatorConfig(accounts=ACCOUNTS, positions=args.positions, rate=0,
                                             seed=5, record=False))  # fmt: skip
    sim = thread.simulator
    rng = random.Random(3)
    holdings = list(sim.portfolio.holdings.values())
    for _ in range(args.executions):  # the day's fills, made before anyone connected
        sim.blotter.fill(holdings[rng.randrange(len(holdings))], rng.choice((-1.0, 1.0)), 0.0)
    port = thread.start()
    with work_dir("reconcile") as scratch, private_redis(scratch) as server:
        env = consumer_env(server.url, scratch / "lake", "bench", "positions") | {
            "POSLAKE_IB_PORT": str(port),
            "POSLAKE_IB_ACCOUNTS": ",".join(ACCOUNTS),
            "POSLAKE_IB_GREEKS": "false",
            "POSLAKE_IB_CONNECT_TIMEOUT_S": "120",
            "POSLAKE_PRODUCER_SPOOL_DIR": str(scratch / "spool"),
            "POSLAKE_BATCH_MAX_WAIT_S": "0.5",
        }
        producer = start_module(["producer"], env, scratch / "producer.log")
        consumer = start_module(["consumer"], env, scratch / "consumer.log")
        lake = scratch / "lake"
        log(f"loading {args.positions:,} positions and {args.executions:,} executions")
        started = time.monotonic()
        while True:
            time.sleep(1)
            try:
                fills = pl.read_delta(str(lake / "executions")).height
                held = pl.read_delta(str(lake / "positions_current")).height
            except Exception:
                continue
            if fills >= args.executions and held >= args.positions:
                break
            if time.monotonic() - started > 900:
                raise SystemExit(f"lake not loaded: {fills} executions, {held} positions")
        log(f"loaded in {time.monotonic() - started:.0f} s")
        producer.send_signal(signal.SIGTERM)
        producer.wait(timeout=60)
        os.environ.update({k: v for k, v in env.items() if k.startswith("POSLAKE_")})
        settings = load_settings()
        options = SimpleNamespace(grace=0.0, wait=60.0, cost_tolerance=1e-4,
                                  value_tolerance=0.005)  # fmt: skip
        connect_s, total_s, ib_s, compare_s, found = [], [], [], [], 0
        for round_no in range(args.rounds):
            connect_s.append(asyncio.run(bare_connect(port, 40 + round_no)))
            begun = time.perf_counter()
            outcome = reconcile_once(settings, options)  # type: ignore[arg-type]
            total_s.append(time.perf_counter() - begun)
            ib_s.append(outcome.ib_read_s)
            compare_s.append(outcome.compare_s)
            found = len(outcome.differences)
            log(f"round {round_no + 1}: {total_s[-1]:.2f} s, {found} differences")
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(timeout=60)
    thread.stop()
    print(f"account: {args.positions:,} positions over {len(ACCOUNTS)} accounts, "
          f"{args.executions:,} executions of the day")  # fmt: skip
    print(f"reconcile: {median(total_s):.2f} s median (IB read {median(ib_s):.2f} s, "
          f"compare {median(compare_s):.2f} s); differences found: {found}")  # fmt: skip
    print(f"bare ib_async connect (same start-up requests): {median(connect_s):.2f} s; "
          f"ratio reconcile/connect {median(total_s) / median(connect_s):.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
