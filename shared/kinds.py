"""The entry kinds: all the core knows about one kind of observation, declared once.

An :class:`EntryKind` names its model (a msgspec struct), its tag on the wire,
its Delta table (Arrow schema, row builder, partition columns), its dedup key
and its optional "current" table with the merge rule. The consumer's core is
generic over kinds and driven by :data:`KINDS`: decoding (shared/wire.py), the
batch in hand (consumer/batch.py), the dedup index (consumer/dedup.py), the
history commit (consumer/sink.py), the current merge (consumer/current.py),
maintenance, ``status``, ``query`` and the benchmarks iterate it. A new kind is
one declaration here plus its producer side.

One stream carries every kind, each entry tagged by its ``kind`` field (absent:
``position``): see README.md, "Wire format", for why one stream and not one each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from shared import lake_names
from shared.account_values import (
    ACCOUNT_VALUE_LABEL_FIELDS,
    ACCOUNT_VALUES_SCHEMA,
    AccountValue,
    account_values_to_arrow,
)
from shared.executions import (
    COMMISSION_COLUMNS,
    DETAIL_COLUMNS,
    EXECUTION_LABEL_FIELDS,
    EXECUTIONS_SCHEMA,
    ExecutionEntry,
    executions_to_arrow,
)
from shared.greeks import GREEKS_LABEL_FIELDS, OPTION_GREEKS_SCHEMA, OptionGreeks, greeks_to_arrow
from shared.model import LABEL_FIELDS, PositionUpdate
from shared.snapshots import (
    ACCOUNT_SNAPSHOTS_SCHEMA,
    NOT_DOWNLOADED_PREFIX,
    POSITION_SNAPSHOTS_SCHEMA,
    SNAPSHOT_LABEL_FIELDS,
    AccountSnapshot,
    PositionSnapshot,
    account_snapshots_to_arrow,
    position_snapshots_to_arrow,
)
from shared.table import POSITION_UPDATES_SCHEMA, updates_to_arrow

RowBuilder = Callable[[Sequence[Any], Sequence[bytes]], pa.Table]
"""Rows of a kind's table from decoded models and their stream entry IDs, in order."""


@dataclass(frozen=True, slots=True)
class CurrentTable:
    """A table holding the newest row per ``match`` columns of a kind's rows.

    A row is updated only by one whose ``newer_by`` value is larger, and inserted
    when its ``match`` is new: idempotent and order-proof, so replays are no-ops.
    """

    name: str
    match: tuple[str, ...]
    newer_by: str = "timestamp"


@dataclass(frozen=True, slots=True)
class UpsertRule:
    """One row per ``key``, made of two parts that change separately (executions: the
    details and the commission, shared/executions.py).

    A part is replaced only by one with a higher revision. The ``attached`` part is
    kept only while its revision is not below the ``main`` part's: newer main
    columns clear an older attached part. Applied in any order, any number of times,
    the same entries give the same row.
    """

    key: str
    main: tuple[str, ...]  # its first column is the part's ID, the second its revision
    attached: tuple[str, ...]  # likewise

    @property
    def main_id(self) -> str:
        return self.main[0]

    @property
    def main_revision(self) -> str:
        return self.main[1]

    @property
    def attached_id(self) -> str:
        return self.attached[0]

    @property
    def attached_revision(self) -> str:
        return self.attached[1]


@dataclass(frozen=True, slots=True, eq=False)
class SnapshotRule:
    """How a complete snapshot of one account closes what it no longer lists.

    The closed kind's current table holds one row per (account, ``identity``); a row
    of the snapshot's account that is still open (``is_open``), older than the
    snapshot and not listed in it gets a closing observation (``close``) at the
    snapshot's time, appended to the closed kind's history and merged into its
    current table like any other (consumer/snapshots.py).
    """

    closes: EntryKind
    identity: tuple[str, ...]  # the current table's columns one held item names
    held: Callable[[pa.Table], set[tuple[Any, ...]]]  # what the snapshot's rows list
    is_open: Callable[[pa.Table], pa.ChunkedArray | pa.Array]  # mask of open current rows
    close: Callable[[dict[str, Any], datetime], msgspec.Struct]  # a row's closing observation


