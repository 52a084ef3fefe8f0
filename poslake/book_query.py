"""``poslake query strategies | legs | transactions``: the strategy book, now or at a
past time.

The book's tables hold one row per strategy, leg and transaction as the book last
computed it (options_model/feed.py); ``--at T`` / ``--version N`` read a table as
it was committed then (Delta time travel), so ``--at`` shows the book as it stood
at that moment, with the marks (prices, Greeks) of that moment.
"""

from __future__ import annotations

import argparse
from datetime import datetime

import polars as pl
from deltalake import DeltaTable

from options_model.tables import (
    GREEKS,
    LEGS,
    POSITION_STATUSES,
    POSITIONS,
    TRANSACTIONS,
    TableSpec,
)
from poslake.command import CommandError, ExitCode

STRATEGY_SHOWN = [
    "strategy_id", "account", "symbol", "strategy_type", "detail", "status", "quantity",
    "entry_time", "entry_price", "exit_time", "exit_price", "realized_pnl", "unrealized_pnl",
    "commissions", "delta", "gamma", "theta", "vega", "open_legs", "rolls", "name", "origin",
]  # fmt: skip
LEG_SHOWN = [
    "leg_id", "strategy_id", "account", "symbol", "sec_type", "right", "strike", "expiry",
    "quantity", "open_price", "current_price", "realized_pnl", "delta", "gamma", "theta",
    "vega", "status", "opened_at", "closed_at", "conid",
]  # fmt: skip
TRANSACTION_SHOWN = [
    "timestamp", "transaction_id", "strategy_id", "leg_id", "account", "symbol", "conid",
    "side", "effect", "quantity", "price", "commission", "realized_pnl", "order_ref", "perm_id",
]  # fmt: skip

GREEKS_SHOWN = [
    "timestamp", "strategy_id", "account", "symbol", "delta", "gamma", "theta", "vega",
    "portfolio_delta", "portfolio_gamma", "trigger",
]  # fmt: skip

BOOK_QUERIES: dict[str, tuple[TableSpec, list[str], list[str]]] = {
    # what -> (table, columns shown, sort)
    "strategies": (POSITIONS, STRATEGY_SHOWN, ["account", "symbol", "entry_time", "strategy_id"]),
    "legs": (LEGS, LEG_SHOWN, ["strategy_id", "expiry", "strike", "right", "leg_id"]),
    "transactions": (TRANSACTIONS, TRANSACTION_SHOWN, ["timestamp", "transaction_id"]),
    "greeks": (GREEKS, GREEKS_SHOWN, ["account", "symbol", "strategy_id", "timestamp"]),
}


def add_parsers(what: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:  # type: ignore[type-arg]
    strategies = what.add_parser(
        "strategies",
        help="the strategy book: type, status, quantity, entry/exit, P&L, Greeks per strategy",
    )
    strategies.add_argument("--status", choices=sorted(POSITION_STATUSES), action="append")
    strategies.add_argument("--strategy", help="only this strategy_id")
    legs = what.add_parser("legs", help="a strategy's legs (every leg with no --strategy)")
    legs.add_argument("--strategy", help="the strategy_id")
    fills = what.add_parser("transactions", help="a strategy's fills, with side and effect")
    fills.add_argument("--strategy", help="the strategy_id")
    greeks = what.add_parser(
        "greeks",
        help="the book's Greeks per strategy as snapshotted at a time (--as-of), with the "
        "account's portfolio delta and gamma; --history for every snapshot",
    )
    greeks.add_argument("--strategy", help="only this strategy_id")
    greeks.add_argument("--as-of", help="the newest snapshot at or before this time")
    greeks.add_argument("--history", action="store_true", help="every snapshot, by time")
    return [strategies, legs, fills, greeks]


def book_frame(
    args: argparse.Namespace, table: DeltaTable, as_of: datetime | None = None
) -> pl.DataFrame:
    """The rows ``args`` ask for from ``table`` (the book's table ``args.what`` reads,
    opened at the version or time asked)."""
    _, shown, order = BOOK_QUERIES[args.what]
    frame = pl.scan_delta(table)
    if args.symbol:
        frame = frame.filter(pl.col("symbol").is_in(args.symbol))
    if args.account:
        frame = frame.filter(pl.col("account").is_in(args.account))
    if args.strategy:
        frame = frame.filter(pl.col("strategy_id") == args.strategy)
    if getattr(args, "status", None):
        frame = frame.filter(pl.col("status").is_in(args.status))
    if args.what == "greeks":
        if as_of is not None:
            frame = frame.filter(pl.col("timestamp") <= as_of)
        if not args.history:  # one row per strategy: its newest ("interval" on a tie)
            frame = frame.sort("timestamp", "trigger").unique(
                "strategy_id", keep="last", maintain_order=True
            )
    result = frame.select(shown).sort(order, nulls_last=True).collect()
    if args.strategy and result.is_empty():
        raise CommandError(
            f"no strategy {args.strategy} in {table_of(args.what)} with these filters",
            ExitCode.NOT_FOUND,
        )
    return result


def table_of(what: str) -> str:
    return BOOK_QUERIES[what][0].name


NOT_FED = (
    "the strategy book has no {table} table yet: run `poslake book` (or `poslake run`) "
    "once the consumers wrote executions or positions"
)
