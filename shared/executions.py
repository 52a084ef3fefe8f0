"""Executions: IB's fills and their commission reports, one row per execution.

An ``execution`` entry (README.md, "Wire format: executions") carries an
execution's ``exec_id`` and its details, its commission report, or both: IB
sends the commission separately, usually after the fill, sometimes before it,
sometimes never. Both parts land in the same row of the ``executions`` table,
keyed by the execution ID without its correction suffix (:func:`split_exec_id`):

- the details with the highest revision win (a correction ``...01.02``
  replaces ``...01.01``; a repeat changes nothing);
- a commission belongs to the revision it names and is kept only while the
  row's details are not newer (a correction drops the earlier commission; the
  correction's own commission completes the row when it comes);
- of two reports for the same revision the first stays.

Each rule is idempotent and the order of arrival does not matter, so the
consumer's fold of a batch and its MERGE (consumer/upsert.py) land every entry
exactly once however often it is replayed, and a batch may be merged whole or in
pieces.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import date
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec
import pyarrow as pa

from shared.model import (
    ContractId,
    CurrencyCode,
    FiniteFloat,
    Label,
    OptionRight,
    PositiveFloat,
    UtcTimestamp,
    _WireRight,
    check_contract,
    timestamp_micros,
)

# IB's execution IDs are printable ASCII, e.g. ``0000e0d5.65b1d2a3.01.01``.
ExecId = Annotated[str, msgspec.Meta(pattern="^[!-~]{1,64}$")]
Side = Literal["BOT", "SLD"]
Shares = Annotated[float, msgspec.Meta(gt=0.0, le=sys.float_info.max)]
OptionalText = Annotated[str, msgspec.Meta(max_length=256)]
IbInt = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
EXECUTION_LABEL_FIELDS = (
    "exec_id",
    "execution.account",
    "execution.symbol",
    "execution.sec_type",
    "execution.exchange",
    "execution.order_ref",
)


class ExecutionDetails(msgspec.Struct, kw_only=True, frozen=True, gc=False, omit_defaults=True):
    """What IB's execDetails says about one fill (``shares`` unsigned; ``side`` says
    which way). ``time`` is the execution's own time, in UTC."""

    account: Label
    conid: ContractId
    symbol: Label  # the underlying's, as for positions: the partition
    sec_type: Label
    currency: CurrencyCode
    side: Side
    shares: Shares
    price: FiniteFloat
    time: UtcTimestamp
    if TYPE_CHECKING:
        right: OptionRight | None = None
        multiplier: float = 1.0
    else:
        right: _WireRight | None = None
        multiplier: PositiveFloat | None = 1.0
    strike: PositiveFloat | None = None
    expiry: date | None = None
    exchange: OptionalText | None = None
    order_id: IbInt | None = None
    perm_id: IbInt | None = None
    client_id: IbInt | None = None
    order_ref: OptionalText | None = None
    cum_qty: FiniteFloat | None = None
    avg_price: FiniteFloat | None = None
    liquidation: IbInt | None = None

    def __post_init__(self) -> None:
        check_contract(self, "execution", self.time)


class CommissionDetails(msgspec.Struct, kw_only=True, frozen=True, gc=False, omit_defaults=True):
    """IB's commissionReport for one execution (``realized_pnl`` null where IB sent its
    unset value)."""

    commission: FiniteFloat
    currency: CurrencyCode
    realized_pnl: FiniteFloat | None = None


class ExecutionEntry(msgspec.Struct, kw_only=True, frozen=True, gc=False, omit_defaults=True):
    """One ``execution`` stream entry: the details, the commission, or both."""

    exec_id: ExecId
    execution: ExecutionDetails | None = None
    commission: CommissionDetails | None = None

    def __post_init__(self) -> None:
        if self.execution is None and self.commission is None:
            raise ValueError("an execution entry needs `execution`, `commission` or both")

    @property
    def key(self) -> str:
        return split_exec_id(self.exec_id)[0]


def split_exec_id(exec_id: str) -> tuple[str, int]:
    """``(base, revision)``: the ID without its correction suffix, and the suffix as a
    number (``0000e0d5.65b1d2a3.01.02`` -> ``("0000e0d5.65b1d2a3.01", 2)``). An ID
    without a numeric last segment is its own base, revision 0."""
    base, dot, suffix = exec_id.rpartition(".")
    if dot and base and suffix.isdigit() and len(suffix) <= 9:
        return base, int(suffix)
    return exec_id, 0


