"""The shared contract: the wire format and the settings (no servers needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta, timezone

import msgspec
import pytest

from shared.errors import ConfigError, PoisonEntry
from shared.model import PositionUpdate
from shared.settings import load_settings
from shared.table import POSITION_UPDATES_SCHEMA, updates_to_arrow
from shared.wire import decode_entries, decode_entry, encode_update
from tests.helpers import REPO_ROOT, make_updates


def test_round_trip_keeps_every_field() -> None:
    for update in make_updates(50, seed=1):
        fields = encode_update(update)
        decoded = decode_entry({k.encode(): v for k, v in fields.items()})
        assert decoded == update
        assert decoded.key == update.key


def test_documented_example_entry_decodes() -> None:
    """The example entry in README.md, as another producer would write it."""
    payload = (
        b'{"account":"U1234567","conid":495512551,"symbol":"SPY","sec_type":"OPT",'
        b'"currency":"USD","position":-2.0,"timestamp":"2026-11-20T15:04:05.123456Z",'
        b'"right":"P","strike":580.0,"expiry":"2026-12-18","multiplier":100.0,'
        b'"market_price":3.45,"market_value":-690.0,"average_cost":412.5,'
        b'"unrealized_pnl":135.0,"realized_pnl":0.0}'
    )
    update = decode_entry({b"v": b"1", b"payload": payload})
    assert update.symbol == "SPY" and update.expiry == date(2026, 12, 18)
    assert update.timestamp == datetime(2026, 11, 20, 15, 4, 5, 123456, tzinfo=UTC)


def test_offsets_are_converted_to_utc_in_rows() -> None:
    eastern = timezone(timedelta(hours=-5))
    update = make_updates(1)[0]
    shifted = msgspec.structs.replace(update, timestamp=update.timestamp.astimezone(eastern))
    assert shifted.key == update.key
    row = updates_to_arrow([shifted], [b"1-0"]).to_pylist()[0]
    assert row["timestamp"] == update.timestamp
    assert row["date"] == update.timestamp.date()


def test_date_is_the_utc_date_of_the_timestamp() -> None:
    late = datetime(2026, 11, 20, 23, 59, 59, 999999, tzinfo=UTC)
    update = msgspec.structs.replace(make_updates(1)[0], timestamp=late)
    row = updates_to_arrow([update], [b"1-0"])
    assert row.schema == POSITION_UPDATES_SCHEMA
    assert row.column("date").to_pylist() == [date(2026, 11, 20)]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("POSLAKE_BATCH_MAX_WAIT_S", "0"),
        ("POSLAKE_BATCH_MAX_WAIT_S", "soon"),
        ("POSLAKE_BATCH_MAX_ENTRIES", "-5"),
        ("POSLAKE_REDIS_URL", "http://localhost"),
        ("POSLAKE_STORAGE_OPTIONS", "{not json"),
        ("POSLAKE_FAULT_CRASH_AT", "somewhere"),
        ("POSLAKE_STREAM", ""),
        ("POSLAKE_VACUUM_INTERVAL_S", "7200"),
        ("POSLAKE_HISTORY_RETENTION_HOURS", "0"),
        ("POSLAKE_MAX_ENTRY_BYTES", "100"),
        ("POSLAKE_BATCH_MAX_BYTES", "1kb"),
        ("POSLAKE_IB_GREEKS_LINES", "0"),
        ("POSLAKE_IB_GREEKS_DATA_TYPE", "5"),
        ("POSLAKE_IB_GREEKS_FALLBACK_DATA_TYPE", "2"),
        ("POSLAKE_IB_GREEKS_REQUESTS_PER_S", "30"),  # with the PnL-single's 20: over 45/s
        ("POSLAKE_IB_GREEKS_ROTATION_S", "1"),
    ],
)
def test_bad_setting_is_named(variable: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


def test_bad_setting_stops_the_consumer_at_start() -> None:
    env = {**os.environ, "POSLAKE_BATCH_MAX_ENTRIES": "zero"}
    command = [sys.executable, "-m", "consumer"]
    result = subprocess.run(
        command, check=False, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "POSLAKE_BATCH_MAX_ENTRIES" in result.stderr


def test_settings_defaults() -> None:
    settings = load_settings()
    assert (settings.stream, settings.group, settings.batch_max_wait_s) == (
        "positions",
        "lake",
        3.0,
    )
    assert settings.dlq_stream == "positions:dlq"
    assert settings.consumer_name == load_settings().consumer_name  # stable per host


def test_update_key_includes_account_and_timestamp() -> None:
    base = make_updates(1)[0]
    later = msgspec.structs.replace(base, timestamp=base.timestamp + timedelta(microseconds=1))
    other_account = msgspec.structs.replace(base, account="U9")
    assert len({base.key, later.key, other_account.key}) == 3
    assert isinstance(base, PositionUpdate)


_BASE = msgspec.to_builtins(make_updates(1, seed=99)[0])


def _entry(**changes: object) -> dict[bytes, bytes]:
    return {b"v": b"1", b"payload": msgspec.json.encode({**_BASE, **changes})}


_OPTION = {"sec_type": "OPT", "strike": 100.0, "expiry": "2026-12-18"}


@pytest.mark.parametrize(("given", "stored"), [("CALL", "C"), ("PUT", "P"), ("C", "C")])
def test_right_is_stored_as_c_or_p(given: str, stored: str) -> None:
    update = decode_entry(_entry(**_OPTION, right=given))
    assert update.right == stored
    assert updates_to_arrow([update], [b"1-0"]).column("right").to_pylist() == [stored]
    assert b'"right":"%s"' % stored.encode() in encode_update(update)["payload"]


def test_null_multiplier_means_one() -> None:
    update = decode_entry(_entry(multiplier=None))
    assert update.multiplier == 1.0
    assert updates_to_arrow([update], [b"1-0"]).column("multiplier").to_pylist() == [1.0]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (_entry(timestamp="2026-12-31T23:59:60Z"), "at `$.timestamp`"),
        (_entry(timestamp="0001-01-01T00:30:00+01:00"), "outside the years 1-9999 in UTC"),
        (_entry(timestamp="9999-12-31T23:30:00-01:00"), "outside the years 1-9999 in UTC"),
        (_entry(conid=5.0), "Expected `int`, got `float` - at `$.conid`"),
        (_entry(sec_type=""), "at `$.sec_type`"),
        (_entry(account="U1\x00"), "a control character in `$.account`"),
        (_entry(symbol="A\x7fB"), "a control character in `$.symbol`"),
        (_entry(sec_type="S\tK"), "a control character in `$.sec_type`"),
        (_entry(right="CALLS", **_OPTION), "at `$.right`"),
        (_entry(symbol="\u00e9" * 33), "symbol is longer than 64 bytes"),
        (_entry(symbol="x" * 65), "at `$.symbol`"),
        ({b"v": b"1", b"payload": b"\xef\xbb\xbf" + _entry()[b"payload"]}, "byte-order mark"),
        ({b"v": b"1", b"payload": _entry()[b"payload"][:-1] + b',"x":"\xc3"}'}, "not UTF-8"),
        ({b"v": b"1", b"payload": b'{"x":' + b"[" * 5000 + b"]" * 5000 + b"}"}, "too deeply"),
        ({b"v": b"1", b"payload": b" " * 70_000}, "more than the limit of 65536"),
    ],
)
def test_rejected_with_reason(fields: dict[bytes, bytes], reason: str) -> None:
    with pytest.raises(PoisonEntry) as caught:
        decode_entry(fields)
    assert reason in caught.value.reason


def test_largest_symbol_fits_a_partition_folder() -> None:
    update = decode_entry(_entry(symbol="\u00e9" * 32))  # 64 bytes: accepted
    folder = "symbol=" + "".join(f"%{b:02X}" for b in update.symbol.encode())
    assert len(folder.encode()) <= 255


def test_decode_entries_isolates_each_failure() -> None:
    good = [encode_update(u) for u in make_updates(20, seed=2)]
    raw = [[b"v", f["v"], b"payload", f["payload"]] for f in good]
    deep = b'{"x":' + b"[" * 2000 + b"]" * 2000 + b"}"
    raw[5] = [b"v", b"1", b"payload", deep]
    raw[9] = [b"v", b"1", b"payload", _entry(account="\\u0000")[b"payload"]]
    raw[9][3] = raw[9][3].replace(b"\\\\u0000", b"\\u0000")
    batch = decode_entries([(f"{i}-0".encode(), r) for i, r in enumerate(raw)])
    assert [p.entry_id for p in batch.poison] == [b"5-0", b"9-0"]
    assert "too deeply" in batch.poison[0].reason
    assert "control character" in batch.poison[1].reason
    assert len(batch.updates) == 18
