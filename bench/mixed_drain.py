"""Drain throughput on a realistic mix of kinds against positions alone, in the same run.

Two streams of the same length drain through one ``python -m consumer --drain``
process each, into copies of the same prefilled position table: positions
alone, and a mix of about 80% positions, 5% executions (a fill's details,
then its commission as a second entry a little later), 5% account values and
10% option Greeks (bid and model computations of 2,000 options).
The runs alternate (positions, mix, positions, mix, ...) and the medians are
compared. Goal: the mix within 10% of positions alone (ratio >= 0.90), in
entries per second end to end.

    python -m bench.mixed_drain             # 300k entries into a 2M-row table, 2 rounds
    python -m bench.mixed_drain --quick     # 40k entries into a 200k-row table, 1 round
"""

from __future__ import annotations

import argparse
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import msgspec
import polars as pl
import redis

from bench.common import (
    consumer_env,
    copy_table,
    log,
    median,
    prefilled_table,
    private_redis,
    ratio,
    stream_index_start,
    updates_for,
    verdict,
    work_dir,
)
from bench.drain import ConsumerRun, run_consumer
from infra.publisher import StreamPublisher
from shared.account_values import AccountValue
from shared.executions import CommissionDetails, ExecutionDetails, ExecutionEntry
from shared.greeks import OptionGreeks

GOAL_RATIO = 0.90
ACCOUNTS = ("DU100001", "DU100002", "DU100003")
VALUE_KEYS = ("NetLiquidation", "TotalCashValue", "BuyingPower", "MaintMarginReq",
              "GrossPositionValue", "AvailableFunds", "UnrealizedPnL", "RealizedPnL")  # fmt: skip
T0 = datetime(2026, 12, 1, 14, 30, tzinfo=UTC)
SYMBOLS = ("SPY", "QQQ", "AAPL", "MSFT", "NVDA", "IWM", "TSLA", "AMZN")


def greeks_at(i: int) -> OptionGreeks:
    n = i // 10
    conid = 400_000 + n % 2_000
    return OptionGreeks(
        conid=conid, symbol=SYMBOLS[conid % len(SYMBOLS)], sec_type="OPT", currency="USD",
        right="C" if conid % 2 else "P", strike=100.0 + conid % 50, expiry=date(2027, 1, 15),
        multiplier=100.0, tick_type=13 if n % 2 else 10,
        timestamp=T0 + timedelta(microseconds=n), implied_vol=0.2 + (n % 30) / 100,
        delta=(0.5 if conid % 2 else -0.5) + (n % 40) / 100 - 0.2, gamma=0.01 + (n % 9) / 1000,
        vega=0.1 + (n % 11) / 100, theta=-0.05 - (n % 7) / 100, opt_price=3.0 + n % 13,
        pv_dividend=0.0, und_price=100.0 + n % 97,
    )  # fmt: skip