# eq=False: a kind is a singleton, compared and hashed by identity. It keys dicts on
# the hot path (a lookup per entry), and a generated hash would hash every field,
# the Arrow schema included, each time (it made the drain 2x slower).
@dataclass(frozen=True, slots=True, eq=False)
class EntryKind:
    """One kind of stream entry and the table it lands in.

    A kind lands in one of two ways. Appended (``upsert`` None): its history table
    gets one row per dedup key, a key already there is a duplicate, and its current
    table, if any, is merged after. Upserted: its table holds one row per
    ``upsert.key``, MERGEd in place by the rule (consumer/upsert.py).
    """

    tag: str  # the entry's ``kind`` field
    model: type[msgspec.Struct]
    table: str  # the history table (shared/lake_names.py)
    schema: pa.Schema
    to_rows: RowBuilder
    partition_by: tuple[str, ...]
    label_fields: tuple[str, ...]  # text checked for control characters at decode
    # The dedup key of appended kinds: ``group`` columns (strings or integers) and a
    # UTC timestamp column. One row per key lands; a key already in the table is a
    # duplicate.
    group: tuple[str, ...] = ()
    time_column: str = "timestamp"
    current: CurrentTable | None = None
    upsert: UpsertRule | None = None
    snapshot: SnapshotRule | None = None  # a snapshot kind: what its complete ones close

    @property
    def key_columns(self) -> tuple[str, ...]:
        """What identifies a row: the upsert key, or the dedup key."""
        if self.upsert is not None:
            return (self.upsert.key,)
        return (*self.group, self.time_column)

    @property
    def tables(self) -> tuple[str, ...]:
        """The lake tables this kind writes: history, then current if any."""
        return (self.table,) if self.current is None else (self.table, self.current.name)

    def empty_rows(self) -> pa.Table:
        return self.schema.empty_table()


POSITIONS = EntryKind(
    tag="position",
    model=PositionUpdate,
    table=lake_names.POSITION_UPDATES,
    schema=POSITION_UPDATES_SCHEMA,
    to_rows=updates_to_arrow,
    partition_by=("symbol",),
    group=("account", "conid"),
    time_column="timestamp",
    label_fields=LABEL_FIELDS,
    current=CurrentTable(lake_names.POSITIONS_CURRENT, match=("account", "conid")),
)

EXECUTIONS = EntryKind(
    tag="execution",
    model=ExecutionEntry,
    table=lake_names.EXECUTIONS,
    schema=EXECUTIONS_SCHEMA,
    to_rows=executions_to_arrow,
    partition_by=("symbol",),
    label_fields=EXECUTION_LABEL_FIELDS,
    upsert=UpsertRule(key="exec_base", main=DETAIL_COLUMNS, attached=COMMISSION_COLUMNS),
)

ACCOUNT_VALUES = EntryKind(
    tag="account_value",
    model=AccountValue,
    table=lake_names.ACCOUNT_VALUES,
    schema=ACCOUNT_VALUES_SCHEMA,
    to_rows=account_values_to_arrow,
    partition_by=("account",),
    label_fields=ACCOUNT_VALUE_LABEL_FIELDS,
    group=("account", "key", "currency"),
    time_column="timestamp",
    current=CurrentTable(lake_names.ACCOUNT_VALUES_CURRENT, match=("account", "key", "currency")),
)

OPTION_GREEKS = EntryKind(
    tag="option_greeks",
    model=OptionGreeks,
    table=lake_names.OPTION_GREEKS,
    schema=OPTION_GREEKS_SCHEMA,
    to_rows=greeks_to_arrow,
    partition_by=("symbol",),
    label_fields=GREEKS_LABEL_FIELDS,
    group=("conid", "source"),
    time_column="timestamp",
    current=CurrentTable(lake_names.OPTION_GREEKS_CURRENT, match=("conid", "source")),
)


def _held_conids(rows: pa.Table) -> set[tuple[Any, ...]]:
    return {(conid,) for conid in pc.list_flatten(rows.column("conids")).to_pylist()}


