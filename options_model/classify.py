"""What structure a strategy's open legs form: iron condor, vertical, straddle, ...

A pure function of the legs (no prices, no time), so a rebuild of the book
classifies alike. The legs are first netted per contract and divided by the
largest common unit: two iron condors are one structure of quantity 2. The
structures, as traders define them (``../shared/notes``; one underlying, per unit):

==================  ==========================================================
iron_condor         long put < short put < short call < long call, one expiry
iron_butterfly      as an iron condor, the short put and call at one strike
vertical_spread     two options of one right and expiry, opposite signs, equal
                    size; ``detail`` says call or put, debit or credit
straddle            a call and a put, one strike and expiry, the same sign
strangle            a call and a put, one expiry, put strike below the call's
butterfly           three strikes of one right and expiry, 1 : -2 : 1 (or the
                    reverse); ``detail`` "broken wing" when not equidistant
calendar_spread     one right and strike, two expiries, opposite signs
diagonal_spread     one right, two strikes and two expiries, opposite signs
ratio_spread        one right and expiry, opposite signs, unequal sizes
covered_call        N x multiplier shares long, N calls short
collar              shares long, as many puts long and calls short (one expiry)
cash_secured_put    a short put alone
single_leg          any other option alone
stock               shares alone
custom              what matches nothing above
==================  ==========================================================

Near-misses are ``custom`` (mismatched sizes in a condor, mixed expiries in a
butterfly, shares that do not cover the calls), except where traders keep the
name with a qualifier: an iron condor or butterfly with unequal wings keeps its
type with ``detail`` "broken wing", a reversed one (long inside) "reverse".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from fractions import Fraction

OPTION_TYPES = frozenset({"OPT", "FOP"})
STOCK_TYPES = frozenset({"STK"})


@dataclass(frozen=True)
class Leg:
    """One open leg: an option (right, strike, expiry) or shares, signed quantity."""

    quantity: float  # contracts or shares; negative is short
    sec_type: str = "OPT"
    right: str | None = None  # "C" or "P" for options
    strike: float | None = None
    expiry: date | None = None
    multiplier: float = 100.0

    @property
    def is_option(self) -> bool:
        return self.sec_type in OPTION_TYPES

    @property
    def contract(self) -> tuple[object, ...]:
        return (self.sec_type, self.right, self.strike, self.expiry, self.multiplier)


@dataclass(frozen=True)
class Classification:
    """A structure's type, a qualifier and how many units of it the legs hold."""

    strategy_type: str
    quantity: float  # units of the structure, >= 0 (0: every leg flat)
    detail: str | None = None  # "call debit", "short", "broken wing", ...


STRATEGY_TYPES = frozenset(
    {
        "iron_condor",
        "iron_butterfly",
        "vertical_spread",
        "straddle",
        "strangle",
        "butterfly",
        "calendar_spread",
        "diagonal_spread",
        "ratio_spread",
        "covered_call",
        "collar",
        "cash_secured_put",
        "single_leg",
        "stock",
        "custom",
    }
)


def net_legs(legs: Iterable[Leg]) -> list[Leg]:
    """One leg per contract, quantities summed, flat ones dropped; in a fixed order."""
    totals: dict[tuple[object, ...], Leg] = {}
    for leg in legs:
        held = totals.get(leg.contract)
        quantity = leg.quantity + (held.quantity if held is not None else 0.0)
        totals[leg.contract] = Leg(
            quantity, leg.sec_type, leg.right, leg.strike, leg.expiry, leg.multiplier
        )
    kept = [leg for leg in totals.values() if abs(leg.quantity) > 1e-9]
    return sorted(kept, key=_order)


def _order(leg: Leg) -> tuple[object, ...]:
    return (
        not leg.is_option,
        leg.expiry or date.min,
        leg.right or "",
        leg.strike if leg.strike is not None else -math.inf,
    )


def common_unit(quantities: Sequence[float]) -> float:
    """The largest quantity every one is a whole multiple of (exact for fractions too)."""
    unit = Fraction(0)
    for quantity in quantities:
        part = Fraction(abs(quantity)).limit_denominator(10_000)
        # gcd(a/b, c/d) = gcd(a*d, c*b) / (b*d)
        shared = math.gcd(unit.numerator * part.denominator, part.numerator * unit.denominator)
        unit = Fraction(shared, unit.denominator * part.denominator)
    return float(unit)


def classify(legs: Iterable[Leg]) -> Classification:
    """The structure the open legs form (see the module's table)."""
    return _classify(tuple(net_legs(legs)))


def classify_distinct(legs: Iterable[Leg]) -> Classification:
    """:func:`classify` for legs known to be distinct contracts (a ledger's open legs):
    no netting needed."""
    return _classify(tuple(sorted((leg for leg in legs if abs(leg.quantity) > 1e-9), key=_order)))


