"""The ``position_updates`` Delta table: its schema, creation, and rows from updates.

Partitioned by ``symbol`` (never by time: a time partition multiplies small
files and buys nothing the timestamp statistics do not already give). All
timestamps are UTC (``timestamp[us, tz=UTC]``) so the table stays at reader
protocol 1: a tz-naive column would silently require ``timestampNtz``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError
from msgspec.structs import astuple

from shared.model import PositionUpdate

TABLE_NAME = "position_updates"
PARTITION_COLUMNS = ["symbol"]
KEY_COLUMNS = ("account", "conid", "timestamp")
UTC_MICROS = pa.timestamp("us", tz="UTC")

POSITION_UPDATES_SCHEMA = pa.schema(
    [
        pa.field("account", pa.string(), nullable=False),
        pa.field("conid", pa.int64(), nullable=False),
        pa.field("symbol", pa.string(), nullable=False),
        pa.field("sec_type", pa.string(), nullable=False),
        pa.field("right", pa.string()),
        pa.field("strike", pa.float64()),
        pa.field("expiry", pa.date32()),
        pa.field("multiplier", pa.float64(), nullable=False),
        pa.field("currency", pa.string(), nullable=False),
        pa.field("position", pa.float64(), nullable=False),
        pa.field("market_price", pa.float64()),
        pa.field("market_value", pa.float64()),
        pa.field("average_cost", pa.float64()),
        pa.field("unrealized_pnl", pa.float64()),
        pa.field("realized_pnl", pa.float64()),
        pa.field("timestamp", UTC_MICROS, nullable=False),
        pa.field("date", pa.date32(), nullable=False),
        pa.field("stream_id", pa.string(), nullable=False),
    ]
)

# The update's fields in its own (struct) order, as astuple() returns them.
_STRUCT_FIELDS: tuple[str, ...] = PositionUpdate.__struct_fields__


def table_configuration(checkpoint_interval: int) -> dict[str, str | None]:
    """Table properties set at creation."""
    return {
        "delta.checkpointInterval": str(checkpoint_interval),
        # Statistics on every column: dedup and queries prune on timestamp and conid.
        "delta.dataSkippingNumIndexedCols": "-1",
    }


def open_or_create_table(
    uri: str,
    storage_options: dict[str, str] | None = None,
    checkpoint_interval: int = 100,
) -> DeltaTable:
    """Open the table, creating it with the explicit schema on first use."""
    try:
        return DeltaTable(uri, storage_options=storage_options)
    except TableNotFoundError:
        pass
    return DeltaTable.create(
        uri,
        POSITION_UPDATES_SCHEMA,
        mode="ignore",  # another consumer may create it at the same moment
        partition_by=PARTITION_COLUMNS,
        name=TABLE_NAME,
        configuration=table_configuration(checkpoint_interval),
        storage_options=storage_options,
    )


def updates_to_arrow(updates: Sequence[PositionUpdate], stream_ids: Sequence[bytes]) -> pa.Table:
    """Rows for the table, in the given order, with ``date`` derived from ``timestamp``."""
    # One pass of astuple + zip transposes rows to columns ~3x faster than a getattr per cell.
    if updates:
        columns = dict(zip(_STRUCT_FIELDS, zip(*map(astuple, updates), strict=True), strict=True))
    else:
        columns = {name: () for name in _STRUCT_FIELDS}
    arrays: list[pa.Array] = []
    for fld in POSITION_UPDATES_SCHEMA:
        if fld.name == "date":
            arrays.append(pc.cast(arrays[_index("timestamp")], pa.date32()))
        elif fld.name == "stream_id":
            arrays.append(pa.array([i.decode() for i in stream_ids], pa.string()))
        else:
            arrays.append(pa.array(columns[fld.name], fld.type))
    return pa.Table.from_arrays(arrays, schema=POSITION_UPDATES_SCHEMA)


def _index(name: str) -> int:
    index: int = POSITION_UPDATES_SCHEMA.get_field_index(name)
    return index
