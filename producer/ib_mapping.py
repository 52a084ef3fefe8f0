"""IB's view of a position -> the shared :class:`~shared.model.PositionUpdate`.

IB timestamps nothing, so each update is stamped with its UTC receive time by
an :class:`UpdateClock` that never repeats or goes back within one producer,
so keys ``(account, conid, timestamp)`` never collide.

IB's contract fields map as: ``symbol`` (for options IB's symbol is already the
underlying's), ``secType``, ``right`` (C/CALL, P/PUT; anything else is none),
``strike``, ``lastTradeDateOrContractMonth`` (YYYYMMDD, an optional time after
it is ignored), ``multiplier`` (a string; empty means 1), ``currency``.
IB's "unset" double and non-finite numbers become ``None``.
"""

from __future__ import annotations

import functools
import math
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import msgspec
from ib_async.util import UNSET_DOUBLE

from shared.model import DERIVATIVE_SEC_TYPES, PositionUpdate

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RIGHTS = {"C": "C", "CALL": "C", "P": "P", "PUT": "P"}


class MappingError(ValueError):
    """IB sent a contract or value the shared model cannot hold (logged, counted, skipped)."""


class UpdateClock:
    """UTC receive time in microseconds, strictly increasing for this producer."""

    def __init__(self, floor_us: int = 0) -> None:
        self._last_us = floor_us

    def raise_floor(self, floor_us: int) -> None:
        """Never stamp at or below ``floor_us`` (e.g. the stream's last explicit ID)."""
        self._last_us = max(self._last_us, floor_us)

    def stamp_us(self) -> int:
        now_us = time.time_ns() // 1000
        stamp = now_us if now_us > self._last_us else self._last_us + 1
        self._last_us = stamp
        return stamp

    @staticmethod
    def as_datetime(stamp_us: int) -> datetime:
        return _EPOCH + timedelta(microseconds=stamp_us)


class ContractInfo(msgspec.Struct, frozen=True, gc=False):
    """The contract fields of an update, mapped once per contract and cached."""

    conid: int
    symbol: str
    sec_type: str
    currency: str
    right: str | None
    strike: float | None
    expiry: date | None
    multiplier: float
    # Where IB lists it (a position's exchange, a portfolio item's primary exchange):
    # futures options are quoted only there, not on SMART. Often '' for options.
    exchange: str = ""


@functools.lru_cache(maxsize=4096)
def parse_expiry(text: str) -> date | None:
    text = text.strip()
    if not text:
        return None
    digits = text[:8]
    if len(digits) != 8 or not digits.isdigit():
        raise MappingError(f"expiry {text!r} is not YYYYMMDD")
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        raise MappingError(f"expiry {text!r} is not a date") from None


def number(value: str | float | None) -> float | None:
    """A money/price field: IB's unset double, '' and non-finite numbers become None."""
    if value is None or value == "":
        return None
    result = float(value)
    if result == UNSET_DOUBLE or not math.isfinite(result):
        return None
    return result


def map_contract(
    conid: int | str,
    symbol: str,
    sec_type: str,
    expiry: str,
    strike: str | float,
    right: str,
    multiplier: str,
    currency: str,
    exchange: str = "",
) -> ContractInfo:
    """Map IB's contract fields; raises :class:`MappingError` for what cannot be kept."""
    try:
        conid_value = int(conid)
        strike_value = float(strike or 0.0)
        multiplier_value = float(multiplier) if multiplier else 1.0
    except ValueError as exc:
        raise MappingError(f"contract {conid}: {exc}") from None
    if conid_value <= 0:
        raise MappingError(f"contract id {conid} is not positive")
    if not symbol:
        raise MappingError(f"contract {conid} has no symbol")
    derivative = sec_type in DERIVATIVE_SEC_TYPES
    mapped_right = _RIGHTS.get(right.upper()) if right else None
    mapped_expiry = parse_expiry(expiry)
    if derivative and (mapped_right is None or strike_value <= 0 or mapped_expiry is None):
        raise MappingError(
            f"{sec_type} contract {conid} lacks right/strike/expiry "
            f"(right={right!r}, strike={strike!r}, expiry={expiry!r})"
        )
    if not (math.isfinite(multiplier_value) and multiplier_value > 0):
        multiplier_value = 1.0
    return ContractInfo(
        conid=conid_value,
        symbol=symbol,
        sec_type=sec_type or "STK",
        currency=currency or "USD",
        right=mapped_right if derivative else None,
        strike=strike_value if derivative else None,
        expiry=mapped_expiry if derivative else None,
        multiplier=multiplier_value,
        exchange=exchange or "",
    )


def map_ib_contract(contract: Any) -> ContractInfo:
    """The same mapping for an ib_async ``Contract`` object."""
    return map_contract(
        contract.conId,
        contract.symbol,
        contract.secType,
        contract.lastTradeDateOrContractMonth,
        contract.strike,
        contract.right,
        contract.multiplier,
        contract.currency,
        contract.exchange or contract.primaryExchange or "",
    )


def build_update(
    account: str,
    contract: ContractInfo,
    position: float,
    timestamp: datetime,
    market_price: float | None = None,
    market_value: float | None = None,
    average_cost: float | None = None,
    unrealized_pnl: float | None = None,
    realized_pnl: float | None = None,
) -> PositionUpdate:
    if position - position != 0.0:  # inf or nan; cheaper than math.isfinite in the hot path
        raise MappingError(f"position {position!r} of {account}/{contract.conid} is not finite")
    if not account:
        raise MappingError(f"update of contract {contract.conid} has no account")
    return PositionUpdate(
        account=account,
        conid=contract.conid,
        symbol=contract.symbol,
        sec_type=contract.sec_type,
        currency=contract.currency,
        position=position,
        timestamp=timestamp,
        right=contract.right,  # type: ignore[arg-type]
        strike=contract.strike,
        expiry=contract.expiry,
        multiplier=contract.multiplier,
        market_price=market_price,
        market_value=market_value,
        average_cost=average_cost,
        unrealized_pnl=unrealized_pnl,
        realized_pnl=realized_pnl,
    )


def price_from_value(value: float | None, position: float, multiplier: float) -> float | None:
    """Market price implied by a position's market value (PnL-single gives only the value)."""
    if value is None or position == 0:
        return None
    return value / (position * multiplier)
