"""The producer with option Greeks: CPU per second, request rate and freshness with more
options than market-data lines.

Processes: a private redis-server and, per round, a fresh gateway simulator holding
``--options`` option positions in one account (its line limit ``--lines``) and one
producer on it. Rounds alternate: the baseline producer with ``POSLAKE_IB_GREEKS=false``
(positions alone) and the producer with Greeks (line budget ``--lines``, rotation
``--rotation`` s), the same book and event rate in both, measured in the same run.
After ``--warmup`` seconds each round measures for ``--duration`` seconds:

- producer CPU seconds per second (``/proc/<pid>/stat``), and the ratio Greeks/baseline;
- market-data requests per second the simulator received (reqMktData, cancel,
  reqMarketDataType), and the most it saw in one line-budget at once;
- option_greeks rows published per second, the options rotated through snapshots,
  and the oldest sample's age (goal: every option sampled within the rotation
  interval, 60 s by default).

    python -m bench.greeks_producer [--options 1000] [--lines 100] [--duration 120]
                                    [--warmup 20] [--rate 20] [--rounds 1] [--keep]
                                    [--quick]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    consumer_env,
    cpu_s,
    log,
    median,
    private_redis,
    ratio,
    scrape,
    start_module,
    work_dir,
)
from gateway_sim import protocol as tws
from gateway_sim.portfolio import SyntheticPortfolio
from infra.redis_server import free_port
from shared.settings import Settings

ACCOUNT = "DU100001"
REQUEST_BUDGET = Settings.model_fields["ib_greeks_requests_per_s"].default
MARKET_DATA = (tws.Incoming.REQ_MKT_DATA, tws.Incoming.CANCEL_MKT_DATA,
               tws.Incoming.REQ_MARKET_DATA_TYPE)  # fmt: skip


def options_held(positions: int) -> int:
    book = SyntheticPortfolio([ACCOUNT], positions, seed=1)
    return sum(1 for h in book.holdings.values() if h.instrument.sec_type == "OPT")


def run_round(
    folder: Path, redis_url: str, args: argparse.Namespace, greeks: bool, index: int
) -> dict[str, float]:
    name = f"{'greeks' if greeks else 'baseline'}-{index}"
    stats_path = folder / f"{name}-simulator.json"
    sim = subprocess.Popen(
        [sys.executable, "-m", "gateway_sim", "--port", "0", "--accounts", ACCOUNT,
         "--positions", str(args.positions), "--rate", str(args.rate), "--no-fills",
         "--md-lines", str(args.lines), "--stats", str(stats_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert sim.stdout is not None
    port = int(sim.stdout.readline().rsplit(":", 1)[1])
    metrics_port = free_port()
    env = consumer_env(redis_url, folder / "lake", name, f"bench-{name}")
    env.update(
        POSLAKE_IB_PORT=str(port),
        POSLAKE_IB_ACCOUNTS=ACCOUNT,
        POSLAKE_PRODUCER_SPOOL_DIR=str(folder / f"spool-{name}"),
        POSLAKE_METRICS_PORT=str(metrics_port),
        POSLAKE_STREAM_MAXLEN="100000",
        POSLAKE_IB_GREEKS="true" if greeks else "false",
        POSLAKE_IB_GREEKS_LINES=str(args.lines),
        POSLAKE_IB_GREEKS_ROTATION_S=str(args.rotation),
    )
    producer = start_module(["producer"], env, folder / f"{name}.log")
    try:
        time.sleep(args.warmup)
        if producer.poll() is not None:
            raise SystemExit(f"{name}: producer exited ({producer.returncode}): see --keep")
        before, cpu_before, started = scrape(metrics_port), cpu_s(producer.pid), time.monotonic()
        oldest = 0.0
        while time.monotonic() - started < args.duration:
            time.sleep(1.0)
            oldest = max(
                oldest, scrape(metrics_port).get("poslake_producer_greeks_oldest_sample_s", 0)
            )
        after, cpu_after = scrape(metrics_port), cpu_s(producer.pid)
        span = time.monotonic() - started
    finally:
        producer.send_signal(signal.SIGTERM)
        producer.wait(60)
        sim.send_signal(signal.SIGTERM)
        sim.wait(60)
    simulated = json.loads(stats_path.read_text())
    received = simulated.get("received", {})
    requests = sum(received.get(str(m), 0) for m in MARKET_DATA)

    def delta(counter: str) -> float:
        name = f"poslake_producer_{counter}_total"  # Prometheus names counters *_total
        return after.get(name, 0.0) - before.get(name, 0.0)

    total_s = args.warmup + span  # the simulator counts requests from the start
    return {
        "cpu_per_s": (cpu_after - cpu_before) / span,
        "requests_per_s": delta("greeks_requests") / span,
        "requests_total_per_s": requests / total_s,
        "rows_per_s": delta("greeks_published") / span,
        "positions_per_s": delta("published") / span,  # the positions feed's count
        "rotated": after.get("poslake_producer_greeks_rotated", 0.0),
        "streaming": after.get("poslake_producer_greeks_streaming", 0.0),
        "options": after.get("poslake_producer_greeks_options", 0.0),
        "oldest_s": oldest,
        "max_lines": float(simulated.get("market_data", {}).get("max_lines", 0)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--options", type=int, default=1000, help="option positions held")
    parser.add_argument("--lines", type=int, default=100, help="line budget and IB's limit")
    parser.add_argument("--rotation", type=float, default=60.0, help="rotation interval (s)")
    parser.add_argument("--duration", type=float, default=120.0, help="measured seconds a round")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before measuring")
    parser.add_argument("--rate", type=float, default=20.0, help="simulator events/s")
    parser.add_argument("--rounds", type=int, default=1, help="baseline/Greeks pairs")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--quick", action="store_true", help="200 options, 40 lines, 30 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.options, args.lines, args.rotation = 200, 40, 20.0
        args.duration, args.warmup = 30.0, 10.0
    # Positions to ask the simulator for so that --options of them are options.
    args.positions = args.options
    while options_held(args.positions) < args.options:
        args.positions += 1
    held = options_held(args.positions)
    log(f"{held} options ({args.positions} positions), budget {args.lines} lines, "
        f"rotation {args.rotation:.0f} s, {args.rate:.0f} events/s")  # fmt: skip
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with (
        work_dir("greeks-producer", keep=args.keep) as folder,
        private_redis(folder / "redis") as server,
    ):
        for index in range(args.rounds):
            for greeks in (False, True):
                figures = run_round(folder, server.url, args, greeks, index)
                results[greeks].append(figures)
                log(f"{'greeks  ' if greeks else 'baseline'} round {index}: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))  # fmt: skip
    base, with_greeks = results[False], results[True]

    def med(rows: list[dict[str, float]], key: str) -> float:
        return median([r[key] for r in rows])

    cpu_base, cpu_greeks = med(base, "cpu_per_s"), med(with_greeks, "cpu_per_s")
    oldest = max(r["oldest_s"] for r in with_greeks)
    most_lines = max(r["max_lines"] for r in with_greeks)
    print(
        f"greeks producer: {held} options over a {args.lines}-line budget, rotation "
        f"{args.rotation:.0f} s, {args.rate:.0f} events/s, {args.duration:.0f} s measured "
        f"after {args.warmup:.0f} s, {args.rounds} round(s)"
    )
    print(f"  producer CPU: baseline (no Greeks) {cpu_base:.3f} s/s, with Greeks "
          f"{cpu_greeks:.3f} s/s: ratio {ratio(cpu_greeks, cpu_base):.2f}")  # fmt: skip
    print(f"  market-data requests: {med(with_greeks, 'requests_per_s'):.1f}/s while rotating "
          f"(all of the run incl. start: {med(with_greeks, 'requests_total_per_s'):.1f}/s; "
          f"budget {REQUEST_BUDGET}/s), most lines at once {most_lines:.0f} "
          f"(budget {args.lines})")  # fmt: skip
    print(f"  option_greeks rows: {med(with_greeks, 'rows_per_s'):.0f}/s; "
          f"{med(with_greeks, 'streaming'):.0f} streaming, {med(with_greeks, 'rotated'):.0f} "
          f"rotated; positions published {med(with_greeks, 'positions_per_s'):.0f}/s vs "
          f"{med(base, 'positions_per_s'):.0f}/s baseline")  # fmt: skip
    met = oldest <= args.rotation
    print(f"  oldest sample {oldest:.1f} s (goal <= {args.rotation:.0f} s): "
          f"{'MET' if met else 'NOT MET'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
