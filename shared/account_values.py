"""Account values: IB's figures per account (net liquidation, cash, margin, P&L...).

One ``account_value`` entry is one value of one account at one time:
``updateAccountValue`` for the portfolio account, ``accountUpdateMulti`` for the
others, and the account's P&L from ``reqPnL`` under keys of their own
(:data:`PNL_KEYS`: they do not collide with ``UnrealizedPnL``/``RealizedPnL``,
which IB's account updates also send). IB sends values as text; the table keeps
the text and, where it is a finite number, the number too.

Appended to ``account_values`` with the key (account, key, currency, timestamp);
``account_values_current`` keeps the newest per (account, key, currency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import msgspec
import pyarrow as pa

from shared.model import Label, UtcTimestamp, timestamp_micros

ValueKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
# IB's currency of a value: an ISO code, "BASE" (the account's base currency) or ""
# for values that are not money (AccountType, Cushion...).
ValueCurrency = Annotated[str, msgspec.Meta(pattern="^[A-Z]{0,8}$")]
ValueText = Annotated[str, msgspec.Meta(max_length=256)]
ACCOUNT_VALUE_LABEL_FIELDS = ("account", "key", "value")

PNL_KEYS = {"daily": "PnL.Daily", "unrealized": "PnL.Unrealized", "realized": "PnL.Realized"}
"""The keys of the account P&L from reqPnL (in the account's base currency, ``BASE``)."""


class AccountValue(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """One value of one account, as IB sent it, observed at ``timestamp``."""

    account: Label
    key: ValueKey
    currency: ValueCurrency
    value: ValueText
    timestamp: UtcTimestamp


def numeric(text: str) -> float | None:
    """The value as a number, where it is one (IB sends numbers as decimal text)."""
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) and abs(number) < 1e300 else None


UTC_MICROS = pa.timestamp("us", tz="UTC")
ACCOUNT_VALUES_SCHEMA = pa.schema(
    [
        pa.field("account", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("currency", pa.string(), nullable=False),
        pa.field("value", pa.string(), nullable=False),
        pa.field("numeric", pa.float64()),
        pa.field("timestamp", UTC_MICROS, nullable=False),
        pa.field("stream_id", pa.string(), nullable=False),
    ]
)


def account_values_to_arrow(
    values: Sequence[AccountValue], stream_ids: Sequence[bytes]
) -> pa.Table:
    """Rows for ``account_values``, in order."""
    return pa.table(
        {
            "account": pa.array([v.account for v in values], pa.string()),
            "key": pa.array([v.key for v in values], pa.string()),
            "currency": pa.array([v.currency for v in values], pa.string()),
            "value": pa.array([v.value for v in values], pa.string()),
            "numeric": pa.array([numeric(v.value) for v in values], pa.float64()),
            "timestamp": pa.array([timestamp_micros(v.timestamp) for v in values], pa.int64()).cast(
                UTC_MICROS
            ),
            "stream_id": pa.array([i.decode() for i in stream_ids], pa.string()),
        },
        schema=ACCOUNT_VALUES_SCHEMA,
    )