@functools.lru_cache(maxsize=65_536)
def _classify(held: tuple[Leg, ...]) -> Classification:
    """Memoized: a book classifies the same leg sets again and again (after every fill
    of a strategy, in every rebuild)."""
    if not held:
        return Classification("custom", 0.0, "flat")
    options = [leg for leg in held if leg.is_option]
    shares = [leg for leg in held if leg.sec_type in STOCK_TYPES]
    if len(options) + len(shares) != len(held) or len(shares) > 1:
        return Classification("custom", 1.0)
    if shares and not options:
        return Classification("stock", abs(shares[0].quantity), _sign_word(shares[0].quantity))
    if shares:
        return _with_shares(shares[0], options)
    unit = common_unit([leg.quantity for leg in options])
    ratios = [round(leg.quantity / unit) for leg in options]
    shape = _SHAPES.get(len(options))
    found = shape(options, ratios) if shape is not None else None
    if found is None:
        return Classification("custom", unit)
    strategy_type, detail = found
    return Classification(strategy_type, unit, detail)


def _sign_word(quantity: float) -> str:
    return "long" if quantity > 0 else "short"


Shape = tuple[str, str | None]


def _one(legs: list[Leg], ratios: list[int]) -> Shape:
    (leg,) = legs
    if leg.right == "P" and leg.quantity < 0:
        return "cash_secured_put", None
    return "single_leg", f"{_sign_word(leg.quantity)} {'call' if leg.right == 'C' else 'put'}"


def _two(legs: list[Leg], ratios: list[int]) -> Shape | None:
    low, high = legs  # by expiry, then right (C before P), then strike
    opposite = ratios[0] * ratios[1] < 0
    equal = abs(ratios[0]) == abs(ratios[1])
    if low.right == high.right:
        if not opposite:
            return None
        if low.expiry != high.expiry:
            if not equal:
                return None
            kind = "calendar_spread" if low.strike == high.strike else "diagonal_spread"
            return kind, _sign_word(high.quantity)  # long: the later expiry bought
        if not equal:
            return "ratio_spread", None
        return "vertical_spread", _vertical_detail(low, high)
    if low.expiry != high.expiry or opposite or not equal:
        return None
    call, put = (low, high) if low.right == "C" else (high, low)
    assert call.strike is not None and put.strike is not None
    word = _sign_word(call.quantity)
    if call.strike == put.strike:
        return "straddle", word
    if put.strike < call.strike:
        return "strangle", word
    return None


def _vertical_detail(first: Leg, second: Leg) -> str:
    """Call or put, debit or credit, from which strike is bought (no prices needed)."""
    lower, upper = sorted((first, second), key=lambda leg: leg.strike or 0.0)
    if lower.right == "C":
        return "call debit" if lower.quantity > 0 else "call credit"
    return "put debit" if upper.quantity > 0 else "put credit"


def _three(legs: list[Leg], ratios: list[int]) -> Shape | None:
    if len({leg.right for leg in legs}) != 1 or len({leg.expiry for leg in legs}) != 1:
        return None
    if ratios not in ([1, -2, 1], [-1, 2, -1]):
        return None
    low, mid, high = (leg.strike or 0.0 for leg in legs)
    detail = "long" if ratios[0] > 0 else "short"
    if not math.isclose(mid - low, high - mid):
        detail += ", broken wing"
    return "butterfly", detail


def _four(legs: list[Leg], ratios: list[int]) -> Shape | None:
    if len({leg.expiry for leg in legs}) != 1 or len(set(map(abs, ratios))) != 1:
        return None
    calls = sorted((leg for leg in legs if leg.right == "C"), key=lambda leg: leg.strike or 0.0)
    puts = sorted((leg for leg in legs if leg.right == "P"), key=lambda leg: leg.strike or 0.0)
    if len(calls) != 2 or len(puts) != 2:
        return None
    outer_put, inner_put = puts
    inner_call, outer_call = calls
    inner_sign = inner_put.quantity > 0
    if (
        (outer_put.quantity > 0) == inner_sign
        or (inner_call.quantity > 0) != inner_sign
        or (outer_call.quantity > 0) == inner_sign
    ):
        return None
    assert inner_put.strike is not None and inner_call.strike is not None
    assert outer_put.strike is not None and outer_call.strike is not None
    if inner_put.strike > inner_call.strike:
        return None
    strategy_type = "iron_butterfly" if inner_put.strike == inner_call.strike else "iron_condor"
    notes = ["reverse"] if inner_sign else []
    put_wing = inner_put.strike - outer_put.strike
    call_wing = outer_call.strike - inner_call.strike
    if not math.isclose(put_wing, call_wing):
        notes.append("broken wing")
    return strategy_type, ", ".join(notes) or None


_SHAPES: dict[int, Callable[[list[Leg], list[int]], Shape | None]] = {
    1: _one,
    2: _two,
    3: _three,
    4: _four,
}


def _with_shares(stock: Leg, options: list[Leg]) -> Classification:
    if stock.quantity <= 0:
        return Classification("custom", 1.0)
    calls = [leg for leg in options if leg.right == "C"]
    puts = [leg for leg in options if leg.right == "P"]
    if len(calls) != 1 or calls[0].quantity >= 0 or len(puts) > 1:
        return Classification("custom", 1.0)
    call = calls[0]
    units = -call.quantity
    if not math.isclose(stock.quantity, units * call.multiplier):
        return Classification("custom", 1.0)
    if not puts:
        return Classification("covered_call", units)
    put = puts[0]
    if put.quantity != units or put.expiry != call.expiry or put.multiplier != call.multiplier:
        return Classification("custom", 1.0)
    if put.strike is None or call.strike is None or put.strike > call.strike:
        return Classification("custom", 1.0)
    return Classification("collar", units)
