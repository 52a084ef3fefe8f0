"""The strategy book's rows: strategies, legs and transactions from the fold's ledgers.

A pure function of the ledgers (options_model/grouping.py) and the marks (the
newest market prices in ``positions_current`` and Greeks in
``option_greeks_current``), so a rebuild over the same tables gives the same rows.

- ``transactions``: one row per fill and strategy it went to (a fill that closes
  two strategies' legs and opens a third is three rows: ``<exec>``, ``<exec>/2``,
  ...), with side, effect, the part's commission and the gross P&L it realized.
- ``legs``: one row per contract a strategy ever held: signed quantity, open price
  (the opening fills' average, or IB's average cost for a position held before any
  fill), current price, position-weighted Greeks (per contract x quantity x
  multiplier, as ``query exposures`` sums them; shares count delta 1).
- ``positions``: one row per strategy: type and detail, status, units, entry and
  exit, Greeks summed over its open legs, unrealized P&L (open legs at their
  current prices, multiplier applied; null while a leg has no price) and realized
  P&L (its legs' realized P&L less every commission).

Each row's ``timestamp`` is the time of the newest fill or holding that made it
what it is: a function of the data, not of when the book ran.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from options_model.ledger import LegLedger, StrategyLedger
from shared.model import DERIVATIVE_SEC_TYPES

Row = dict[str, Any]
GREEK_NAMES = ("delta", "gamma", "theta", "vega")


@dataclass(frozen=True)
class Marks:
    """What prices the book: per conid, the newest market price and Greeks per contract."""

    prices: Mapping[int, float] = field(default_factory=dict)
    greeks: Mapping[int, Mapping[str, float | None]] = field(default_factory=dict)


@dataclass
class BookRows:
    positions: list[Row] = field(default_factory=list)
    legs: list[Row] = field(default_factory=list)
    transactions: list[Row] = field(default_factory=list)


def book_rows(
    strategies: Iterable[StrategyLedger], marks: Marks, names: Mapping[str, str] | None = None
) -> BookRows:
    rows = BookRows()
    seen: dict[str, int] = {}
    for strategy in strategies:
        rows.transactions += _transactions(strategy, seen)
        legs = [_leg(strategy, leg, marks) for leg in strategy.legs.values()]
        rows.legs += legs
        rows.positions.append(
            _position(strategy, legs, marks, (names or {}).get(strategy.strategy_id))
        )
    return rows


def _transactions(strategy: StrategyLedger, seen: dict[str, int]) -> list[Row]:
    out = []
    for done in strategy.transactions:
        fill = done.fill
        seen[fill.exec_base] = seen.get(fill.exec_base, 0) + 1
        part = seen[fill.exec_base]
        quantity = done.closed + done.opened
        share = quantity / fill.shares if fill.shares else 0.0
        out.append(
            {
                "transaction_id": fill.exec_base if part == 1 else f"{fill.exec_base}/{part}",
                "strategy_id": strategy.strategy_id,
                "account": strategy.account,
                "leg_id": done.leg_id,
                "symbol": strategy.symbol,
                "side": done.side,
                "effect": done.effect,
                "quantity": quantity,
                "price": fill.price,
                "commission": None if fill.commission is None else fill.commission * share,
                "timestamp": fill.time,
                "exec_base": fill.exec_base,
                "conid": fill.contract.conid,
                "closed": done.closed,
                "opened": done.opened,
                "realized_pnl": done.realized,
                "order_ref": fill.order_ref,
                "perm_id": fill.perm_id,
            }
        )
    return out


def _leg_greeks(leg: LegLedger, marks: Marks) -> dict[str, float | None]:
    size = leg.quantity * leg.contract.multiplier
    if leg.contract.sec_type not in DERIVATIVE_SEC_TYPES:
        return {"delta": size, "gamma": 0.0, "theta": 0.0, "vega": 0.0}
    per_contract = marks.greeks.get(leg.contract.conid)
    if per_contract is None:
        return dict.fromkeys(GREEK_NAMES)
    return {
        name: None if (value := per_contract.get(name)) is None else value * size
        for name in GREEK_NAMES
    }


def _leg(strategy: StrategyLedger, leg: LegLedger, marks: Marks) -> Row:
    contract = leg.contract
    times = [t for t in (leg.opened_at, leg.closed_at) if t is not None]
    times += [d.fill.time for d in strategy.transactions if d.leg_id == leg.leg_id]
    greeks = _leg_greeks(leg, marks) if leg.quantity else dict.fromkeys(GREEK_NAMES, 0.0)
    return {
        "leg_id": leg.leg_id,
        "strategy_id": strategy.strategy_id,
        "account": strategy.account,
        "symbol": strategy.symbol,
        "strike": contract.strike,
        "expiry": contract.expiry,
        "right": contract.right,
        "quantity": leg.quantity,
        "open_price": leg.open_price,
        "current_price": marks.prices.get(contract.conid),
        **greeks,
        "status": leg.status,
        "timestamp": max(times),
        "conid": contract.conid,
        "sec_type": contract.sec_type,
        "multiplier": contract.multiplier,
        "realized_pnl": leg.realized,
        "from_fills": leg.from_fills,
        "opened_at": leg.opened_at,
        "closed_at": leg.closed_at,
    }


def _position(strategy: StrategyLedger, legs: list[Row], marks: Marks, name: str | None) -> Row:
    shape = strategy.classification
    open_legs = [row for row in legs if row["quantity"]]
    sums: dict[str, float | None] = {}
    for greek in GREEK_NAMES:
        values = [row[greek] for row in open_legs]
        sums[greek] = None if any(v is None for v in values) else float(sum(values))
    timestamp: datetime = max(row["timestamp"] for row in legs)
    return {
        "strategy_id": strategy.strategy_id,
        "account": strategy.account,
        "strategy_type": shape.strategy_type,
        "symbol": strategy.symbol,
        "status": strategy.status,
        "entry_date": strategy.entry_time.date() if strategy.entry_time else None,
        "exit_date": strategy.exit_time.date() if strategy.exit_time else None,
        "entry_price": strategy.entry_price,
        "exit_price": strategy.exit_price,
        "quantity": shape.quantity,
        **sums,
        "unrealized_pnl": strategy.unrealized_pnl(dict(marks.prices)),
        "realized_pnl": strategy.realized_pnl,
        "timestamp": timestamp,
        "detail": shape.detail,
        "origin": strategy.origin,
        "name": name,
        "entry_time": strategy.entry_time,
        "exit_time": strategy.exit_time,
        "open_legs": len(open_legs),
        "rolls": strategy.rolls,
        "commissions": strategy.commissions,
        "missing_commissions": strategy.missing_commissions,
        "legs_without_greeks": sum(1 for row in open_legs if row["delta"] is None),
    }
