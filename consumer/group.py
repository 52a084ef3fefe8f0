"""The consumer's side of the Redis consumer group: reading, claiming, counting deliveries.

Order of reading, as a restarted consumer needs it: first its own pending
entries (delivered before a crash, never acknowledged), then entries other
consumers left pending longer than the claim idle time, then new ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import OutOfMemoryError, ResponseError

from shared.settings import Settings
from shared.wire import EntryFields

log = logging.getLogger(__name__)


RawFields = EntryFields | list[bytes]
"""An entry's fields as a mapping, or flat ``[k1, v1, k2, v2, ...]`` as Redis sends them."""


@dataclass(slots=True)
class Page:
    """Entries read in one call (parallel lists), plus pending IDs whose entries were trimmed.

    ``deliveries`` is ``None`` when every entry is delivered for the first time,
    which spares the hot path a list of ones.
    """

    ids: list[bytes]
    fields: list[RawFields]
    deliveries: list[int] | None
    vanished: list[bytes]


def _empty() -> Page:
    return Page([], [], None, [])


def _raw_reply(response: Any, **_options: Any) -> Any:
    return response


class ConsumerGroup:
    """Reads for one named consumer of one group."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._client = client
        # Same connections; XREADGROUP replies left as Redis sent them (nested lists):
        # redis-py's per-entry dict building is a large share of the hot path.
        self._raw = redis.Redis(connection_pool=client.connection_pool)
        self._raw.set_response_callback("XREADGROUP", _raw_reply)
        self.stream = settings.stream
        self.group = settings.group
        self.consumer = settings.consumer_name
        self._claim_min_idle_ms = int(settings.claim_min_idle_s * 1000)
        self._claim_page = settings.claim_page_size
        self._pending_cursor: bytes | None = b"0-0"
        self._claim_cursor = b"0-0"

    def ensure_group(self) -> None:
        """Create the stream and group if missing; the group starts at the stream's start.

        Under ``maxmemory`` (noeviction) Redis refuses XGROUP CREATE with OOM before
        it looks at the group: an existing group is then fine, a missing one is a
        transient failure (the caller waits for memory).
        """
        try:
            self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group", extra={"stream": self.stream, "group": self.group})
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return
            if isinstance(exc, OutOfMemoryError) and self.group_exists():
                return
            raise

    def group_exists(self) -> bool:
        """Whether the stream has this group (XINFO GROUPS; no stream means no group)."""
        try:
            groups: Any = self._client.xinfo_groups(self.stream)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return False
            raise
        return any(_as_bytes(g["name"]) == self.group.encode() for g in groups)

    @property
    def own_pending_done(self) -> bool:
        return self._pending_cursor is None

    def restart_own_pending(self) -> None:
        """Read the own pending list from its start again."""
        self._pending_cursor = b"0-0"

    def read_own_pending(self, count: int) -> Page:
        """The next page of this consumer's own pending entries; empty once all were read."""
        if self._pending_cursor is None:
            return _empty()
        reply = self._raw.xreadgroup(
            self.group, self.consumer, {self.stream: self._pending_cursor}, count=count
        )
        entries = _entries_of(reply)
        if not entries:
            self._pending_cursor = None
            return _empty()
        self._pending_cursor = entries[-1][0]
        ids = [e[0] for e in entries if e[1]]
        counts = self._delivery_counts(ids)
        return Page(
            ids,
            [e[1] for e in entries if e[1]],
            [counts.get(i, 1) for i in ids],
            [e[0] for e in entries if not e[1]],
        )

    def read_new(self, count: int, block_ms: int | None) -> Page:
        """Entries never delivered to the group, waiting up to ``block_ms`` for the first."""
        reply = self._raw.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms
        )
        entries = _entries_of(reply)
        return Page([e[0] for e in entries], [e[1] for e in entries], None, [])

    def claim_page(self) -> tuple[Page, bool]:
        """One XAUTOCLAIM page of entries idle longer than the claim idle time.

        Returns the page and whether the scan has more pages (the cursor is kept
        between calls, so a scan continues where it stopped).
        """
        reply: Any = self._client.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self._claim_min_idle_ms,
            start_id=self._claim_cursor,
            count=self._claim_page,
        )
        # 6.2 replies [cursor, entries]; 7.x adds the IDs of entries deleted meanwhile.
        cursor: bytes = reply[0]
        raw_entries = reply[1] or []
        vanished = list(reply[2]) if len(reply) > 2 and reply[2] else []
        live: list[tuple[bytes, RawFields]] = []
        for item in raw_entries:
            if item is None or item[0] is None:
                # 6.2: a trimmed entry comes back as (nil, nil) but is now in our
                # pending list; re-reading that list yields its ID, to acknowledge.
                self.restart_own_pending()
                continue
            entry_id, fields = item[0], item[1]
            if fields:
                live.append((entry_id, fields))
            else:
                vanished.append(entry_id)
        self._claim_cursor = cursor
        more = cursor not in (b"0-0", "0-0")
        ids = [i for i, _ in live]
        counts = self._delivery_counts(ids)
        if live:
            log.info(
                "claimed idle entries",
                extra={
                    "consumer": self.consumer,
                    "first_id": ids[0].decode(),
                    "last_id": ids[-1].decode(),
                    "entries": len(live),
                },
            )
        page = Page(ids, [f for _, f in live], [counts.get(i, 1) for i in ids], vanished)
        return page, more

    def _delivery_counts(self, ids: list[bytes]) -> dict[bytes, int]:
        """Times delivered, from the pending list (XREADGROUP and XAUTOCLAIM do not say)."""
        if not ids:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        counts: dict[bytes, int] = {}
        for rows in pipe.execute():
            for row in rows:
                counts[row["message_id"]] = int(row["times_delivered"])
        return counts

    def group_pending(self) -> int:
        """Entries delivered to any consumer of the group and not yet acknowledged."""
        summary: Any = self._client.xpending(self.stream, self.group)
        return int(summary["pending"])

    def has_undelivered(self) -> bool:
        """Whether the stream holds entries after the group's last delivered ID."""
        info: Any = self._client.xinfo_groups(self.stream)
        for group in info:
            name = group["name"]
            if (name.decode() if isinstance(name, bytes) else name) != self.group:
                continue
            last = group["last-delivered-id"]
            newer = self._client.xrange(self.stream, min=b"(" + _as_bytes(last), count=1)
            return bool(newer)
        return False


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _entries_of(reply: Any) -> list[Any]:
    """``[[id, fields], ...]`` from a raw XREADGROUP reply (RESP2 or RESP3)."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: [[id, fields], ...]}
        return list(next(iter(reply.values())))
    entries: list[Any] = reply[0][1]
    return entries
