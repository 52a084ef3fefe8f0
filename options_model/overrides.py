"""A trader's corrections to the book's grouping, kept in the lake (``book_overrides``).

The book groups fills by evidence (options_model/grouping.py); where it guessed
wrong, an override says better, and every step and rebuild honours it:

- ``assign``: a fill (by execution ID) or a position held without a known fill
  (``conid:<conid>``) goes to the strategy named by a label; every fill and holding
  with one label is one strategy (origin ``user:<label>``), stronger evidence than
  an order reference. ``split`` and ``merge`` are assignments too: the CLI gives the
  fills to move a new label, or every fill of the merged strategies one label.
- ``name``: a strategy's display name.

The table is append-only (one row per change, with the time it was made); the
newest row per (account, kind, subject) is in force, and an empty value withdraws
it. A rebuild reads the same rows, so overrides survive it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

import polars as pl
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from options_model.tables import OVERRIDES

ASSIGN = "assign"
NAME = "name"
HELD_PREFIX = "conid:"  # an assign subject naming a position held without a known fill


@dataclass(frozen=True)
class Override:
    account: str
    symbol: str
    kind: str  # ASSIGN or NAME
    subject: str  # exec_base, conid:<conid> or strategy_id
    value: str  # the label or the name; "" withdraws the override


@dataclass
class Overrides:
    """The overrides in force."""

    fills: dict[tuple[str, str], str] = field(default_factory=dict)  # (account, exec) -> label
    held: dict[tuple[str, int], str] = field(default_factory=dict)  # (account, conid) -> label
    names: dict[str, str] = field(default_factory=dict)  # strategy_id -> name
    # every override in force by (account, kind, subject), and the symbol of each key
    # ever recorded: to see which underlyings a change touches
    in_force: dict[tuple[str, str, str], str] = field(default_factory=dict)
    symbols: dict[tuple[str, str, str], str] = field(default_factory=dict)


def _uri(lake_uri: str) -> str:
    return f"{lake_uri.rstrip('/')}/{OVERRIDES.name}"


def read_overrides(lake_uri: str, storage_options: dict[str, str] | None = None) -> Overrides:
    """The overrides in force (none before the first one is recorded)."""
    try:
        table = DeltaTable(_uri(lake_uri), storage_options=storage_options)
    except TableNotFoundError:
        return Overrides()
    rows = (
        pl.scan_delta(table)
        .sort("timestamp", "override_id")
        .unique(["account", "kind", "subject"], keep="last", maintain_order=True)
        .collect()
        .to_dicts()
    )
    found = Overrides()
    for row in rows:
        account, subject, value = str(row["account"]), str(row["subject"]), row["value"] or ""
        found.symbols[(account, row["kind"], subject)] = str(row["symbol"])
        if not value:
            continue
        found.in_force[(account, row["kind"], subject)] = value
        if row["kind"] == NAME:
            found.names[subject] = value
        elif subject.startswith(HELD_PREFIX):
            found.held[(account, int(subject.removeprefix(HELD_PREFIX)))] = value
        else:
            found.fills[(account, subject)] = value
    return found


def record(
    lake_uri: str,
    overrides: list[Override],
    storage_options: dict[str, str] | None = None,
    now: datetime | None = None,
) -> int:
    """Append ``overrides`` in one commit; returns how many."""
    if not overrides:
        return 0
    moment = now or datetime.now(UTC)
    rows = [
        {
            "override_id": _override_id(o, moment),
            "account": o.account,
            "symbol": o.symbol,
            "kind": o.kind,
            "subject": o.subject,
            "value": o.value,
            "timestamp": moment,
        }
        for o in overrides
    ]
    write_deltalake(
        _uri(lake_uri),
        pa.Table.from_pylist(rows, schema=OVERRIDES.schema),
        mode="append",
        storage_options=storage_options,
    )
    return len(rows)


def _override_id(override: Override, moment: datetime) -> str:
    text = "\x1f".join(
        [override.account, override.kind, override.subject, override.value, moment.isoformat()]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]