def _held_values(rows: pa.Table) -> set[tuple[Any, ...]]:
    flat = pc.list_flatten(rows.column("keys"))
    return set(zip(pc.struct_field(flat, "key").to_pylist(),
                   pc.struct_field(flat, "currency").to_pylist(), strict=True))  # fmt: skip


def _open_position(rows: pa.Table) -> pa.ChunkedArray:
    return pc.not_equal(rows.column("position"), 0.0)


def _open_value(rows: pa.Table) -> pa.ChunkedArray:
    downloaded = pc.invert(pc.starts_with(rows.column("key"), NOT_DOWNLOADED_PREFIX))
    return pc.and_(pc.not_equal(rows.column("value"), ""), downloaded)


def _closed_position(row: dict[str, Any], at: datetime) -> PositionUpdate:
    """The position at 0 (worth 0, no unrealized P&L) at the snapshot's time."""
    return PositionUpdate(
        account=row["account"], conid=row["conid"], symbol=row["symbol"],
        sec_type=row["sec_type"], currency=row["currency"], position=0.0, timestamp=at,
        right=row["right"], strike=row["strike"], expiry=row["expiry"],
        multiplier=row["multiplier"], market_value=0.0, unrealized_pnl=0.0,
    )  # fmt: skip


def _closed_value(row: dict[str, Any], at: datetime) -> AccountValue:
    """The value gone: empty text (``numeric`` null) at the snapshot's time."""
    return AccountValue(
        account=row["account"], key=row["key"], currency=row["currency"], value="", timestamp=at
    )


POSITION_SNAPSHOTS = EntryKind(
    tag="position_snapshot",
    model=PositionSnapshot,
    table=lake_names.POSITION_SNAPSHOTS,
    schema=POSITION_SNAPSHOTS_SCHEMA,
    to_rows=position_snapshots_to_arrow,
    partition_by=("account",),
    label_fields=SNAPSHOT_LABEL_FIELDS,
    group=("account", "part"),
    time_column="timestamp",
    snapshot=SnapshotRule(
        closes=POSITIONS,
        identity=("conid",),
        held=_held_conids,
        is_open=_open_position,
        close=_closed_position,
    ),
)

ACCOUNT_SNAPSHOTS = EntryKind(
    tag="account_snapshot",
    model=AccountSnapshot,
    table=lake_names.ACCOUNT_SNAPSHOTS,
    schema=ACCOUNT_SNAPSHOTS_SCHEMA,
    to_rows=account_snapshots_to_arrow,
    partition_by=("account",),
    label_fields=SNAPSHOT_LABEL_FIELDS,
    group=("account", "part"),
    time_column="timestamp",
    snapshot=SnapshotRule(
        closes=ACCOUNT_VALUES,
        identity=("key", "currency"),
        held=_held_values,
        is_open=_open_value,
        close=_closed_value,
    ),
)

KINDS: tuple[EntryKind, ...] = (
    POSITIONS,
    EXECUTIONS,
    ACCOUNT_VALUES,
    OPTION_GREEKS,
    POSITION_SNAPSHOTS,
    ACCOUNT_SNAPSHOTS,
)
"""Every kind, in the order the consumer commits them."""

DEFAULT_KIND = POSITIONS
"""The kind of an entry without a ``kind`` field (every version 1 producer's)."""

_BY_TAG = {kind.tag: kind for kind in KINDS}
_BY_MODEL = {kind.model: kind for kind in KINDS}
_BY_TABLE = {table: kind for kind in KINDS for table in kind.tables}


def kind_of_tag(tag: str) -> EntryKind | None:
    """The kind tagged ``tag`` on the wire, if any."""
    return _BY_TAG.get(tag)


def kind_of(model: msgspec.Struct) -> EntryKind:
    """The kind of a decoded model."""
    return _BY_MODEL[type(model)]


def kind_of_table(table: str) -> EntryKind | None:
    """The kind writing the lake table named ``table`` (history or current)."""
    return _BY_TABLE.get(table)


def all_tables() -> list[str]:
    """Every lake table of every kind: each history, then its current table."""
    return [table for kind in KINDS for table in kind.tables]
