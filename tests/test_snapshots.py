"""Complete snapshots close what an account no longer holds: once, replay-safe, only when
every part arrived, and never over a newer update. Real redis-server, real Delta tables,
consumer processes (SIGKILLed at the crash points around the closing commit)."""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import polars as pl
import pytest
import redis

from shared.account_values import AccountValue
from shared.model import PositionUpdate
from shared.snapshots import HeldValue, PositionSnapshot, account_snapshot, position_snapshot
from shared.wire import encode_update
from tests.helpers import (
    BASE_TIME,
    assert_current_exact,
    assert_table_exact,
    consumer_env,
    group_pending,
    make_updates,
    publish_entries,
    read_frame,
    run_consumer,
    start_consumer,
)

SNAP_AT = BASE_TIME + timedelta(hours=1)


def _newest(updates: list[PositionUpdate]) -> dict[tuple[str, int], PositionUpdate]:
    newest: dict[tuple[str, int], PositionUpdate] = {}
    for update in updates:
        seen = newest.get((update.account, update.conid))
        if seen is None or seen.timestamp < update.timestamp:
            newest[(update.account, update.conid)] = update
    return newest


def _closed(update: PositionUpdate, at: datetime) -> PositionUpdate:
    """What the lake must hold for a contract a snapshot at ``at`` closed."""
    return msgspec.structs.replace(
        update, position=0.0, timestamp=at, market_price=None, market_value=0.0,
        average_cost=None, unrealized_pnl=0.0, realized_pnl=None,
    )  # fmt: skip


def _book(count: int = 120) -> tuple[list[PositionUpdate], str, set[int], set[int]]:
    """Updates before the snapshot, its account, the conids it keeps and those it closes."""
    updates = make_updates(count, seed=11)
    newest = _newest(updates)
    account = updates[0].account
    held = sorted(c for (a, c), u in newest.items() if a == account and u.position != 0)
    assert len(held) >= 6, "the sample must hold enough contracts in one account"
    keep, close = set(held[::2]), set(held[1::2])
    return updates, account, keep, close


def test_a_complete_snapshot_closes_what_it_no_longer_lists(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    updates, account, keep, close = _book()
    newest = _newest(updates)
    # One contract that the snapshot does not list got a newer update after it: it stays.
    survivor = min(close)
    later = msgspec.structs.replace(newest[(account, survivor)],
                                    timestamp=SNAP_AT + timedelta(seconds=1))  # fmt: skip
    parts = list(position_snapshot(account, SNAP_AT, sorted(keep), per_part=2))
    assert len(parts) >= 2 and parts[-1].part == parts[-1].parts
    values = [
        AccountValue(account=account, key=k, currency="USD", value="1.5", timestamp=BASE_TIME)
        for k in ("NetLiquidation", "TotalCashValue", "GoneKey")
    ] + [AccountValue(account=account, key="PnL.Daily", currency="BASE", value="3.0",
                      timestamp=BASE_TIME)]  # fmt: skip
    kept_values = [("NetLiquidation", "USD"), ("TotalCashValue", "USD")]
    entries: list[msgspec.Struct] = [*updates, *values, later, *parts]
    entries += list(account_snapshot(account, SNAP_AT, kept_values, per_part=1))
    publish_entries(redis_url, stream, entries)
    # Parts in different batches, and two consumers side by side.
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=3)
    other = start_consumer(consumer_env(redis_url, lake, "c2", stream, batch_max_entries=4),
                           drain=True, log=tmp_path / "c2.log")  # fmt: skip
    try:
        assert run_consumer(env, log=tmp_path / "c1.log") == 0
        assert other.wait(timeout=120) == 0
    finally:
        if other.poll() is None:
            other.kill()
    # The survivor's newer update wins in the current table; the history holds the
    # snapshot's closing row for it too (it was open just before the snapshot).
    closed = [_closed(newest[(account, c)], SNAP_AT) for c in sorted(close)]
    expected = [*updates, later, *closed]
    assert_table_exact(lake, expected)
    assert_current_exact(lake, expected)
    current = read_frame(lake, "positions_current").filter(pl.col("account") == account)
    still_open = set(current.filter(pl.col("position") != 0)["conid"].to_list())
    assert still_open == keep | {survivor}
    values_now = {
        (r["key"], r["currency"]): r["value"]
        for r in read_frame(lake, "account_values_current").to_dicts()
    }
    assert values_now == {("NetLiquidation", "USD"): "1.5", ("TotalCashValue", "USD"): "1.5",
                          ("GoneKey", "USD"): "", ("PnL.Daily", "BASE"): "3.0"}  # fmt: skip
    gone = read_frame(lake, "account_values").filter(pl.col("key") == "GoneKey").sort("timestamp")
    assert gone["value"].to_list() == ["1.5", ""] and gone["numeric"].to_list() == [1.5, None]
    assert read_frame(lake, "position_snapshots").height == len(parts)
    # A replay of everything changes nothing.
    client = redis.Redis.from_url(redis_url)
    heights = {
        name: read_frame(lake, name).height for name in ("position_updates", "account_values")
    }
    assert heights["position_updates"] == len(expected)
    client.xgroup_setid(stream, "lake", "0")
    replay = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=40)
    assert run_consumer(replay, log=tmp_path / "c1.log") == 0
    assert_table_exact(lake, expected)
    assert_current_exact(lake, expected)
    for name, height in heights.items():
        assert read_frame(lake, name).height == height
    assert group_pending(redis_url, stream) == 0


