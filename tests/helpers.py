"""Shared test helpers: deterministic updates, consumer processes, table comparison."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import msgspec
import polars as pl
import pyarrow as pa
import redis
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from infra.publisher import StreamPublisher
from infra.stopping import spawn_holding_stops
from shared.greeks import OptionGreeks
from shared.model import PositionUpdate
from shared.table import updates_to_arrow
from shared.wire import decode_entry, encode_update

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_TIME = datetime(2026, 11, 2, 14, 30, tzinfo=UTC)
SYMBOLS = ["AAPL", "MSFT", "SPY", "QQQ", "TSLA", "NVDA", "AMZN", "IWM"]
ACCOUNTS = ["U1000001", "U1000002", "DU555001"]


def make_updates(
    count: int,
    *,
    seed: int = 7,
    symbols: Sequence[str] = SYMBOLS,
    accounts: Sequence[str] = ACCOUNTS,
    contracts_per_symbol: int = 6,
    start: datetime = BASE_TIME,
) -> list[PositionUpdate]:
    """``count`` updates with unique keys and strictly increasing timestamps.

    Every third contract of a symbol is an option on it (so options land in
    their underlying's partition).
    """
    rng = random.Random(seed)
    updates: list[PositionUpdate] = []
    for i in range(count):
        symbol = symbols[rng.randrange(len(symbols))]
        slot = rng.randrange(contracts_per_symbol)
        conid = 100_000 + symbols.index(symbol) * 1_000 + slot
        is_option = slot % 3 == 2
        price = round(rng.uniform(5, 500), 4)
        qty = float(rng.randrange(-20, 21))
        mult = 100.0 if is_option else 1.0
        updates.append(
            PositionUpdate(
                account=accounts[rng.randrange(len(accounts))],
                conid=conid,
                symbol=symbol,
                sec_type="OPT" if is_option else "STK",
                currency="USD",
                position=qty,
                timestamp=start + timedelta(microseconds=1_237 * i + 1),
                right=("C" if slot % 2 else "P") if is_option else None,
                strike=float(100 + 5 * slot) if is_option else None,
                expiry=date(2026, 12, 18) if is_option else None,
                multiplier=mult,
                market_price=price,
                market_value=round(price * qty * mult, 4),
                average_cost=round(price * 0.97, 4),
                unrealized_pnl=round(price * 0.03 * qty * mult, 4),
                realized_pnl=0.0,
            )
        )
    return updates


def make_greeks(
    count: int, *, seed: int = 11, conids: int = 40, start: datetime = BASE_TIME
) -> list[OptionGreeks]:
    """``count`` option computations over ``conids`` options of :data:`SYMBOLS`, unique
    keys, increasing timestamps, every source tick, live and delayed, some values null."""
    rng = random.Random(seed)
    greeks: list[OptionGreeks] = []
    for i in range(count):
        slot = rng.randrange(conids)
        symbol = SYMBOLS[slot % len(SYMBOLS)]
        right: Literal["C", "P"] = "C" if slot % 2 else "P"
        delta = round(rng.uniform(0.01, 0.99), 6) * (1 if right == "C" else -1)
        delayed = slot % 5 == 0
        greeks.append(
            OptionGreeks(
                conid=700_000 + slot,
                symbol=symbol,
                sec_type="OPT",
                currency="USD",
                right=right,
                strike=float(100 + 5 * slot),
                expiry=date(2027, 1, 15),
                multiplier=100.0,
                tick_type=rng.choice((10, 11, 12, 13)) + (70 if delayed else 0),  # type: ignore[arg-type]
                data_type=4 if delayed else 1,
                timestamp=start + timedelta(microseconds=997 * i + 1),
                implied_vol=None if i % 17 == 3 else round(rng.uniform(0.1, 0.8), 6),
                delta=delta,
                gamma=round(rng.uniform(0.0001, 0.05), 6),
                vega=None if i % 13 == 5 else round(rng.uniform(0.01, 0.5), 6),
                theta=None if i % 13 == 5 else round(-rng.uniform(0.01, 0.3), 6),
                opt_price=round(rng.uniform(0.5, 30), 4),
                pv_dividend=0.0,
                und_price=round(rng.uniform(90, 300), 4),
            )
        )
    return greeks


@dataclass(frozen=True)
class Lake:
    """Where a test's lake lives: a local folder, or a prefix on an object store with the
    storage options to reach it."""

    uri: str
    storage_options: dict[str, str] = field(default_factory=dict, repr=False)

    def table_uri(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"

    def table(self, name: str, version: int | None = None) -> DeltaTable:
        return DeltaTable(
            self.table_uri(name), version=version, storage_options=self.storage_options or None
        )

    def env(self) -> dict[str, str]:
        """The settings that point a poslake program at this lake."""
        env = {"POSLAKE_LAKE_URI": self.uri}
        if self.storage_options:
            env["POSLAKE_STORAGE_OPTIONS"] = msgspec.json.encode(self.storage_options).decode()
        return env


def as_lake(lake: Path | Lake) -> Lake:
    return lake if isinstance(lake, Lake) else Lake(str(lake))


def read_frame(lake: Path | Lake, name: str) -> pl.DataFrame:
    """A lake table's rows, as polars reads them (on a folder or a store)."""
    target = as_lake(lake)
    return pl.read_delta(target.table_uri(name), storage_options=target.storage_options or None)


def publish(url: str, stream: str, updates: Sequence[PositionUpdate]) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return StreamPublisher(client, stream).publish(updates)
    finally:
        client.close()


def publish_entries(url: str, stream: str, entries: Sequence[msgspec.Struct]) -> None:
    """XADD each observation of any kind, one at a time, as a producer would."""
    client = redis.Redis.from_url(url)
    try:
        for entry in entries:
            client.xadd(stream, encode_update(entry))  # type: ignore[arg-type]
    finally:
        client.close()


def consumer_env(
    redis_url: str, lake: Path | Lake, name: str, stream: str = "positions", **settings: object
) -> dict[str, str]:
    """The environment of a consumer process: only POSLAKE_* settings are ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSLAKE_")}
    env.update(
        {
            "POSLAKE_REDIS_URL": redis_url,
            "POSLAKE_STREAM": stream,
            "POSLAKE_CONSUMER_NAME": name,
            "POSLAKE_BATCH_MAX_WAIT_S": "0.2",
            "POSLAKE_RETRY_INITIAL_S": "0.05",
            "POSLAKE_RETRY_MAX_S": "0.5",
            "POSLAKE_LOG_LEVEL": "INFO",
        }
    )
    env.update(as_lake(lake).env())
    env.update({f"POSLAKE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def start_consumer(
    env: dict[str, str], *, drain: bool = False, log: Path | None = None
) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "consumer"] + (["--drain"] if drain else [])
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    return spawn_holding_stops(args, env=env, cwd=REPO_ROOT, stdout=out, stderr=out)


def run_python(
    args: Sequence[str],
    env: dict[str, str],
    *,
    cwd: Path = REPO_ROOT,
    timeout: float = 120,
    stdin: str = "",
) -> subprocess.CompletedProcess[str]:
    """``python <args>`` (a module of ours, usually ``-m ...``) to its end, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_consumer(env: dict[str, str], *, timeout: float = 120, log: Path | None = None) -> int:
    """Run ``python -m consumer --drain`` to completion; returns its exit code."""
    proc = start_consumer(env, drain=True, log=log)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def stop(*procs: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM each program, wait for it to end (30 s), SIGKILL it if it does not."""
    for proc in procs:
        if proc is None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            kill(proc)


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def wait_until(condition: Any, timeout: float = 30, interval: float = 0.05) -> None:
    """Poll ``condition``; a Redis error (group not created yet) or a table still being
    created counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (redis.ResponseError, TableNotFoundError):
            pass
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


_COMPARED = [
    "account", "conid", "symbol", "sec_type", "right", "strike", "expiry", "multiplier",
    "currency", "position", "market_price", "market_value", "average_cost",
    "unrealized_pnl", "realized_pnl", "timestamp", "date",
]  # fmt: skip


def sorted_rows(table: pa.Table) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = table.select(_COMPARED).to_pylist()
    rows.sort(key=lambda r: (r["account"], r["conid"], r["timestamp"]))
    return rows


def table_rows(lake: Path | Lake) -> list[dict[str, Any]]:
    """Every row of ``position_updates`` (compared columns), sorted by key."""
    return sorted_rows(as_lake(lake).table("position_updates").to_pyarrow_table())


def expected_rows(updates: Iterable[PositionUpdate]) -> list[dict[str, Any]]:
    """The rows a correct pipeline holds for these updates: one per key."""
    by_key = {u.key: u for u in updates}
    unique = list(by_key.values())
    return sorted_rows(updates_to_arrow(unique, [b"0-0"] * len(unique)))


def current_rows(lake: Path | Lake) -> list[dict[str, Any]]:
    """Every row of ``positions_current`` (compared columns), sorted by key."""
    return sorted_rows(as_lake(lake).table("positions_current").to_pyarrow_table())


def assert_current_exact(lake: Path | Lake, updates: Iterable[PositionUpdate]) -> None:
    """positions_current holds one row per (account, conid): the newest update's fields."""
    newest: dict[tuple[str, int], PositionUpdate] = {}
    for update in updates:
        seen = newest.get((update.account, update.conid))
        if seen is None or seen.timestamp < update.timestamp:
            newest[(update.account, update.conid)] = update
    actual = current_rows(lake)
    keys = [(r["account"], r["conid"]) for r in actual]
    assert len(keys) == len(set(keys)), "positions_current holds a contract twice"
    assert actual == expected_rows(newest.values()), (
        f"positions_current differs: {len(actual)} rows vs {len(newest)} contracts"
    )


def assert_table_exact(lake: Path | Lake, updates: Iterable[PositionUpdate]) -> None:
    """The table holds exactly one row per key, equal field by field to the update."""
    actual = table_rows(lake)
    expected = expected_rows(updates)
    keys = [(r["account"], r["conid"], r["timestamp"]) for r in actual]
    assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} duplicate keys in table"
    missing = len(expected) - len(actual)
    assert actual == expected, (
        f"table differs from expected: {len(actual)} rows vs {len(expected)} expected "
        f"({missing} missing)"
    )


def stream_updates(client: redis.Redis, stream: str) -> list[PositionUpdate]:
    """Every update in the stream, decoded, in stream order."""
    entries: Any = client.xrange(stream)
    return [decode_entry(fields) for _, fields in entries if b"kind" not in fields]


def group_pending(url: str, stream: str, group: str = "lake") -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.xpending(stream, group)["pending"])
    finally:
        client.close()
