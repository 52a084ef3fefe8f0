"""Poison entries go to the dead-letter stream with the reason; the valid ones land."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from shared.wire import encode_update
from tests.helpers import (
    Lake,
    assert_table_exact,
    consumer_env,
    group_pending,
    make_updates,
    run_consumer,
)


@pytest.fixture
def lake(any_lake: Lake) -> Lake:
    """Every test here runs on a local lake and on one on SeaweedFS."""
    return any_lake


def _payload(**changes: object) -> bytes:
    base = msgspec.to_builtins(make_updates(1, seed=99)[0])
    base.update(changes)
    for key in [k for k, v in changes.items() if v is _DROP]:
        del base[key]
    return msgspec.json.encode(base)


_DROP = object()


def _nonfinite_payload() -> bytes:
    text = _payload(position=1.5).replace(b'"position":1.5', b'"position":1e999')
    assert b"1e999" in text
    return text


POISON: list[tuple[dict[str, bytes], str]] = [
    ({"v": b"1", "payload": b"{not json"}, "invalid payload: JSON is malformed"),
    ({"v": b"1"}, "missing field 'payload'"),
    ({"payload": _payload()}, "missing field 'v'"),
    ({"v": b"99", "payload": _payload()}, "unknown schema version 99"),
    ({"v": b"x", "payload": _payload()}, "schema version b'x' is not a number"),
    ({"v": b"1", "payload": _payload(conid=_DROP)}, "missing required field `conid`"),
    ({"v": b"1", "payload": _payload(conid="abc")}, "Expected `int`, got `str` - at `$.conid`"),
    ({"v": b"1", "payload": _nonfinite_payload()}, "Number out of range - at `$.position`"),
    ({"v": b"1", "payload": _payload(symbol="")}, "at `$.symbol`"),
    ({"v": b"1", "payload": _payload(timestamp="2026-11-02T14:30:00")}, "at `$.timestamp`"),
    (
        {
            "v": b"1",
            "payload": _payload(sec_type="OPT", strike=None, right="C", expiry="2026-12-18"),
        },
        "OPT update needs right, strike and expiry",
    ),
]


def test_poison_goes_to_dlq_and_valid_entries_land(
    redis_url: str, lake: Lake, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(600, seed=3)
    client = redis.Redis.from_url(redis_url)
    poison_ids: dict[Any, tuple[dict[str, bytes], str]] = {}
    for i, update in enumerate(updates):
        client.xadd(stream, encode_update(update))  # type: ignore[arg-type]
        if i % 50 == 0 and i // 50 < len(POISON):
            fields, reason = POISON[i // 50]
            poison_ids[client.xadd(stream, fields)] = (fields, reason)  # type: ignore[arg-type]
    assert len(poison_ids) == len(POISON)

    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=128)
    assert run_consumer(env, log=tmp_path / "c.log") == 0
    assert_table_exact(lake, updates)
    assert group_pending(redis_url, stream) == 0

    letters: Any = client.xrange(f"{stream}:dlq")
    assert len(letters) == len(POISON)
    for _, letter in letters:
        dead: dict[bytes, bytes] = letter
        source = dead[b"dlq:source_id"]
        original, reason = poison_ids[source]
        assert reason in dead[b"dlq:reason"].decode(), dead[b"dlq:reason"]
        for key, value in original.items():
            assert dead[key.encode()] == value  # original fields kept
        assert dead[b"dlq:consumer"] == b"c1"
        assert dead[b"dlq:stream"] == stream.encode()


def test_entry_delivered_too_often_is_dead_lettered(
    redis_url: str, lake: Lake, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(20, seed=4)
    client = redis.Redis.from_url(redis_url)
    ids = [client.xadd(stream, encode_update(u)) for u in updates]  # type: ignore[arg-type]
    client.xgroup_create(stream, "lake", id="0")
    client.xreadgroup("lake", "ghost", {stream: ">"}, count=100)
    # The first entry has crashed consumers again and again.
    for _ in range(3):
        client.xclaim(stream, "lake", "ghost", min_idle_time=0, message_ids=[ids[0]])
    env = consumer_env(redis_url, lake, "c1", stream, claim_min_idle_s=0, max_deliveries=3)
    assert run_consumer(env, log=tmp_path / "c.log") == 0
    letters: Any = client.xrange(f"{stream}:dlq")
    assert [f[b"dlq:source_id"] for _, f in letters] == [ids[0]]
    assert letters[0][1][b"dlq:reason"] == b"delivered 5 times (limit 3)"
    assert letters[0][1][b"dlq:deliveries"] == b"5"
    assert_table_exact(lake, updates[1:])
    assert group_pending(redis_url, stream) == 0