def test_an_incomplete_snapshot_closes_nothing_until_its_last_part_lands(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    updates, account, keep, close = _book()
    first, second, third = list(position_snapshot(account, SNAP_AT, sorted(keep), per_part=2))[:3]
    assert third.parts >= 3
    # The third part arrives broken (a part number past `parts`): dead-lettered alone.
    client = redis.Redis.from_url(redis_url)
    broken = encode_update(third)
    broken["payload"] = broken["payload"].replace(b'"part":3', b'"part":9')
    publish_entries(redis_url, stream, [*updates, first, second])
    client.xadd(stream, broken)  # type: ignore[arg-type]
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=50)
    assert run_consumer(env, log=tmp_path / "c1.log") == 0
    assert_table_exact(lake, updates)
    assert_current_exact(lake, updates)
    letters: Any = client.xrange(f"{stream}:dlq")
    assert len(letters) == 1 and b"part 9 of" in letters[0][1][b"dlq:reason"]
    # The rest of the parts, sent again as they should be, complete it: now it closes.
    rest = list(position_snapshot(account, SNAP_AT, sorted(keep), per_part=2))[2:]
    publish_entries(redis_url, stream, [*rest])
    assert run_consumer(env, log=tmp_path / "c1.log") == 0
    newest = _newest(updates)
    expected = [*updates, *(_closed(newest[(account, c)], SNAP_AT) for c in sorted(close))]
    assert_table_exact(lake, expected)
    assert_current_exact(lake, expected)


@pytest.mark.parametrize("order", ["update first", "snapshot first"])
def test_a_snapshot_older_than_an_update_does_not_undo_it(
    redis_url: str, lake: Path, stream: str, tmp_path: Path, order: str
) -> None:
    """An update observed after the snapshot keeps its contract open in the current
    table, delivered before or after the snapshot; a snapshot older than every row
    closes nothing."""
    updates, account, keep, close = _book()
    newest = _newest(updates)
    reopened = [
        msgspec.structs.replace(newest[(account, c)], timestamp=SNAP_AT + timedelta(seconds=5))
        for c in sorted(close)
    ]
    old = PositionSnapshot(account=account, timestamp=BASE_TIME - timedelta(days=1), part=1,
                           parts=1, conids=[])  # fmt: skip
    stale = PositionSnapshot(account=account, timestamp=SNAP_AT, part=1, parts=1,
                             conids=sorted(keep))  # fmt: skip
    if order == "update first":
        publish_entries(redis_url, stream, [*updates, *reopened, old, stale])
    else:
        publish_entries(redis_url, stream, [*updates, old, stale, *reopened])
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=40)
    assert run_consumer(env, log=tmp_path / "c1.log") == 0
    # The current table holds the newer updates; the history also holds the snapshot's
    # own closing rows at its time (true then), however the entries fell into batches.
    assert_current_exact(lake, [*updates, *reopened])
    closed = [_closed(newest[(account, c)], SNAP_AT) for c in sorted(close)]
    assert_table_exact(lake, [*updates, *reopened, *closed])


@pytest.mark.parametrize("point", ["after_commit", "after_close", "after_current"])
def test_crash_around_the_closing_commit_lands_everything_once(
    redis_url: str, lake: Path, stream: str, tmp_path: Path, point: str
) -> None:
    updates, account, keep, close = _book()
    batch = 10
    parts = list(position_snapshot(account, SNAP_AT, sorted(keep), per_part=2))
    values = [AccountValue(account=account, key="Gone", currency="USD", value="7",
                           timestamp=BASE_TIME)]  # fmt: skip
    snapshot_values = list(account_snapshot(account, SNAP_AT, [("Other", "USD")]))
    entries: list[msgspec.Struct] = [*updates, *values, *parts, *snapshot_values]
    after = make_updates(25, seed=12, start=SNAP_AT + timedelta(minutes=1))
    entries += after
    publish_entries(redis_url, stream, entries)
    # The batch holding the last snapshot part, with the account snapshot after it.
    crash_batch = (len(updates) + len(values) + len(parts) - 1) // batch + 1
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=batch)
    crashing = env | {
        "POSLAKE_FAULT_CRASH_AT": point,
        "POSLAKE_FAULT_CRASH_ON_BATCH": str(crash_batch),
    }
    proc = start_consumer(crashing, drain=True, log=tmp_path / "crash.log")
    try:
        assert proc.wait(timeout=120) == -9, (tmp_path / "crash.log").read_text()[-3000:]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert group_pending(redis_url, stream) > 0
    assert run_consumer(env, log=tmp_path / "after.log") == 0
    newest = _newest(updates)
    expected = [*updates, *(_closed(newest[(account, c)], SNAP_AT) for c in sorted(close)),
                *after]  # fmt: skip
    assert_table_exact(lake, expected)
    assert_current_exact(lake, expected)
    gone = read_frame(lake, "account_values").filter(pl.col("key") == "Gone").sort("timestamp")
    assert gone["value"].to_list() == ["7", ""]
    assert read_frame(lake, "account_snapshots")["keys"].to_list() == [
        [{"key": "Other", "currency": "USD"}]
    ]
    assert group_pending(redis_url, stream) == 0
    assert HeldValue("Other", "USD") == snapshot_values[0].keys[0]
