"""The producer's spool: an append-only file of entries with a persisted read offset.

Updates go here while Redis is away and memory is full (producer/outbox.py); the
writer replays them in order. A torn last line (the process died mid-write) is
dropped at open; a lost or stale offset means replaying from the start, which is
safe (explicit IDs or the consumers' key dedup catch the repeats).
"""

from __future__ import annotations

import logging
import os
from itertools import islice
from pathlib import Path

log = logging.getLogger(__name__)

Entry = tuple[int, bytes]
"""(timestamp in µs, payload): a position's JSON, or for another kind its tag, a space
and its JSON (JSON starts with ``{``; a spool line stays ``<stamp> <payload>``)."""


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def _cut_torn_tail(path: Path) -> None:
    """Drop a partial last line (the process died mid-write) so appends start clean."""
    if not path.exists():
        return
    with path.open("r+b") as spool:
        size = spool.seek(0, os.SEEK_END)
        if size == 0:
            return
        start = max(0, size - 65536)
        while True:
            spool.seek(start)
            tail = spool.read(size - start)
            cut = tail.rfind(b"\n")
            if cut >= 0 or start == 0:
                break
            start = max(0, start - 65536)
        keep = start + cut + 1 if cut >= 0 else 0
        if keep < size:
            log.warning("dropping a torn last line of the spool", extra={"bytes": size - keep})
            spool.truncate(keep)


class Spool:
    """An append-only file of entries with a persisted read offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset_path = path.with_name(path.name + ".offset")
        path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(path)
        self._append = path.open("ab")
        self.offset = self._read_offset()

    def _read_offset(self) -> int:
        # A missing, torn or stale offset means "from the start": replaying entries
        # already published is safe (explicit IDs or the consumer's dedup catch them).
        try:
            offset = int(self._offset_path.read_text())
        except (OSError, ValueError):
            return 0
        return offset if 0 <= offset <= self.path.stat().st_size else 0

    def append(self, entry: Entry) -> None:
        self._append.write(b"%d %s\n" % entry)

    def flush(self) -> None:
        self._append.flush()

    def unread(self) -> bool:
        self.flush()
        return self.offset < self.path.stat().st_size

    def peek(self, count: int) -> tuple[list[Entry], int]:
        """Up to ``count`` entries from the read offset, and the offset after them."""
        self.flush()
        entries: list[Entry] = []
        position = self.offset
        # A fresh handle per read: a long-lived buffered one could serve bytes from
        # before the file was started over.
        with self.path.open("rb") as reader:
            reader.seek(self.offset)
            for line in islice(reader, count):
                if not line.endswith(b"\n"):
                    break  # a torn last line (killed mid-write) is not an entry
                stamp, _, payload = line.rstrip(b"\n").partition(b" ")
                entries.append((int(stamp), payload))
                position += len(line)
        return entries, position

    def advance(self, offset: int) -> None:
        self.offset = offset
        self.flush()  # entries appended while a chunk was in flight count as unread
        if offset >= self.path.stat().st_size:
            # Fully replayed: start the file over.
            self._append.truncate(0)
            self._append.seek(0)
            self.offset = 0
        _write_atomically(self._offset_path, str(self.offset).encode())

    def rewrite(self, entries: list[Entry]) -> None:
        """Replace the spool's unread part with ``entries`` (written aside, then renamed:
        a crash in between leaves the old spool whole)."""
        self._append.close()
        data = b"".join(b"%d %s\n" % entry for entry in entries)
        _write_atomically(self.path, data)
        _write_atomically(self._offset_path, b"0")
        self.offset = 0
        self._append = self.path.open("ab")

    def close(self) -> None:
        self._append.flush()
        self._append.close()
