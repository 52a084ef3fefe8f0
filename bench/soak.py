"""Soak: producer and consumer memory over minutes at a steady rate with position churn.

Processes: a private redis-server, the gateway simulator (``--rate`` events/s over
three accounts: prices move, positions open, change and close, so the two
positions-only accounts keep PnL-single subscriptions coming and going), the
producer (metrics on, so its ib_async request queue and PnL subscriptions can be
read), one consumer, and, as a baseline, a second producer on the same gateway
that follows the portfolio account only (no PnL-single churn) into its own
trimmed stream. Every ``--interval`` seconds this process reads each one's VmRSS
from ``/proc/<pid>/status``.

Printed per process: RSS at the start of the window (after ``--warmup``) and at
the end, growth over the last 4 minutes, the least-squares slope after warm-up
(kB/s), and MET/NOT MET against the goal: under 2 MB growth over the last 4
minutes for the producer and the consumer.

    python -m bench.soak [--duration 600] [--rate 2000] [--positions 200] [--warmup 60]
                         [--consumer-env NAME=VALUE] [--no-fills] [--seed-current]
                         [--no-baseline] [--keep] [--quick]

At 2,000 events/s with 200 positions (``poslake run``'s default) a position lives
about 2 s: far more opens and closes than PnL-single requests the budget allows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pyarrow as pa
from deltalake import DeltaTable

from bench.common import (
    consumer_env,
    log,
    private_redis,
    rss_kb,
    scrape,
    start_module,
    work_dir,
)
from consumer.current import CurrentWriter
from gateway_sim import protocol as tws
from gateway_sim.portfolio import SyntheticPortfolio
from infra.redis_server import free_port
from shared.greeks import OptionGreeks, greeks_to_arrow
from shared.kinds import OPTION_GREEKS
from shared.settings import Settings, load_settings
from shared.table import POSITION_UPDATES_SCHEMA

DEFAULT_INDEX_MAX_KEYS = Settings.model_fields["dedup_index_max_keys"].default
GOAL_GROWTH_KB = 2_000  # over the last 4 minutes, per process
LAST_WINDOW_S = 240.0
SEED_TICKS: tuple[Literal[10, 11, 12, 13], ...] = (10, 11, 12, 13)
ACCOUNTS = "DU100001,DU100002,DU100003"
PORTFOLIO_ACCOUNT = "DU100001"  # the first: IB's portfolio stream, no PnL-single
# Measured cost in the index (consumer/dedup.py): an int64 a key with its arrays'
# headroom, and a dict entry and array per contract (account, conid).
INDEX_KEY_BYTES = 15
INDEX_CONTRACT_BYTES = 200


@dataclass
class Series:
    name: str
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)  # (s since start, kB)

    def sample(self, at: float) -> None:
        kb = rss_kb(self.pid)
        if kb is not None:
            self.samples.append((at, kb))


def slope_kb_s(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var if var else 0.0


def at_or_after(points: list[tuple[float, int]], moment: float) -> tuple[float, int]:
    return next((p for p in points if p[0] >= moment), points[-1])


def table_rows(uri: Path) -> int:
    """Rows of a Delta table, from its file statistics."""
    actions = pa.table(DeltaTable(str(uri)).get_add_actions(flatten=True))
    return int(sum(actions.column("num_records").to_pylist())) if actions.num_rows else 0


def universe() -> int:
    """(account, contract) pairs the simulator can open positions in."""
    accounts = ACCOUNTS.split(",")
    return len(accounts) * len(SyntheticPortfolio(accounts, 1).instruments)


def seed_current(lake: Path) -> int:
    """Give ``positions_current`` a row (closed, a day old) for every contract of the
    universe, and ``option_greeks_current`` one per option and source tick, as a
    consumer that has run for long has: its merges then work on tables at full size
    from the start, not on ones growing by each new contract."""
    accounts = ACCOUNTS.split(",")
    instruments = SyntheticPortfolio(accounts, 1).instruments
    pairs = [(a, i) for a in accounts for i in instruments]
    when = datetime.now(UTC) - timedelta(days=1)
    n = len(pairs)

    def expiry(text: str) -> object:
        return datetime.strptime(text, "%Y%m%d").date() if text else None

    rows = pa.table(
        {
            "account": [a for a, _ in pairs],
            "conid": [i.conid for _, i in pairs],
            "symbol": [i.symbol for _, i in pairs],
            "sec_type": [i.sec_type for _, i in pairs],
            "right": [i.right or None for _, i in pairs],
            "strike": [i.strike if i.sec_type == "OPT" else None for _, i in pairs],
            "expiry": [expiry(i.expiry) for _, i in pairs],
            "multiplier": [float(i.multiplier) for _, i in pairs],
            "currency": [i.currency for _, i in pairs],
            "position": [0.0] * n,
            "market_price": [1.0] * n,
            "market_value": [0.0] * n,
            "average_cost": [1.0] * n,
            "unrealized_pnl": [0.0] * n,
            "realized_pnl": [0.0] * n,
            "timestamp": [when] * n,
            "date": [when.date()] * n,
            "stream_id": ["0-0"] * n,
        },
        schema=POSITION_UPDATES_SCHEMA,
    )
    settings = load_settings(lake_uri=str(lake))
    CurrentWriter(settings).merge(rows)
    # The Greeks of every option, from each source tick the simulator sends.
    options = [i for i in instruments if i.sec_type == "OPT"]
    greeks = [
        OptionGreeks(
            conid=i.conid, symbol=i.symbol, sec_type="OPT", currency=i.currency,
            right="C" if i.right == "C" else "P", strike=i.strike,
            expiry=datetime.strptime(i.expiry, "%Y%m%d").date(),
            multiplier=float(i.multiplier), tick_type=tick, timestamp=when, delta=0.5,
        )
        for i in options
        for tick in SEED_TICKS
    ]  # fmt: skip
    CurrentWriter(settings, OPTION_GREEKS).merge(greeks_to_arrow(greeks, [b"0-0"] * len(greeks)))
    return n + len(greeks)


def producer_env(
    base: dict[str, str], port: int, folder: Path, metrics_port: int, **extra: str
) -> dict[str, str]:
    env = dict(base)
    env.update(
        {
            "POSLAKE_IB_PORT": str(port),
            "POSLAKE_PRODUCER_SPOOL_DIR": str(folder),
            "POSLAKE_METRICS_PORT": str(metrics_port),
        }
    )
    env.update(extra)
    return env


def report(series: Series, warmup: float, goal: bool) -> bool:
    window = [p for p in series.samples if p[0] >= warmup]
    if len(window) < 2:
        print(f"  {series.name}: too few samples after warm-up")
        return False
    end_t, end_kb = window[-1]
    start_t, start_kb = window[0]
    last_from = max(start_t, end_t - LAST_WINDOW_S)
    last_t, last_kb = at_or_after(window, last_from)
    # RSS swings by tens of MB with batches and compaction, so two single samples
    # say little: the growth judged is the least-squares trend over the last 4
    # minutes (its slope times the span); the sample-to-sample difference is shown too.
    last = [p for p in window if p[0] >= last_t]
    growth = slope_kb_s(last) * (end_t - last_t)
    met = growth < GOAL_GROWTH_KB
    verdict = f"goal < {GOAL_GROWTH_KB / 1000:g} MB: {'MET' if met else 'NOT MET'}" if goal else ""
    print(
        f"  {series.name:<18} start {start_kb / 1024:7.1f} MB  end {end_kb / 1024:7.1f} MB  "
        f"growth over last {end_t - last_t:.0f}s {growth / 1024:+6.2f} MB (trend; samples "
        f"{(end_kb - last_kb) / 1024:+.2f})  "
        f"slope {slope_kb_s(window):+7.2f} kB/s  peak {max(v for _, v in window) / 1024:.1f} MB"
        f"  {verdict}"
    )
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="run length in seconds")
    parser.add_argument("--rate", type=float, default=2000.0, help="simulator events/s")
    parser.add_argument(
        "--positions", type=int, default=200, help="open positions held (poslake run's default)"
    )
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds left out of slopes")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--no-baseline", action="store_true", help="skip the second producer")
    parser.add_argument(
        "--consumer-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment of the consumer (repeatable), e.g. MALLOC_ARENA_MAX=2",
    )
    parser.add_argument(
        "--seed-current",
        action="store_true",
        help="start positions_current with a row for every contract (its steady-state size)",
    )
    parser.add_argument(
        "--no-fills",
        action="store_true",
        help="the simulator changes positions without fills (position updates alone)",
    )
    parser.add_argument(
        "--position-changes-per-s",
        type=float,
        default=3.0,
        help="position changes (fills) a second at most, as a real account makes (0: ~20%% "
        "of the events, the simulator's seeded rolls)",
    )
    parser.add_argument("--quick", action="store_true", help="90 s run, 30 s warm-up")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs)")
    args = parser.parse_args(argv)
    duration, warmup = (90.0, 30.0) if args.quick else (args.duration, args.warmup)
    if duration - warmup < LAST_WINDOW_S:
        log(f"note: the window after warm-up is under {LAST_WINDOW_S:.0f}s: growth is over less")

    with work_dir("soak", keep=args.keep) as folder, private_redis(folder / "redis") as server:
        stats_path = folder / "simulator-stats.json"
        sim = subprocess.Popen(
            [sys.executable, "-m", "gateway_sim", "--port", "0", "--accounts", ACCOUNTS,
             "--positions", str(args.positions), "--rate", str(args.rate),
             "--stats", str(stats_path), *(["--no-fills"] if args.no_fills else []),
             *(["--position-changes-per-s", str(args.position_changes_per_s)]
               if args.position_changes_per_s > 0 else [])],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert sim.stdout is not None
        port = int(sim.stdout.readline().rsplit(":", 1)[1])
        base = consumer_env(server.url, folder / "lake", "soak", "positions")
        if args.seed_current:
            rows = seed_current(folder / "lake")
            log(f"positions_current and option_greeks_current seeded with {rows} rows")
        metrics_port, consumer_port = free_port(), free_port()
        extra = dict(item.split("=", 1) for item in args.consumer_env)
        consumer = start_module(
            ["consumer"],
            {**base, "POSLAKE_METRICS_PORT": str(consumer_port), **extra},
            folder / "consumer.log",
        )
        producer = start_module(
            ["producer"],
            producer_env(base, port, folder / "spool", metrics_port),
            folder / "producer.log",
        )
        processes = [("producer", producer), ("consumer", consumer)]
        series = [Series("producer", producer.pid), Series("consumer", consumer.pid)]
        if not args.no_baseline:
            baseline = start_module(
                ["producer"],
                producer_env(
                    base, port, folder / "spool-baseline", free_port(),
                    POSLAKE_IB_ACCOUNTS=PORTFOLIO_ACCOUNT, POSLAKE_IB_CLIENT_ID="18",
                    POSLAKE_STREAM="baseline", POSLAKE_STREAM_MAXLEN="10000",
                ),
                folder / "producer-baseline.log",
            )  # fmt: skip
            processes.append(("baseline producer", baseline))
            series.append(Series("baseline producer", baseline.pid))
        series.append(Series("simulator", sim.pid))
        if server.process is not None:
            series.append(Series("redis-server", server.process.pid))
        log(
            f"soak: {duration:.0f}s at {args.rate:.0f} events/s, {args.positions} positions, "
            f"sampling every {args.interval:.0f}s (warm-up {warmup:.0f}s)"
        )
        started = time.monotonic()
        gauges: list[tuple[float, dict[str, float]]] = []
        while (now := time.monotonic() - started) < duration:
            for one in series:
                one.sample(now)
            gauges.append((now, scrape(metrics_port) | scrape(consumer_port)))
            for name, process in processes:
                if process.poll() is not None:
                    raise SystemExit(f"{name} exited early ({process.returncode}): see --keep")
            if int(now) % 60 < args.interval:
                queue = gauges[-1][1].get("poslake_producer_ib_request_queue", float("nan"))
                log(
                    f"{now:.0f}s: producer {series[0].samples[-1][1] / 1024:.1f} MB, "
                    f"consumer {series[1].samples[-1][1] / 1024:.1f} MB, ib queue {queue:.0f}"
                )
            time.sleep(args.interval - (time.monotonic() - started - now))
        for _, process in processes:
            process.send_signal(signal.SIGTERM)
        for _, process in processes:
            process.wait(60)
        sim.send_signal(signal.SIGTERM)
        try:
            # A long run's simulator holds its whole day of fills: give it time to stop.
            sim.wait(180)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()
            log("the simulator did not stop within 180 s: its request counts are lost")
        received = (
            json.loads(stats_path.read_text()).get("received", {}) if stats_path.exists() else {}
        )
        current_rows = table_rows(folder / "lake" / "positions_current")
        greeks_path = folder / "lake" / "option_greeks_current"
        greeks_rows = table_rows(greeks_path) if greeks_path.exists() else 0
        with (folder / "rss.csv").open("w") as table:  # kept with --keep
            table.write("process,seconds,rss_kb\n")
            for one in series:
                table.writelines(f"{one.name},{t:.1f},{kb}\n" for t, kb in one.samples)

    with open("/proc/loadavg") as loadavg:
        load = loadavg.read().split()[:3]
    print(
        f"soak: {duration:.0f}s at {args.rate:.0f} events/s over {ACCOUNTS} "
        f"({args.positions} positions, fills {'off' if args.no_fills else 'on'}, position "
        f"changes {args.position_changes_per_s:g}/s at most), "
        f"RSS every {args.interval:.0f}s, warm-up "
        f"{warmup:.0f}s; load average at the end {' '.join(load)} on {os.cpu_count()} cores"
    )
    judged = ("producer", "consumer", "redis-server")
    results = [report(s, warmup, goal=s.name in judged) for s in series]
    pnl = sum(
        received.get(str(m), 0)
        for m in (tws.Incoming.REQ_PNL_SINGLE, tws.Incoming.CANCEL_PNL_SINGLE)
    )
    print(
        f"  gateway received: {sum(received.values())} requests, {pnl} PnL-single subscribes "
        f"and cancels ({pnl / duration:.1f}/s; ib_async throttles at 45/s)"
    )
    window = [g for t, g in gauges if t >= warmup and g]
    if window:

        def figure(name: str) -> str:
            values = [g.get(f"poslake_producer_{name}", 0.0) for g in window]
            return f"{values[0]:.0f} -> {values[-1]:.0f} (max {max(values):.0f})"

        print(
            f"  producer after warm-up: ib_async request queue {figure('ib_request_queue')}, "
            f"PnL subscriptions {figure('pnl_subscriptions')}, waiting "
            f"{figure('pnl_pending')}"
        )
        span = (gauges[-1][0] - warmup) or 1.0

        def rate(counter: str) -> float:
            values = [g.get(f"poslake_producer_{counter}_total", 0.0) for g in window]
            return (values[-1] - values[0]) / span

        print(
            f"  producer published {rate('published'):.0f} position updates/s and "
            f"{rate('greeks_published'):.0f} option_greeks rows/s after warm-up "
            f"(stream entries of all kinds: {rate('xadd_published'):.0f}/s)"
        )
        # The index's share of the consumer's growth: measured per item (consumer/dedup.py).
        last = [g for t, g in gauges if t >= gauges[-1][0] - LAST_WINDOW_S and g]

        def index_mb(g: dict[str, float]) -> float:
            keys = g.get("poslake_consumer_dedup_index_keys", 0.0)
            contracts = g.get("poslake_consumer_dedup_index_contracts", 0.0)
            return (keys * INDEX_KEY_BYTES + contracts * INDEX_CONTRACT_BYTES) / 1e6

        keys = [g.get("poslake_consumer_dedup_index_keys", 0.0) for g in window]
        raised = any(b < a for a, b in itertools.pairwise(keys))
        state = "at its bound: horizon raised" if raised else "still filling, by design"
        bound = int(extra.get("POSLAKE_DEDUP_INDEX_MAX_KEYS", DEFAULT_INDEX_MAX_KEYS))
        print(
            f"  consumer dedup index after warm-up: {keys[0]:.0f} -> {keys[-1]:.0f} keys, "
            f"{last[-1].get('poslake_consumer_dedup_index_contracts', 0):.0f} contracts "
            f"(bound {bound} keys, {state}); "
            f"~{index_mb(last[-1]) - index_mb(last[0]):+.1f} MB over the last "
            f"{LAST_WINDOW_S:.0f}s"
        )
    # One row per contract ever held: every merge rewrites the files holding the
    # batch's contracts (all of them, at this rate), so its working set grows with it.
    print(
        f"  positions_current at the end: {current_rows} rows (one per contract ever held; "
        f"the simulator's universe is {universe()} contracts); option_greeks_current "
        f"{greeks_rows} rows (per option and source tick)"
    )
    met = all(r for s, r in zip(series, results, strict=True) if s.name in judged)
    print(f"  producer, consumer and redis-server flat: {'MET' if met else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
