"""Publishing updates to the stream: pipelined XADD with optional approximate trimming.

Bursts (IB's snapshot at connect) go out in pipelines of ``chunk`` entries, one
round trip each. A transient failure (infra/redis_errors.py) retries the
unfinished chunk with backoff; an XADD may then land twice, which the consumer's
key dedup absorbs. A fatal one (no permission, wrong password) raises
:class:`shared.errors.RedisRefused` at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from infra.backoff import backoff_s
from infra.redis_errors import is_transient, refusal
from shared.errors import StreamUnavailable
from shared.wire import encode_many

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrimPolicy:
    """Approximate trimming on XADD: by length, or by age (MINID), or neither.

    Trimming ignores consumer groups: entries a lagging group has not read yet
    are dropped too. Size it well above the worst expected consumer lag.
    """

    maxlen: int | None = None
    min_age_s: float | None = None

    def xadd_kwargs(self, now_s: float) -> dict[str, object]:
        if self.maxlen is not None:
            return {"maxlen": self.maxlen, "approximate": True}
        if self.min_age_s is not None:
            return {"minid": f"{int((now_s - self.min_age_s) * 1000)}-0", "approximate": True}
        return {}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff for transient Redis errors; ``attempts`` bounds one publish."""

    attempts: int = 8
    initial_s: float = 0.1
    max_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return backoff_s(attempt, self.initial_s, self.max_s, jitter=False)


def _queue_xadds(
    pipe: redis.client.Pipeline | aioredis.client.Pipeline,
    stream: str,
    entries: list[dict[str, bytes]],
    trim: TrimPolicy,
) -> None:
    options = trim.xadd_kwargs(time.time())
    for fields in entries:
        pipe.xadd(stream, fields, **options)  # type: ignore[arg-type]


class StreamPublisher:
    """Synchronous publisher (tools, benchmarks, tests)."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        trim: TrimPolicy | None = None,
        chunk: int = 500,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._client = client
        self._stream = stream
        self._trim = trim or TrimPolicy()
        self._chunk = chunk
        self._retry = retry or RetryPolicy()

    def publish(self, updates: Sequence[msgspec.Struct]) -> list[bytes]:
        """XADD every update in order; returns the entry IDs."""
        ids: list[bytes] = []
        for start in range(0, len(updates), self._chunk):
            ids.extend(self._publish_chunk(updates[start : start + self._chunk]))
        return ids

    def _publish_chunk(self, updates: Sequence[msgspec.Struct]) -> list[bytes]:
        entries = encode_many(updates)
        for attempt in range(self._retry.attempts):
            try:
                pipe = self._client.pipeline(transaction=False)
                _queue_xadds(pipe, self._stream, entries, self._trim)
                return list(pipe.execute())
            except (RedisError, OSError) as exc:
                if not is_transient(exc):
                    raise refusal(exc, "XADD", self._stream) from None
                delay = self._retry.delay(attempt)
                log.warning("xadd failed, retrying", extra={"error": str(exc), "delay_s": delay})
                time.sleep(delay)
        raise StreamUnavailable(f"could not publish to {self._stream!r} after retries")


class AsyncStreamPublisher:
    """Asyncio publisher for the producer, which runs on ib_async's event loop."""

    def __init__(
        self,
        client: aioredis.Redis,
        stream: str,
        trim: TrimPolicy | None = None,
        chunk: int = 500,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._client = client
        self._stream = stream
        self._trim = trim or TrimPolicy()
        self._chunk = chunk
        self._retry = retry or RetryPolicy()

    async def publish(self, updates: Sequence[msgspec.Struct]) -> list[bytes]:
        """XADD every update in order; returns the entry IDs."""
        ids: list[bytes] = []
        for start in range(0, len(updates), self._chunk):
            ids.extend(await self._publish_chunk(updates[start : start + self._chunk]))
        return ids

    async def _publish_chunk(self, updates: Sequence[msgspec.Struct]) -> list[bytes]:
        entries = encode_many(updates)
        for attempt in range(self._retry.attempts):
            try:
                pipe = self._client.pipeline(transaction=False)
                _queue_xadds(pipe, self._stream, entries, self._trim)
                return list(await pipe.execute())
            except (RedisError, OSError) as exc:
                if not is_transient(exc):
                    raise refusal(exc, "XADD", self._stream) from None
                delay = self._retry.delay(attempt)
                log.warning("xadd failed, retrying", extra={"error": str(exc), "delay_s": delay})
                await asyncio.sleep(delay)
        raise StreamUnavailable(f"could not publish to {self._stream!r} after retries")
