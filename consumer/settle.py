"""The acknowledgement policy, in one place: commit first, then settle.

A batch is settled only after its rows are committed to Delta (or found to be
there already). Settling writes the batch's dead letters and acknowledges all
of its entries in one MULTI/EXEC, so a crash can neither lose a dead letter nor
write it twice; a batch without dead letters is one XACK (atomic by itself, and
allowed under ``maxmemory``, where Redis refuses every command queued in a
MULTI: acknowledging is what frees memory then). A crash before settling
leaves the entries pending: they are delivered again and the key dedup makes
the second pass a no-op.

The dead-letter stream is bounded too: at most ``POSLAKE_DLQ_MAX_ENTRIES`` letters,
the oldest dropped past it in the same transaction (counted in
``poslake_consumer_dlq_trimmed_total`` and logged).

A dead letter is bounded: an entry of at most ``max_entry_bytes`` and
:data:`DLQ_MAX_FIELDS` fields is copied whole; a bigger one is cut to its first
:data:`DLQ_KEEP_FIELDS` fields and :data:`DLQ_KEEP_BYTES` bytes and marked
``dlq:truncated``, ``dlq:original_bytes`` and ``dlq:original_fields``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from infra.redis_conn import check_transactions
from shared.wire import EntryFields

log = logging.getLogger(__name__)

DLQ_PREFIX = "dlq:"
TRUNCATED_FIELD = f"{DLQ_PREFIX}truncated"
DLQ_MAX_FIELDS = 64  # more, and the copy is truncated
DLQ_KEEP_FIELDS = 16  # what a truncated copy keeps at most
DLQ_KEEP_BYTES = 4_096


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry moved aside: its original fields (or a bounded part), where it came
    from, and why. ``original`` is ``(bytes, fields)`` of the entry when ``fields``
    holds only part of it."""

    entry_id: bytes
    fields: EntryFields
    reason: str
    deliveries: int
    original: tuple[int, int] | None = None

    @classmethod
    def bounded(
        cls, entry_id: bytes, fields: EntryFields, reason: str, deliveries: int, max_bytes: int
    ) -> DeadLetter:
        """A dead letter holding the entry whole if small enough, else a truncated copy."""
        size = sum(len(k) + len(v) for k, v in fields.items())
        if size <= max_bytes and len(fields) <= DLQ_MAX_FIELDS:
            return cls(entry_id, fields, reason, deliveries)
        kept: dict[bytes, bytes] = {}
        room = DLQ_KEEP_BYTES
        for key, value in fields.items():
            if len(kept) == DLQ_KEEP_FIELDS or room <= len(key):
                break
            if key.startswith(DLQ_PREFIX.encode()):
                continue  # never let the entry forge our own markers
            kept[key] = value[: room - len(key)]
            room -= len(key) + len(kept[key])
        return cls(entry_id, kept, reason, deliveries, (size, len(fields)))


class Settler:
    """Writes dead letters and acknowledges entries for one consumer."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        consumer: str,
        dlq_max_entries: int = 100_000,
    ) -> None:
        self._client = client
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self.dlq_stream = f"{stream}:dlq"
        self.dlq_max_entries = dlq_max_entries
        self.dlq_trimmed = 0  # the oldest dead letters the bound dropped

    def check_transactions(self) -> None:
        """Raise if Redis refuses MULTI or EXEC (see infra/redis_conn.py)."""
        check_transactions(self._client)

    def settle(self, entry_ids: Sequence[bytes], dead: Sequence[DeadLetter]) -> None:
        """Dead-letter ``dead`` and acknowledge every ID in ``entry_ids`` atomically.

        Call only after the batch's rows are committed. ``entry_ids`` must include
        the dead letters' IDs. Safe to repeat: XACK of an acked ID is a no-op, and a
        repeat after a successful EXEC is prevented by the caller's state.
        """
        if not entry_ids and not dead:
            return
        if not dead:
            self._client.xack(self._stream, self._group, *entry_ids)
            return
        pipe = self._client.pipeline(transaction=True)
        failed_at = str(time.time()).encode()
        for letter in dead:
            fields: dict[bytes | str, bytes | str] = {k: v for k, v in letter.fields.items()}
            fields.update(
                {
                    f"{DLQ_PREFIX}reason": letter.reason,
                    f"{DLQ_PREFIX}source_id": letter.entry_id,
                    f"{DLQ_PREFIX}stream": self._stream,
                    f"{DLQ_PREFIX}group": self._group,
                    f"{DLQ_PREFIX}consumer": self._consumer,
                    f"{DLQ_PREFIX}deliveries": str(letter.deliveries),
                    f"{DLQ_PREFIX}failed_at": failed_at,
                }
            )
            if letter.original is not None:
                fields[TRUNCATED_FIELD] = b"1"
                fields[f"{DLQ_PREFIX}original_bytes"] = str(letter.original[0])
                fields[f"{DLQ_PREFIX}original_fields"] = str(letter.original[1])
            pipe.xadd(self.dlq_stream, fields)  # type: ignore[arg-type]
        # The dead-letter stream's bound: its oldest letters go, counted.
        pipe.xtrim(self.dlq_stream, maxlen=self.dlq_max_entries, approximate=False)
        if entry_ids:
            pipe.xack(self._stream, self._group, *entry_ids)
        replies = pipe.execute()
        dropped = int(replies[len(dead)])
        if dropped:
            self.dlq_trimmed += dropped
            log.warning(
                "dead-letter stream at its bound: oldest letters dropped",
                extra={"dropped": dropped, "bound": self.dlq_max_entries, "dlq": self.dlq_stream},
            )
        for letter in dead:
            log.warning(
                "dead-lettered entry",
                extra={
                    "entry_id": letter.entry_id.decode(),
                    "reason": letter.reason,
                    "consumer": self._consumer,
                    "deliveries": letter.deliveries,
                },
            )
