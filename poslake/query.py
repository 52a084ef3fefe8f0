"""``poslake query``: current positions and contract history, now or in the past.

Reads go through polars' lazy Delta scan, so the symbol filter prunes
partitions and the account/contract filters are pushed into the Parquet scan
(statistics), instead of loading the table. Time travel: ``--version N`` or
``--at TIME`` (ISO 8601; a time before the table existed is an error, not
version 0).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from deltalake import DeltaTable

from infra.redaction import scrub
from infra.time_travel import RETENTION_HINT, open_table_at
from options_model.exposures import exposures
from options_model.repository import TableRepository
from options_model.tables import ALL_TABLES
from poslake import book_query
from poslake.command import CommandError, ExitCode
from shared.errors import RepositoryError, TableMissing
from shared.kinds import ACCOUNT_VALUES, EXECUTIONS, POSITIONS, all_tables, kind_of_table
from shared.lake_names import ACCOUNT_VALUES_CURRENT
from shared.settings import Settings

KEY = ["account", "conid"]
SHOWN = [
    "account",
    "conid",
    "symbol",
    "sec_type",
    "right",
    "strike",
    "expiry",
    "position",
    "market_price",
    "market_value",
    "average_cost",
    "unrealized_pnl",
    "realized_pnl",
    "timestamp",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    current = what.add_parser("positions", help="current positions: latest row per contract")
    current.add_argument(
        "--include-closed", action="store_true", help="also positions that closed (position 0)"
    )
    current.add_argument(
        "--as-of",
        help="positions as they stood at this time (ISO 8601, UTC if naive): the newest "
        "row per contract observed by then; needs no time travel, so any time works",
    )
    history = what.add_parser("history", help="every update of one contract")
    history.add_argument("--conid", type=int, required=True)
    model = what.add_parser(
        "table",
        help="a table of the options data model (latest row per key, or --history), or a "
        "pipeline table (history or current) of any entry kind, as stored",
    )
    fills = what.add_parser(
        "executions",
        help="fills with their commissions, one row per execution (corrections applied)",
    )
    fills.add_argument("--since", help="executions at or after this time (ISO 8601, UTC if naive)")
    fills.add_argument("--until", help="executions before this time")
    values = what.add_parser(
        "account-values", help="every account's values and P&L now, or at a time (--as-of)"
    )
    values.add_argument(
        "--as-of",
        help="values as they stood at this time: the newest of each observed by then",
    )
    exposure = what.add_parser(
        "exposures",
        help="per account and underlying: position-weighted dollar delta, gamma, vega and "
        "theta from the positions and their option Greeks, now or at a time (--at)",
    )
    exposure.add_argument(
        "--at",
        "--as-of",
        dest="as_of",
        help="exposures as they stood at this time (ISO 8601, UTC if naive): the newest "
        "positions and Greeks observed by then, from the history tables",
    )
    book = book_query.add_parsers(what)
    model.add_argument("name", choices=[*sorted(ALL_TABLES), *all_tables()])
    model.add_argument("--history", action="store_true", help="every row, not the latest")
    model.add_argument("--strategy", help="only this strategy_id")
    for sub in (current, history, model, fills, values, exposure, *book):
        sub.add_argument("--symbol", action="append", default=[], help="repeatable")
        sub.add_argument("--account", action="append", default=[], help="repeatable")
        if sub is not exposure:  # its --at is the observation time, across tables
            when = sub.add_mutually_exclusive_group()
            when.add_argument("--version", type=int, help="read the table as of this version")
            when.add_argument(
                "--at", help="read the table as of this time (ISO 8601, UTC if naive)"
            )
        sub.add_argument("--format", choices=["table", "csv", "parquet"], default="table")
        sub.add_argument("--output", type=Path, help="write here instead of stdout")


def parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CommandError(
            f"bad time {text!r}: use ISO 8601, e.g. 2026-11-22T14:30:00Z", ExitCode.BAD_INPUT
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def open_table(
    settings: Settings,
    version: int | None = None,
    at: str | None = None,
    uri: str | None = None,
) -> DeltaTable:
    """A table (``position_updates`` unless ``uri``) at its latest version, a given
    version, or as of a time; a version or time it does not have is bad input."""
    uri = uri or settings.table_uri
    try:
        return open_table_at(
            uri,
            settings.storage_options or None,
            version=version,
            at=parse_time(at) if at is not None else None,
            shown=scrub(uri),
        )
    except TableMissing as exc:
        raise CommandError(f"{exc} (set POSLAKE_LAKE_URI?)", ExitCode.NOT_FOUND) from None
    except RepositoryError as exc:
        hint = _AS_OF_HINT if RETENTION_HINT in str(exc) else ""
        raise CommandError(f"{exc}{hint}", ExitCode.BAD_INPUT) from None


_AS_OF_HINT = "; for positions at that time use `query positions --as-of`"


def _filtered(table: DeltaTable, symbols: list[str], accounts: list[str]) -> pl.LazyFrame:
    frame = pl.scan_delta(table)
    if symbols and "symbol" not in {f.name for f in table.schema().fields}:
        raise CommandError("this table has no symbol: use --account", ExitCode.BAD_INPUT)
    if symbols:
        frame = frame.filter(pl.col("symbol").is_in(symbols))
    if accounts:
        frame = frame.filter(pl.col("account").is_in(accounts))
    return frame


def current_positions(
    table: DeltaTable,
    *,
    symbols: list[str] | None = None,
    accounts: list[str] | None = None,
    include_closed: bool = False,
    as_of: datetime | None = None,
) -> pl.DataFrame:
    """The latest row per (account, conid) (observed by ``as_of`` if given); closed
    positions left out unless asked."""
    frame = _filtered(table, symbols or [], accounts or [])
    if as_of is not None:
        frame = frame.filter(pl.col("timestamp") <= as_of)
    latest = frame.filter(pl.col("timestamp") == pl.col("timestamp").max().over(KEY))
    if not include_closed:
        latest = latest.filter(pl.col("position") != 0)
    return latest.select(SHOWN).sort(KEY).collect()


def contract_history(
    table: DeltaTable,
    conid: int,
    *,
    symbols: list[str] | None = None,
    accounts: list[str] | None = None,
) -> pl.DataFrame:
    frame = _filtered(table, symbols or [], accounts or []).filter(pl.col("conid") == conid)
    return frame.select(SHOWN).sort(["account", "timestamp"]).collect()


EXECUTION_SHOWN = [
    "time", "account", "symbol", "conid", "sec_type", "right", "strike", "expiry", "side",
    "shares", "price", "commission", "commission_currency", "realized_pnl", "exec_id",
    "order_id", "perm_id", "order_ref", "exchange",
]  # fmt: skip
ACCOUNT_VALUE_SHOWN = ["account", "key", "currency", "value", "numeric", "timestamp"]
ACCOUNT_VALUE_KEY = ["account", "key", "currency"]


def executions(
    table: DeltaTable,
    *,
    symbols: list[str] | None = None,
    accounts: list[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> pl.DataFrame:
    """Executions by time; rows whose details have not arrived yet (a commission that
    came first) are left out."""
    frame = _filtered(table, symbols or [], accounts or []).filter(pl.col("exec_id").is_not_null())
    if since is not None:
        frame = frame.filter(pl.col("time") >= since)
    if until is not None:
        frame = frame.filter(pl.col("time") < until)
    return frame.select(EXECUTION_SHOWN).sort(["time", "exec_id"]).collect()


def account_values(
    settings: Settings,
    *,
    accounts: list[str] | None = None,
    as_of: datetime | None = None,
    version: int | None = None,
    at: str | None = None,
) -> pl.DataFrame:
    """Every account's values: the current table, or the newest of each value in the
    history observed by ``as_of``."""
    name = ACCOUNT_VALUES.table if as_of is not None else ACCOUNT_VALUES_CURRENT
    table = open_table(settings, version, at, uri=settings.lake_table_uri(name))
    frame = pl.scan_delta(table)
    if accounts:
        frame = frame.filter(pl.col("account").is_in(accounts))
    if as_of is not None:
        frame = frame.filter(pl.col("timestamp") <= as_of)
        newest = pl.col("timestamp").max().over(ACCOUNT_VALUE_KEY)
        frame = frame.filter(pl.col("timestamp") == newest)
    return frame.select(ACCOUNT_VALUE_SHOWN).sort(ACCOUNT_VALUE_KEY).collect()


def query_exposures(args: argparse.Namespace, settings: Settings) -> pl.DataFrame:
    at = parse_time(args.as_of) if args.as_of is not None else None
    try:
        return exposures(
            settings.lake_uri,
            settings.storage_options or None,
            at=at,
            accounts=args.account,
            symbols=args.symbol,
        )
    except TableMissing:
        raise CommandError(
            f"no positions yet under {scrub(settings.lake_uri)} (set POSLAKE_LAKE_URI?)",
            ExitCode.NOT_FOUND,
        ) from None


def check_output(output: Path | None) -> None:
    """Fail before the query, not after it, when ``--output`` cannot be written."""
    if output is None:
        return
    if output.is_dir():
        raise CommandError(f"--output {output} is a folder, not a file", ExitCode.BAD_INPUT)
    if not output.parent.is_dir():
        raise CommandError(
            f"--output {output}: the folder {output.parent} does not exist", ExitCode.BAD_INPUT
        )


def write(frame: pl.DataFrame, fmt: str, output: Path | None) -> None:
    target = f"--output {output}" if output is not None else "stdout"
    try:
        _write(frame, fmt, output)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        raise CommandError(
            f"cannot write {target}: {exc.strerror or exc}", ExitCode.BAD_INPUT
        ) from None
    except OSError as exc:  # a full disk, a closed pipe
        raise CommandError(
            f"writing {target} failed: {exc.strerror or exc}", ExitCode.FAILED
        ) from None


def _write(frame: pl.DataFrame, fmt: str, output: Path | None) -> None:
    if fmt == "parquet":
        if output is None:
            raise CommandError("--format parquet needs --output FILE", ExitCode.BAD_INPUT)
        frame.write_parquet(output)
    elif fmt == "csv":
        if output is None:
            sys.stdout.write(frame.write_csv())
        else:
            frame.write_csv(output)
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200):
            text = str(frame)
        if output is None:
            print(text)
        else:
            output.write_text(text + "\n")


def query_model_table(args: argparse.Namespace, settings: Settings) -> pl.DataFrame:
    """The options data model's tables through their repositories; the pipeline's tables
    (every kind's, shared/kinds.py) as stored, sorted by their key."""
    kind = kind_of_table(args.name)
    if kind is not None:
        uri = settings.lake_table_uri(args.name)
        table = open_table(settings, args.version, args.at, uri=uri)
        frame = _filtered(table, args.symbol, args.account)
        if kind is POSITIONS:
            return frame.select(SHOWN).sort([*KEY, "timestamp"]).collect()
        return frame.drop("stream_id").sort(list(kind.key_columns)).collect()
    repository = TableRepository(
        settings.lake_uri, ALL_TABLES[args.name], settings.storage_options or None
    )
    filters = {"strategy_id": args.strategy} if args.strategy else {}
    symbol = args.symbol[0] if len(args.symbol) == 1 else None
    if len(args.symbol) > 1:
        raise CommandError("table queries take one --symbol", ExitCode.BAD_INPUT)
    try:
        if args.history:
            return repository.history(symbol=symbol, version=args.version, **filters)
        if args.version is not None:
            return repository.at_version(args.version, symbol=symbol, **filters)
        if args.at is not None:
            return repository.at_time(parse_time(args.at), symbol=symbol, **filters)
        return repository.latest(symbol=symbol, **filters)
    except RepositoryError as exc:
        code = ExitCode.NOT_FOUND if "does not exist yet" in str(exc) else ExitCode.BAD_INPUT
        raise CommandError(str(exc), code) from None


def run(args: argparse.Namespace, settings: Settings) -> int:
    check_output(args.output)
    if args.format == "parquet" and args.output is None:
        raise CommandError("--format parquet needs --output FILE", ExitCode.BAD_INPUT)
    if args.what == "table":
        write(query_model_table(args, settings), args.format, args.output)
        return ExitCode.OK
    if args.what in book_query.BOOK_QUERIES:
        name = book_query.table_of(args.what)
        try:
            table = open_table(settings, args.version, args.at, uri=settings.lake_table_uri(name))
        except CommandError as exc:
            if exc.code != ExitCode.NOT_FOUND:
                raise
            raise CommandError(book_query.NOT_FED.format(table=name), exc.code) from None
        as_of = getattr(args, "as_of", None)
        frame = book_query.book_frame(args, table, parse_time(as_of) if as_of else None)
        write(frame, args.format, args.output)
        return ExitCode.OK
    if args.what == "exposures":
        write(query_exposures(args, settings), args.format, args.output)
        return ExitCode.OK
    if args.what == "account-values":
        if args.symbol:
            raise CommandError("account values have no symbol: use --account", ExitCode.BAD_INPUT)
        as_of = parse_time(args.as_of) if args.as_of is not None else None
        frame = account_values(
            settings, accounts=args.account, as_of=as_of, version=args.version, at=args.at
        )
        write(frame, args.format, args.output)
        return ExitCode.OK
    if args.what == "executions":
        table = open_table(
            settings, args.version, args.at, uri=settings.lake_table_uri(EXECUTIONS.table)
        )
        frame = executions(
            table,
            symbols=args.symbol,
            accounts=args.account,
            since=parse_time(args.since) if args.since else None,
            until=parse_time(args.until) if args.until else None,
        )
        write(frame, args.format, args.output)
        return ExitCode.OK
    table = open_table(settings, args.version, args.at)
    if args.what == "positions":
        frame = current_positions(
            table,
            symbols=args.symbol,
            accounts=args.account,
            include_closed=args.include_closed,
            as_of=parse_time(args.as_of) if args.as_of is not None else None,
        )
    else:
        frame = contract_history(table, args.conid, symbols=args.symbol, accounts=args.account)
        if frame.is_empty():
            raise CommandError(
                f"no updates of contract {args.conid} with these filters", ExitCode.NOT_FOUND
            )
    write(frame, args.format, args.output)
    return ExitCode.OK
