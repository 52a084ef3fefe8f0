"""Which update keys are already in the table, without reading the table.

:class:`CommittedKeyIndex` holds every key committed with a timestamp at or
after its *horizon*, complete as of table version :attr:`version`. A key at or
after the horizon is answered from memory; only a key older than the horizon
(a replay from long ago, or one left by a crash before this process started)
sends a read to the table, and that read is pruned to the suspect keys'
partitions, contracts and time range.

The index starts empty with the horizon just past the newest timestamp in the
table's file statistics, which is trivially complete. It then learns every
commit: its own as they land, other writers' by reading only the rows those
commits added (the change feed of the new versions). When it grows past its
bound the horizon moves forward and older keys are forgotten, which only ever
turns memory answers into table reads, never into wrong answers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from deltalake import DeltaTable

from shared.model import UpdateKey

log = logging.getLogger(__name__)

# Delta statistics keep timestamps to the millisecond, truncated.
_STATS_RESOLUTION_US = 1_000
_KEY_COLUMNS = ["account", "conid", "timestamp"]
_MASK64 = (1 << 64) - 1


def keys_of(rows: pa.Table) -> list[UpdateKey]:
    """``(account, conid, timestamp_us)`` for each row, in order."""
    accounts = rows.column("account").to_pylist()
    conids = rows.column("conid").to_pylist()
    micros = rows.column("timestamp").cast(pa.int64()).to_pylist()
    return list(zip(accounts, conids, micros, strict=True))


@dataclass(frozen=True, slots=True)
class BatchKeys:
    """A batch's keys packed to single ints, with their timestamps, row by row."""

    packed: list[int]
    micros: list[int]


