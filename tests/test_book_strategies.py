"""The strategy book against the simulator's strategy scenario (gateway_sim/strategies.py):
every structure opened as a combo, as leg orders sharing a reference and untagged,
some held from before the producer started, then partly closed, rolled and closed,
through the real ib_async client, the producer, the consumer and ``poslake book``.

Every strategy the simulator made is one strategy of the book, with its type,
status, units, legs, rolls, entry price and realized P&L to the cent; every fill
is one ``transactions`` row with its side, effect and commission.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import polars as pl
import pytest

from gateway_sim.fills import FillFaults, SimFill
from gateway_sim.simulator import SimulatorConfig, SimulatorThread
from gateway_sim.strategies import PARTLY_CLOSED, STRUCTURES, StrategyScenario, expected
from options_model.repository import StrategyPositionRepository
from options_model.repository import legs as legs_repository
from tests.helpers import (
    REPO_ROOT,
    consumer_env,
    group_pending,
    run_python,
    start_consumer,
    stop,
    wait_until,
)

ACCOUNTS = {"combo": "DU300001", "ref": "DU300002", "untagged": "DU300003", "held": "DU300004"}


@pytest.mark.timeout(300)
def test_the_book_holds_every_strategy_the_simulator_traded(
    redis_url: str, stream: str, lake: Path, tmp_path: Path
) -> None:
    faults = FillFaults(commission_first=0.2, correction=0.15, combo=0.0)
    config = SimulatorConfig(
        accounts=list(ACCOUNTS.values()), positions=0, rate=0, seed=5, fill_faults=faults
    )
    thread = SimulatorThread(config)
    port = thread.start()
    scenario = StrategyScenario(thread.simulator, ACCOUNTS)
    thread.do(scenario.hold_before)  # from an earlier day: no fills today
    env = consumer_env(redis_url, lake, "strategies-consumer", stream, batch_max_wait_s=0.2)
    producer = subprocess.Popen(
        [sys.executable, "-m", "producer"],
        env=env | {"POSLAKE_IB_PORT": str(port), "POSLAKE_PRODUCER_SPOOL_DIR": str(tmp_path)},
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    consumer = start_consumer(env, log=tmp_path / "consumer.log")
    book_env = env | {"POSLAKE_BOOK_INTERVAL_S": "0.3"}
    book = subprocess.Popen(
        [sys.executable, "-m", "poslake", "book"], env=book_env, cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "book.log", "wb"),  # noqa: SIM115
    )  # fmt: skip
    blotter = thread.simulator.blotter
    try:
        wait_until((lake / "positions_current").exists, 60)
        wait_until((lake / "positions").exists, 60)  # the held strategies
        for phase in (scenario.open_all, scenario.partly_close, scenario.roll, scenario.close):
            thread.do(phase)
            bases = sum(1 for f in blotter.final().values() if f.instrument.sec_type != "BAG")
            wait_until(lambda n=bases: _landed(lake) >= n, 60, interval=0.3)
            time.sleep(1.0)  # the book's step sees the phase apart from the next
        wait_until(lambda: _all_final(lake, blotter.final()), 60, interval=0.3)
        wait_until(lambda: group_pending(redis_url, stream) == 0, 60)
    finally:
        stop(book, producer, consumer)
        thread.stop()
    once = run_python(["-m", "poslake", "book", "--once"], book_env)
    assert once.returncode == 0, once.stderr

    final = blotter.final()
    transactions = pl.read_delta(str(lake / "transactions"))
    positions = {r["strategy_id"]: r for r in pl.read_delta(str(lake / "positions")).to_dicts()}
    legs = pl.read_delta(str(lake / "legs"))
    assert set(transactions["account"].to_list()) <= set(ACCOUNTS.values())
    by_exec = {r["exec_base"]: r for r in transactions.to_dicts()}
    # every leg fill is one row (no fill is split: each strategy trades its own contracts)
    leg_fills = {b: f for b, f in final.items() if f.instrument.sec_type != "BAG"}
    assert transactions.height == len(by_exec) == len(leg_fills)
    found: set[str] = set()
    for key, made in scenario.made.items():
        ids = {by_exec[b]["strategy_id"] for b in made.exec_bases}
        if not made.exec_bases:  # held, never traded: found by its contracts
            ids = set(
                legs.filter(
                    (pl.col("account") == made.account) & pl.col("conid").is_in(list(made.held))
                )["strategy_id"].to_list()
            )
        assert len(ids) == 1, (key, ids)
        (sid,) = ids
        found.add(sid)
        row = positions[sid]
        booked = transactions.filter(pl.col("strategy_id") == sid)
        assert sorted(booked["exec_base"].to_list()) == sorted(made.exec_bases), key
        want = expected(made, final)
        assert row["strategy_type"] == made.structure, key
        assert row["status"] == ("closed" if made.closed else "open"), key
        partly = made.structure in PARTLY_CLOSED and made.mode != "held"
        units = 0.0 if made.closed else (1.0 if partly else want.units)
        assert row["quantity"] == pytest.approx(units), key
        assert row["realized_pnl"] == pytest.approx(want.realized_pnl, abs=0.005), key
        assert row["commissions"] == pytest.approx(want.commissions, abs=0.005), key
        assert row["entry_price"] == pytest.approx(want.entry_price, abs=1e-6), key
        assert row["rolls"] == made.rolls, key
        assert (row["exit_time"] is not None) == made.closed, key
        one_leg = len(STRUCTURES[made.structure](scenario.chains[made.structure])) == 1
        origin = {"held": "held:", "ref": "ref:", "combo": "fills:" if one_leg else "combo:"}
        assert row["origin"].startswith(origin.get(made.mode, "fills:")), key
        its_legs = legs.filter(pl.col("strategy_id") == sid)
        held = {r["conid"]: r["quantity"] for r in its_legs.to_dicts() if r["quantity"]}
        assert held == {c: q for c, q in made.held.items() if q}, key
    # nothing else: one book strategy per strategy made
    assert found == set(positions)
    # the options model's repositories read the fed tables
    repository = StrategyPositionRepository(str(lake))
    opened = {k for k, r in positions.items() if r["status"] == "open"}
    assert set(repository.open_positions()["strategy_id"].to_list()) == opened
    some = next(iter(sorted(opened)))
    assert (
        legs_repository(str(lake)).latest(strategy_id=some).height
        == legs.filter(pl.col("strategy_id") == some).height
    )
    # side, effect and commission of every fill, against a replay of the scenario's record
    position: dict[tuple[str, int], float] = defaultdict(float)
    for made in scenario.made.values():
        for conid, (quantity, _price) in made.held_before.items():
            position[(made.account, conid)] = quantity
    for base, fill in sorted(leg_fills.items(), key=lambda i: (i[1].time, i[1].exec_id)):
        row = by_exec[base]
        contract = (fill.account, fill.instrument.conid)
        before, after = position[contract], position[contract] + fill.signed_shares
        position[contract] = after
        effect = "OPEN" if abs(after) > abs(before) and before * after >= 0 else "CLOSE"
        assert (row["side"], row["effect"]) == (
            "BUY" if fill.side == "BOT" else "SELL", effect
        ), base  # fmt: skip
        assert row["commission"] == pytest.approx(fill.commission), base
        assert row["price"] == fill.price and row["quantity"] == fill.shares


def _landed(lake: Path) -> int:
    if not (lake / "executions").exists():
        return 0
    return pl.read_delta(str(lake / "executions")).height


def _all_final(lake: Path, final: dict[str, SimFill]) -> bool:
    table = pl.read_delta(str(lake / "executions"))
    got = {r["exec_base"]: r for r in table.to_dicts()}
    for base, fill in final.items():
        if fill.instrument.sec_type == "BAG":
            continue
        row = got.get(base)
        if row is None or row["exec_id"] != fill.exec_id:
            return False
        if fill.commission is not None and row["commission"] != fill.commission:
            return False
    return True
