"""Positions and values gone while the producer was not running at all (stopped
overnight, redeployed) are closed in the lake once it is back: the real producer and
consumer processes, the real ib_async client against the simulator."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import polars as pl

from gateway_sim.simulator import SimulatorConfig, SimulatorThread
from tests.helpers import REPO_ROOT, consumer_env, kill, read_frame, wait_until

ACCOUNTS = ["DU100001", "DU100002"]  # DU100001 streams its portfolio, DU100002 positions only


def _start_producer(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "producer"], env=env, cwd=REPO_ROOT,
                                stdout=out, stderr=out)  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        kill(proc)


def _open_positions(lake: Path) -> dict[tuple[str, int], float]:
    if not (lake / "positions_current" / "_delta_log").exists():
        return {}
    current = read_frame(lake, "positions_current").filter(pl.col("position") != 0)
    return {(r["account"], r["conid"]): r["position"] for r in current.to_dicts()}


def test_positions_closed_while_the_producer_was_stopped_are_closed_after_its_restart(
    redis_url: str, stream: str, lake: Path, tmp_path: Path
) -> None:
    thread = SimulatorThread(SimulatorConfig(accounts=ACCOUNTS, positions=40, rate=0, seed=6))
    port = thread.start()
    sim = thread.simulator
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_wait_s=0.2)
    producer_env = env | {
        "POSLAKE_IB_PORT": str(port),
        "POSLAKE_IB_ACCOUNTS": ",".join(ACCOUNTS),
        "POSLAKE_PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
    }
    consumer = subprocess.Popen([sys.executable, "-m", "consumer"], env=env, cwd=REPO_ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    log = tmp_path / "producer.log"
    try:
        producer = _start_producer(producer_env, log)

        def book() -> dict[tuple[str, int], float]:
            return {(h.account, h.instrument.conid): h.position
                    for h in list(sim.portfolio.holdings.values())}  # fmt: skip

        wait_until(lambda: _open_positions(lake) == book(), timeout=60, interval=0.3)
        _stop(producer)
        # Overnight, without the producer: three positions closed in each account, then
        # a new day, so IB's answer no longer lists them at all.
        gone = [key for account in ACCOUNTS for key in list(book()) if key[0] == account][:3]
        gone += [key for key in list(book()) if key[0] == ACCOUNTS[1]][:3]
        for account, conid in gone:
            thread.run("set_position", account, conid, 0.0)
        thread.run("new_day")
        thread.run("stop_sending_value", ACCOUNTS[1], "GrossPositionValue")
        assert all(key not in book() for key in gone)
        restarted = _start_producer(producer_env, log)

        def value_closed() -> bool:
            values = read_frame(lake, "account_values_current")
            gross = values.filter((pl.col("account") == ACCOUNTS[1])
                                  & (pl.col("key") == "GrossPositionValue"))  # fmt: skip
            return gross["value"].to_list() == [""]

        try:
            wait_until(lambda: _open_positions(lake) == book(), timeout=60, interval=0.3)
            wait_until(value_closed, timeout=30, interval=0.3)
        finally:
            _stop(restarted)
        consumer.send_signal(signal.SIGTERM)
        assert consumer.wait(timeout=30) == 0
    finally:
        kill(consumer)
        thread.stop()
    history = read_frame(lake, "position_updates")
    for account, conid in gone:
        rows = history.filter((pl.col("account") == account) & (pl.col("conid") == conid))
        closing = rows.filter(pl.col("position") == 0)
        assert closing.height == 1, (account, conid, rows)
        assert closing["timestamp"][0] == rows["timestamp"].max()
    values = read_frame(lake, "account_values_current").filter(pl.col("account") == ACCOUNTS[1])
    by_key = {r["key"]: r["value"] for r in values.to_dicts()}
    assert by_key["GrossPositionValue"] == ""  # gone from the download: closed
    assert by_key["NetLiquidation"] != "" and by_key["PnL.Daily"] != ""
    snapshots = read_frame(lake, "position_snapshots")
    assert set(snapshots["account"].to_list()) == set(ACCOUNTS)
    assert snapshots.height >= 2 * len(ACCOUNTS)  # one per account and connect
    assert "Traceback" not in log.read_text()