def mixed_entries(start: int, count: int) -> list[msgspec.Struct]:
    """``count`` entries: every 20th an execution entry, every 20th (offset 10) an
    account value, every 10th (offset 5) option Greeks, the rest the positions
    ``updates_for`` gives."""
    positions = iter(updates_for(start, count))
    entries: list[msgspec.Struct] = []
    for i in range(start, start + count):
        if i % 20 == 0:
            n = i // 40  # details at even multiples of 20, the commission at odd ones
            exec_id = f"0000bnch.{n:08x}.01.01"
            if (i // 20) % 2 == 0:
                entries.append(ExecutionEntry(exec_id=exec_id, execution=ExecutionDetails(
                    account=ACCOUNTS[n % 3], conid=300_000 + n % 5_000, symbol="SPY",
                    sec_type="STK", currency="USD", side="BOT" if n % 2 else "SLD",
                    shares=float(1 + n % 9) * 100, price=500.0 + n % 50,
                    time=T0 + timedelta(microseconds=n), order_id=n, perm_id=n, client_id=0,
                )))  # fmt: skip
            else:
                entries.append(ExecutionEntry(exec_id=exec_id, commission=CommissionDetails(
                    commission=1.0 + n % 7, currency="USD")))  # fmt: skip
        elif i % 10 == 5:
            entries.append(greeks_at(i))
        elif i % 20 == 10:
            n = i // 20
            entries.append(AccountValue(
                account=ACCOUNTS[n % 3], key=VALUE_KEYS[n % len(VALUE_KEYS)], currency="USD",
                value=f"{1_000_000 + n % 100_000}.25", timestamp=T0 + timedelta(microseconds=n),
            ))  # fmt: skip
        else:
            entries.append(next(positions))
    return entries


def publish(url: str, stream: str, start: int, count: int, mixed: bool) -> None:
    client = redis.Redis.from_url(url)
    publisher = StreamPublisher(client, stream, chunk=500)
    try:
        for offset in range(0, count, 50_000):
            size = min(50_000, count - offset)
            entries = (
                mixed_entries(start + offset, size) if mixed else updates_for(start + offset, size)
            )
            publisher.publish(entries)
    finally:
        client.close()


def drain_once(
    source: Path, scratch: Path, name: str, args: argparse.Namespace, mixed: bool
) -> ConsumerRun:
    lake = scratch / f"lake-{name}"
    copy_table(source, lake)
    with private_redis(scratch / f"redis-{name}") as server:
        publish(server.url, "positions", stream_index_start(args.prefill), args.entries, mixed)
        env = consumer_env(
            server.url, lake, "bench-mix", "positions",
            batch_max_entries=args.batch_max_entries, batch_max_wait_s=10,
        )  # fmt: skip
        run = run_consumer(env, scratch / f"{name}.log", args.timeout, None)
    if run.exit_code != 0:
        raise SystemExit(f"consumer failed: {run.log_path.read_text()[-2000:]}")
    if mixed:
        executions = pl.read_delta(str(lake / "executions"))
        values = pl.read_delta(str(lake / "account_values"))
        greeks = pl.read_delta(str(lake / "option_greeks"))
        expected_exec = len(range(0, args.entries, 40))
        log(f"{name}: executions {executions.height:,} rows (expected ~{expected_exec:,}), "
            f"{executions['commission'].null_count():,} without commission; "
            f"account values {values.height:,}; option greeks {greeks.height:,}")  # fmt: skip
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mixed_drain", description=__doc__)
    parser.add_argument("--entries", type=int, default=300_000)
    parser.add_argument("--prefill", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-max-entries", type=int, default=35_000)
    parser.add_argument("--timeout", type=float, default=1_800.0)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.entries, args.prefill, args.rounds = 40_000, 200_000, 1
        args.batch_max_entries = min(args.batch_max_entries, 20_000)
    source = prefilled_table(args.prefill)
    rates: dict[str, list[float]] = {"positions": [], "mix": []}
    with work_dir("mixed-drain", keep=args.keep) as scratch:
        for round_ in range(args.rounds):
            for name, mixed in (("positions", False), ("mix", True)):
                run = drain_once(source, scratch, f"{name}-{round_}", args, mixed)
                rates[name].append(args.entries / run.wall_s)
                log(f"{name} round {round_ + 1}: {args.entries / run.wall_s:,.0f} entries/s")
    pos, mix = median(rates["positions"]), median(rates["mix"])
    print(f"== mixed drain: {args.entries:,} entries into a {args.prefill:,}-row table, "
          f"{args.rounds} round(s) ==")  # fmt: skip
    print("positions alone: " + ", ".join(f"{r:,.0f}" for r in rates["positions"])
          + f" entries/s (median {pos:,.0f})")  # fmt: skip
    shown = ", ".join(f"{r:,.0f}" for r in rates["mix"])
    print(f"mix (80% positions, 5% executions, 5% account values, 10% option Greeks): "
          f"{shown} entries/s "
          f"(median {mix:,.0f})")  # fmt: skip
    print(f"ratio mix/positions: {ratio(mix, pos):.3f}  "
          f"{verdict(ratio(mix, pos), GOAL_RATIO, True)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
