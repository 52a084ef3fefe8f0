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
from typing import Any

import msgspec
import pyarrow as pa

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

KINDS: tuple[EntryKind, ...] = (POSITIONS, EXECUTIONS, ACCOUNT_VALUES, OPTION_GREEKS)
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
