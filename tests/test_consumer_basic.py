"""The consumer against a real redis-server and a real Delta table."""

from __future__ import annotations

from pathlib import Path

import redis
from deltalake import DeltaTable

from shared.wire import encode_update
from tests.helpers import (
    assert_table_exact,
    consumer_env,
    group_pending,
    make_updates,
    publish,
    run_consumer,
)


def test_drain_lands_every_update_once(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(3_000)
    publish(redis_url, stream, updates)
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=700)
    assert run_consumer(env, log=tmp_path / "c1.log") == 0
    assert_table_exact(lake, updates)
    assert group_pending(redis_url, stream) == 0
    table = DeltaTable(str(lake / "position_updates"))
    assert table.metadata().partition_columns == ["symbol"]
    protocol = table.protocol()
    assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 2)


def test_same_update_twice_and_full_replay_land_once(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(1_200, seed=11)
    client = redis.Redis.from_url(redis_url)
    # Every 5th update is written as two stream entries (a producer retry).
    for i, update in enumerate(updates):
        client.xadd(stream, encode_update(update))  # type: ignore[arg-type]
        if i % 5 == 0:
            client.xadd(stream, encode_update(update))  # type: ignore[arg-type]
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=250)
    assert run_consumer(env, log=tmp_path / "c.log") == 0
    assert_table_exact(lake, updates)
    version = DeltaTable(str(lake / "position_updates")).version()

    client.xgroup_setid(stream, "lake", "0")
    assert run_consumer(env, log=tmp_path / "c.log") == 0
    assert_table_exact(lake, updates)
    assert DeltaTable(str(lake / "position_updates")).version() == version
    assert group_pending(redis_url, stream) == 0
