"""The book's inputs, read from the pipeline's tables: fills and positions held.

A :class:`Fill` is one row of ``executions`` after corrections (the consumer keeps
the newest revision's details and its commission, shared/executions.py); a
:class:`Holding` is what an account held of a contract before every fill the lake
knows of it: its position now (``positions_current``) less the sum of those fills,
non-zero for positions opened before the pipeline ran. It needs no comparison of
fill and position times (IB's execution times have whole seconds, a correction
may move one), so a fill is never counted twice. Both are plain values, so the
book (options_model/book.py) is a pure function of them and a rebuild gives the
same rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from options_model.classify import Leg

SIGNED_SIDE = {"BOT": 1.0, "SLD": -1.0}
# What a fill needs to be booked: a row lacking any is left out (its details have not
# landed yet, or another producer sent less than the wire format asks).
_NEEDED = ("exec_base", "account", "symbol", "conid", "sec_type", "shares", "price", "time")


@dataclass(frozen=True)
class Contract:
    """What a leg is: the same for every fill and position of one conid."""

    conid: int
    sec_type: str
    right: str | None = None
    strike: float | None = None
    expiry: date | None = None
    multiplier: float = 1.0

    def leg(self, quantity: float) -> Leg:
        return Leg(quantity, self.sec_type, self.right, self.strike, self.expiry, self.multiplier)


@dataclass(frozen=True)
class Fill:
    """One execution: side and size, price, the order it belongs to, its commission."""

    exec_base: str  # the execution ID without its correction suffix: the key
    account: str
    symbol: str
    contract: Contract
    side: str  # "BOT" or "SLD", as IB says
    shares: float  # unsigned
    price: float
    time: datetime
    order_id: int | None = None
    perm_id: int | None = None
    order_ref: str | None = None
    commission: float | None = None  # None until IB's report lands
    group: str | None = (
        None  # a trader's label (options_model/overrides.py): the strongest evidence
    )

    @property
    def signed(self) -> float:
        return SIGNED_SIDE[self.side] * self.shares

    @property
    def sort_key(self) -> tuple[datetime, str]:
        return (self.time, self.exec_base)


@dataclass(frozen=True)
class Holding:
    """What an account held of a contract before the fills the lake knows of it."""

    account: str
    symbol: str
    contract: Contract
    position: float  # signed, before every known fill
    average_cost: float | None  # IB's: the multiplier included for options
    market_price: float | None
    first_seen: datetime  # the first time the lake recorded it held
    group: str | None = None  # a trader's label for what is held without a known fill

    @property
    def open_price(self) -> float | None:
        """IB's average cost as a price per share or contract unit."""
        if self.average_cost is None:
            return None
        return self.average_cost / (self.contract.multiplier or 1.0)


def _contract(row: Mapping[str, Any]) -> Contract:
    return Contract(
        conid=int(row["conid"]),
        sec_type=str(row["sec_type"]),
        right=row.get("right"),
        strike=row.get("strike"),
        expiry=row.get("expiry"),
        multiplier=float(row.get("multiplier") or 1.0),
    )


def fills_from_rows(rows: Iterable[Mapping[str, Any]]) -> list[Fill]:
    """Fills from ``executions`` rows; rows without details yet (a commission that
    came first) are left out until their details land."""
    fills = [
        Fill(
            exec_base=str(row["exec_base"]),
            account=str(row["account"]),
            symbol=str(row["symbol"]),
            contract=_contract(row),
            side=str(row["side"]),
            shares=float(row["shares"]),
            price=float(row["price"]),
            time=row["time"],
            order_id=row.get("order_id"),
            perm_id=row.get("perm_id"),
            order_ref=row.get("order_ref") or None,
            commission=row.get("commission"),
        )
        for row in rows
        if row.get("side") in SIGNED_SIDE and all(row.get(c) is not None for c in _NEEDED)
    ]
    return sorted(fills, key=lambda fill: fill.sort_key)


def held_before(row: Mapping[str, Any], position: float) -> Holding:
    """A contract held before the fills the lake knows (``position``: what they do not
    explain), described by its first ``position_updates`` row (its first sight, and
    IB's average cost then)."""
    return Holding(
        account=str(row["account"]),
        symbol=str(row["symbol"]),
        contract=_contract(row),
        position=position,
        average_cost=row.get("average_cost"),
        market_price=row.get("market_price"),
        first_seen=row["timestamp"],
    )
