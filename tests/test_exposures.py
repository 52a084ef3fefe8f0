"""``poslake query exposures`` and ``options_model.exposures``: equal to a computation by
hand from the lake's tables, now and at a past time from the history."""

from __future__ import annotations

import csv
import io
import os
import random
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import polars as pl
import pytest
import redis

from options_model.exposures import exposures
from shared.greeks import OptionGreeks
from shared.model import PositionUpdate
from shared.wire import encode_update
from tests.helpers import REPO_ROOT, consumer_env, make_updates, run_consumer

Sums = dict[tuple[str, str], dict[str, Any]]


def greeks_for(updates: list[PositionUpdate], at: datetime, seed: int) -> list[OptionGreeks]:
    """Model and bid computations for all but one option held (it has no Greeks). As
    IB often does, some model ticks leave ``und_price`` unset while the bid's has it,
    and every fifth option has it in no tick (its underlying's stock price, if held,
    or nothing: counted)."""
    rng = random.Random(seed)
    options = {u.conid: u for u in updates if u.sec_type == "OPT"}
    made = []
    for n, (conid, u) in enumerate(sorted(options.items())[1:]):
        for k, tick in enumerate((13, 10) if n % 3 else (10,)):  # some have bid only
            sign = 1 if u.right == "C" else -1
            made.append(
                OptionGreeks(
                    conid=conid, symbol=u.symbol, sec_type="OPT", currency="USD",
                    right=u.right or "C", strike=u.strike or 1.0, expiry=u.expiry or at.date(),
                    multiplier=u.multiplier, tick_type=tick,  # type: ignore[arg-type]
                    timestamp=at + timedelta(milliseconds=n * 3 + k),
                    delta=sign * round(rng.uniform(0.05, 0.95), 4),
                    gamma=round(rng.uniform(0.001, 0.05), 5),
                    vega=round(rng.uniform(0.01, 0.4), 4), theta=-round(rng.uniform(0.01, 0.2), 4),
                    und_price=None if n % 5 == 0 or (tick == 13 and n % 2 == 0)
                    else round(rng.uniform(90, 400), 2),
                    implied_vol=0.3,
                )
            )  # fmt: skip
    return made


def by_hand(lake: Path, at: datetime | None) -> Sums:
    """The exposures from the tables read row by row, in plain Python."""
    positions = pl.read_delta(str(lake / ("position_updates" if at else "positions_current")))
    greeks = pl.read_delta(str(lake / ("option_greeks" if at else "option_greeks_current")))
    newest: dict[tuple[str, int], dict[str, Any]] = {}
    for row in positions.to_dicts():
        key = (row["account"], row["conid"])
        if (at is None or row["timestamp"] <= at) and (
            key not in newest or row["timestamp"] > newest[key]["timestamp"]
        ):
            newest[key] = row
    computed: dict[tuple[int, str], dict[str, Any]] = {}
    for row in greeks.to_dicts():
        key = (row["conid"], row["source"])
        if (at is None or row["timestamp"] <= at) and (
            key not in computed or row["timestamp"] > computed[key]["timestamp"]
        ):
            computed[key] = row
    sums: Sums = defaultdict(
        lambda: {"positions": 0, "missing": 0, "unpriced": 0, "delta_shares": 0.0,
                 "delta_dollars": 0.0, "gamma": 0.0, "vega": 0.0, "theta": 0.0}
    )  # fmt: skip
    stock_price: dict[str, tuple[Any, int, float]] = {}  # the newest open stock row's
    for row in newest.values():
        if row["position"] != 0 and row["sec_type"] != "OPT" and row["market_price"] is not None:
            mark = (row["timestamp"], row["conid"], row["market_price"])
            stock_price[row["symbol"]] = max(stock_price.get(row["symbol"], mark), mark)
    for row in newest.values():
        if row["position"] == 0:
            continue
        total = sums[(row["account"], row["symbol"])]
        total["positions"] += 1
        size = row["position"] * row["multiplier"]
        if row["sec_type"] != "OPT":
            total["delta_shares"] += size
            total["delta_dollars"] += size * row["market_price"]
            continue
        found = [
            computed[(row["conid"], s)]
            for s in ("model", "last", "bid", "ask")
            if (row["conid"], s) in computed
        ]
        if not found:
            total["missing"] += 1
            continue
        g = found[0]
        total["delta_shares"] += g["delta"] * size
        priced = [
            c for s in ("model", "last", "bid", "ask")
            if (c := computed.get((row["conid"], s))) and c["und_price"] is not None
        ]  # fmt: skip
        if priced:
            und = max(priced, key=lambda c: (c["timestamp"], c["source"]))["und_price"]
        elif row["symbol"] in stock_price:
            und = stock_price[row["symbol"]][2]
        else:
            und = None
        if und is None:
            total["unpriced"] += 1
        else:
            total["delta_dollars"] += g["delta"] * size * und
        for name in ("gamma", "vega", "theta"):
            total[name] += g[name] * size
    return dict(sums)


