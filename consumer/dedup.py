"""Which keys of a kind's rows are already in its table, without reading the table.

A kind's key (shared/kinds.py) is its ``group`` columns and a timestamp; below,
a "contract" is one value of the group (for positions an account and a conid)
and a "stamp" one timestamp in microseconds.

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

import json
import logging
from array import array
from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake.fs import DeltaStorageHandler

from shared.kinds import POSITIONS, EntryKind

log = logging.getLogger(__name__)

# Delta statistics keep timestamps to the millisecond, truncated.
_STATS_RESOLUTION_US = 1_000
_MASK64 = (1 << 64) - 1

RowKey = tuple[object, ...]
"""A row's key: its group columns' values, then its timestamp in UTC microseconds."""


def keys_of(rows: pa.Table, kind: EntryKind = POSITIONS) -> list[RowKey]:
    """The key of each row, in order (for positions ``(account, conid, timestamp_us)``)."""
    columns = [rows.column(name).to_pylist() for name in kind.group]
    columns.append(rows.column(kind.time_column).cast(pa.int64()).to_pylist())
    return list(zip(*columns, strict=True))


def _key_schema(kind: EntryKind) -> pa.Schema:
    return pa.schema([kind.schema.field(name) for name in kind.key_columns])


@dataclass(frozen=True, slots=True)
class BatchKeys:
    """A batch's keys, row by row: the contract as one int, and the timestamp."""

    contracts: list[int]  # the group's values as one int (positions: account_id << 64 | conid)
    micros: list[int]