class CommittedKeyIndex:
    """Keys committed at or after :attr:`horizon_us`, as of table :attr:`version`.

    A key is held as one int, ``account_id << 128 | conid << 64 | timestamp``
    (~70 bytes a key in the set, against ~200 for a tuple with its own strings),
    so millions of keys fit in the consumer's memory budget.
    """

    def __init__(self, max_keys: int) -> None:
        self._keys: set[int] = set()
        self._accounts: dict[str, int] = {}
        self._max_keys = max_keys
        self.horizon_us = 0
        self.version = -1

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple) or len(key) != 3:
            return False
        account, conid, micros = key
        return self._pack(self._account_id(account), conid, micros) in self._keys

    def _account_id(self, account: str) -> int:
        found = self._accounts.get(account)
        if found is None:
            found = self._accounts[account] = len(self._accounts)
        return found

    @staticmethod
    def _pack(account_id: int, conid: int, micros: int) -> int:
        return (account_id << 128) | ((conid & _MASK64) << 64) | (micros & _MASK64)

    @staticmethod
    def _micros_of(packed: int) -> int:
        micros = packed & _MASK64
        return micros - (1 << 64) if micros >> 63 else micros

    def keys_for(self, rows: pa.Table) -> BatchKeys:
        """Packed keys of ``rows`` (account strings are mapped through a small dictionary)."""
        encoded = pc.dictionary_encode(rows.column("account")).combine_chunks()
        ids = [self._account_id(a) for a in encoded.dictionary.to_pylist()]
        accounts = [ids[i] for i in encoded.indices.to_pylist()]
        conids = rows.column("conid").to_pylist()
        micros = rows.column("timestamp").cast(pa.int64()).to_pylist()
        mask = _MASK64  # the packing of _pack, inlined: this runs once per entry
        packed = [
            (a << 128) | ((c & mask) << 64) | (t & mask)
            for a, c, t in zip(accounts, conids, micros, strict=True)
        ]
        return BatchKeys(packed, micros)

    def bootstrap(self, table: DeltaTable) -> None:
        """Start empty, just past the newest committed timestamp: complete by construction."""
        self._keys.clear()
        self.version = table.version()
        self.horizon_us = newest_timestamp_us(table) + _STATS_RESOLUTION_US
        log.info(
            "dedup index bootstrapped",
            extra={"table_version": self.version, "horizon_us": self.horizon_us},
        )

    def add_committed(self, batch: BatchKeys, indices: Sequence[int]) -> None:
        """Record the rows of ``batch`` at ``indices``, just committed."""
        packed, micros = batch.packed, batch.micros
        if len(indices) == len(packed) and (not micros or min(micros) >= self.horizon_us):
            self._keys.update(packed)  # the common case, at C speed
            if len(self._keys) > self._max_keys:
                self._raise_horizon()
            return
        self._add_packed([(packed[i], micros[i]) for i in indices])

    def _add_packed(self, entries: list[tuple[int, int]]) -> None:
        horizon = self.horizon_us  # older keys are not needed: below it the table answers
        self._keys.update(k for k, t in entries if t >= horizon)
        if len(self._keys) > self._max_keys:
            self._raise_horizon()

    def _raise_horizon(self) -> None:
        # Keep the newest half: one sort per halving keeps the cost amortised O(log n).
        stamps = sorted(self._micros_of(k) for k in self._keys)
        self.horizon_us = stamps[len(stamps) // 2]
        micros_of, horizon = self._micros_of, self.horizon_us
        self._keys = {k for k in self._keys if micros_of(k) >= horizon}
        log.info(
            "dedup index horizon raised",
            extra={"horizon_us": self.horizon_us, "keys": len(self._keys)},
        )

    def sync(self, table: DeltaTable, own_commit_ids: set[str]) -> int:
        """Learn what other writers committed since :attr:`version`; returns rows read.

        ``table`` must already be updated to the version to sync to. Versions
        whose commit id is in ``own_commit_ids`` were added by
        :meth:`add_committed` when they landed and are skipped (and their ids
        forgotten).
        """
        target = table.version()
        if target <= self.version:
            return 0
        to_read: list[int] = []
        for commit in table.history(limit=target - self.version):
            version = int(commit["version"])
            if version <= self.version:
                continue
            commit_id = commit.get("poslake.commit_id")
            if commit_id in own_commit_ids:
                own_commit_ids.discard(str(commit_id))
                continue
            if _adds_rows(commit):
                to_read.append(version)
        rows_read = 0
        # Never version 0: sync starts after the version the index was bootstrapped at.
        for first, last in _ranges(sorted(to_read)):
            reader = table.load_cdf(
                starting_version=first, ending_version=last, columns=_KEY_COLUMNS
            )
            added = pa.RecordBatchReader.from_stream(reader).read_all()
            if "_change_type" in added.column_names:
                added = added.filter(pc.equal(added.column("_change_type"), "insert"))
            rows_read += added.num_rows
            if added.num_rows:
                batch = self.keys_for(added)
                self.add_committed(batch, range(added.num_rows))
        self.version = target
        return rows_read

    def split_new(self, batch: BatchKeys, rows: pa.Table, table: DeltaTable) -> list[int]:
        """Indices of the rows whose keys the table lacks, first occurrence only."""
        horizon = self.horizon_us
        known = self._keys
        packed = batch.packed
        if (
            (not batch.micros or min(batch.micros) >= horizon)
            and known.isdisjoint(packed)
            and len(set(packed)) == len(packed)
        ):
            return list(range(len(packed)))  # the common case: all new, no table read
        seen: set[int] = set()
        fresh: list[int] = []
        cold: list[int] = []
        for i, (key, micros) in enumerate(zip(batch.packed, batch.micros, strict=True)):
            if key in seen:
                continue
            seen.add(key)
            if micros >= horizon:
                if key not in known:
                    fresh.append(i)
            else:
                cold.append(i)
        if cold:
            suspects = rows.take(pa.array(cold, pa.int64()))
            keys = keys_of(suspects)
            in_table = committed_among(table, keys, suspects.column("symbol").to_pylist())
            fresh.extend(i for i, key in zip(cold, keys, strict=True) if key not in in_table)
            fresh.sort()
        return fresh


def committed_among(
    table: DeltaTable, keys: Sequence[UpdateKey], symbols: Sequence[str]
) -> set[UpdateKey]:
    """Which of ``keys`` the table holds: a read pruned by partition, file stats and row groups."""
    low = min(k[2] for k in keys)
    high = max(k[2] for k in keys)
    ts_type = pa.timestamp("us", tz="UTC")
    predicate = (
        pc.field("symbol").isin(sorted(set(symbols)))
        & (pc.field("timestamp") >= pa.scalar(low, ts_type))
        & (pc.field("timestamp") <= pa.scalar(high, ts_type))
        & pc.field("conid").isin(sorted({k[1] for k in keys}))
    )
    dataset: pds.Dataset = table.to_pyarrow_dataset()
    found = dataset.to_table(columns=_KEY_COLUMNS, filter=predicate)
    wanted = set(keys)
    hits = {k for k in keys_of(found) if k in wanted}
    log.debug("cold dedup read", extra={"keys": len(keys), "rows_read": found.num_rows})
    return hits


def newest_timestamp_us(table: DeltaTable) -> int:
    """The newest timestamp in the table, from file statistics where every file has them."""
    actions = pa.table(table.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return 0
    if "max.timestamp" in actions.column_names:
        maxima = actions.column("max.timestamp")
        if maxima.null_count == 0:
            return int(pc.max(maxima.cast(pa.int64())).as_py())
    # Some file lacks statistics: read the column (once, at start).
    column = table.to_pyarrow_dataset().to_table(columns=["timestamp"]).column("timestamp")
    newest = pc.max(column.cast(pa.int64())).as_py()
    return int(newest) if newest is not None else 0


def _adds_rows(commit: dict[str, object]) -> bool:
    operation = str(commit.get("operation", ""))
    if operation in {"CREATE TABLE", "OPTIMIZE", "VACUUM START", "VACUUM END", "SET TBLPROPERTIES"}:
        return False
    metrics = commit.get("operationMetrics")
    if isinstance(metrics, dict):
        added = metrics.get("num_added_rows", metrics.get("num_target_rows_inserted"))
        if added is not None:
            return int(added) > 0
    return True  # unknown writer: read its change feed to be safe


def _ranges(versions: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for v in versions:
        if ranges and ranges[-1][1] == v - 1:
            ranges[-1] = (ranges[-1][0], v)
        else:
            ranges.append((v, v))
    return ranges