def assert_equal(frame: pl.DataFrame, expected: Sums) -> None:
    got = {(r["account"], r["symbol"]): r for r in frame.to_dicts()}
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        row = got[key]
        assert row["positions"] == want["positions"], key
        assert row["options_without_greeks"] == want["missing"], key
        assert row["options_without_underlying_price"] == want["unpriced"], key
        for name in ("delta_shares", "delta_dollars", "gamma", "vega", "theta"):
            assert row[name] == pytest.approx(want[name], rel=1e-9, abs=1e-9), (key, name)


def test_exposures_now_and_at_a_past_time_equal_the_tables_by_hand(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(400, seed=23)
    # Options on an underlying the account holds no shares of: where no tick has
    # und_price, nothing gives their dollars.
    updates += [
        msgspec.structs.replace(
            u, symbol="NOSTK", conid=900_000 + i, position=float(i + 1),
            timestamp=u.timestamp + timedelta(seconds=1),
        )
        for i, u in enumerate(u for u in updates[:100] if u.sec_type == "OPT")
    ][:6]  # fmt: skip
    updates.sort(key=lambda u: u.timestamp)
    first, second = updates[:200], updates[200:]
    between = first[-1].timestamp + timedelta(microseconds=500)
    waves: list[list[PositionUpdate] | list[OptionGreeks]] = [
        first,
        greeks_for(first, first[0].timestamp, 1),
        second,
        greeks_for(updates, between + timedelta(microseconds=100), 2),
    ]
    client = redis.Redis.from_url(redis_url)
    for wave in waves:
        for entry in wave:
            client.xadd(stream, encode_update(entry))  # type: ignore[arg-type]
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=120)
    assert run_consumer(env, log=tmp_path / "consumer.log") == 0

    now = by_hand(lake, None)
    assert any(v["missing"] for v in now.values()) and any(v["vega"] for v in now.values())
    assert any(v["unpriced"] for v in now.values())
    assert_equal(exposures(str(lake)), now)
    past = by_hand(lake, between)
    assert past != now
    assert_equal(exposures(str(lake), at=between), past)
    # Filters: one account and one symbol.
    account, symbol = sorted(now)[0]
    only = exposures(str(lake), accounts=[account], symbols=[symbol])
    assert_equal(only, {(account, symbol): now[(account, symbol)]})

    # The CLI says the same, as CSV.
    cli_env = {**os.environ, **env}
    for at, expected in ((None, now), (between, past)):
        args = ["query", "exposures", "--format", "csv"]
        args += ["--at", at.isoformat()] if at else []
        result = subprocess.run(
            [sys.executable, "-m", "poslake", *args], env=cli_env, cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        frame = pl.DataFrame(
            [{**r, "positions": int(r["positions"]),
              "options_without_greeks": int(r["options_without_greeks"]),
              "options_without_underlying_price": int(r["options_without_underlying_price"]),
              **{n: float(r[n]) for n in ("delta_shares", "delta_dollars", "gamma", "vega",
                                           "theta")}}
             for r in rows]
        )  # fmt: skip
        assert_equal(frame, expected)


def test_exposures_without_positions_is_not_found(lake: Path, tmp_path: Path) -> None:
    env = {**os.environ, "POSLAKE_LAKE_URI": str(tmp_path / "empty-lake")}
    result = subprocess.run(
        [sys.executable, "-m", "poslake", "query", "exposures"], env=env, cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "no positions yet" in result.stderr and "Traceback" not in result.stderr
