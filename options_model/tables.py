"""The options data model's tables: strategy positions, legs, Greeks, transactions.

Each is a Delta table under the lake URI, created on first use with an explicit
Arrow schema, UTC timestamps (``timestamp[us, tz=UTC]``, so the tables stay at
the basic protocol), and partitioned by ``symbol`` (the underlying). Rows are
append-only observations; a table's "latest state" is the newest row per key.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from options_model.classify import STRATEGY_TYPES
from shared.table import UTC_MICROS

POSITION_STATUSES = frozenset({"open", "closed", "rolling"})
LEG_STATUSES = frozenset({"open", "closed"})
SIDES = frozenset({"BUY", "SELL"})
EFFECTS = frozenset({"OPEN", "CLOSE", "CLOSE_OPEN"})  # CLOSE_OPEN: the fill crossed zero
RIGHTS = frozenset({"C", "P"})


@dataclass(frozen=True)
class TableSpec:
    """One table: its name under the lake, schema, key and the allowed values of codes."""

    name: str
    schema: pa.Schema
    key: tuple[str, ...]  # the entity a row is an observation of
    codes: dict[str, frozenset[str]]  # column -> allowed values
    unique: str | None = None  # a column whose values may appear once (dedup on append)


def _f(name: str, kind: pa.DataType, required: bool = False) -> pa.Field:
    return pa.field(name, kind, nullable=not required)


GREEK_FIELDS = [
    _f("delta", pa.float64()),
    _f("gamma", pa.float64()),
    _f("theta", pa.float64()),
    _f("vega", pa.float64()),
]

POSITIONS = TableSpec(
    name="positions",
    schema=pa.schema(
        [
            _f("strategy_id", pa.string(), True),
            _f("account", pa.string(), True),
            _f("strategy_type", pa.string(), True),
            _f("symbol", pa.string(), True),
            _f("status", pa.string(), True),
            _f("entry_date", pa.date32()),
            _f("exit_date", pa.date32()),
            _f("entry_price", pa.float64()),
            _f("exit_price", pa.float64()),
            _f("quantity", pa.float64(), True),
            *GREEK_FIELDS,
            _f("unrealized_pnl", pa.float64()),
            _f("realized_pnl", pa.float64()),
            _f("timestamp", UTC_MICROS, True),
            # how the book grouped it, and what it knows of it (options_model/book.py)
            _f("detail", pa.string()),
            _f("origin", pa.string()),
            _f("name", pa.string()),
            _f("entry_time", UTC_MICROS),
            _f("exit_time", UTC_MICROS),
            _f("open_legs", pa.int64()),
            _f("rolls", pa.int64()),
            _f("commissions", pa.float64()),
            _f("missing_commissions", pa.int64()),
            _f("legs_without_greeks", pa.int64()),
        ]
    ),
    key=("strategy_id",),
    codes={"strategy_type": STRATEGY_TYPES, "status": POSITION_STATUSES},
)

LEGS = TableSpec(
    name="legs",
    schema=pa.schema(
        [
            _f("leg_id", pa.string(), True),
            _f("strategy_id", pa.string(), True),
            _f("account", pa.string(), True),
            _f("symbol", pa.string(), True),
            _f("strike", pa.float64()),  # null for shares
            _f("expiry", pa.date32()),
            _f("right", pa.string()),
            _f("quantity", pa.float64(), True),
            _f("open_price", pa.float64()),
            _f("current_price", pa.float64()),
            *GREEK_FIELDS,  # position-weighted: per contract x quantity x multiplier
            _f("status", pa.string(), True),
            _f("timestamp", UTC_MICROS, True),
            _f("conid", pa.int64()),
            _f("sec_type", pa.string()),
            _f("multiplier", pa.float64()),
            _f("realized_pnl", pa.float64()),
            _f("from_fills", pa.bool_()),
            _f("opened_at", UTC_MICROS),
            _f("closed_at", UTC_MICROS),
        ]
    ),
    key=("leg_id",),
    codes={"right": RIGHTS, "status": LEG_STATUSES},
)

GREEKS = TableSpec(
    name="greeks",
    schema=pa.schema(
        [
            _f("strategy_id", pa.string(), True),
            _f("account", pa.string(), True),
            _f("symbol", pa.string(), True),
            *GREEK_FIELDS,
            _f("portfolio_delta", pa.float64()),
            _f("portfolio_gamma", pa.float64()),
            _f("timestamp", UTC_MICROS, True),
            # "interval": every open strategy on the POSLAKE_BOOK_SNAPSHOT_S grid;
            # "change": one strategy at the time of the fill or position that changed it
            _f("trigger", pa.string()),
        ]
    ),
    key=("strategy_id",),
    codes={"trigger": frozenset({"interval", "change"})},
)

TRANSACTIONS = TableSpec(
    name="transactions",
    schema=pa.schema(
        [
            _f("transaction_id", pa.string(), True),
            _f("strategy_id", pa.string(), True),
            _f("account", pa.string(), True),
            _f("leg_id", pa.string()),
            _f("symbol", pa.string(), True),
            _f("side", pa.string(), True),
            _f("effect", pa.string()),
            _f("quantity", pa.float64(), True),
            _f("price", pa.float64(), True),
            _f("commission", pa.float64()),
            _f("timestamp", UTC_MICROS, True),
            _f("exec_base", pa.string()),
            _f("conid", pa.int64()),
            _f("closed", pa.float64()),
            _f("opened", pa.float64()),
            _f("realized_pnl", pa.float64()),  # gross, on the closing part
            _f("order_ref", pa.string()),
            _f("perm_id", pa.int64()),
        ]
    ),
    key=("transaction_id",),
    codes={"side": SIDES, "effect": EFFECTS},
    unique="transaction_id",
)

OVERRIDES = TableSpec(  # a trader's corrections to the grouping (options_model/overrides.py)
    name="book_overrides",
    schema=pa.schema(
        [
            _f("override_id", pa.string(), True),
            _f("account", pa.string(), True),
            _f("symbol", pa.string(), True),
            _f("kind", pa.string(), True),
            _f("subject", pa.string(), True),
            _f("value", pa.string()),
            _f("timestamp", UTC_MICROS, True),
        ]
    ),
    key=("override_id",),
    codes={"kind": frozenset({"assign", "name"})},
    unique="override_id",
)

ALL_TABLES = {spec.name: spec for spec in (POSITIONS, LEGS, GREEKS, TRANSACTIONS, OVERRIDES)}
