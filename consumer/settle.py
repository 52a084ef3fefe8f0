"""The acknowledgement policy, in one place: commit first, then settle.

A batch is settled only after its rows are committed to Delta (or found to be
there already). Settling writes the batch's dead letters and acknowledges all
of its entries in one MULTI/EXEC, so a crash can neither lose a dead letter nor
write it twice; a batch without dead letters is one XACK (atomic by itself, and
allowed under ``maxmemory``, where Redis refuses every command queued in a
MULTI: acknowledging is what frees memory then). A crash before settling
leaves the entries pending: they are delivered again and the key dedup makes
the second pass a no-op.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from shared.wire import EntryFields

log = logging.getLogger(__name__)

DLQ_PREFIX = "dlq:"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry moved aside: its original fields, where it came from, and why."""

    entry_id: bytes
    fields: EntryFields
    reason: str
    deliveries: int


class Settler:
    """Writes dead letters and acknowledges entries for one consumer."""

    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str) -> None:
        self._client = client
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self.dlq_stream = f"{stream}:dlq"

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
            pipe.xadd(self.dlq_stream, fields)  # type: ignore[arg-type]
        if entry_ids:
            pipe.xack(self._stream, self._group, *entry_ids)
        pipe.execute()
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
