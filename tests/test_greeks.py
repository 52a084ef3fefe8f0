"""Option Greeks in the lake: ``option_greeks`` gets each computation once (two consumers
side by side, retries, a full replay), ``option_greeks_current`` the newest per
(conid, source); the wire format's rules for the kind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import redis

from shared.greeks import SOURCE_OF_TICK, OptionGreeks
from shared.wire import decode_entries, encode_update
from tests.helpers import (
    Lake,
    consumer_env,
    group_pending,
    kill,
    make_greeks,
    read_frame,
    run_consumer,
    start_consumer,
)

VALUES = ("implied_vol", "delta", "gamma", "vega", "theta", "opt_price", "pv_dividend", "und_price")


def expected_history(greeks: list[OptionGreeks]) -> list[tuple[Any, ...]]:
    return sorted(
        (g.conid, g.source, g.timestamp, g.tick_type, g.data_type, *(getattr(g, v) for v in VALUES))
        for g in greeks
    )


def table_history(lake: Path | Lake) -> list[tuple[Any, ...]]:
    frame = read_frame(lake, "option_greeks")
    return sorted(
        tuple(r[c] for c in ("conid", "source", "timestamp", "tick_type", "data_type", *VALUES))
        for r in frame.to_dicts()
    )


def assert_greeks_exact(lake: Path | Lake, greeks: list[OptionGreeks]) -> None:
    assert table_history(lake) == expected_history(greeks)
    current = read_frame(lake, "option_greeks_current")
    newest: dict[tuple[int, str], OptionGreeks] = {}
    for g in sorted(greeks, key=lambda g: g.timestamp):
        newest[(g.conid, g.source)] = g
    got = {(r["conid"], r["source"]): (r["timestamp"], r["delta"]) for r in current.to_dicts()}
    assert got == {k: (g.timestamp, g.delta) for k, g in newest.items()}
    assert current.height == len(newest)


def test_greeks_land_once_current_keeps_the_newest_and_a_replay_changes_nothing(
    redis_url: str, lake: Path | Lake, stream: str, tmp_path: Path
) -> None:
    greeks = make_greeks(400)
    client = redis.Redis.from_url(redis_url)
    for entry in greeks + greeks[:50]:  # a producer's retry: 50 written twice
        client.xadd(stream, encode_update(entry))  # type: ignore[arg-type]
    other = start_consumer(
        consumer_env(redis_url, lake, "c2", stream, batch_max_entries=40),
        drain=True,
        log=tmp_path / "c2.log",
    )
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=50)
    try:
        assert run_consumer(env, log=tmp_path / "c1.log") == 0
        assert other.wait(timeout=60) == 0
    finally:
        kill(other)
    assert group_pending(redis_url, stream) == 0
    assert_greeks_exact(lake, greeks)
    history = read_frame(lake, "option_greeks")
    # Partitioned by the underlying's symbol; delayed ticks carry their data type.
    assert set(history["symbol"]) == {g.symbol for g in greeks}
    delayed = history.filter(pl.col("tick_type") >= 80)
    assert delayed.height > 0 and set(delayed["data_type"]) == {4}
    assert set(history["source"]) == set(SOURCE_OF_TICK.values())
    assert history["delta"].null_count() == 0 and history["vega"].null_count() > 0

    client.xgroup_setid(stream, "lake", "0")
    assert run_consumer(env, log=tmp_path / "replay.log") == 0
    assert_greeks_exact(lake, greeks)


def _entry(**changes: object) -> dict[bytes, bytes]:
    base = json.loads(encode_update(make_greeks(1)[0])["payload"])
    base.update(changes)
    payload = {k: v for k, v in base.items() if v is not ...}
    return {b"v": b"1", b"kind": b"option_greeks", b"payload": json.dumps(payload).encode()}


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"tick_type": 14}, "tick_type"),
        ({"tick_type": 53}, "tick_type"),
        ({"data_type": 5}, "data_type"),
        ({"data_type": 0}, "data_type"),
        ({"expiry": ...}, "expiry"),
        ({"right": "X"}, "right"),
        ({"delta": "0.5"}, "delta"),
        ({"conid": 0}, "conid"),
        ({"symbol": "Ä" * 33}, "symbol"),
    ],
)
def test_bad_greeks_are_poison_with_their_reason(changes: dict[str, object], reason: str) -> None:
    decoded = decode_entries([(b"1-1", _entry(**changes))])
    assert not decoded.updates
    assert len(decoded.poison) == 1 and reason in decoded.poison[0].reason


def test_greeks_wire_spellings() -> None:
    decoded = decode_entries(
        [
            (b"1-1", _entry(right="CALL", multiplier=None, delta=None)),
            (b"1-2", _entry(tick_type=83, data_type=3, theta=-0.25)),
        ]
    )
    assert not decoded.poison
    first, second = decoded.updates
    assert isinstance(first, OptionGreeks) and isinstance(second, OptionGreeks)
    assert (first.right, first.multiplier, first.delta) == ("C", 1.0, None)
    assert (second.source, second.data_type, second.theta) == ("model", 3, -0.25)
