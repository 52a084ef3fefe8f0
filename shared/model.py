"""The update both sides agree on: one observation of one position at one time.

A :class:`PositionUpdate` is keyed by ``(account, conid, timestamp)``: the same
contract is observed many times (so the key holds the timestamp) and can be held
in several accounts (so the key holds the account).
"""

from __future__ import annotations

import sys
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec.structs import force_setattr

# Bounds reject NaN and +-inf at decode time, in C, without a Python check per field.
FiniteFloat = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0.0, le=sys.float_info.max)]
NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
# Text that may become part of a path, a log line or a CSV cell. It holds no control
# character (U+0000-U+001F, U+007F): shared/wire.py checks that outside the decoder,
# only for payloads with an escape or a DEL byte (a msgspec pattern here would cost
# every entry ~1.3 us).
Label = NonEmptyStr
LABEL_FIELDS = ("account", "symbol", "sec_type")
CurrencyCode = Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")]
ContractId = Annotated[int, msgspec.Meta(gt=0, le=2**63 - 1)]
UtcTimestamp = Annotated[datetime, msgspec.Meta(tz=True)]

OptionRight = Literal["C", "P"]
# Accepted on the wire and stored as C/P, like IB's own spelling (producer/ib_mapping.py).
_WireRight = Literal["C", "P", "CALL", "PUT"]
_RIGHT_OF = {"CALL": "C", "PUT": "P"}
SYMBOL_MAX_BYTES = 64
"""``symbol`` in UTF-8 bytes: its partition folder ``symbol=<percent-encoded>``, every
byte encoded (3 bytes each), stays well under the 255-byte file-name limit (7 + 192)."""
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

    account: Label
    conid: ContractId
    symbol: Label
    sec_type: Label
    currency: CurrencyCode
    position: FiniteFloat
    timestamp: UtcTimestamp
    if TYPE_CHECKING:
        right: OptionRight | None = None
    else:  # what the wire may say; __post_init__ stores C/P
        right: _WireRight | None = None
    strike: PositiveFloat | None = None
    expiry: date | None = None
    if TYPE_CHECKING:
        multiplier: float = 1.0
    else:  # null on the wire means the default; __post_init__ stores 1.0
        multiplier: PositiveFloat | None = 1.0
    market_price: FiniteFloat | None = None
    market_value: FiniteFloat | None = None
    average_cost: FiniteFloat | None = None
    unrealized_pnl: FiniteFloat | None = None
    realized_pnl: FiniteFloat | None = None

    def __post_init__(self) -> None:
        check_contract(self, "update", self.timestamp)

    @property
    def key(self) -> UpdateKey:
        """The deduplication key, with the timestamp in UTC microseconds."""
        return (self.account, self.conid, timestamp_micros(self.timestamp))


def check_contract(observation: Any, what: str, moment: datetime) -> None:
    """The checks and normal forms every struct naming a contract shares (positions,
    executions), run by msgspec at decode (it turns the ValueError into a
    ValidationError naming the struct): ``symbol`` within its bytes, the time within
    the years 1-9999 in UTC, ``right`` as C/P, a null ``multiplier`` as 1, and an
    option's right, strike and expiry present."""
    symbol = observation.symbol
    if len(symbol) > SYMBOL_MAX_BYTES // 4 and len(symbol.encode()) > SYMBOL_MAX_BYTES:
        raise ValueError(f"symbol is longer than {SYMBOL_MAX_BYTES} bytes in UTF-8")
    if moment.year in (1, 9999) and moment.utcoffset():
        try:
            moment.astimezone(UTC)
        except OverflowError:
            # Arrow would store it, but no reader could turn it back into a datetime.
            raise ValueError("timestamp is outside the years 1-9999 in UTC") from None
    right = observation.right
    if right is not None and len(right) > 1:
        force_setattr(observation, "right", _RIGHT_OF[right])
    if observation.multiplier is None:
        force_setattr(observation, "multiplier", 1.0)
    if observation.sec_type in DERIVATIVE_SEC_TYPES and (
        observation.right is None or observation.strike is None or observation.expiry is None
    ):
        raise ValueError(f"{observation.sec_type} {what} needs right, strike and expiry")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch for an aware datetime."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
