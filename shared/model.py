"""The update both sides agree on: one observation of one position at one time.

A :class:`PositionUpdate` is keyed by ``(account, conid, timestamp)``: the same
contract is observed many times (so the key holds the timestamp) and can be held
in several accounts (so the key holds the account).
"""

from __future__ import annotations

import sys
from datetime import UTC, date, datetime
from typing import Annotated, Literal

import msgspec

# Bounds reject NaN and +-inf at decode time, in C, without a Python check per field.
FiniteFloat = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0.0, le=sys.float_info.max)]
NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
CurrencyCode = Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")]
ContractId = Annotated[int, msgspec.Meta(gt=0, le=2**63 - 1)]
UtcTimestamp = Annotated[datetime, msgspec.Meta(tz=True)]

OptionRight = Literal["C", "P"]
DERIVATIVE_SEC_TYPES = frozenset({"OPT", "FOP", "WAR"})

UpdateKey = tuple[str, int, int]
"""``(account, conid, timestamp in microseconds since the Unix epoch, UTC)``."""


class PositionUpdate(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """One position/portfolio observation for one contract in one account.

    ``symbol`` is the underlying's symbol, so an option lands in the partition of
    the stock it is written on. Money fields are in ``currency``; ``market_value``
    and the P&L fields are totals for the position (price x quantity x multiplier).
    Market fields are ``None`` when the source did not know them.
    """

    account: NonEmptyStr
    conid: ContractId
    symbol: NonEmptyStr
    sec_type: NonEmptyStr
    currency: CurrencyCode
    position: FiniteFloat
    timestamp: UtcTimestamp
    right: OptionRight | None = None
    strike: PositiveFloat | None = None
    expiry: date | None = None
    multiplier: PositiveFloat = 1.0
    market_price: FiniteFloat | None = None
    market_value: FiniteFloat | None = None
    average_cost: FiniteFloat | None = None
    unrealized_pnl: FiniteFloat | None = None
    realized_pnl: FiniteFloat | None = None

    def __post_init__(self) -> None:
        # msgspec turns a ValueError here into a ValidationError naming the struct.
        if self.sec_type in DERIVATIVE_SEC_TYPES and (
            self.right is None or self.strike is None or self.expiry is None
        ):
            raise ValueError(f"{self.sec_type} update needs right, strike and expiry")

    @property
    def key(self) -> UpdateKey:
        """The deduplication key, with the timestamp in UTC microseconds."""
        return (self.account, self.conid, timestamp_micros(self.timestamp))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch for an aware datetime."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
