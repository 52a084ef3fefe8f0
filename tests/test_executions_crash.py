"""Every kind under SIGKILL and with several consumers: a mixed stream of positions,
executions, account values and option Greeks, the consumer killed at each crash point,
then every table checked row by row (executions against the rules' reference, the
others against what was published)."""

from __future__ import annotations

import signal
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from shared.account_values import AccountValue
from shared.executions import ExecutionEntry
from shared.model import PositionUpdate
from shared.wire import encode_update
from tests.helpers import (
    Lake,
    assert_current_exact,
    assert_table_exact,
    consumer_env,
    group_pending,
    make_greeks,
    make_updates,
    read_frame,
    run_consumer,
    start_consumer,
    wait_until,
)
from tests.test_executions import T0, assert_executions_exact, scenario, table_executions
from tests.test_greeks import assert_greeks_exact

GREEKS = make_greeks(270, seed=5)


@pytest.fixture
def lake(any_lake: Lake) -> Lake:
    """Every kind's crash points and two consumers side by side, on a folder and on
    SeaweedFS."""
    return any_lake


def _values(count: int) -> list[AccountValue]:
    return [
        AccountValue(
            account=f"DU10{i % 3}", key=("NetLiquidation", "TotalCashValue")[i % 2],
            currency="USD", value=f"{1000 + i}.5", timestamp=T0 + timedelta(seconds=i),
        )
        for i in range(count)
    ]  # fmt: skip


def assert_account_values_exact(lake: Path | Lake, values: list[AccountValue]) -> None:
    history = read_frame(lake, "account_values")
    got = sorted(zip(history["account"], history["key"], history["value"], strict=True))
    assert got == sorted((v.account, v.key, v.value) for v in values)
    current = read_frame(lake, "account_values_current")
    newest = {(v.account, v.key): v.value for v in values}  # in time order
    assert dict(zip(zip(current["account"], current["key"], strict=True), current["value"],
                    strict=True)) == newest  # fmt: skip


def _publish_mixed(
    url: str, stream: str, seed: int
) -> tuple[list[PositionUpdate], list[ExecutionEntry]]:
    """Positions with the executions scenario, account values and option Greeks spread
    among them: a fill and its commission fall in different batches."""
    updates = make_updates(900, seed=seed)
    entries = scenario()
    values = _values(90)
    greeks = iter(GREEKS)
    client = redis.Redis.from_url(url)
    try:
        pipe = client.pipeline(transaction=False)
        every = len(updates) // len(entries)
        for i, update in enumerate(updates):
            pipe.xadd(stream, encode_update(update))  # type: ignore[arg-type]
            if i % every == 0 and i // every < len(entries):
                pipe.xadd(stream, encode_update(entries[i // every]))  # type: ignore[arg-type]
            if i % 10 == 5:
                pipe.xadd(stream, encode_update(values[i // 10]))  # type: ignore[arg-type]
            if i % 10 in (2, 6, 8):  # three per ten positions: all 270 of them
                pipe.xadd(stream, encode_update(next(greeks)))  # type: ignore[arg-type]
        pipe.execute()
    finally:
        client.close()
    return updates, entries


@pytest.mark.parametrize(
    ("point", "on"), [("after_read", 3), ("after_commit", 2), ("after_current", 4)]
)
def test_kill_at_each_point_then_everything_lands_once(
    redis_url: str, lake: Path | Lake, stream: str, tmp_path: Path, point: str, on: int
) -> None:
    updates, entries = _publish_mixed(redis_url, stream, seed=on)
    faulty = consumer_env(
        redis_url, lake, "c1", stream, batch_max_entries=60,
        fault_crash_at=point, fault_crash_on_batch=on,
    )  # fmt: skip
    assert run_consumer(faulty, log=tmp_path / "crash.log") == -signal.SIGKILL
    assert group_pending(redis_url, stream) > 0
    healthy = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=60)
    assert run_consumer(healthy, log=tmp_path / "recover.log") == 0
    assert group_pending(redis_url, stream) == 0
    assert_executions_exact(lake, entries)
    assert_account_values_exact(lake, _values(90))
    assert_greeks_exact(lake, GREEKS)
    assert_table_exact(lake, updates)
    assert_current_exact(lake, updates)


def test_two_consumers_side_by_side_never_insert_an_execution_twice(
    redis_url: str, lake: Path | Lake, stream: str, tmp_path: Path
) -> None:
    updates, entries = _publish_mixed(redis_url, stream, seed=41)
    procs = [
        start_consumer(
            consumer_env(redis_url, lake, name, stream, batch_max_entries=25),
            log=tmp_path / f"{name}.log",
        )
        for name in ("c1", "c2")
    ]
    try:
        client = redis.Redis.from_url(redis_url)
        wait_until(
            lambda: (
                group_pending(redis_url, stream) == 0
                and client.xinfo_groups(stream)[0]["last-delivered-id"]
                == client.xrevrange(stream, count=1)[0][0]  # type: ignore[index]
            ),
            timeout=240,  # on SeaweedFS each lost commit race costs ~1 s
        )
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert_executions_exact(lake, entries)  # one row per execution: no double insert
    assert len(table_executions(lake)) == len({e.key for e in entries})
    assert_account_values_exact(lake, _values(90))
    assert_greeks_exact(lake, GREEKS)
    assert_table_exact(lake, updates)
