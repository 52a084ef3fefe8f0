"""The gateway simulator speaks enough TWS protocol for the real, unmodified ib_async client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from ib_async import IB

from gateway_sim.simulator import SimulatorConfig, SimulatorThread
from tests.helpers import REPO_ROOT
from tests.producer_harness import (
    producer_settings,
    running_producer,
    running_simulator,
    until,
)

pytestmark = pytest.mark.usefixtures("no_decoder_errors")


@pytest.mark.parametrize("readonly", [True, False], ids=["readonly", "read-write"])
def test_ib_async_connects_and_syncs(readonly: bool) -> None:
    """Every startup request ib_async sends is answered (orders too when not read-only)."""

    async def scenario() -> None:
        async with running_simulator(accounts=["DU1", "DU2"], positions=12, rate=0) as sim:
            ib = IB()
            await ib.connectAsync("127.0.0.1", sim.port, clientId=5, readonly=readonly,
                                  account="DU1", raiseSyncErrors=True, timeout=5)  # fmt: skip
            try:
                assert ib.managedAccounts() == ["DU1", "DU2"]
                held = {(h.account, h.instrument.conid) for h in sim.portfolio.holdings.values()}
                assert {(p.account, p.contract.conId) for p in ib.positions()} == held
                in_du1 = {c for a, c in held if a == "DU1"}
                assert {i.contract.conId for i in ib.portfolio("DU1")} == in_du1
                assert any(v.tag == "NetLiquidation" for v in ib.accountValues("DU1"))
                assert (await ib.reqCurrentTimeAsync()).year >= 2026
                conid = next(iter(in_du1))
                pnl = ib.reqPnLSingle("DU1", "", conid)
                await until(lambda: pnl.value == pnl.value and pnl.position != 0, timeout=5)
            finally:
                ib.disconnect()

    asyncio.run(scenario())


def test_drop_after_reconnects_the_producer(redis_url: str, stream: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_simulator(accounts=["DU1"], positions=10, rate=20,
                                     drop_after_s=0.4) as sim:  # fmt: skip
            settings = producer_settings(redis_url, stream, sim.port, tmp_path / "spool")
            async with running_producer(settings) as producer:
                await until(lambda: producer.source.stats.connects >= 3, timeout=20)
                assert producer.source.stats.disconnects >= 2

    asyncio.run(scenario())


def test_random_drops_are_seeded_and_counted(redis_url: str, stream: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_simulator(accounts=["DU1"], positions=10, rate=20,
                                     drop_probability_per_s=1.0) as sim:  # fmt: skip
            settings = producer_settings(redis_url, stream, sim.port, tmp_path / "spool")
            async with running_producer(settings) as producer:
                await until(lambda: producer.source.stats.disconnects >= 2, timeout=20)

    asyncio.run(scenario())


def test_runs_on_its_own_and_writes_its_final_state(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway_sim", "--port", "0", "--positions", "7",
         "--accounts", "DU9", "--final-state", str(state)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    assert "listening on 127.0.0.1:" in line
    process.terminate()
    assert process.wait(timeout=20) == 0
    book = json.loads(state.read_text())
    assert len(book) == 7 and {row["account"] for row in book} == {"DU9"}


def test_bad_simulator_arguments_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway_sim", "--port", "0", "--positions", "999999",
         "--accounts", "DU1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "positions asked for" in done.stderr


def test_thread_runner_controls() -> None:
    thread = SimulatorThread(SimulatorConfig(accounts=["DU1"], positions=3, rate=0))
    thread.start()
    try:
        assert thread.run("drop_connections") == 0
        thread.run("pause")
        assert thread.simulator.paused
    finally:
        thread.stop()


def test_a_late_client_gets_the_book_as_it_is_and_fills_add_up() -> None:
    """Fills made before any client connected: the first connection's position answer
    is the book at that moment (contracts closed meanwhile at 0, as IB answers), so
    for every contract with fills, the fills add up to its change since the start."""

    async def scenario() -> None:
        async with running_simulator(accounts=["DU1", "DU2"], positions=30, rate=300) as sim:
            start = dict(sim.initial_positions)
            await asyncio.sleep(2.0)  # no client yet: the book moves by fills alone
            sim.pause()
            ib = IB()
            await ib.connectAsync("127.0.0.1", sim.port, clientId=5, readonly=True, timeout=5)
            try:
                answer = {(p.account, p.contract.conId): p.position
                          for p in await ib.reqPositionsAsync()}  # fmt: skip
                filled: dict[tuple[str, int], float] = {}
                for fill in ib.fills():
                    if fill.contract.secType == "BAG":
                        continue
                    key = (fill.execution.acctNumber, fill.contract.conId)
                    sign = 1.0 if fill.execution.side == "BOT" else -1.0
                    filled[key] = filled.get(key, 0.0) + sign * fill.execution.shares
            finally:
                ib.disconnect()
            assert len(filled) >= 20, "too few contracts with fills to mean anything"
            closed = [k for k in filled if answer.get(k) == 0]
            assert closed, "no contract closed by fills: the zero rows are untested"
            for key, shares in filled.items():
                assert key in answer, f"{key} has fills but is not in the position answer"
                assert answer[key] == pytest.approx(start.get(key, 0.0) + shares), key

    asyncio.run(scenario())


def test_execution_ids_are_new_for_every_run() -> None:
    """Two runs with the same seed make the same fills under different execution IDs."""

    async def fills_of_one_run() -> list[tuple[str, str, float]]:
        async with running_simulator(accounts=["DU1"], positions=20, rate=200, seed=4) as sim:
            await asyncio.sleep(0.5)
            sim.pause()
            return [(f.exec_id, f.side, f.shares) for f in sim.blotter.fills[:20]]

    first, second = asyncio.run(fills_of_one_run()), asyncio.run(fills_of_one_run())
    assert len(first) == len(second) == 20
    assert [f[1:] for f in first] == [f[1:] for f in second]  # the seed still decides
    assert not {f[0] for f in first} & {f[0] for f in second}


def test_position_changes_keep_to_their_budget() -> None:
    """A real account's pace: prices move at the full rate, positions change a few times
    a second (each change is fills)."""

    async def scenario() -> None:
        async with running_simulator(accounts=["DU1"], positions=50, rate=500,
                                     position_changes_per_s=5.0) as sim:  # fmt: skip
            await asyncio.sleep(2.0)
            sim.pause()
            assert sim.events >= 600
            changes = {f.perm_id for f in sim.blotter.fills}  # one order per change
            assert 3 <= len(changes) <= 5 * 2 + 2, len(changes)

    asyncio.run(scenario())