UTC_MICROS = pa.timestamp("us", tz="UTC")
DETAIL_COLUMNS = (
    "exec_id",
    "revision",
    "account",
    "conid",
    "symbol",
    "sec_type",
    "right",
    "strike",
    "expiry",
    "multiplier",
    "currency",
    "side",
    "shares",
    "price",
    "time",
    "order_id",
    "perm_id",
    "client_id",
    "order_ref",
    "exchange",
    "cum_qty",
    "avg_price",
    "liquidation",
    "stream_id",
)
"""The details' columns: they change together, when newer details arrive."""
COMMISSION_COLUMNS = (
    "commission_exec_id",
    "commission_revision",
    "commission",
    "commission_currency",
    "realized_pnl",
    "commission_stream_id",
)
"""The commission's columns: they change together, when a report is kept."""

EXECUTIONS_SCHEMA = pa.schema(
    [
        pa.field("exec_base", pa.string(), nullable=False),
        pa.field("exec_id", pa.string()),
        pa.field("revision", pa.int64()),
        pa.field("account", pa.string()),
        pa.field("conid", pa.int64()),
        pa.field("symbol", pa.string()),
        pa.field("sec_type", pa.string()),
        pa.field("right", pa.string()),
        pa.field("strike", pa.float64()),
        pa.field("expiry", pa.date32()),
        pa.field("multiplier", pa.float64()),
        pa.field("currency", pa.string()),
        pa.field("side", pa.string()),
        pa.field("shares", pa.float64()),
        pa.field("price", pa.float64()),
        pa.field("time", UTC_MICROS),
        pa.field("order_id", pa.int64()),
        pa.field("perm_id", pa.int64()),
        pa.field("client_id", pa.int64()),
        pa.field("order_ref", pa.string()),
        pa.field("exchange", pa.string()),
        pa.field("cum_qty", pa.float64()),
        pa.field("avg_price", pa.float64()),
        pa.field("liquidation", pa.int64()),
        pa.field("stream_id", pa.string()),
        pa.field("commission_exec_id", pa.string()),
        pa.field("commission_revision", pa.int64()),
        pa.field("commission", pa.float64()),
        pa.field("commission_currency", pa.string()),
        pa.field("realized_pnl", pa.float64()),
        pa.field("commission_stream_id", pa.string()),
    ]
)


def _details_row(entry: ExecutionEntry, revision: int, stream_id: str) -> dict[str, object]:
    d = entry.execution
    assert d is not None
    return {
        "exec_id": entry.exec_id,
        "revision": revision,
        "account": d.account,
        "conid": d.conid,
        "symbol": d.symbol,
        "sec_type": d.sec_type,
        "right": d.right,
        "strike": d.strike,
        "expiry": d.expiry,
        "multiplier": d.multiplier,
        "currency": d.currency,
        "side": d.side,
        "shares": d.shares,
        "price": d.price,
        "time": timestamp_micros(d.time),
        "order_id": d.order_id,
        "perm_id": d.perm_id,
        "client_id": d.client_id,
        "order_ref": d.order_ref,
        "exchange": d.exchange,
        "cum_qty": d.cum_qty,
        "avg_price": d.avg_price,
        "liquidation": d.liquidation,
        "stream_id": stream_id,
    }


def _commission_row(entry: ExecutionEntry, revision: int, stream_id: str) -> dict[str, object]:
    c = entry.commission
    assert c is not None
    return {
        "commission_exec_id": entry.exec_id,
        "commission_revision": revision,
        "commission": c.commission,
        "commission_currency": c.currency,
        "realized_pnl": c.realized_pnl,
        "commission_stream_id": stream_id,
    }


def executions_to_arrow(entries: Sequence[ExecutionEntry], stream_ids: Sequence[bytes]) -> pa.Table:
    """One row per entry, in stream order: the details' columns null for a commission
    alone, the commission's null for details alone. The consumer folds them to one row
    per execution by the rules above (consumer/upsert.py) and MERGEs that."""
    rows: list[dict[str, object]] = []
    for entry, raw_id in zip(entries, stream_ids, strict=True):
        base, revision = split_exec_id(entry.exec_id)
        stream_id = raw_id.decode()
        row: dict[str, object] = {"exec_base": base}
        if entry.execution is not None:
            row.update(_details_row(entry, revision, stream_id))
        if entry.commission is not None:
            row.update(_commission_row(entry, revision, stream_id))
        rows.append(row)
    return pa.Table.from_pylist(rows, EXECUTIONS_SCHEMA)
