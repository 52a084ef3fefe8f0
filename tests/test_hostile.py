"""Hostile entries interleaved with valid ones, against a running consumer process.

Every valid entry lands exactly once, every hostile one is in the dead-letter
stream with its own reason, and the consumer process stays up throughout.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import msgspec
import redis

from shared.model import PositionUpdate
from shared.wire import encode_update
from tests.helpers import (
    assert_current_exact,
    assert_table_exact,
    consumer_env,
    group_pending,
    make_updates,
    start_consumer,
    wait_until,
)
from tests.test_cli import poslake

_VALID = msgspec.to_builtins(make_updates(1, seed=99)[0])


def _payload(**changes: object) -> bytes:
    return msgspec.json.encode({**_VALID, **changes})


def _with_unknown(raw_value: bytes) -> bytes:
    """A valid payload plus an unknown field holding ``raw_value`` as raw JSON."""
    return _payload()[:-1] + b',"extra":' + raw_value + b"}"


_DEEP = _with_unknown(b"[" * 1_000 + b"]" * 1_000)
_HUGE = _with_unknown(b'"' + b"x" * 2_000_000 + b'"')
_MANY_FIELDS: dict[str, bytes] = {"v": b"1", "payload": _payload()}
_MANY_FIELDS.update({f"f{i}": b"x" for i in range(100_000)})

# (fields, the reason's words, truncated in the dead-letter stream)
HOSTILE: list[tuple[dict[str, bytes], str, bool]] = [
    ({"v": b"1", "payload": _DEEP}, "nested too deeply", False),
    ({"v": b"1", "payload": _payload(symbol="\u00e9" * 42)}, "longer than 64 bytes", False),
    ({"v": b"1", "payload": _HUGE}, "more than the limit of 65536", True),
    (_MANY_FIELDS, "more than the limit of 65536", True),
    ({"v": b"1", "payload": _with_unknown(b'"\xff\xfe"')}, "not UTF-8", False),
    ({"v": b"1", "payload": b"\xef\xbb\xbf" + _payload()}, "byte-order mark", False),
    (
        {"v": b"1", "payload": _payload(account="U1\x00")},
        "a control character in `$.account`",
        False,
    ),
    ({"v": b"1", "payload": _payload(symbol="A\nB")}, "a control character in `$.symbol`", False),
    ({"v": b"1", "payload": _payload(timestamp="2026-12-31T23:59:60Z")}, "at `$.timestamp`", False),
    ({"v": b"1", "payload": _payload(conid=5.0)}, "got `float` - at `$.conid`", False),
    ({"v": b"1", "payload": _payload(sec_type="")}, "at `$.sec_type`", False),
    ({"v": b"\xff", "payload": _payload()}, "is not a number", False),
    ({"v": b"1", "payload": _payload(right="CALLS")}, "at `$.right`", False),
]


def _normalised() -> list[tuple[dict[str, bytes], PositionUpdate]]:
    """Entries accepted with a normalised value, and the update each must become."""
    option = {**_VALID, "conid": 777_001, "sec_type": "OPT", "strike": 100.0}
    option["expiry"] = "2026-12-18"
    cases = []
    for i, (right, stored) in enumerate((("CALL", "C"), ("PUT", "P"))):
        wire = {**option, "conid": 777_001 + i, "right": right}
        expected = msgspec.convert({**wire, "right": stored}, PositionUpdate)
        cases.append(({"v": b"1", "payload": msgspec.json.encode(wire)}, expected))
    wire = {**_VALID, "conid": 777_010, "multiplier": None}
    expected = msgspec.convert({**wire, "multiplier": 1.0}, PositionUpdate)
    cases.append(({"v": b"1", "payload": msgspec.json.encode(wire)}, expected))
    return cases


def test_hostile_entries_never_stop_the_consumer(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    client: Any = redis.Redis.from_url(redis_url)
    updates = make_updates(900, seed=21)
    hostile_ids: dict[bytes, tuple[dict[str, bytes], str, bool]] = {}
    normalised = _normalised()
    for i, update in enumerate(updates):
        client.xadd(stream, encode_update(update))
        if i % 60 == 30 and i // 60 < len(HOSTILE):
            case = HOSTILE[i // 60]
            hostile_ids[client.xadd(stream, case[0])] = case
        if i % 300 == 100:
            client.xadd(stream, normalised[i // 300][0])
    assert len(hostile_ids) == len(HOSTILE)

    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=200, read_count=100)
    proc = start_consumer(env, log=tmp_path / "c.log")
    try:
        wait_until(lambda: client.xlen(f"{stream}:dlq") == len(HOSTILE), timeout=60)
        wait_until(lambda: group_pending(redis_url, stream) == 0 and _all_read(client, stream))
        assert proc.poll() is None, "the consumer exited"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    landed = updates + [u for _, u in normalised]
    assert_table_exact(lake, landed)
    assert_current_exact(lake, landed)
    letters: Any = client.xrange(f"{stream}:dlq")
    assert len(letters) == len(HOSTILE)
    for _, dead in letters:
        original, reason, truncated = hostile_ids[dead[b"dlq:source_id"]]
        assert reason in dead[b"dlq:reason"].decode(errors="replace"), dead[b"dlq:reason"]
        assert dead[b"dlq:deliveries"] == b"1"  # dead-lettered on the first delivery
        if truncated:
            assert dead[b"dlq:truncated"] == b"1"
            size = sum(len(k.encode()) + len(v) for k, v in original.items())
            assert dead[b"dlq:original_bytes"] == str(size).encode()
            assert dead[b"dlq:original_fields"] == str(len(original)).encode()
            kept = {k: v for k, v in dead.items() if not k.startswith(b"dlq:")}
            assert len(kept) <= 16 and sum(len(k) + len(v) for k, v in kept.items()) <= 4096
        else:
            assert b"dlq:truncated" not in dead
            for key, value in original.items():
                assert dead[key.encode()] == value  # the original, whole
    log_text = (tmp_path / "c.log").read_text()
    assert log_text.count("consumer started") == 1
    assert "Traceback" not in log_text


def _all_read(client: Any, stream: str) -> bool:
    """Whether the group has been handed every entry (works before Redis 7's ``lag``)."""
    group = client.xinfo_groups(stream)[0]
    last = client.xrevrange(stream, count=1)[0][0]
    return bool(group["last-delivered-id"] == last)


def test_truncated_dead_letter_is_not_requeued(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    client: Any = redis.Redis.from_url(redis_url)
    client.xadd(stream, {"v": b"1", "payload": _HUGE})
    client.xadd(stream, {"v": b"1", "payload": b"{broken"})
    env = consumer_env(redis_url, lake, "c1", stream)
    proc = start_consumer(env, drain=True, log=tmp_path / "c.log")
    assert proc.wait(timeout=60) == 0
    letters: Any = client.xrange(f"{stream}:dlq")
    truncated = [i.decode() for i, f in letters if b"dlq:truncated" in f]
    whole = [i.decode() for i, f in letters if b"dlq:truncated" not in f]
    assert len(truncated) == 1 and len(whole) == 1
    length = client.xlen(stream)

    refused = poslake(env, "dlq", "requeue", truncated[0], whole[0], "--yes")
    assert refused.returncode == 2 and "truncated copy" in refused.stderr
    assert client.xlen(stream) == length and client.xlen(f"{stream}:dlq") == 2  # unchanged

    everything = poslake(env, "dlq", "requeue", "--all", "--yes")
    assert everything.returncode == 0, everything.stderr
    assert "1 dead letters requeued" in everything.stdout
    assert "1 truncated dead letters kept" in everything.stdout
    assert client.xlen(stream) == length + 1
    assert [i.decode() for i, _ in client.xrange(f"{stream}:dlq")] == truncated
    listing = poslake(env, "dlq", "list")
    assert "more than the limit" in listing.stdout


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_huge_entries_keep_memory_bounded(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    """Ten 10 MB entries among valid ones: the dead letters stay small in Redis and
    the consumer holds about one reply of them at a time."""
    client: Any = redis.Redis.from_url(redis_url)
    updates = make_updates(200, seed=31)
    huge = _with_unknown(b'"' + b"y" * 10_000_000 + b'"')
    for i, update in enumerate(updates):
        client.xadd(stream, encode_update(update))
        if i % 20 == 0:
            client.xadd(stream, {"v": b"1", "payload": huge})
    before = client.info("memory")["used_memory"]
    env = consumer_env(redis_url, lake, "c1", stream)
    proc = start_consumer(env, log=tmp_path / "c.log")
    try:
        wait_until(lambda: client.xlen(f"{stream}:dlq") == 10, timeout=60)
        wait_until(lambda: group_pending(redis_url, stream) == 0)
        peak = _peak_rss_mb(proc.pid)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert_table_exact(lake, updates)
    grown = client.info("memory")["used_memory"] - before
    assert grown < 2_000_000, f"dead letters took {grown} bytes of Redis memory"
    assert peak < 450, f"consumer peak RSS {peak:.0f} MB for 100 MB of entries"
