"""options_model.classify: one case per leg set, near-misses included."""

from __future__ import annotations

from datetime import date

import pytest

from options_model.classify import STRATEGY_TYPES, Classification, Leg, classify, common_unit
from options_model.tables import POSITIONS

JAN, FEB = date(2027, 1, 15), date(2027, 2, 19)


def call(strike: float, quantity: float, expiry: date = JAN) -> Leg:
    return Leg(quantity, "OPT", "C", strike, expiry)


def put(strike: float, quantity: float, expiry: date = JAN) -> Leg:
    return Leg(quantity, "OPT", "P", strike, expiry)


def shares(quantity: float) -> Leg:
    return Leg(quantity, "STK", multiplier=1.0)


def condor(n: float, lp: float, sp: float, sc: float, lc: float) -> list[Leg]:
    return [put(lp, n), put(sp, -n), call(sc, -n), call(lc, n)]


CASES: list[tuple[str, list[Leg], Classification]] = [
    # iron condors and butterflies
    ("iron condor", condor(1, 90, 95, 105, 110), Classification("iron_condor", 1)),
    ("two iron condors", condor(2, 90, 95, 105, 110), Classification("iron_condor", 2)),
    (
        "iron condor, unequal wings",
        condor(1, 85, 95, 105, 110),
        Classification("iron_condor", 1, "broken wing"),
    ),
    (
        "reverse iron condor",
        [put(90, -1), put(95, 1), call(105, 1), call(110, -1)],
        Classification("iron_condor", 1, "reverse"),
    ),
    (
        "iron condor, mismatched quantities",
        [put(90, 1), put(95, -1), call(105, -2), call(110, 2)],
        Classification("custom", 1),
    ),
    (
        "iron condor, mixed expiries",
        [put(90, 1), put(95, -1), call(105, -1, FEB), call(110, 1, FEB)],
        Classification("custom", 1),
    ),
    (
        "iron condor, put strikes above call strikes",
        condor(1, 100, 110, 95, 105),
        Classification("custom", 1),
    ),
    ("iron butterfly", condor(3, 90, 100, 100, 110), Classification("iron_butterfly", 3)),
    (
        "iron butterfly, unequal wings",
        condor(1, 95, 100, 100, 110),
        Classification("iron_butterfly", 1, "broken wing"),
    ),
    (
        "iron condor, one wing long the wrong way",
        [put(90, 1), put(95, -1), call(105, -1), call(110, -1)],
        Classification("custom", 1),
    ),
    (
        "four calls (a call condor: not in the table)",
        [call(90, 1), call(95, -1), call(105, -1), call(110, 1)],
        Classification("custom", 1),
    ),
    # verticals
    (
        "bull call spread",
        [call(100, 1), call(105, -1)],
        Classification("vertical_spread", 1, "call debit"),
    ),
    (
        "bear call spread",
        [call(100, -5), call(105, 5)],
        Classification("vertical_spread", 5, "call credit"),
    ),
    (
        "bear put spread",
        [put(95, -1), put(100, 1)],
        Classification("vertical_spread", 1, "put debit"),
    ),
    (
        "bull put spread",
        [put(95, 2), put(100, -2)],
        Classification("vertical_spread", 2, "put credit"),
    ),
    ("two longs of one right", [call(100, 1), call(105, 1)], Classification("custom", 1)),
    # ratio spreads
    ("call ratio 1:2", [call(100, 1), call(105, -2)], Classification("ratio_spread", 1)),
    ("put ratio 2:3", [put(95, -3), put(100, 2)], Classification("ratio_spread", 1)),
    # straddles and strangles
    ("long straddle", [call(100, 1), put(100, 1)], Classification("straddle", 1, "long")),
    ("short straddle", [call(100, -4), put(100, -4)], Classification("straddle", 4, "short")),
    ("long strangle", [put(95, 1), call(105, 1)], Classification("strangle", 1, "long")),
    ("short strangle", [put(95, -2), call(105, -2)], Classification("strangle", 2, "short")),
    ("strangle, unequal sizes", [put(95, -1), call(105, -2)], Classification("custom", 1)),
    ("put above the call (guts)", [put(105, 1), call(95, 1)], Classification("custom", 1)),
    ("straddle across expiries", [call(100, 1), put(100, 1, FEB)], Classification("custom", 1)),
    ("risk reversal", [put(95, -1), call(105, 1)], Classification("custom", 1)),
    # butterflies
    (
        "long call butterfly",
        [call(95, 1), call(100, -2), call(105, 1)],
        Classification("butterfly", 1, "long"),
    ),
    (
        "short put butterfly",
        [put(95, -2), put(100, 4), put(105, -2)],
        Classification("butterfly", 2, "short"),
    ),
    (
        "broken wing butterfly",
        [call(95, 1), call(100, -2), call(110, 1)],
        Classification("butterfly", 1, "long, broken wing"),
    ),
    (
        "butterfly, mixed expiries",
        [call(95, 1), call(100, -2, FEB), call(105, 1)],
        Classification("custom", 1),
    ),
    (
        "butterfly, body 1:-1:1",
        [call(95, 1), call(100, -1), call(105, 1)],
        Classification("custom", 1),
    ),
    (
        "butterfly, mixed rights",
        [put(95, 1), call(100, -2), call(105, 1)],
        Classification("custom", 1),
    ),
    # calendars and diagonals
    (
        "long call calendar",
        [call(100, -1), call(100, 1, FEB)],
        Classification("calendar_spread", 1, "long"),
    ),
    (
        "short put calendar",
        [put(100, 3), put(100, -3, FEB)],
        Classification("calendar_spread", 3, "short"),
    ),
    ("diagonal", [call(100, -1), call(105, 1, FEB)], Classification("diagonal_spread", 1, "long")),
    ("calendar, unequal sizes", [call(100, -1), call(100, 2, FEB)], Classification("custom", 1)),
    ("calendar, both long", [call(100, 1), call(100, 1, FEB)], Classification("custom", 1)),
    # with shares
    ("covered call", [shares(100), call(105, -1)], Classification("covered_call", 1)),
    ("three covered calls", [shares(300), call(105, -3)], Classification("covered_call", 3)),
    ("shares do not cover the call", [shares(150), call(105, -1)], Classification("custom", 1)),
    ("short shares and a short call", [shares(-100), call(105, -1)], Classification("custom", 1)),
    ("collar", [shares(200), put(95, 2), call(105, -2)], Classification("collar", 2)),
    (
        "collar, put and call in two expiries",
        [shares(100), put(95, 1), call(105, -1, FEB)],
        Classification("custom", 1),
    ),
    ("shares and a long call", [shares(100), call(105, 1)], Classification("custom", 1)),
    ("shares alone", [shares(250)], Classification("stock", 250, "long")),
    ("short shares", [shares(-10)], Classification("stock", 10, "short")),
    # single legs
    ("cash-secured put", [put(95, -2)], Classification("cash_secured_put", 2)),
    ("long put", [put(95, 1)], Classification("single_leg", 1, "long put")),
    ("short call", [call(105, -1)], Classification("single_leg", 1, "short call")),
    # netting and flat
    (
        "fills of one contract net first",
        [call(100, 1), call(100, 1), call(105, -2)],
        Classification("vertical_spread", 2, "call debit"),
    ),
    (
        "a closed leg drops out",
        [*condor(1, 90, 95, 105, 110), put(90, -1), put(95, 1)],
        Classification("vertical_spread", 1, "call credit"),
    ),
    ("every leg flat", [call(100, 1), call(100, -1)], Classification("custom", 0, "flat")),
    (
        "five legs",
        [*condor(1, 90, 95, 105, 110), call(120, 1)],
        Classification("custom", 1),
    ),
]


@pytest.mark.parametrize(
    ("legs", "expected"), [(legs, want) for _, legs, want in CASES], ids=[c[0] for c in CASES]
)
def test_classify(legs: list[Leg], expected: Classification) -> None:
    assert classify(legs) == expected
    assert classify(reversed(legs)) == expected  # the order legs come in does not matter


def test_the_table_has_enough_cases_and_every_type() -> None:
    assert len(CASES) >= 40
    seen = {want.strategy_type for _, _, want in CASES}
    assert seen == STRATEGY_TYPES


def test_the_positions_table_allows_every_type() -> None:
    assert POSITIONS.codes["strategy_type"] == STRATEGY_TYPES


@pytest.mark.parametrize(
    ("quantities", "unit"),
    [([2, 4, 6], 2.0), ([3, 2], 1.0), ([0.5, 1.5], 0.5), ([7], 7.0), ([-4, 4, -8], 4.0)],
)
def test_common_unit(quantities: list[float], unit: float) -> None:
    assert common_unit(quantities) == unit
