"""The ``position_updates`` Delta table: its schema, creation, and rows from updates.

Partitioned by ``symbol`` (never by time: a time partition multiplies small
files and buys nothing the timestamp statistics do not already give). All
timestamps are UTC (``timestamp[us, tz=UTC]``) so the table stays at reader
protocol 1: a tz-naive column would silently require ``timestampNtz``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from shared import lake_names
from shared.model import PositionUpdate
from shared.settings import DEFAULT_HISTORY_RETENTION_HOURS, TOMBSTONE_MARGIN_HOURS

TABLE_NAME = lake_names.POSITION_UPDATES
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

# The update's fields as read from JSON lines: dates as text (cast after),
# timestamps parsed by Arrow's ISO 8601 parser (offsets converted to UTC).
_JSON_PARSE = pj.ParseOptions(
    explicit_schema=pa.schema(
        [
            pa.field(f.name, pa.string() if f.type == pa.date32() else f.type)
            for f in POSITION_UPDATES_SCHEMA
            if f.name not in ("date", "stream_id")
        ]
    ),
    unexpected_field_behavior="ignore",
)
_encoder = msgspec.json.Encoder()


TOMBSTONE_RETENTION = "delta.deletedFileRetentionDuration"
LOG_RETENTION = "delta.logRetentionDuration"


def retention_interval(history_retention_hours: float) -> str:
    """Tombstone and log retention for a time-travel window of that many hours."""
    seconds = round((history_retention_hours + TOMBSTONE_MARGIN_HOURS) * 3600)
    return f"interval {seconds} seconds"


def table_configuration(
    checkpoint_interval: int, history_retention_hours: float = DEFAULT_HISTORY_RETENTION_HOURS
) -> dict[str, str | None]:
    """Table properties set at creation."""
    retention = retention_interval(history_retention_hours)
    return {
        "delta.checkpointInterval": str(checkpoint_interval),
        # Statistics on every column: dedup and queries prune on timestamp and conid.
        "delta.dataSkippingNumIndexedCols": "-1",
        # Every checkpoint carries a tombstone for each file retired within this window
        # (vacuum needs it to delete the file once the history no longer does). Each
        # batch retires ~50 small files, so the window sets the checkpoint's size and
        # with it the cost of every open and checkpoint: the history, and a margin.
        TOMBSTONE_RETENTION: retention,
        # Log files past it are removed when a checkpoint is written: one a batch
        # otherwise piles up, and every open lists them.
        LOG_RETENTION: retention,
        "delta.enableExpiredLogCleanup": "true",
    }


def open_or_create_table(
    uri: str,
    storage_options: dict[str, str] | None = None,
    checkpoint_interval: int = 100,
    history_retention_hours: float = DEFAULT_HISTORY_RETENTION_HOURS,
    *,
    schema: pa.Schema = POSITION_UPDATES_SCHEMA,
    partition_by: Sequence[str] = PARTITION_COLUMNS,
    name: str = TABLE_NAME,
) -> DeltaTable:
    """Open a table, creating it with its explicit schema on first use (by default
    ``position_updates``; shared/kinds.py gives every kind's schema and partitions)."""
    try:
        return DeltaTable(uri, storage_options=storage_options)
    except TableNotFoundError:
        pass
    return DeltaTable.create(
        uri,
        schema,
        mode="ignore",  # another consumer may create it at the same moment
        partition_by=list(partition_by),
        name=name,
        configuration=table_configuration(checkpoint_interval, history_retention_hours),
        storage_options=storage_options,
    )


def updates_to_arrow(updates: Sequence[PositionUpdate], stream_ids: Sequence[bytes]) -> pa.Table:
    """Rows for the table, in the given order, with ``date`` derived from ``timestamp``.

    The validated updates are encoded once more as canonical JSON lines (msgspec,
    in C) and parsed into columns by Arrow's JSON reader (in C++, without the GIL):
    several times cheaper than moving every field of every object into Arrow from
    Python. The canonical form is what was validated, so both parsers see the
    same values.
    """
    if not updates:
        return POSITION_UPDATES_SCHEMA.empty_table()
    parsed = pj.read_json(pa.py_buffer(_encoder.encode_lines(updates)), parse_options=_JSON_PARSE)
    arrays: list[pa.Array | pa.ChunkedArray] = []
    for fld in POSITION_UPDATES_SCHEMA:
        if fld.name == "date":
            arrays.append(pc.cast(parsed.column("timestamp"), pa.date32()))
        elif fld.name == "stream_id":
            arrays.append(pa.array([i.decode() for i in stream_ids], pa.string()))
        elif fld.name == "multiplier":
            arrays.append(pc.fill_null(parsed.column("multiplier"), 1.0))
        else:
            arrays.append(parsed.column(fld.name).cast(fld.type))
    return pa.Table.from_arrays(arrays, schema=POSITION_UPDATES_SCHEMA)


def partitions_to_compact(
    table: DeltaTable, small_bytes: int, min_files: int, column: str = "symbol"
) -> list[str]:
    """Values of the partition ``column`` whose partition holds at least ``min_files``
    files under ``small_bytes``."""
    actions = pa.table(table.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return []
    symbols = actions.column(f"partition.{column}").to_pylist()
    sizes = actions.column("size_bytes").to_pylist()
    small = Counter(s for s, size in zip(symbols, sizes, strict=True) if size < small_bytes)
    # A null partition (executions whose commission came first) is rewritten by its
    # MERGEs and left alone here: a partition filter cannot name it.
    return sorted(s for s, n in small.items() if n >= min_files and s is not None)


def compact_partitions(
    table: DeltaTable, symbols: list[str], target_bytes: int, column: str = "symbol"
) -> dict[str, object]:
    """Compact the given partitions in one commit (insertion order is kept)."""
    metrics: dict[str, object] = table.optimize.compact(
        partition_filters=[(column, "in", symbols)], target_size=target_bytes
    )
    return metrics


def sql_strings(values: Sequence[str]) -> str:
    """``'a', 'b'``: string literals for a Delta MERGE predicate's ``IN (...)``."""
    return ", ".join("'" + value.replace("'", "''") + "'" for value in values)
