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
ACTIONS = frozenset({"BUY", "SELL", "OPEN", "CLOSE"})
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
            _f("symbol", pa.string(), True),
            _f("strike", pa.float64(), True),
            _f("expiry", pa.date32(), True),
            _f("right", pa.string(), True),
            _f("quantity", pa.float64(), True),
            _f("open_price", pa.float64()),
            _f("current_price", pa.float64()),
            *GREEK_FIELDS,
            _f("status", pa.string(), True),
            _f("timestamp", UTC_MICROS, True),
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
            _f("symbol", pa.string(), True),
            *GREEK_FIELDS,
            _f("portfolio_delta", pa.float64()),
            _f("portfolio_gamma", pa.float64()),
            _f("timestamp", UTC_MICROS, True),
        ]
    ),
    key=("strategy_id",),
    codes={},
)

TRANSACTIONS = TableSpec(
    name="transactions",
    schema=pa.schema(
        [
            _f("transaction_id", pa.string(), True),
            _f("strategy_id", pa.string(), True),
            _f("leg_id", pa.string()),
            _f("symbol", pa.string(), True),
            _f("action", pa.string(), True),
            _f("quantity", pa.float64(), True),
            _f("price", pa.float64(), True),
            _f("commission", pa.float64()),
            _f("timestamp", UTC_MICROS, True),
        ]
    ),
    key=("transaction_id",),
    codes={"action": ACTIONS},
    unique="transaction_id",
)

ALL_TABLES = {spec.name: spec for spec in (POSITIONS, LEGS, GREEKS, TRANSACTIONS)}
