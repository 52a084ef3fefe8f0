"""Executions end to end: the simulator's fills, through the real ib_async client, the
producer and the consumer (separate programs), into ``executions``, exactly once.

Faults on: commissions before their executions, never sent, corrections, and fills
made while the producer is disconnected. The producer runs in Tokyo's time zone
while the simulator writes New York's abbreviations (EST/EDT): every time must
still come out in UTC.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import polars as pl
import redis

from gateway_sim.fills import FillFaults
from gateway_sim.portfolio import SyntheticPortfolio
from gateway_sim.simulator import SimulatorConfig, SimulatorThread
from tests.helpers import REPO_ROOT, consumer_env, group_pending, kill, start_consumer, wait_until

ACCOUNTS = ["DU100001", "DU100002"]


def test_every_fill_lands_once_with_its_commission(
    redis_url: str, stream: str, lake: Path, tmp_path: Path
) -> None:
    faults = FillFaults(commission_first=0.15, commission_missing=0.1, correction=0.15, combo=0.5)
    config = SimulatorConfig(
        accounts=ACCOUNTS, positions=30, rate=60, seed=9, fill_faults=faults,
        exec_time_format="abbrev",
    )  # fmt: skip
    thread = SimulatorThread(config)
    port = thread.start()
    # The book before the first event: the same seed builds the same portfolio.
    start = SyntheticPortfolio(ACCOUNTS, config.positions, seed=config.seed)
    initial = {key: h.position for key, h in start.holdings.items()}
    env = consumer_env(redis_url, lake, "exec-consumer", stream, batch_max_wait_s=0.3)
    producer_env = env | {
        "POSLAKE_IB_PORT": str(port),
        "POSLAKE_PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
        "POSLAKE_IB_RECONNECT_INITIAL_S": "1.5",
        "POSLAKE_IB_RECONNECT_MAX_S": "2",
        "TZ": "Asia/Tokyo",
    }
    producer_log = tmp_path / "producer.log"
    with producer_log.open("wb") as out:
        producer = subprocess.Popen(
            [sys.executable, "-m", "producer"], env=producer_env, cwd=REPO_ROOT,
            stdout=out, stderr=out,
        )  # fmt: skip
    consumer = start_consumer(env, log=tmp_path / "consumer.log")
    blotter = thread.simulator.blotter
    try:
        wait_until(lambda: thread.simulator.connections >= 1 and len(blotter.fills) >= 20, 60)
        thread.run("drop_connections")
        made_before = len(blotter.fills)
        # Fills go on while the producer is away; it gets them from reqExecutions.
        wait_until(lambda: thread.simulator.connections >= 2, timeout=60)
        assert len(blotter.fills) > made_before
        wait_until(lambda: len(blotter.fills) >= made_before + 30, timeout=60)
        thread.run("pause")
        # Let delayed commissions and corrections go out, then everything land.
        final = _wait_for_table(lake, thread, redis_url, stream)
    finally:
        producer.send_signal(signal.SIGTERM)
        try:
            producer.wait(timeout=30)
        finally:
            kill(producer)
            consumer.send_signal(signal.SIGTERM)
            consumer.wait(timeout=30)
            kill(consumer)
            thread.stop()
    assert "ib_async.Decoder" not in producer_log.read_text()
    expected = blotter.final()
    rows = {row["exec_base"]: row for row in final.to_dicts()}
    assert rows.keys() == expected.keys()
    kinds = {"corrected": 0, "no commission": 0}
    for base, made in expected.items():
        row = rows[base]
        assert row["exec_id"] == made.exec_id
        assert (row["account"], row["conid"]) == (made.account, made.instrument.conid)
        assert (row["side"], row["shares"], row["price"]) == (made.side, made.shares, made.price)
        assert row["time"] == made.time  # UTC, from New York's abbreviation, in Tokyo
        assert row["commission"] == made.commission
        kinds["corrected"] += not made.exec_id.endswith(".01")
        kinds["no commission"] += made.commission is None
    assert kinds["corrected"] > 0 and kinds["no commission"] > 0
    # Combos: the legs are booked (sharing the order's perm_id), the BAG report is not.
    bags = [f for f in blotter.fills if f.instrument.sec_type == "BAG"]
    assert bags, "the run made no combo"
    assert "BAG" not in set(final["sec_type"].drop_nulls().to_list())
    for bag in bags:
        legs = final.filter(pl.col("perm_id") == bag.perm_id)
        assert legs.height >= 2 and set(legs["conid"].to_list()) == {
            f.instrument.conid for f in blotter.fills if f.perm_id == bag.perm_id and f is not bag
        }
    # Every position change was made by fills: they add up, contract by contract, to the
    # change of position in the lake (positions closed while the producer was away
    # included: it publishes their close after the reconnect) and in the simulator.
    book = {key: h.position for key, h in thread.simulator.portfolio.holdings.items()}
    current = pl.read_delta(str(lake / "positions_current"))
    held = {(r["account"], r["conid"]): r["position"] for r in current.to_dicts()}
    assert {k: v for k, v in held.items() if v} == book
    filled: dict[tuple[str, int], float] = defaultdict(float)
    for made in expected.values():
        filled[(made.account, made.instrument.conid)] += made.signed_shares
    for key in filled.keys() | held.keys():
        assert held.get(key, 0.0) - initial.get(key, 0.0) == filled.get(key, 0.0), key


def _wait_for_table(
    lake: Path, thread: SimulatorThread, redis_url: str, stream: str
) -> pl.DataFrame:
    blotter = thread.simulator.blotter
    client = redis.Redis.from_url(redis_url)

    def landed() -> bool:
        if group_pending(redis_url, stream) or not (lake / "executions").exists():
            return False
        table = pl.read_delta(str(lake / "executions"))
        expected = blotter.final()
        if table.height != len(expected):
            return False
        by_base = dict(zip(table["exec_base"], table["exec_id"], strict=True))
        return all(by_base.get(base) == made.exec_id for base, made in expected.items())

    try:
        try:
            wait_until(landed, timeout=60, interval=0.3)
        except AssertionError:
            table = pl.read_delta(str(lake / "executions"))
            got = dict(zip(table["exec_base"], table["exec_id"], strict=False))
            missing = {b: f.exec_id for b, f in blotter.final().items() if got.get(b) != f.exec_id}
            raise AssertionError(
                f"{len(missing)} of {len(blotter.final())} executions not landed, "
                f"{table.height} rows: {sorted(missing.items())[:5]}"
            ) from None
    finally:
        client.close()
    return pl.read_delta(str(lake / "executions"))
