"""IB's contract and value fields onto the shared model, and the producer's clock."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from datetime import date

import msgspec
import pytest

from gateway_sim.protocol import UNSET_DOUBLE
from producer.ib_mapping import (
    MappingError,
    UpdateClock,
    build_update,
    map_contract,
    number,
    price_from_value,
)
from producer.market_data_lines import ib_contract
from shared.model import PositionUpdate
from shared.wire import decode_entry, encode_update
from tests.helpers import REPO_ROOT


def test_option_maps_to_its_underlying_with_right_strike_expiry() -> None:
    contract = map_contract("12345", "SPY", "OPT", "20261218", "450.0", "CALL", "100", "USD")
    assert contract.symbol == "SPY"
    assert (contract.right, contract.strike, contract.expiry) == ("C", 450.0, date(2026, 12, 18))
    assert contract.multiplier == 100.0


def test_expiry_with_a_time_suffix_and_short_rights() -> None:
    contract = map_contract(7, "ES", "FOP", "20261218 16:00:00 US/Eastern", 5000, "P", "50", "USD")
    assert (contract.right, contract.expiry) == ("P", date(2026, 12, 18))


def test_stock_drops_ib_placeholders() -> None:
    contract = map_contract("265598", "AAPL", "STK", "", "0.0", "0", "", "USD")
    assert (contract.right, contract.strike, contract.expiry) == (None, None, None)
    assert contract.multiplier == 1.0


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (("1", "SPY", "OPT", "", "450", "C", "100", "USD"), "lacks right/strike/expiry"),
        (("1", "SPY", "OPT", "202612", "450", "C", "100", "USD"), "not YYYYMMDD"),
        (("1", "SPY", "OPT", "20261218", "450", "?", "100", "USD"), "lacks right"),
        (("0", "SPY", "STK", "", "0", "", "", "USD"), "not positive"),
        (("x", "SPY", "STK", "", "0", "", "", "USD"), "contract x"),
        (("5", "", "STK", "", "0", "", "", "USD"), "no symbol"),
    ],
)
def test_unmappable_contracts_say_why(fields: tuple[str, ...], reason: str) -> None:
    with pytest.raises(MappingError, match=reason):
        map_contract(*fields)


def test_unset_and_non_finite_values_become_none() -> None:
    assert number(UNSET_DOUBLE) is None
    assert number(float("nan")) is None
    assert number("") is None
    assert number("1.5") == 1.5
    assert price_from_value(-500.0, -2.0, 100.0) == 2.5
    assert price_from_value(10.0, 0.0, 1.0) is None


def test_built_update_round_trips_the_wire_format() -> None:
    contract = map_contract("12345", "SPY", "OPT", "20261218", "450", "P", "100", "USD")
    clock = UpdateClock()
    stamp = clock.stamp_us()
    update = build_update("DU1", contract, -3.0, UpdateClock.as_datetime(stamp),
                          market_price=2.5, market_value=-750.0)  # fmt: skip
    fields = {k.encode(): v for k, v in encode_update(update).items()}
    decoded = decode_entry(fields)
    assert decoded == update
    assert decoded.key[2] == stamp
    with pytest.raises(MappingError, match="not finite"):
        build_update("DU1", contract, float("inf"), UpdateClock.as_datetime(stamp))
    assert isinstance(msgspec.json.decode(fields[b"payload"]), dict)
    assert isinstance(decoded, PositionUpdate)


def test_clock_strictly_increases_and_respects_a_floor() -> None:
    clock = UpdateClock()
    stamps = [clock.stamp_us() for _ in range(10_000)]
    assert all(a < b for a, b in itertools.pairwise(stamps))
    clock.raise_floor(stamps[-1] + 10_000_000)
    assert clock.stamp_us() == stamps[-1] + 10_000_001


@pytest.mark.parametrize(
    ("name", "value"),
    [("POSLAKE_IB_PORT", "70000"), ("POSLAKE_IB_CLIENT_ID", "-1"),
     ("POSLAKE_IB_RECONNECT_MAX_S", "0.001")],
)  # fmt: skip
def test_bad_producer_setting_stops_at_start(name: str, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSLAKE_")}
    env[name] = value
    done = subprocess.run(
        [sys.executable, "-m", "producer"],
        check=False,
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert name in done.stderr


def test_market_data_is_asked_where_the_contract_is_quoted() -> None:
    """Stock options on SMART (their positions name no exchange); futures options on
    their own exchange, which SMART does not route (the position or portfolio item
    names it)."""
    option = map_contract("11", "SPY", "OPT", "20270115", "560", "C", "100", "USD", "")
    assert ib_contract(option).exchange == "SMART"
    fop = map_contract("12", "ES", "FOP", "20270115", "6000", "P", "50", "USD", "CME")
    assert (fop.exchange, ib_contract(fop).exchange) == ("CME", "CME")
    assert ib_contract(fop).conId == 12 and ib_contract(fop).secType == "FOP"