class CommittedKeyIndex:
    """Keys committed at or after :attr:`horizon_us`, as of table :attr:`version`.

    Per contract (account, conid), the committed timestamps in ascending order,
    as an ``array('q')`` of 8 bytes a key (~15 with the arrays' headroom, plus
    ~200 a contract, measured): millions of keys fit in a few tens of MB, where a
    set of key objects would take ~90 bytes a key. A key newer than
    its contract's last stamp (the common case: a new observation) is answered
    by one comparison; an older one (a replay) by a binary search.
    """

    def __init__(
        self,
        max_keys: int,
        storage_options: dict[str, str] | None = None,
        kind: EntryKind = POSITIONS,
    ) -> None:
        self.kind = kind
        self._storage_options = storage_options
        self._filesystem: pafs.FileSystem | None = None
        self._stamps: dict[int, array[int]] = {}
        # Per group column: None for an integer column, else its text values' ids.
        self._text_ids: list[dict[str, int] | None] = [
            {} if pa.types.is_string(kind.schema.field(name).type) else None for name in kind.group
        ]
        self._size = 0
        self._max_keys = max_keys
        self.horizon_us = 0
        self.version = -1

    def __len__(self) -> int:
        return self._size

    @property
    def contracts(self) -> int:
        """Contracts holding keys: each costs ~200 bytes besides its keys' ~8-16."""
        return len(self._stamps)

    def __contains__(self, key: object) -> bool:
        group = self.kind.group
        if not isinstance(key, tuple) or len(key) != len(group) + 1:
            return False
        micros = key[-1]
        if micros < self.horizon_us:
            return False  # below the horizon only the table knows
        contract = 0
        for value, ids in zip(key[:-1], self._text_ids, strict=True):
            part = value & _MASK64 if ids is None else _text_id(ids, value)
            contract = (contract << 64) | part
        stamps = self._stamps.get(contract)
        return stamps is not None and _holds(stamps, micros)

    def keys_for(self, rows: pa.Table) -> BatchKeys:
        """Keys of ``rows``: text columns are mapped through small dictionaries, and
        the group's parts packed into one int, 64 bits each."""
        contracts: list[int] | None = None
        mask = _MASK64
        for name, ids in zip(self.kind.group, self._text_ids, strict=True):
            column = rows.column(name)
            if ids is None:
                parts = [v & mask for v in column.to_pylist()]
            else:
                encoded = pc.dictionary_encode(column).combine_chunks()
                known = [_text_id(ids, v) for v in encoded.dictionary.to_pylist()]
                parts = [known[i] for i in encoded.indices.to_pylist()]
            if contracts is None:
                contracts = parts
            else:  # this runs once per entry and group column
                contracts = [(c << 64) | p for c, p in zip(contracts, parts, strict=True)]
        micros = rows.column(self.kind.time_column).cast(pa.int64()).to_pylist()
        return BatchKeys(contracts or [], micros)

    def bootstrap(self, table: DeltaTable) -> None:
        """Start empty, just past the newest committed timestamp: complete by construction."""
        self._stamps.clear()
        self._size = 0
        self.version = table.version()
        self.horizon_us = newest_timestamp_us(table, self.kind.time_column) + _STATS_RESOLUTION_US
        log.info(
            "dedup index bootstrapped",
            extra={"table_version": self.version, "horizon_us": self.horizon_us},
        )

    def add_committed(self, batch: BatchKeys, indices: Sequence[int]) -> None:
        """Record the rows of ``batch`` at ``indices``, just committed."""
        horizon = self.horizon_us  # older keys are not needed: below it the table answers
        stamps_of = self._stamps
        contracts, micros = batch.contracts, batch.micros
        if len(indices) == len(contracts):
            pairs: Iterable[tuple[int, int]] = zip(contracts, micros, strict=True)
        else:
            pairs = ((contracts[i], micros[i]) for i in indices)
        added = 0
        for contract, t in pairs:
            if t < horizon:
                continue
            stamps = stamps_of.get(contract)
            if stamps is None:
                stamps_of[contract] = array("q", (t,))
            elif t > stamps[-1]:
                stamps.append(t)  # the common case: a newer observation
            elif not _holds(stamps, t):
                insort(stamps, t)
            else:
                continue
            added += 1
        self._size += added
        if self._size > self._max_keys:
            self._raise_horizon()

    def _raise_horizon(self) -> None:
        # Keep the newest half of the bound: one pass per raise keeps the cost
        # amortised O(1) a key. The horizon only ever moves forward, and every key
        # at or after it stays: below it, the table answers.
        keep = self._max_keys // 2
        pivot = self._newest_stamp(keep + 1)  # the (keep+1)-th newest stamp
        if self._count_from(pivot) > self._max_keys:
            pivot += 1  # one stamp held by very many keys: keep only the newer ones
        self.horizon_us = max(self.horizon_us, pivot)
        horizon, size = self.horizon_us, 0
        for contract in list(self._stamps):
            stamps = self._stamps[contract]
            cut = bisect_left(stamps, horizon)
            if cut == len(stamps):
                del self._stamps[contract]
                continue
            if cut:
                del stamps[:cut]
            size += len(stamps)
        self._size = size
        log.info(
            "dedup index horizon raised",
            extra={"horizon_us": self.horizon_us, "keys": self._size},
        )

    def _count_from(self, micros: int) -> int:
        """How many keys are at or after ``micros``."""
        return sum(len(s) - bisect_left(s, micros) for s in self._stamps.values())

    def _newest_stamp(self, rank: int) -> int:
        """The ``rank``-th newest stamp (1 = the newest), by a binary search over
        time counting each contract's sorted stamps: no copy of the keys. Copying
        and sorting them took ~3x the index's own memory at each raise, a peak the
        allocators kept as resident memory. A contract whose stamps all fall on one
        side of the narrowing window is counted once and dropped from the search."""
        live = list(self._stamps.values())
        low = min(s[0] for s in live)  # invariant: count_from(low) >= rank
        high = max(s[-1] for s in live) + 1  # and count_from(high) < rank
        above = 0  # keys of the dropped contracts lying wholly at or after ``high``
        while high - low > 1:
            middle = (low + high) // 2
            if above + sum(len(s) - bisect_left(s, middle) for s in live) >= rank:
                low = middle
            else:
                high = middle
            straddling = []
            for stamps in live:
                if stamps[0] >= high:
                    above += len(stamps)
                elif stamps[-1] >= low:
                    straddling.append(stamps)
            live = straddling
        return low

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
        commits = table.history(limit=target - self.version)
        if min((int(c["version"]) for c in commits), default=target + 1) > self.version + 1:
            # The log of the versions right after ours was cleaned up (we were idle
            # longer than its retention): what they added is unknown. Start afresh.
            log.warning("dedup index re-bootstrapped: log gap", extra={"from": self.version})
            self.bootstrap(table)
            return 0
        for commit in commits:
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
        if to_read:
            # Never version 0: sync starts after the version the index was bootstrapped at.
            added = self._rows_added(table, to_read)
            rows_read = added.num_rows
            if added.num_rows:
                batch = self.keys_for(added)
                self.add_committed(batch, range(added.num_rows))
        self.version = target
        return rows_read

    def _rows_added(self, table: DeltaTable, versions: Sequence[int]) -> pa.Table:
        """The keys of the rows those commits added, read from the files their log
        entries name.

        Not ``load_cdf``: it decodes a partition folder's name once too few times
        (``symbol=MOG%2520A`` for the file in ``symbol=MOG%20A``), so any symbol whose
        folder needs encoding broke it. The log holds each path URI-encoded; decoded
        once it is the file's path in the table.
        """
        if self._filesystem is None:
            handler = DeltaStorageHandler(table.table_uri, self._storage_options)
            self._filesystem = pafs.PyFileSystem(handler)
        fs = self._filesystem
        adds: list[dict[str, Any]] = []
        for version in versions:
            with fs.open_input_stream(f"_delta_log/{version:020d}.json") as log_file:
                text = log_file.read()
            for line in text.splitlines():
                add = json.loads(line).get("add") if line.strip() else None
                if add and add.get("dataChange", True):
                    adds.append(add)
        schema = _key_schema(self.kind)
        if not adds:
            return schema.empty_table()
        paths = [unquote(add["path"]) for add in adds]
        # A partition column is not in the files: its value is the add action's.
        in_path = [name for name in schema.names if name in self.kind.partition_by]
        if not in_path:
            dataset = pds.dataset(paths, schema=schema, format="parquet", filesystem=fs)
            return dataset.to_table(columns=schema.names)
        stored = pa.schema([f for f in schema if f.name not in in_path])
        pieces = []
        for add, path in zip(adds, paths, strict=True):
            piece = pds.dataset(path, schema=stored, format="parquet", filesystem=fs).to_table()
            values = add.get("partitionValues") or {}
            for name in in_path:
                constant = pa.array([values.get(name)] * piece.num_rows, schema.field(name).type)
                piece = piece.append_column(name, constant)
            pieces.append(piece.select(schema.names))
        return pa.concat_tables(pieces)

    def split_new(self, batch: BatchKeys, rows: pa.Table, table: DeltaTable) -> list[int]:
        """Indices of the rows whose keys the table lacks, first occurrence only."""
        horizon = self.horizon_us
        stamps_of = self._stamps
        contracts, micros = batch.contracts, batch.micros
        # The common case: each key newer than its contract's previous one, committed
        # or earlier in this batch (so no key repeats) and not below the horizon.
        # One pass, one comparison a key, no table read.
        previous: dict[int, int] = {}
        for contract, t in zip(contracts, micros, strict=True):
            last = previous.get(contract)
            if last is None:
                stamps = stamps_of.get(contract)
                last = stamps[-1] if stamps else horizon - 1
            if t <= last:
                break
            previous[contract] = t
        else:
            return list(range(len(contracts)))
        pairs = list(zip(contracts, micros, strict=True))
        seen: set[tuple[int, int]] = set()
        fresh: list[int] = []
        cold: list[int] = []
        for i, pair in enumerate(pairs):
            if pair in seen:
                continue
            seen.add(pair)
            contract, t = pair
            if t >= horizon:
                stamps = stamps_of.get(contract)
                if stamps is None or not _holds(stamps, t):
                    fresh.append(i)
            else:
                cold.append(i)
        if cold:
            suspects = rows.take(pa.array(cold, pa.int64()))
            keys = keys_of(suspects, self.kind)
            in_table = committed_among(table, keys, suspects, self.kind)
            fresh.extend(i for i, key in zip(cold, keys, strict=True) if key not in in_table)
            fresh.sort()
        return fresh


