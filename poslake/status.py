"""``poslake status``: the stream, its groups and consumers, dead letters and the table."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl
import redis
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from infra.redaction import scrub
from infra.redis_errors import refusal
from infra.stream_lag import group_lag
from options_model.feed import book_progress
from options_model.tables import POSITIONS as BOOK_POSITIONS
from poslake.command import ExitCode, redis_client
from shared.kinds import EXECUTIONS, POSITIONS, all_tables
from shared.settings import Settings

# status counts a lag up to this many entries (100 XRANGE pages at most).
STATUS_LAG_COUNT = 100_000


@dataclass
class ConsumerStatus:
    name: str
    pending: int
    idle_ms: int
    max_deliveries: int  # highest delivery count among its pending entries (first page)


@dataclass
class GroupStatus:
    name: str
    last_delivered_id: str
    entries_read: int | None  # Redis 7+
    lag: int | None  # from the IDs (infra/stream_lag.py), never Redis's stale figure
    pending: int
    consumers: list[ConsumerStatus] = field(default_factory=list)
    lag_at_least: bool = False  # counted up to STATUS_LAG_COUNT: at least that many


@dataclass
class TableStatus:
    name: str
    uri: str
    version: int
    rows: int
    active_files: int
    last_commit: str


@dataclass
class BookStatus:
    """How far the strategy book (poslake book) is behind ``executions``."""

    reflected_version: int | None  # the executions version of the book's last commit
    executions_version: int | None
    behind_versions: int  # executions commits the book has not reflected yet
    behind_s: float | None  # age of the oldest of them
    lease: str  # who feeds it now
    # strategies by status (open, rolling, closed), and the open ones by type
    strategies: dict[str, int] = field(default_factory=dict)
    open_by_type: dict[str, int] = field(default_factory=dict)


@dataclass
class Status:
    stream: str
    length: int
    first_id: str | None
    last_id: str | None
    groups: list[GroupStatus]
    dead_letters: int
    table: TableStatus | None  # position_updates
    maintenance_lease: str = ""  # who holds it and for how long, or why it cannot be read
    # Every kind's tables (shared/kinds.py), None for those not created yet.
    tables: dict[str, TableStatus | None] = field(default_factory=dict)
    # The replayable range starts at the first entry kept (consumers trim acknowledged
    # entries past POSLAKE_STREAM_RETENTION_S or the memory cap): its age in seconds.
    first_age_s: float | None = None
    book: BookStatus | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stream_status(client: Any, settings: Settings) -> tuple[int, str | None, str | None]:
    if not client.exists(settings.stream):
        return 0, None, None
    info = client.xinfo_stream(settings.stream)
    first, last = info.get("first-entry"), info.get("last-entry")
    return (
        int(info["length"]),
        _text(first[0]) if first else None,
        _text(last[0]) if last else None,
    )


def group_status(client: Any, settings: Settings) -> list[GroupStatus]:
    if not client.exists(settings.stream):
        return []
    groups = []
    for info in client.xinfo_groups(settings.stream):
        name = _text(info["name"])
        group = GroupStatus(
            name=name,
            last_delivered_id=_text(info["last-delivered-id"]),
            entries_read=info.get("entries-read"),
            lag=None,
            pending=int(info["pending"]),
        )
        # Not Redis's lag: nil on 6.2 and after a promotion, stale after an AOF restart.
        lag = group_lag(client, settings.stream, info, STATUS_LAG_COUNT)
        group.lag, group.lag_at_least = lag.entries, lag.at_least
        for consumer in client.xinfo_consumers(settings.stream, name):
            consumer_name = _text(consumer["name"])
            deliveries = 0
            if consumer["pending"]:
                page = client.xpending_range(
                    settings.stream, name, "-", "+", 100, consumername=consumer_name
                )
                deliveries = max(int(p["times_delivered"]) for p in page)
            group.consumers.append(
                ConsumerStatus(
                    consumer_name, int(consumer["pending"]), int(consumer["idle"]), deliveries
                )
            )
        groups.append(group)
    return groups


def lease_status(client: Any, settings: Settings, key: str | None = None) -> str:
    """A lease (the consumers' maintenance lease unless ``key``): its holder and TTL,
    free, or why unreadable."""
    key = key or settings.maintenance_lease_key
    try:
        holder = client.get(key)
        ttl_ms = int(client.pttl(key)) if holder is not None else 0
    except redis.ResponseError as exc:  # e.g. NOPERM: the consumers likely lack it too
        return f"cannot read: {refusal(exc, 'GET', key)}"
    if holder is None:
        return "free"
    return f"held by {_text(holder)}, expires in {max(ttl_ms, 0) / 1000:.0f}s"


def table_status(settings: Settings, name: str = POSITIONS.table) -> TableStatus | None:
    uri = settings.lake_table_uri(name)
    try:
        table = DeltaTable(uri, storage_options=settings.storage_options or None)
    except TableNotFoundError:
        return None
    actions = table.get_add_actions(flatten=True)
    rows = sum(n or 0 for n in actions.column("num_records").to_pylist())
    last = table.history(1)[0]
    when = datetime.fromtimestamp(int(last["timestamp"]) / 1000, UTC).isoformat()
    shown = scrub(uri)  # a lake URI may carry credentials
    return TableStatus(name, shown, table.version(), rows, actions.num_rows, when)


def book_status(settings: Settings, lease: str, noted: Any) -> BookStatus | None:
    """The book's progress: the executions version its last step reflected (noted in
    Redis by ``poslake book``, else its tables' app transaction); None before its first
    commit."""
    reflected, current = book_progress(settings.lake_uri, settings.storage_options or None)
    if reflected is None:
        return None
    with contextlib.suppress(ValueError, IndexError):  # not ours: the tables' figure stands
        reflected = max(reflected, int(_text(noted).split()[0])) if noted else reflected
    behind = max(0, (current or 0) - reflected)
    behind_s = None
    if behind:
        table = DeltaTable(
            settings.lake_table_uri(EXECUTIONS.table),
            storage_options=settings.storage_options or None,
        )
        oldest = min(table.history(min(behind, 1000)), key=lambda c: int(c["version"]))
        behind_s = max(0.0, time.time() - int(oldest["timestamp"]) / 1000)
    strategies: dict[str, int] = {}
    open_by_type: dict[str, int] = {}
    with contextlib.suppress(TableNotFoundError):
        positions = DeltaTable(
            settings.lake_table_uri(BOOK_POSITIONS.name),
            storage_options=settings.storage_options or None,
        )
        frame = pl.scan_delta(positions).select("status", "strategy_type").collect()
        strategies = dict(frame.group_by("status").len().iter_rows())
        live = frame.filter(pl.col("status") != "closed")
        open_by_type = dict(live.group_by("strategy_type").len().sort("strategy_type").iter_rows())
    return BookStatus(reflected, current, behind, behind_s, lease, strategies, open_by_type)


def collect(settings: Settings) -> Status:
    with redis_client(settings) as client:
        length, first, last = stream_status(client, settings)
        groups = group_status(client, settings)
        dead = int(client.xlen(settings.dlq_stream))
        lease = lease_status(client, settings)
        book_lease = lease_status(client, settings, settings.book_lease_key)
        try:
            noted = client.get(settings.book_progress_key)
        except redis.ResponseError:  # no right to read it: the tables' figure is used
            noted = None
    tables = {name: table_status(settings, name) for name in all_tables()}
    table = tables[POSITIONS.table]
    age = entry_age_s(first) if first else None
    book = book_status(settings, book_lease, noted)
    return Status(
        settings.stream, length, first, last, groups, dead, table, lease, tables, age, book
    )


def entry_age_s(entry_id: str) -> float:
    """How long ago an entry ID's time part was (IDs carry milliseconds since the epoch)."""
    return max(0.0, time.time() - int(entry_id.split("-", maxsplit=1)[0]) / 1000)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def book_summary(book: BookStatus) -> str:
    """``3 open (iron_condor 2, vertical_spread 1), 1 rolling, 5 closed``."""
    kinds = ", ".join(f"{kind} {n}" for kind, n in book.open_by_type.items())
    parts = [f"{book.strategies.get('open', 0)} open" + (f" ({kinds})" if kinds else "")]
    parts += [f"{book.strategies[s]} {s}" for s in ("rolling", "closed") if book.strategies.get(s)]
    return ", ".join(parts)


def render(status: Status) -> str:
    lines = [
        f"stream {status.stream}: {status.length} entries, first {status.first_id or '-'}, "
        f"last {status.last_id or '-'}"
    ]
    if status.first_id is not None and status.first_age_s is not None:
        lines.append(
            f"  replayable from {status.first_id} ({_age(status.first_age_s)} ago): older "
            "entries were trimmed once every group had acknowledged them"
        )
    if not status.groups:
        lines.append("  no consumer groups")
    for group in status.groups:
        lag = "?" if group.lag is None else f"{'>=' if group.lag_at_least else ''}{group.lag}"
        lines.append(
            f"  group {group.name}: lag {lag}, entries read {group.entries_read}, "
            f"pending {group.pending}, last delivered {group.last_delivered_id}"
        )
        for consumer in group.consumers:
            lines.append(
                f"    {consumer.name}: pending {consumer.pending}, idle "
                f"{consumer.idle_ms / 1000:.1f}s, max deliveries "
                f"{consumer.max_deliveries}"
            )
    lines.append(f"dead letters ({status.stream}:dlq): {status.dead_letters}")
    if status.maintenance_lease:
        lines.append(f"maintenance lease: {status.maintenance_lease}")
    if status.table is None:
        lines.append("table: not created yet")
    for name, table in status.tables.items():
        if table is None:
            if name != POSITIONS.table:
                lines.append(f"table {name}: not created yet")
            continue
        lines.append(
            f"table {table.uri}: version {table.version}, {table.rows} rows, "
            f"{table.active_files} active files, last commit {table.last_commit}"
        )
    book = status.book
    if book is None:
        lines.append("strategy book: not fed yet (poslake book)")
    else:
        behind = (
            "up to date"
            if not book.behind_versions
            else f"{book.behind_versions} executions commits behind"
            + (f", the oldest {_age(book.behind_s)} old" if book.behind_s is not None else "")
        )
        lines.append(
            f"strategy book: at executions version {book.reflected_version} of "
            f"{book.executions_version}: {behind}; lease {book.lease}"
        )
        lines.append(f"  strategies: {book_summary(book)}")
    return "\n".join(lines)


def run(args: argparse.Namespace, settings: Settings) -> int:
    status = collect(settings)
    print(json.dumps(asdict(status), indent=2) if args.json else render(status))
    return ExitCode.OK
