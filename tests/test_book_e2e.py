"""The strategy book end to end: the simulator's fills (combos among them) through the
real ib_async client, the producer and the consumer into the lake, then ``poslake
book`` (a separate program) into ``transactions``, ``legs`` and ``positions``.

Its steps are killed with SIGKILL between commits while fills go on; after the
restarts the tables equal, row by row, a rebuild from scratch into an empty
location; a replay of the whole stream changes nothing; and the book agrees with
the simulator: every fill is booked once, with its side and commission, and the
legs add up to what each account holds.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from deltalake import DeltaTable

from gateway_sim.fills import FillFaults
from gateway_sim.simulator import SimulatorConfig, SimulatorThread
from options_model.feed import APP_ID, FED_TABLES, BookFeed
from tests.helpers import (
    REPO_ROOT,
    consumer_env,
    group_pending,
    run_consumer,
    run_python,
    start_consumer,
    stop,
    wait_until,
)

ACCOUNTS = ["DU100001", "DU100002"]


def _rows(uri: Path, name: str, key: str) -> list[dict[str, Any]]:
    frame = pl.read_delta(str(uri / name))
    return sorted(frame.to_dicts(), key=lambda r: str(r[key]))


def _book(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "poslake", "book", *args], env=env, cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


@pytest.mark.timeout(300)
def test_book_survives_sigkill_and_equals_a_rebuild(
    redis_url: str, stream: str, lake: Path, tmp_path: Path
) -> None:
    faults = FillFaults(commission_first=0.1, commission_missing=0.05, correction=0.1, combo=0.5)
    config = SimulatorConfig(accounts=ACCOUNTS, positions=20, rate=40, seed=21, fill_faults=faults)
    thread = SimulatorThread(config)
    port = thread.start()
    env = consumer_env(redis_url, lake, "book-consumer", stream, batch_max_wait_s=0.3)
    producer_env = env | {
        "POSLAKE_IB_PORT": str(port),
        "POSLAKE_PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
    }
    book_env = env | {"POSLAKE_BOOK_INTERVAL_S": "0.3", "POSLAKE_BOOK_SNAPSHOT_S": "2"}
    producer = subprocess.Popen(
        [sys.executable, "-m", "producer"], env=producer_env, cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    consumer = start_consumer(env, log=tmp_path / "consumer.log")
    blotter = thread.simulator.blotter
    try:
        wait_until(lambda: (lake / "executions").exists() and len(blotter.fills) >= 15, 60)
        # Killed at its first commit (of the first step), then in a later step
        # (fills keep coming), each time restarted.
        for crash_after in (1, 5):
            fault = {"POSLAKE_FAULT_BOOK_CRASH_AFTER_COMMITS": str(crash_after)}
            crashing = _book(book_env | fault)
            assert crashing.wait(timeout=120) == -signal.SIGKILL, crashing.stdout
        running = _book(book_env)
        wait_until(lambda: len(blotter.fills) >= 35, 90)
        thread.run("pause")
        time.sleep(1.5)  # late commissions and corrections go out
        wait_until(lambda: group_pending(redis_url, stream) == 0, 60)
        time.sleep(1.0)
        running.send_signal(signal.SIGTERM)
        assert running.wait(timeout=60) == 0
    finally:
        stop(producer, consumer)
        thread.stop()
    assert run_consumer(env) == 0
    once = run_python(["-m", "poslake", "book", "--once"], book_env)
    assert once.returncode == 0, once.stderr
    assert "book up to date" in once.stdout

    # A rebuild from scratch into an empty location gives exactly the same rows.
    fresh = tmp_path / "rebuilt"
    BookFeed(str(lake), book_uri=str(fresh)).step(0.0, full=True)
    for spec in FED_TABLES:
        key = spec.key[0]
        assert _rows(lake, spec.name, key) == _rows(fresh, spec.name, key), spec.name

    # The book agrees with the simulator: every fill once, side and commission kept.
    transactions = pl.read_delta(str(lake / "transactions"))
    made = blotter.final()
    booked: dict[str, float] = defaultdict(float)
    commissions: dict[str, float] = defaultdict(float)
    for row in transactions.to_dicts():
        booked[row["exec_base"]] += row["quantity"]
        commissions[row["exec_base"]] += row["commission"] or 0.0
        fill = made[row["exec_base"]]
        assert row["side"] == ("BUY" if fill.side == "BOT" else "SELL")
        assert row["price"] == fill.price and row["conid"] == fill.instrument.conid
    legs_made = {b: f for b, f in made.items() if f.instrument.sec_type != "BAG"}
    assert booked.keys() == legs_made.keys()
    for base, fill in legs_made.items():
        assert booked[base] == pytest.approx(fill.shares), base
        assert commissions[base] == pytest.approx(fill.commission or 0.0), base
    # Legs of one combo order are one strategy.
    by_perm = transactions.group_by("perm_id").agg(pl.col("strategy_id").n_unique())
    combos = {f.perm_id for f in blotter.fills if f.instrument.sec_type == "BAG"}
    assert combos, "the run made no combo"
    assert by_perm.filter(pl.col("perm_id").is_in(combos))["strategy_id"].max() == 1
    # The legs add up to what each account holds, contract by contract.
    legs = pl.read_delta(str(lake / "legs"))
    held: dict[tuple[str, int], float] = defaultdict(float)
    for row in legs.to_dicts():
        held[(row["account"], row["conid"])] += row["quantity"]
    book = {key: h.position for key, h in thread.simulator.portfolio.holdings.items()}
    assert {k: v for k, v in held.items() if v} == pytest.approx(book)
    positions = pl.read_delta(str(lake / "positions"))
    assert positions.height >= 10
    assert set(positions["status"].to_list()) <= {"open", "closed", "rolling"}

    # Greeks snapshots: every open strategy has one; a grid snapshot's rows carry their
    # account's portfolio delta, the sum over its open strategies.
    greeks = pl.read_delta(str(lake / "greeks"))
    still_open = set(positions.filter(pl.col("status") != "closed")["strategy_id"].to_list())
    assert still_open <= set(greeks["strategy_id"].to_list())
    interval = greeks.filter(pl.col("trigger") == "interval")
    assert set(greeks["trigger"].to_list()) == {"interval", "change"}
    grid = interval.filter(pl.col("timestamp") == interval["timestamp"].max())
    assert grid.height >= 5
    for _account, rows in grid.group_by("account"):
        assert rows["portfolio_delta"][0] == pytest.approx(rows["delta"].fill_null(0).sum())
    newest = _query(env, "greeks")
    assert newest.height == greeks["strategy_id"].n_unique()

    # A replay of the whole stream lands nothing new, so the book writes nothing.
    versions = {s.name: _version(lake, s.name) for s in FED_TABLES}
    replay = run_python(["-m", "poslake", "replay", "--beginning", "--yes"], env)
    assert replay.returncode == 0, replay.stderr
    assert run_consumer(env) == 0
    again = run_python(["-m", "poslake", "book", "--once"], book_env)
    assert again.returncode == 0, again.stderr
    assert {s.name: _version(lake, s.name) for s in FED_TABLES} == versions, again.stdout
    for name in ("transactions", "legs", "positions"):
        assert f" {name} " not in again.stdout  # nothing written to the book's rows

    # The operator's view: status shows the book caught up; the queries show its rows.
    shown = run_python(["-m", "poslake", "status"], env)
    assert shown.returncode == 0, shown.stderr
    assert "strategy book: at executions version" in shown.stdout and "up to date" in shown.stdout
    still = positions.filter(pl.col("status") == "open").height
    assert f"strategies: {still} open (" in shown.stdout
    listed = _query(env, "strategies")
    assert sorted(listed["strategy_id"].to_list()) == sorted(positions["strategy_id"].to_list())
    opened = _query(env, "strategies", "--status", "open")
    assert set(opened["status"].to_list()) == {"open"}
    assert opened.height == positions.filter(pl.col("status") == "open").height
    one = positions.sort("strategy_id").row(0, named=True)
    its_legs = _query(env, "legs", "--strategy", one["strategy_id"])
    assert sorted(its_legs["leg_id"].to_list()) == sorted(
        legs.filter(pl.col("strategy_id") == one["strategy_id"])["leg_id"].to_list()
    )
    its_fills = _query(env, "transactions", "--strategy", one["strategy_id"])
    assert (
        its_fills.height == transactions.filter(pl.col("strategy_id") == one["strategy_id"]).height
    )
    # Time travel: the first version of the table is what --version 0 shows.
    first = pl.read_delta(str(lake / "positions"), version=0)
    assert _query(env, "strategies", "--version", "0").height == first.height
    missing = run_python(["-m", "poslake", "query", "legs", "--strategy", "nope"], env)
    assert missing.returncode == 3, missing.stderr

    # Overrides: merge two strategies of one account and underlying, name the result,
    # split a fill off another; they hold after a step and after a rebuild.
    multi = (
        positions.group_by("account", "symbol").agg(pl.col("strategy_id").sort())
        .filter(pl.col("strategy_id").list.len() >= 3).sort("account", "symbol").row(0)
    )  # fmt: skip
    first, second, third = multi[2][:3]
    merged = _book_command(env, "merge", first, second)
    merged_id = merged.split("strategy ")[1].split(":")[0]
    _book_command(env, "name", merged_id, "my condor")
    third_fills = transactions.filter(pl.col("strategy_id") == third)["exec_base"].to_list()
    split = _book_command(env, "split", third, "--exec", third_fills[0])
    split_id = split.split("strategy ")[1].split(":")[0]
    assert run_python(["-m", "poslake", "book", "--once"], book_env).returncode == 0
    after = pl.read_delta(str(lake / "positions"))
    ids = set(after["strategy_id"].to_list())
    assert merged_id in ids and first not in ids and second not in ids
    assert after.filter(pl.col("strategy_id") == merged_id)["name"].to_list() == ["my condor"]
    moved = pl.read_delta(str(lake / "transactions")).filter(pl.col("exec_base") == third_fills[0])
    assert set(moved["strategy_id"].to_list()) == {split_id}
    was = {s.name: _rows(lake, s.name, s.key[0]) for s in FED_TABLES}
    rebuilt = run_python(["-m", "poslake", "book", "--rebuild"], book_env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    for spec in FED_TABLES:
        assert _rows(lake, spec.name, spec.key[0]) == was[spec.name], spec.name
    again_fresh = tmp_path / "rebuilt-again"
    BookFeed(str(lake), book_uri=str(again_fresh)).step(0.0, full=True)
    for spec in FED_TABLES:
        assert _rows(again_fresh, spec.name, spec.key[0]) == was[spec.name], spec.name
    listed_overrides = _book_command(env, "overrides")
    assert "my condor" in listed_overrides and f"merge-{min(first, second)}" in listed_overrides


def _book_command(env: dict[str, str], *args: str) -> str:
    done = run_python(["-m", "poslake", "book", *args], env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _query(env: dict[str, str], *args: str) -> pl.DataFrame:
    done = run_python(["-m", "poslake", "query", *args, "--format", "csv"], env)
    assert done.returncode == 0, done.stderr
    return pl.read_csv(io.StringIO(done.stdout))


def _version(lake: Path, name: str) -> int:
    table = DeltaTable(str(lake / name))
    assert table.transaction_version(APP_ID) is not None
    return table.version()