def committed_among(
    table: DeltaTable, keys: Sequence[RowKey], rows: pa.Table, kind: EntryKind = POSITIONS
) -> set[RowKey]:
    """Which of ``keys`` (of ``rows``) the table holds: a read pruned by partition, file
    statistics and row groups (the rows' partitions, time range and integer key columns)."""
    micros = [int(k[-1]) for k in keys]  # type: ignore[call-overload]
    ts_type = kind.schema.field(kind.time_column).type
    predicate = (pc.field(kind.time_column) >= pa.scalar(min(micros), ts_type)) & (
        pc.field(kind.time_column) <= pa.scalar(max(micros), ts_type)
    )
    for name in kind.partition_by:
        predicate &= pc.field(name).isin(sorted(set(rows.column(name).to_pylist())))
    for at, name in enumerate(kind.group):
        if pa.types.is_integer(kind.schema.field(name).type):
            predicate &= pc.field(name).isin(sorted({k[at] for k in keys}))  # type: ignore[type-var]
    dataset: pds.Dataset = table.to_pyarrow_dataset()
    found = dataset.to_table(columns=list(kind.key_columns), filter=predicate)
    wanted = set(keys)
    hits = {k for k in keys_of(found, kind) if k in wanted}
    log.debug("cold dedup read", extra={"keys": len(keys), "rows_read": found.num_rows})
    return hits


def newest_timestamp_us(table: DeltaTable, column: str = "timestamp") -> int:
    """The newest ``column`` value in the table, from file statistics where every file
    has them."""
    actions = pa.table(table.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return 0
    if f"max.{column}" in actions.column_names:
        maxima = actions.column(f"max.{column}")
        if maxima.null_count == 0:
            return int(pc.max(maxima.cast(pa.int64())).as_py())
    # Some file lacks statistics: read the column (once, at start).
    values = table.to_pyarrow_dataset().to_table(columns=[column]).column(column)
    newest = pc.max(values.cast(pa.int64())).as_py()
    return int(newest) if newest is not None else 0


def _text_id(ids: dict[str, int], value: str) -> int:
    found = ids.get(value)
    if found is None:
        found = ids[value] = len(ids)
    return found


def _holds(stamps: array[int], micros: int) -> bool:
    """Whether the ascending ``stamps`` hold ``micros``."""
    at = bisect_left(stamps, micros)
    return at < len(stamps) and stamps[at] == micros


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
