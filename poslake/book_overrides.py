"""``poslake book assign | split | merge | name | unassign | overrides``: a trader's
corrections to the book's grouping, recorded in ``book_overrides``
(options_model/overrides.py) and honoured by every step and rebuild of the book.

Each command checks what it names against the lake (the fill exists, the
strategy holds it, merged strategies share an account and underlying), records
the overrides in one commit, and prints the strategy ID that results; a running
``poslake book`` applies them at its next step (``poslake book --once`` now).
"""

from __future__ import annotations

import argparse
from typing import Any

import polars as pl
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from options_model.grouping import strategy_id
from options_model.overrides import ASSIGN, HELD_PREFIX, NAME, Override, read_overrides, record
from options_model.tables import LEGS, POSITIONS, TRANSACTIONS
from poslake.command import CommandError, ExitCode
from shared import lake_names
from shared.settings import Settings


def add_parsers(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    assign = actions.add_parser(
        "assign", help="give fills or held positions to the strategy of a label"
    )
    assign.add_argument("label", help="the strategy's label: one label, one strategy")
    _subjects(assign)
    split = actions.add_parser("split", help="move some of a strategy's fills to a new strategy")
    split.add_argument("strategy", help="the strategy_id")
    split.add_argument("--exec", dest="execs", action="append", required=True, help="repeatable")
    merge = actions.add_parser("merge", help="make one strategy of several")
    merge.add_argument("strategies", nargs="+", metavar="STRATEGY", help="two strategy_ids or more")
    name = actions.add_parser("name", help="name a strategy ('' removes the name)")
    name.add_argument("strategy")
    name.add_argument("name")
    unassign = actions.add_parser("unassign", help="withdraw assignments: the book groups again")
    _subjects(unassign)
    actions.add_parser("overrides", help="list the overrides in force")


def _subjects(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exec", dest="execs", action="append", default=[], help="repeatable")
    parser.add_argument(
        "--conid", dest="conids", type=int, action="append", default=[],
        help="a position held without a known fill (repeatable)",
    )  # fmt: skip
    parser.add_argument("--account", help="the account, where a conid is held in several")


def run(args: argparse.Namespace, settings: Settings) -> int:
    lake = _Lake(settings)
    if args.action == "overrides":
        given = read_overrides(settings.lake_uri, lake.storage)
        if not given.in_force:
            print("no overrides")
        for (account, kind, subject), value in sorted(given.in_force.items()):
            symbol = given.symbols.get((account, kind, subject), "")
            print(f"{account} {symbol} {kind} {subject} -> {value}")
        return ExitCode.OK
    if args.action == "name":
        strategy = lake.strategy(args.strategy)
        override = Override(strategy["account"], strategy["symbol"], NAME, args.strategy, args.name)
        return _record(lake, settings, [override], None)
    if args.action in ("assign", "unassign"):
        if not args.execs and not args.conids:
            raise CommandError("name at least one --exec or --conid", ExitCode.BAD_INPUT)
        label = args.label if args.action == "assign" else ""
        return _record(lake, settings, lake.subjects(args, label), label or None)
    if args.action == "split":
        strategy = lake.strategy(args.strategy)
        mine = set(lake.rows(TRANSACTIONS.name, args.strategy)["exec_base"].to_list())
        stray = sorted(set(args.execs) - mine)
        if stray:
            raise CommandError(
                f"strategy {args.strategy} has no fill {', '.join(stray)}", ExitCode.NOT_FOUND
            )
        label = f"split-{args.strategy}-{min(args.execs)}"
        overrides = [_assign(strategy, e, label) for e in sorted(set(args.execs))]
        return _record(lake, settings, overrides, label)
    # merge
    if len(set(args.strategies)) < 2:
        raise CommandError("merge needs two strategies or more", ExitCode.BAD_INPUT)
    found = [lake.strategy(sid) for sid in args.strategies]
    places = {(s["account"], s["symbol"]) for s in found}
    if len(places) > 1:
        raise CommandError(
            "a strategy belongs to one account and underlying: these span "
            + ", ".join(f"{a}/{s}" for a, s in sorted(places)),
            ExitCode.BAD_INPUT,
        )
    label = f"merge-{min(args.strategies)}"
    overrides = []
    for strategy in found:
        sid = strategy["strategy_id"]
        for exec_base in sorted(set(lake.rows(TRANSACTIONS.name, sid)["exec_base"].to_list())):
            overrides.append(_assign(strategy, exec_base, label))
        held = lake.rows(LEGS.name, sid).filter(
            ~pl.col("from_fills")
        )  # held before, even if closed
        for conid in sorted(held["conid"].to_list()):
            overrides.append(_assign(strategy, f"{HELD_PREFIX}{conid}", label))
    return _record(lake, settings, overrides, label)


def _assign(strategy: dict[str, Any], subject: str, label: str) -> Override:
    return Override(strategy["account"], strategy["symbol"], ASSIGN, subject, label)


def _record(lake: _Lake, settings: Settings, overrides: list[Override], label: str | None) -> int:
    count = record(settings.lake_uri, overrides, lake.storage)
    print(f"recorded {count} override(s); the book applies them at its next step")
    if label is not None:
        places = sorted({(o.account, o.symbol) for o in overrides})
        for account, symbol in places:
            sid = strategy_id(account, symbol, f"user:{label}")
            print(f"strategy {sid}: {account} {symbol} label {label}")
    return ExitCode.OK


class _Lake:
    """The tables the commands check their arguments against."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.storage = settings.storage_options or None

    def _scan(self, name: str) -> pl.LazyFrame:
        try:
            table = DeltaTable(self.settings.lake_table_uri(name), storage_options=self.storage)
        except TableNotFoundError:
            raise CommandError(
                f"no {name} table yet (run the pipeline and `poslake book` first)",
                ExitCode.NOT_FOUND,
            ) from None
        return pl.scan_delta(table)

    def strategy(self, sid: str) -> dict[str, Any]:
        """The strategy's row in the book, or (made by an override the book has not
        applied yet) its account and underlying."""
        rows = self._scan(POSITIONS.name).filter(pl.col("strategy_id") == sid).collect()
        if not rows.is_empty():
            return rows.row(0, named=True)
        given = read_overrides(self.settings.lake_uri, self.storage)
        for (account, kind, subject), label in given.in_force.items():
            symbol = given.symbols.get((account, kind, subject), "")
            if kind == ASSIGN and strategy_id(account, symbol, f"user:{label}") == sid:
                return {"strategy_id": sid, "account": account, "symbol": symbol}
        raise CommandError(f"no strategy {sid} in the book", ExitCode.NOT_FOUND)

    def rows(self, name: str, sid: str) -> pl.DataFrame:
        return self._scan(name).filter(pl.col("strategy_id") == sid).collect()

    def subjects(self, args: argparse.Namespace, label: str) -> list[Override]:
        out: list[Override] = []
        if args.execs:
            fills = (
                self._scan(lake_names.EXECUTIONS)
                .filter(pl.col("exec_base").is_in(args.execs) & pl.col("side").is_not_null())
                .select("exec_base", "account", "symbol")
                .collect()
            )
            missing = sorted(set(args.execs) - set(fills["exec_base"].to_list()))
            if missing:
                raise CommandError(f"no execution {', '.join(missing)}", ExitCode.NOT_FOUND)
            for row in fills.to_dicts():
                out.append(Override(row["account"], row["symbol"], ASSIGN, row["exec_base"], label))
        for conid in args.conids:
            frame = self._scan(lake_names.POSITIONS_CURRENT).filter(pl.col("conid") == conid)
            if args.account:
                frame = frame.filter(pl.col("account") == args.account)
            held = frame.select("account", "symbol").unique().collect()
            if held.is_empty():
                raise CommandError(f"no position in contract {conid}", ExitCode.NOT_FOUND)
            if held.height > 1:
                raise CommandError(
                    f"contract {conid} is held in several accounts: add --account",
                    ExitCode.BAD_INPUT,
                )
            account, symbol = held.row(0)
            out.append(Override(account, symbol, ASSIGN, f"{HELD_PREFIX}{conid}", label))
        return out
