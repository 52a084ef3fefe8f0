"""Complete snapshots: which contracts, and which values, an account holds at one time.

IB says nothing about a position that no longer exists, or a value it stopped
sending: after a producer restart the lake would keep them open for ever. So
after each complete download from IB (positions up to ``positionEnd``, an
account's values up to its download's end) a producer publishes what the
account holds then, as a snapshot:

- ``position_snapshot``: the conids the account holds (non-zero positions);
- ``account_snapshot``: the (key, currency) pairs of the account download.

A large account's snapshot is split into parts, ``part`` 1..``parts`` of one
``(account, timestamp)``, each its own entry (the last part is the one whose
``part`` equals ``parts``), so no entry passes the entry size limit. The
consumer acts on a snapshot only once every part of it is in the lake
(consumer/snapshots.py): a part lost or dead-lettered closes nothing.

Appended to ``position_snapshots`` / ``account_snapshots`` (partitioned by
account) with the key (account, part, timestamp).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Annotated

import msgspec
import pyarrow as pa

from shared.account_values import ValueCurrency, ValueKey
from shared.model import ContractId, Label, UtcTimestamp, timestamp_micros

MAX_PARTS = 100_000
PartNumber = Annotated[int, msgspec.Meta(ge=1, le=MAX_PARTS)]

CONIDS_PER_PART = 1_000
"""Conids in one part our producer writes: at most ~20 KB of JSON (19 digits each)."""
KEYS_PER_PART = 200
"""(key, currency) pairs in one part our producer writes: at most ~16 KB of JSON."""

SNAPSHOT_LABEL_FIELDS = ("account",)

NOT_DOWNLOADED_PREFIX = "PnL."
"""Keys no account download sends (the account P&L from ``reqPnL``): an account
snapshot never closes them."""

UTC_MICROS = pa.timestamp("us", tz="UTC")


def _check_part(part: int, parts: int, moment: datetime) -> None:
    if part > parts:
        raise ValueError(f"part {part} of {parts}: a part number is at most `parts`")
    if moment.year in (1, 9999) and moment.utcoffset():
        # Arrow would store it, but no reader could turn it back into a datetime.
        raise ValueError("timestamp is outside the years 1-9999 in UTC")


class PositionSnapshot(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """Part ``part`` of ``parts`` of the contracts ``account`` holds at ``timestamp``."""

    account: Label
    timestamp: UtcTimestamp
    part: PartNumber
    parts: PartNumber
    conids: list[ContractId]

    def __post_init__(self) -> None:
        _check_part(self.part, self.parts, self.timestamp)


class HeldValue(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One value an account download sent, as ``[key, currency]`` on the wire."""

    key: ValueKey
    currency: ValueCurrency


class AccountSnapshot(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """Part ``part`` of ``parts`` of the values ``account``'s download sent at ``timestamp``."""

    account: Label
    timestamp: UtcTimestamp
    part: PartNumber
    parts: PartNumber
    keys: list[HeldValue]

    def __post_init__(self) -> None:
        _check_part(self.part, self.parts, self.timestamp)


_COMMON = [
    pa.field("account", pa.string(), nullable=False),
    pa.field("timestamp", UTC_MICROS, nullable=False),
    pa.field("part", pa.int64(), nullable=False),
    pa.field("parts", pa.int64(), nullable=False),
]
_STREAM_ID = pa.field("stream_id", pa.string(), nullable=False)

POSITION_SNAPSHOTS_SCHEMA = pa.schema(
    [*_COMMON, pa.field("conids", pa.list_(pa.int64()), nullable=False), _STREAM_ID]
)
HELD_VALUE_TYPE = pa.struct(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("currency", pa.string(), nullable=False),
    ]
)
ACCOUNT_SNAPSHOTS_SCHEMA = pa.schema(
    [*_COMMON, pa.field("keys", pa.list_(HELD_VALUE_TYPE), nullable=False), _STREAM_ID]
)


def _common_columns(
    snapshots: Sequence[PositionSnapshot] | Sequence[AccountSnapshot], stream_ids: Sequence[bytes]
) -> dict[str, pa.Array]:
    stamps = [timestamp_micros(s.timestamp) for s in snapshots]
    return {
        "account": pa.array([s.account for s in snapshots], pa.string()),
        "timestamp": pa.array(stamps, pa.int64()).cast(UTC_MICROS),
        "part": pa.array([s.part for s in snapshots], pa.int64()),
        "parts": pa.array([s.parts for s in snapshots], pa.int64()),
    }


def position_snapshots_to_arrow(
    snapshots: Sequence[PositionSnapshot], stream_ids: Sequence[bytes]
) -> pa.Table:
    """Rows for ``position_snapshots``, in order."""
    columns = _common_columns(snapshots, stream_ids)
    columns["conids"] = pa.array([s.conids for s in snapshots], pa.list_(pa.int64()))
    columns["stream_id"] = pa.array([i.decode() for i in stream_ids], pa.string())
    return pa.table(columns, schema=POSITION_SNAPSHOTS_SCHEMA)


def account_snapshots_to_arrow(
    snapshots: Sequence[AccountSnapshot], stream_ids: Sequence[bytes]
) -> pa.Table:
    """Rows for ``account_snapshots``, in order."""
    columns = _common_columns(snapshots, stream_ids)
    columns["keys"] = pa.array(
        [[{"key": v.key, "currency": v.currency} for v in s.keys] for s in snapshots],
        pa.list_(HELD_VALUE_TYPE),
    )
    columns["stream_id"] = pa.array([i.decode() for i in stream_ids], pa.string())
    return pa.table(columns, schema=ACCOUNT_SNAPSHOTS_SCHEMA)


def position_snapshot(
    account: str, timestamp: datetime, conids: Sequence[int], per_part: int = CONIDS_PER_PART
) -> Iterator[PositionSnapshot]:
    """The parts of one account's position snapshot (one part when it holds nothing)."""
    held = sorted(set(conids))
    chunks = [held[i : i + per_part] for i in range(0, len(held), per_part)] or [[]]
    for number, chunk in enumerate(chunks, start=1):
        yield PositionSnapshot(
            account=account, timestamp=timestamp, part=number, parts=len(chunks), conids=chunk
        )


def account_snapshot(
    account: str,
    timestamp: datetime,
    keys: Sequence[tuple[str, str]],
    per_part: int = KEYS_PER_PART,
) -> Iterator[AccountSnapshot]:
    """The parts of one account's values snapshot (one part when it sent none)."""
    held = sorted(set(keys))
    chunks = [held[i : i + per_part] for i in range(0, len(held), per_part)] or [[]]
    for number, chunk in enumerate(chunks, start=1):
        yield AccountSnapshot(
            account=account,
            timestamp=timestamp,
            part=number,
            parts=len(chunks),
            keys=[HeldValue(key, currency) for key, currency in chunk],
        )
