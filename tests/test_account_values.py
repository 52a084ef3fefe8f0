"""Account values and P&L: the simulator's figures through the real ib_async client, the
producer and the consumer into ``account_values`` and ``account_values_current``."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import redis

from gateway_sim.simulator import SimulatorConfig, SimulatorThread
from shared.account_values import PNL_KEYS, AccountValue
from shared.wire import encode_update
from tests.helpers import (
    REPO_ROOT,
    consumer_env,
    group_pending,
    kill,
    run_consumer,
    start_consumer,
    wait_until,
)

ACCOUNTS = ["DU100001", "DU100002", "DU100003"]
T0 = datetime(2026, 12, 2, 15, 0, tzinfo=UTC)


def _current(lake: Path) -> dict[tuple[str, str, str], str]:
    frame = pl.read_delta(str(lake / "account_values_current"))
    return {(r["account"], r["key"], r["currency"]): r["value"] for r in frame.to_dicts()}


def test_values_land_once_and_current_keeps_the_newest(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    values = [
        AccountValue(account=a, key=k, currency="USD", value=f"{100 * i + j}.50",
                     timestamp=T0 + timedelta(seconds=i))
        for i in range(60) for j, a in enumerate(ACCOUNTS) for k in ("NetLiquidation", "Cash")
    ]  # fmt: skip
    values.append(AccountValue(account="DU100001", key="AccountType", currency="",
                               value="INDIVIDUAL", timestamp=T0))  # fmt: skip
    client = redis.Redis.from_url(redis_url)
    for value in values + values[:30]:  # a producer's retry: 30 written twice
        client.xadd(stream, encode_update(value))  # type: ignore[arg-type]
    # Two consumers side by side: each reads the other's commits into its dedup index
    # (``account`` is the partition column: it is in the key but not in the files).
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=7)
    other = start_consumer(consumer_env(redis_url, lake, "c2", stream, batch_max_entries=5),
                           drain=True, log=tmp_path / "c2.log")  # fmt: skip
    try:
        assert run_consumer(env, log=tmp_path / "c.log") == 0
        assert other.wait(timeout=60) == 0
    finally:
        kill(other)
    history = pl.read_delta(str(lake / "account_values"))
    assert history.height == len(values)
    assert history.filter(pl.col("key") == "AccountType")["numeric"].to_list() == [None]
    assert history.filter(pl.col("value") == "1900.50")["numeric"].to_list() == [1900.5] * 2
    newest = {(v.account, v.key, v.currency): v.value for v in values}  # in time order
    assert _current(lake) == newest
    version = pl.read_delta(str(lake / "account_values")).height
    client.xgroup_setid(stream, "lake", "0")
    assert run_consumer(env, log=tmp_path / "c.log") == 0
    assert pl.read_delta(str(lake / "account_values")).height == version
    assert _current(lake) == newest
    assert group_pending(redis_url, stream) == 0


def test_every_account_ends_with_the_simulators_values(
    redis_url: str, stream: str, lake: Path, tmp_path: Path
) -> None:
    config = SimulatorConfig(accounts=ACCOUNTS, positions=40, rate=80, seed=4,
                             account_values_every_s=0.5)  # fmt: skip
    thread = SimulatorThread(config)
    port = thread.start()
    env = consumer_env(redis_url, lake, "av-consumer", stream, batch_max_wait_s=0.3)
    producer_env = env | {
        "POSLAKE_IB_PORT": str(port),
        "POSLAKE_PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
        "POSLAKE_IB_RECONNECT_INITIAL_S": "0.5",
    }
    log_path = tmp_path / "producer.log"
    with log_path.open("wb") as out:
        producer = subprocess.Popen([sys.executable, "-m", "producer"], env=producer_env,
                                    cwd=REPO_ROOT, stdout=out, stderr=out)  # fmt: skip
    consumer = subprocess.Popen([sys.executable, "-m", "consumer"], env=env, cwd=REPO_ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: thread.simulator.events >= 200, timeout=60)
        thread.run("drop_connections")  # the full set again after the reconnect
        wait_until(lambda: thread.simulator.connections >= 2, timeout=60)
        wait_until(lambda: thread.simulator.events >= 400, timeout=60)
        thread.run("pause")
        thread.run("send_account_figures")
        final = thread.simulator.account_figures()
        want = {(a, k, c): v for a, values in final.items() for (k, c), v in values.items()}

        def landed() -> bool:
            current = _current(lake)
            return all(current.get(key) == value for key, value in want.items())

        wait_until(landed, timeout=60, interval=0.3)
    finally:
        producer.send_signal(signal.SIGTERM)
        consumer.send_signal(signal.SIGTERM)
        try:
            producer.wait(timeout=30)
            consumer.wait(timeout=30)
        finally:
            kill(producer)
            kill(consumer)
            thread.stop()
    current = _current(lake)
    for account in ACCOUNTS:  # the account P&L, under keys of its own
        assert {k for (a, k, c) in current if a == account and c == "BASE"} == set(
            PNL_KEYS.values()
        )
    history = pl.read_delta(str(lake / "account_values")).sort("timestamp")
    # Only changes are published: no value repeats its predecessor within a connection,
    # and the full set goes out after each connect (AccountType never changes).
    types = history.filter(pl.col("key") == "AccountType")
    assert types.group_by("account").len()["len"].to_list() == [2] * len(ACCOUNTS)
    assert "Traceback" not in log_path.read_text()
