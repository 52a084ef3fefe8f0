"""The stream stays bounded and never loses an unread entry: the trim script against real
redis-servers (6.2 and 7.x), and consumer processes trimming as they run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis

from consumer.trim import trim_stream
from tests.conftest import RedisTarget
from tests.helpers import (
    assert_table_exact,
    consumer_env,
    group_pending,
    make_updates,
    publish,
    run_consumer,
    run_python,
)

DAY_S = 86_400.0
BIG_CAP = 1 << 40


def _fill(client: redis.Redis, stream: str, count: int, size: int = 40) -> list[bytes]:
    """``count`` entries 5 ms apart (200/s), ending now."""
    pipe = client.pipeline(transaction=False)
    start_ms = int(time.time() * 1000) - 5 * count
    for i in range(count):
        payload = json.dumps({"i": i, "pad": "x" * size})
        pipe.xadd(stream, {"v": "1", "payload": payload}, id=f"{start_ms + 5 * i}-0")
    return [i if isinstance(i, bytes) else str(i).encode() for i in pipe.execute()]


def _ids(client: redis.Redis, stream: str) -> list[bytes]:
    return [entry_id for entry_id, _ in client.xrange(stream)]  # type: ignore[union-attr,misc]


def test_only_what_every_group_acknowledged_is_trimmed(redis_any_version: RedisTarget) -> None:
    client = redis.Redis.from_url(redis_any_version.url)
    stream = "s"
    ids = _fill(client, stream, 100)
    client.xgroup_create(stream, "lake", id="0")
    client.xgroup_create(stream, "slow", id=ids[9])  # has read 10, all acknowledged
    client.xreadgroup("lake", "c1", {stream: ">"}, count=60)  # 60 delivered...
    client.xack(stream, "lake", *ids[:30])  # ...30 acknowledged, 30 pending (a dead consumer)
    # A window of 0 s: only the groups' state bounds the trim. The slower group wins.
    result = trim_stream(client, stream, 0.0, BIG_CAP)
    assert result.removed == 10 and _ids(client, stream) == ids[10:]
    assert result.safe_point == f"{ids[9].decode().split('-')[0]}-{int(ids[9].split(b'-')[1]) + 1}"
    client.xgroup_setid(stream, "slow", ids[-1])  # the slow group caught up
    result = trim_stream(client, stream, 0.0, BIG_CAP)
    assert result.removed == 20 and _ids(client, stream) == ids[30:]  # pending ones stay
    assert trim_stream(client, stream, 0.0, BIG_CAP).removed == 0  # idempotent
    # The dead consumer's entries are claimed and acknowledged at last: they may go now,
    # but never the 40 the lake group has not read yet.
    client.xack(stream, "lake", *ids[30:60])
    assert trim_stream(client, stream, 0.0, BIG_CAP).removed == 30
    assert _ids(client, stream) == ids[60:]
    # A stream without a group, or no stream at all: nothing trimmed, no error.
    _fill(client, "lonely", 5)
    assert trim_stream(client, "lonely", 0.0, BIG_CAP).removed == 0
    assert client.xlen("lonely") == 5
    assert trim_stream(client, "missing", 0.0, BIG_CAP).removed == 0


def test_the_replay_window_is_kept_within_the_cap(redis_any_version: RedisTarget) -> None:
    client = redis.Redis.from_url(redis_any_version.url)
    stream = "s"
    ids = _fill(client, stream, 12_000, size=300)
    client.xgroup_create(stream, "lake", id=ids[-1])  # everything acknowledged
    # A day's window keeps everything while under the cap...
    assert trim_stream(client, stream, DAY_S, BIG_CAP).removed == 0
    # ...and over the cap the oldest acknowledged entries go, down to ~90% of it.
    cap = 2 * 1024 * 1024
    before = int(client.memory_usage(stream) or 0)
    assert before > cap
    result = trim_stream(client, stream, DAY_S, cap)
    assert 0 < result.removed < len(ids)
    assert result.bytes_after <= cap and not result.held_by_unacknowledged
    assert _ids(client, stream) == ids[result.removed :]  # the oldest went, in order


def test_unacknowledged_entries_are_never_trimmed_whatever_the_cap(
    redis_any_version: RedisTarget,
) -> None:
    client = redis.Redis.from_url(redis_any_version.url)
    stream = "s"
    ids = _fill(client, stream, 12_000, size=300)
    client.xgroup_create(stream, "lake", id="0")
    client.xreadgroup("lake", "c1", {stream: ">"}, count=6_000)  # delivered, never acked
    result = trim_stream(client, stream, 0.0, 1024 * 1024)
    assert result.removed == 0 and client.xlen(stream) == len(ids)
    assert result.held_by_unacknowledged and result.bytes_after > 1024 * 1024


def test_consumers_trim_what_they_acknowledged_and_the_slower_group_bounds_it(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(3_000, seed=31)
    ids = publish(redis_url, stream, updates)
    client = redis.Redis.from_url(redis_url)
    client.xgroup_create(stream, "audit", id=ids[999])  # another group, 2,000 behind
    env = consumer_env(redis_url, lake, "c1", stream, stream_retention_s=0,
                       stream_trim_interval_s=1)  # fmt: skip
    assert run_consumer(env, log=tmp_path / "c1.log") == 0
    assert_table_exact(lake, updates)
    assert group_pending(redis_url, stream) == 0
    # Everything the audit group has not read is still there, and nothing before it.
    assert _ids(client, stream) == ids[1000:]
    assert "stream trimmed" in (tmp_path / "c1.log").read_text()
    # The audit group reads and acknowledges: the next consumer run trims the rest.
    client.xgroup_setid(stream, "audit", ids[-1])
    assert run_consumer(env, log=tmp_path / "c1.log") == 0
    assert client.xlen(stream) == 0
    assert_table_exact(lake, updates)


def test_status_shows_the_replayable_range_and_replay_from_before_it_fails(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(500, seed=32)
    ids = publish(redis_url, stream, updates)
    client = redis.Redis.from_url(redis_url)
    client.xgroup_create(stream, "lake", id=ids[199])  # 200 acknowledged: trimmable
    env = consumer_env(redis_url, lake, "c1", stream, stream_retention_s=0)
    trim_stream(client, stream, 0.0, BIG_CAP)
    client.xgroup_setid(stream, "lake", ids[-1])  # the consumers read the rest meanwhile
    status = run_python(["-m", "poslake", "status"], env)
    assert status.returncode == 0, status.stderr
    assert f"replayable from {ids[200].decode()}" in status.stdout
    replay = run_python(["-m", "poslake", "replay", "--to-id", ids[50].decode(), "--yes"], env)
    assert replay.returncode == 2
    assert "older than the replayable range" in replay.stderr
    assert ids[200].decode() in replay.stderr and "Traceback" not in replay.stderr
    assert client.xinfo_groups(stream)[0]["last-delivered-id"] == ids[-1]  # unchanged
    # From inside the range, or the whole of what is kept, it works.
    inside = run_python(["-m", "poslake", "replay", "--to-id", ids[300].decode(), "--yes"], env)
    assert inside.returncode == 0, inside.stderr
    whole = run_python(["-m", "poslake", "replay", "--beginning", "--yes"], env)
    assert whole.returncode == 0, whole.stderr
