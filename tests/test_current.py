"""positions_current: one row per (account, conid), newest timestamp wins, kept by the consumer."""

from __future__ import annotations

import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import redis

from consumer.current import CurrentWriter, newest_per_contract
from shared.model import PositionUpdate
from shared.settings import Settings
from shared.table import updates_to_arrow
from tests.helpers import (
    assert_current_exact,
    assert_table_exact,
    consumer_env,
    current_rows,
    expected_rows,
    make_updates,
    publish,
    run_consumer,
    sorted_rows,
    table_rows,
)


def _later(update: PositionUpdate, seconds: float, **changes: Any) -> PositionUpdate:
    return msgspec.structs.replace(
        update, timestamp=update.timestamp + timedelta(seconds=seconds), **changes
    )


def test_seed_plans_check_done_right(redis_url: str, lake: Path, stream: str) -> None:
    """Two updates of one contract with increasing timestamps: one current row with the
    newer values; the history keeps both."""
    first = make_updates(1)[0]
    second = _later(first, 5, position=first.position + 3, market_price=123.25)
    publish(redis_url, stream, [first, second])
    assert run_consumer(consumer_env(redis_url, lake, "c1", stream)) == 0
    assert len(table_rows(lake)) == 2
    current = current_rows(lake)
    assert len(current) == 1
    assert current[0]["position"] == first.position + 3
    assert current[0]["market_price"] == 123.25


def test_older_replayed_and_out_of_order_updates_never_overwrite(
    redis_url: str, lake: Path, stream: str
) -> None:
    base = make_updates(60, seed=3)
    newer = [_later(u, 3600, position=u.position + 1) for u in base]
    env = consumer_env(redis_url, lake, "c1", stream)
    publish(redis_url, stream, newer)  # the newer observations arrive first
    assert run_consumer(env) == 0
    publish(redis_url, stream, base)  # then the older ones, in a later batch
    assert run_consumer(env) == 0
    assert_current_exact(lake, base + newer)
    assert {r["position"] for r in current_rows(lake)} <= {u.position for u in newer}
    # Replay the whole stream: nothing changes in either table.
    before = (table_rows(lake), current_rows(lake))
    client: Any = redis.Redis.from_url(redis_url)
    client.xgroup_setid(stream, "lake", "0")
    assert run_consumer(env) == 0
    assert (table_rows(lake), current_rows(lake)) == before
    # One batch holding both the older and the newer update of a contract.
    mixed = [_later(base[0], 7200, position=9.0), _later(base[0], 7100, position=8.0)]
    publish(redis_url, stream, mixed)
    assert run_consumer(env) == 0
    assert_current_exact(lake, base + newer + mixed)


def test_a_closed_position_keeps_its_row_with_position_zero(
    redis_url: str, lake: Path, stream: str
) -> None:
    opened = make_updates(1, seed=5)[0]
    closed = _later(opened, 10, position=0.0, market_value=0.0)
    publish(redis_url, stream, [opened])
    env = consumer_env(redis_url, lake, "c1", stream)
    assert run_consumer(env) == 0
    publish(redis_url, stream, [closed])
    assert run_consumer(env) == 0
    current = current_rows(lake)
    assert len(current) == 1 and current[0]["position"] == 0.0


def test_crash_between_history_and_current_commit(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    """SIGKILL right after the history commit: positions_current is behind; the restart's
    replay (all history rows now duplicates) still brings it up to date."""
    updates = make_updates(900, seed=11, contracts_per_symbol=3)
    publish(redis_url, stream, updates)
    faulty = consumer_env(
        redis_url,
        lake,
        "c1",
        stream,
        batch_max_entries=300,
        fault_crash_at="after_commit",
        fault_crash_on_batch=2,
    )
    assert run_consumer(faulty, log=tmp_path / "crash.log") == -signal.SIGKILL
    in_history = table_rows(lake)
    assert len(in_history) == 600  # two batches committed to the history...
    # ...but at most the first one merged into current: its merge runs while the
    # second batch's history commits, so it may or may not have landed.
    current = current_rows(lake)
    if current:
        assert current == expected_rows(_newest(updates[:300]))
    assert current != expected_rows(_newest(updates[:600]))
    healthy = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=300)
    assert run_consumer(healthy, log=tmp_path / "recover.log") == 0
    assert_table_exact(lake, updates)
    assert_current_exact(lake, updates)


def _newest(updates: list[PositionUpdate]) -> list[PositionUpdate]:
    by_key: dict[tuple[str, int], PositionUpdate] = {}
    for update in updates:
        old = by_key.get((update.account, update.conid))
        if old is None or old.timestamp < update.timestamp:
            by_key[(update.account, update.conid)] = update
    return list(by_key.values())


def test_newest_per_contract_takes_the_first_of_equal_timestamps_like_the_history() -> None:
    updates = make_updates(300, seed=12, contracts_per_symbol=2)
    # Same keys again with other fields (a second payload for a key), some out of order.
    twins = [msgspec.structs.replace(u, position=u.position + 1) for u in updates[::3]]
    mixed = updates[:150] + twins + updates[150:]
    ids = [f"{i + 1}-0".encode() for i in range(len(mixed))]
    chunked = pa.concat_tables(
        [updates_to_arrow(mixed[:200], ids[:200]), updates_to_arrow(mixed[200:], ids[200:])]
    )
    expected: dict[tuple[str, int], PositionUpdate] = {}
    for update in mixed:
        seen = expected.get((update.account, update.conid))
        if seen is None or update.timestamp > seen.timestamp:
            expected[(update.account, update.conid)] = update
    newest = newest_per_contract(chunked)
    assert sorted_rows(newest) == expected_rows(expected.values())


def test_a_ticker_change_moves_the_contract_to_its_new_symbol(tmp_path: Path) -> None:
    """Same conid, new underlying symbol (a ticker change): one row, under the new symbol,
    and a late update under the old symbol does not bring the old one back."""
    settings = Settings(lake_uri=str(tmp_path / "lake"), consumer_name="c1")
    current = CurrentWriter(settings)
    before = make_updates(40, seed=13)
    current.merge(updates_to_arrow(before, [f"{i + 1}-0".encode() for i in range(40)]))
    renamed = _later(before[0], 3_600, symbol="NEWTICK")
    late_old = _later(before[0], 60)  # older than the rename, still under the old symbol
    current.merge(updates_to_arrow([renamed], [b"41-0"]))
    current.merge(updates_to_arrow([late_old], [b"42-0"]))
    rows = current_rows(tmp_path / "lake")
    mine = [r for r in rows if (r["account"], r["conid"]) == (before[0].account, before[0].conid)]
    assert [r["symbol"] for r in mine] == ["NEWTICK"]
    assert rows == expected_rows(_newest([*before, renamed, late_old]))
