"""A batch in hand: pages of entries decoded into Arrow rows and dead letters.

Decoding isolates every failure to its entry: an entry that cannot be decoded, or
whose row Arrow cannot build, becomes a dead letter with its own reason and the
rest of its page lands. Dead letters are bounded (consumer/settle.py), so a huge
entry is let go as soon as its page is decoded.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import pyarrow as pa

from consumer.group import Page, RawFields
from consumer.settle import DeadLetter
from shared.kinds import EntryKind
from shared.wire import (
    DEFAULT_MAX_ENTRY_BYTES,
    KindEntries,
    decode_entries,
    entry_bytes,
    fields_as_dict,
)

# Pages read but not yet decoded: enough to keep the decoder busy, few enough that
# raw replies never pile up.
_PAGES_DECODING = 2


@dataclass(slots=True)
class DecodedPage:
    """What one page of new entries in hand turned into."""

    rows: dict[EntryKind, pa.Table]  # the decodable entries' rows per kind, in delivery order
    over_limit: list[DeadLetter]  # delivered more often than allowed
    poison: list[DeadLetter]


def decode_page(
    ids: list[bytes],
    fields: list[RawFields],
    counts: list[int] | None,
    max_deliveries: int,
    max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
) -> DecodedPage:
    """Dead letters for entries delivered too often or undecodable; rows for the rest.

    Whatever fails for one entry dead-letters that entry alone: a page-level step
    that fails is redone entry by entry to find the culprits.
    """
    over_limit: list[DeadLetter] = []
    poison: list[DeadLetter] = []
    if counts is None:  # first deliveries
        entries = list(zip(ids, fields, strict=True))
    else:
        entries = []
        for entry_id, raw, count in zip(ids, fields, counts, strict=True):
            if count > max_deliveries:
                reason = f"delivered {count} times (limit {max_deliveries})"
                over_limit.append(_dead(entry_id, raw, reason, count, max_entry_bytes))
            else:
                entries.append((entry_id, raw))
    decoded = decode_entries(entries, max_entry_bytes)
    del entries
    count_of = dict(zip(ids, counts, strict=True)) if counts is not None else {}
    poison = [
        DeadLetter.bounded(
            p.entry_id, p.fields, p.reason, count_of.get(p.entry_id, 1), max_entry_bytes
        )
        for p in decoded.poison
    ]
    rows: dict[EntryKind, pa.Table] = {}
    for kind, decoded_kind in decoded.by_kind.items():
        try:
            rows[kind] = kind.to_rows(decoded_kind.updates, decoded_kind.entry_ids)
        except Exception:  # some row Arrow cannot take: find which
            raw_of = dict(zip(ids, fields, strict=True))
            found = _rows_one_by_one(kind, decoded_kind, raw_of, count_of, poison, max_entry_bytes)
            if found is not None:
                rows[kind] = found
    return DecodedPage(rows, over_limit, poison)


def _dead(
    entry_id: bytes, raw: RawFields, reason: str, count: int, max_entry_bytes: int
) -> DeadLetter:
    try:
        fields = fields_as_dict(raw)
    except Exception:  # an unreadable reply keeps no fields
        fields = {}
    return DeadLetter.bounded(entry_id, fields, reason, count, max_entry_bytes)


def _rows_one_by_one(
    kind: EntryKind,
    decoded: KindEntries,
    raw_of: dict[bytes, RawFields],
    count_of: dict[bytes, int],
    poison: list[DeadLetter],
    max_entry_bytes: int,
) -> pa.Table | None:
    tables: list[pa.Table] = []
    for entry_id, update in zip(decoded.entry_ids, decoded.updates, strict=True):
        try:
            tables.append(kind.to_rows([update], [entry_id]))
        except Exception as exc:  # this entry's alone
            reason = f"cannot become a table row: {type(exc).__name__}: {exc}"
            count = count_of.get(entry_id, 1)
            poison.append(_dead(entry_id, raw_of[entry_id], reason, count, max_entry_bytes))
    return pa.concat_tables(tables) if tables else None


@dataclass(slots=True)
class Batch:
    """Entries in hand: their IDs in delivery order, their rows and their dead letters.

    Each page is decoded into Arrow rows as soon as it is added, by ``decoder``
    when given (while the reader waits for the next page) or else right away, so
    a batch holds the raw replies of a few pages at most, never of all its entries.
    """

    max_deliveries: int
    decoder: Executor | None = None
    max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
    ids: list[bytes] = field(default_factory=list)
    size_bytes: int = 0  # of the entries read, field names and values
    mean_entry_bytes: int = 0  # mean size of the last page's entries
    rows: dict[EntryKind, list[pa.Table]] = field(default_factory=dict)
    over_limit: list[DeadLetter] = field(default_factory=list)
    poison: list[DeadLetter] = field(default_factory=list)
    vanished: list[bytes] = field(default_factory=list)
    max_count: int = 0  # most deliveries of any entry in hand
    opened_at: float = 0.0
    in_flight: frozenset[bytes] = frozenset()
    _seen: set[bytes] | None = None
    _decoding: deque[Future[DecodedPage]] = field(default_factory=deque)

    def add(self, page: Page) -> None:
        if page.deliveries is None:
            # First deliveries (XREADGROUP >): new to everyone, nothing to filter.
            if self._seen is not None:
                self._seen.update(page.ids)
            self._take(page.ids, page.fields, None)
        else:
            # A claim scan or pending re-read can hand back an entry already in hand
            # (here, or in the batch being committed meanwhile).
            if self._seen is None:
                self._seen = set(self.ids) | self.in_flight
            seen = self._seen
            ids: list[bytes] = []
            fields: list[RawFields] = []
            counts: list[int] = []
            for entry_id, raw, count in zip(page.ids, page.fields, page.deliveries, strict=True):
                if entry_id not in seen:
                    seen.add(entry_id)
                    ids.append(entry_id)
                    fields.append(raw)
                    counts.append(count)
            self._take(ids, fields, counts)
        self.vanished.extend(page.vanished)

    def _take(self, ids: list[bytes], fields: list[RawFields], counts: list[int] | None) -> None:
        if not ids:
            return
        if not self.ids:
            self.opened_at = time.monotonic()
        self.ids.extend(ids)
        # The common layout has 4 fields and its payload is nearly all of its bytes.
        size = sum(
            [len(f[3]) if type(f) is list and len(f) == 4 else entry_bytes(f) for f in fields]
        )
        self.size_bytes += size
        self.mean_entry_bytes = size // len(ids) + 1
        self.max_count = max(self.max_count, 1 if counts is None else max(counts))
        limit = self.max_entry_bytes
        if self.decoder is None:
            self._fold(decode_page(ids, fields, counts, self.max_deliveries, limit))
            return
        self._decoding.append(
            self.decoder.submit(decode_page, ids, fields, counts, self.max_deliveries, limit)
        )
        while len(self._decoding) > _PAGES_DECODING:
            self._fold(self._decoding.popleft().result())

    def _fold(self, page: DecodedPage) -> None:
        for kind, rows in page.rows.items():
            self.rows.setdefault(kind, []).append(rows)
        self.over_limit.extend(page.over_limit)
        self.poison.extend(page.poison)

    def finish(self) -> Batch:
        """Wait for the pages still being decoded."""
        while self._decoding:
            self._fold(self._decoding.popleft().result())
        return self

    def tables(self) -> dict[EntryKind, pa.Table]:
        """Per kind, the rows of its decodable entries in delivery order, in one chunk;
        the batch lets go of its pages' rows.

        One chunk rather than one per page: the Delta writer splits every chunk
        by partition, so many small chunks cost it noticeably more.
        """
        self.finish()
        tables = {kind: pa.concat_tables(rows).combine_chunks() for kind, rows in self.rows.items()}
        self.rows.clear()
        return tables

    @property
    def dead(self) -> list[DeadLetter]:
        """Dead letters: entries delivered too often, then undecodable ones."""
        self.finish()
        return self.over_limit + self.poison

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def empty(self) -> bool:
        return not self.ids and not self.vanished
