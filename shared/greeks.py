"""Option Greeks: IB's option computations for one contract at one time.

One ``option_greeks`` entry (README.md, "Wire format: option Greeks") is one
``tickOptionComputation`` IB sent for an option's market-data line, sampled by
the producer: the implied volatility, delta, gamma, vega, theta, the option
price the model used, the PV of dividends and the underlying's price. IB sends
one computation per source tick: bid (10), ask (11), last (12) and model (13),
or their delayed twins (80-83) under delayed market data. ``data_type`` is the
market data type the line was served with (1 live, 2 frozen, 3 delayed,
4 delayed frozen). A value IB did not compute is null (IB's -1/-2 "not
computed" and its unset double are turned into null by the producer).

Greeks are per contract, not per account: two accounts holding one option share
its rows. Appended to ``option_greeks`` with the key (conid, source, timestamp);
``option_greeks_current`` keeps the newest per (conid, source).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec
import pyarrow as pa

from shared.model import (
    ContractId,
    CurrencyCode,
    FiniteFloat,
    Label,
    OptionRight,
    PositiveFloat,
    UtcTimestamp,
    _WireRight,
    check_contract,
    timestamp_micros,
)

GREEKS_LABEL_FIELDS = ("symbol", "sec_type")

SOURCE_OF_TICK: dict[int, str] = {10: "bid", 11: "ask", 12: "last", 13: "model"}
SOURCE_OF_TICK.update({tick + 70: source for tick, source in SOURCE_OF_TICK.items()})
"""IB's option computation tick types and what each is computed from (80-83: delayed)."""

TickType = Literal[10, 11, 12, 13, 80, 81, 82, 83]
MarketDataType = Annotated[int, msgspec.Meta(ge=1, le=4)]
MARKET_DATA_TYPES = {1: "live", 2: "frozen", 3: "delayed", 4: "delayed frozen"}


class OptionGreeks(msgspec.Struct, kw_only=True, frozen=True, gc=False, omit_defaults=True):
    """One option computation of one contract, observed at ``timestamp``."""

    conid: ContractId
    symbol: Label  # the underlying's, as for positions: the partition
    sec_type: Label
    currency: CurrencyCode
    if TYPE_CHECKING:
        right: OptionRight
        multiplier: float = 1.0
    else:  # what the wire may say; check_contract stores C/P and 1.0 for null
        right: _WireRight
        multiplier: PositiveFloat | None = 1.0
    strike: PositiveFloat
    expiry: date
    tick_type: TickType
    data_type: MarketDataType = 1
    timestamp: UtcTimestamp
    implied_vol: FiniteFloat | None = None
    delta: FiniteFloat | None = None
    gamma: FiniteFloat | None = None
    vega: FiniteFloat | None = None
    theta: FiniteFloat | None = None
    opt_price: FiniteFloat | None = None
    pv_dividend: FiniteFloat | None = None
    und_price: FiniteFloat | None = None

    def __post_init__(self) -> None:
        check_contract(self, "option_greeks", self.timestamp)

    @property
    def source(self) -> str:
        return SOURCE_OF_TICK[self.tick_type]


UTC_MICROS = pa.timestamp("us", tz="UTC")
GREEK_COLUMNS = (
    "implied_vol",
    "delta",
    "gamma",
    "vega",
    "theta",
    "opt_price",
    "pv_dividend",
    "und_price",
)
OPTION_GREEKS_SCHEMA = pa.schema(
    [
        pa.field("conid", pa.int64(), nullable=False),
        pa.field("symbol", pa.string(), nullable=False),
        pa.field("sec_type", pa.string(), nullable=False),
        pa.field("currency", pa.string(), nullable=False),
        pa.field("right", pa.string(), nullable=False),
        pa.field("strike", pa.float64(), nullable=False),
        pa.field("expiry", pa.date32(), nullable=False),
        pa.field("multiplier", pa.float64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("tick_type", pa.int32(), nullable=False),
        pa.field("data_type", pa.int32(), nullable=False),
        pa.field("timestamp", UTC_MICROS, nullable=False),
        *(pa.field(name, pa.float64()) for name in GREEK_COLUMNS),
        pa.field("stream_id", pa.string(), nullable=False),
    ]
)


def greeks_to_arrow(rows: Sequence[OptionGreeks], stream_ids: Sequence[bytes]) -> pa.Table:
    """Rows for ``option_greeks``, in order."""
    columns: dict[str, pa.Array] = {
        "conid": pa.array([g.conid for g in rows], pa.int64()),
        "symbol": pa.array([g.symbol for g in rows], pa.string()),
        "sec_type": pa.array([g.sec_type for g in rows], pa.string()),
        "currency": pa.array([g.currency for g in rows], pa.string()),
        "right": pa.array([g.right for g in rows], pa.string()),
        "strike": pa.array([g.strike for g in rows], pa.float64()),
        "expiry": pa.array([g.expiry for g in rows], pa.date32()),
        "multiplier": pa.array([g.multiplier for g in rows], pa.float64()),
        "source": pa.array([SOURCE_OF_TICK[g.tick_type] for g in rows], pa.string()),
        "tick_type": pa.array([g.tick_type for g in rows], pa.int32()),
        "data_type": pa.array([g.data_type for g in rows], pa.int32()),
        "timestamp": pa.array([timestamp_micros(g.timestamp) for g in rows], pa.int64()).cast(
            UTC_MICROS
        ),
    }
    for name in GREEK_COLUMNS:
        columns[name] = pa.array([getattr(g, name) for g in rows], pa.float64())
    columns["stream_id"] = pa.array([i.decode() for i in stream_ids], pa.string())
    return pa.table(columns, schema=OPTION_GREEKS_SCHEMA)
