"""The producer's path to the stream: nothing dropped, order kept, bounded memory.

Updates wait in memory (up to ``memory_limit``) while one writer task XADDs
them in pipelined chunks. While Redis is unreachable the writer retries with
backoff; once memory is full, new updates go to a spool file on disk, and from
then on every update goes there until the writer has replayed the whole spool
(memory first, then the spool, in order), so order is kept end to end. A spool
left by an earlier run is replayed first at start.

With ``explicit_ids`` (only for a stream's sole producer) each entry's ID is
derived from its microsecond timestamp (``<ms>-<us % 1000>``), strictly
increasing. A chunk retried after a dropped connection is then refused by
Redis ("ID equal or smaller than the top item") instead of written twice. A
refusal is never taken on trust: the writer reads the entry with that ID back
and counts it as already written only if it holds the same payload; otherwise
(an entry added with a server-assigned ID in between, e.g. a dead letter
requeued, or a clock that stepped back) the update is written with a
server-assigned ID, and the clock moves past the stream's top. Without explicit
IDs a retried chunk may land twice; the consumer's key dedup absorbs that.

With :class:`ReplicaWait` on (``POSLAKE_PRODUCER_WAIT_REPLICAS``), each pipeline
ends with ``WAIT n timeout`` (or ``WAITAOF 1 n timeout``): a pipeline fewer than
``n`` replicas confirmed is not published, however the XADDs answered. It stays
in memory (or the spool) and is sent again, to this master or, after a
failover, to the new one (repeats are recognised by explicit IDs or deduplicated
by the consumers), so a master lost before its replica had the entries loses
none of them.

Redis failures never drop an update: a transient one (connection loss, OOM
under ``noeviction``, LOADING...) and a refusal (a password or ACL right that
went away while running) are retried with backoff while the updates stay in
memory or the spool; meanwhile :attr:`Outbox.health` says why (``/healthz`` 503).
At start :meth:`Outbox.check_access` tries the password and the right to XADD
once, so a wrong one stops the producer (exit 6) instead of spooling for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import NoReturn

import msgspec

from infra.backoff import backoff_s
from infra.publisher import TrimPolicy
from infra.redis_conn import RedisTarget
from infra.redis_errors import error_code, refusal, reply_kind
from infra.redis_health import RedisHealth
from producer.replica_wait import NotReplicated, ReplicaWait
from producer.resp import RespConnection, RespError, pack_command
from producer.spool import Entry, Spool
from shared.errors import RedisRefused
from shared.kinds import DEFAULT_KIND, kind_of
from shared.wire import CURRENT_VERSION, encode_payload

log = logging.getLogger(__name__)

_DUPLICATE_ID = "equal or smaller than the target stream top item"
# The start-up probe's XADD with ID 0-0 is refused after the ACL and OOM checks and
# before anything is written: this reply means the right to XADD is there.
_PROBE_REFUSED = "must be greater than 0-0"
REPLY_TIMEOUT_S = 30.0


@dataclass
class OutboxStats:
    published: int = 0
    recognised_duplicates: int = 0
    spooled: int = 0
    replayed_from_spool: int = 0
    retries: int = 0
    reconnects: int = 0
    server_assigned_ids: int = 0  # explicit IDs refused and not found: written with '*'
    unreplicated: int = 0  # pipelines the replicas did not confirm in time (sent again)
    ids_moved_past: int = 0  # XSETIDs after a reconnect found the stream's top behind


def entry_id(stamp_us: int) -> bytes:
    return b"%d-%d" % divmod(stamp_us, 1000)


def _payload_of(reply: object) -> bytes | None:
    """The payload field of an XRANGE reply holding one entry, if any."""
    if not isinstance(reply, list) or not reply:
        return None
    fields = reply[0][1]
    for name, value in zip(fields[::2], fields[1::2], strict=True):
        if name == b"payload":
            return bytes(value)
    return None


def split_payload(payload: bytes) -> tuple[bytes | None, bytes]:
    """An entry's kind tag (None for positions) and its JSON payload."""
    if payload.startswith(b"{"):
        return None, payload
    tag, _, json = payload.partition(b" ")
    return tag, json


def id_to_us(entry: bytes) -> int:
    ms, _, seq = entry.partition(b"-")
    return int(ms) * 1000 + min(int(seq or 0), 999)


def _id_tuple(entry: bytes) -> tuple[int, int]:
    ms, _, seq = entry.partition(b"-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class _Counts:
    """What a chunk adds to the stats once it counts as published."""

    published: int = 0
    recognised: int = 0
    server_assigned: int = 0


class Outbox:
    """Buffer, spool and writer task between the IB handlers and the stream."""

    def __init__(
        self,
        redis_url: str,
        stream: str,
        *,
        spool_path: Path,
        memory_limit: int = 100_000,
        chunk: int = 500,
        explicit_ids: bool = False,
        trim: TrimPolicy | None = None,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 10.0,
        on_stream_top: Callable[[int], None] | None = None,
        wait: ReplicaWait | None = None,
    ) -> None:
        self._on_stream_top = on_stream_top
        self._wait = wait or ReplicaWait()
        head_args = [b"XADD", stream.encode()]
        if trim is not None and trim.maxlen is not None:
            head_args += [b"MAXLEN", b"~", str(trim.maxlen).encode()]
        # pack_command of the head, with the array length of the whole command.
        self._xadd_head = pack_command(*head_args).replace(
            b"*%d\r\n" % len(head_args), b"*%d\r\n" % (len(head_args) + 5), 1
        )
        self._xadd_fields = pack_command(b"v", CURRENT_VERSION, b"payload")[4:]
        self._address = RedisTarget.parse(redis_url)
        self._stream = stream.encode()
        self._memory: deque[Entry] = deque()
        self._memory_limit = memory_limit
        self._spool = Spool(spool_path)
        self._spooling = self._spool.unread()
        self._chunk = chunk
        self._explicit = explicit_ids
        self._trim = trim or TrimPolicy()
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connection: RespConnection | None = None
        self._top_us = 0  # the newest stream ID seen (µs), for the clock's floor
        self._newest_seen: tuple[int, int] | None = None  # the same, exactly (ms, seq)
        # A chunk written on this connection that the replicas have not confirmed yet.
        self._unconfirmed: tuple[RespConnection, _Counts, int] | None = None
        self._closing = False
        self.connected = False
        self.health = RedisHealth()
        self.stats = OutboxStats()
        if self._spooling:
            log.warning(
                "replaying a spool left by an earlier run", extra={"spool": str(spool_path)}
            )

    # --- producer side (called from IB event handlers; never blocks) --------

    def put(self, stamp_us: int, update: msgspec.Struct) -> None:
        """Queue one observation of any kind (shared/kinds.py)."""
        kind = kind_of(update)
        payload = encode_payload(update)
        if kind is not DEFAULT_KIND:
            payload = kind.tag.encode() + b" " + payload
        entry = (stamp_us, payload)
        if not self._spooling and len(self._memory) < self._memory_limit:
            self._memory.append(entry)
        else:
            if not self._spooling:
                log.warning(
                    "memory buffer full, spooling to disk",
                    extra={"buffered": len(self._memory), "spool": str(self._spool.path)},
                )
            self._spooling = True
            self._spool.append(entry)
            self.stats.spooled += 1
        self._wake.set()

    @property
    def buffered(self) -> int:
        return len(self._memory)

    def writer_failed(self) -> bool:
        """The writer task ended while the outbox is open (it should never)."""
        return self._task is not None and self._task.done() and not self._closing

    async def check_access(self) -> None:
        """Try the password and the right to XADD (and XREVRANGE with explicit IDs) once.

        Raises :class:`RedisRefused` when Redis refuses either. An unreachable or
        transiently failing Redis only logs: the writer retries and buffers meanwhile.
        """
        probe = pack_command(b"XADD", self._stream, b"0-0", b"v", b"1")
        wait_probe = [self._wait.probe] if self._wait.probe is not None else []
        try:
            connection = await self._connect()
            (reply, *waited) = await self._execute(connection, [probe, *wait_probe])
        except RedisRefused:
            self._drop_connection()
            raise
        except (OSError, ConnectionError, TimeoutError, RespError) as exc:
            self._drop_connection()
            self.health.failed("XADD", exc, _code(exc))
            log.warning("redis not usable at start; buffering", extra={"error": repr(exc)})
            return
        for answer in waited:
            if isinstance(answer, RespError) and reply_kind(answer) == "fatal":
                raise refusal(answer, self._wait.name) from answer
        if isinstance(reply, RespError) and _PROBE_REFUSED not in str(reply):
            if reply_kind(reply) == "fatal":
                raise refusal(reply, "XADD", self._stream.decode()) from reply
            self.health.failed("XADD", reply, _code(reply))
            log.warning("redis not usable at start; buffering", extra={"error": str(reply)})

    def start(self) -> None:
        self._task = asyncio.create_task(self._write_forever(), name="outbox-writer")

    async def close(self, timeout_s: float) -> bool:
        """Publish what is buffered within ``timeout_s``; spool the rest. True if all sent."""
        self._closing = True
        self._wake.set()
        drained = False
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
                drained = True
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        all_sent = not self._memory and not self._spool.unread()
        if self._memory:
            # Redis is still away: keep what is in memory on disk, ahead of the spool.
            log.warning("spooling unsent updates at exit", extra={"count": len(self._memory)})
            self.stats.spooled += len(self._memory)
            pending, _ = self._spool.peek(10**12) if self._spooling else ([], 0)
            self._spool.rewrite([*self._memory, *pending])
            self._memory.clear()
        self._spool.close()
        if self._connection is not None:
            self._connection.close()
        return drained and all_sent

    # --- writer ---------------------------------------------------------------

    async def _write_forever(self) -> None:
        attempt = 0
        while True:
            from_spool = not self._memory and self._spooling
            if not self._memory and not (self._spooling and self._spool.unread()):
                if self._spooling:
                    self._spooling = False
                    log.info("spool replayed, back to memory buffering")
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # A chunk awaiting its replicas is taken again as it was (the head of the
            # memory or the spool does not move meanwhile; only its tail grows).
            size = self._unconfirmed[2] if self._unconfirmed is not None else self._chunk
            try:
                if from_spool:
                    entries, next_offset = self._spool.peek(size)
                    if not entries:  # unreadable rest of the file: nothing more to send
                        self._spool.advance(self._spool.path.stat().st_size)
                        continue
                else:
                    entries, next_offset = list(islice(self._memory, size)), 0
                await self._send(entries)
            except Exception as exc:
                # Connection errors, error replies and refusals are expected while Redis is
                # away or misconfigured; anything else is a bug, logged with its traceback,
                # and retried too: a writer that died would strand every buffered update.
                expected = isinstance(
                    exc, (OSError, ConnectionError, TimeoutError, RespError, RedisRefused)
                )  # NotReplicated is a ConnectionError
                if not expected:
                    log.exception("publishing failed unexpectedly")
                self.health.failed("XADD", exc, _code(exc))
                if not isinstance(exc, NotReplicated):  # kept: the retry only waits again
                    self._drop_connection()
                delay = backoff_s(attempt, self._retry_initial_s, self._retry_max_s)
                attempt += 1
                self.stats.retries += 1
                log.warning(
                    "publishing failed, retrying",
                    extra={
                        "error": repr(exc),
                        "delay_s": round(delay, 3),
                        "buffered": self.buffered,
                    },
                )
                if self._closing and attempt > 3:
                    return  # close() spools what is left
                await asyncio.sleep(delay)
                continue
            if attempt:
                log.info("publishing again", extra={"stream": self._stream.decode()})
                self.health.recovered("XADD")
            attempt = 0
            if from_spool:
                self._spool.advance(next_offset)
                self.stats.replayed_from_spool += len(entries)
            else:
                for _ in entries:
                    self._memory.popleft()

    async def _send(self, entries: list[Entry]) -> None:
        """XADD ``entries`` in one pipeline. An error reply raises: the whole chunk is
        retried (entries before it that landed are then recognised with explicit IDs,
        or deduplicated by the consumer's key otherwise).

        With :class:`ReplicaWait`, a chunk too few replicas confirmed raises
        :class:`NotReplicated` and is not counted; while the connection it was
        written on lasts, the retry only waits again (WAIT covers every write of a
        connection), so the stream gets no copies; on a new connection (the master
        may have died with it) the chunk is written again.
        """
        connection = await self._connect()
        pending = self._unconfirmed
        if pending is not None and pending[0] is connection and pending[2] == len(entries):
            wait = self._wait.command
            assert wait is not None
            (reply,) = await self._execute(connection, [wait])
            self._require_replicas(reply)
            self._apply(pending[1])
            self._unconfirmed = None
            return
        self._unconfirmed = None
        commands = [self._xadd(stamp, payload, self._explicit) for stamp, payload in entries]
        wait = self._wait.command
        if wait is not None:
            commands.append(wait)
        replies = await self._execute(connection, commands)
        waited = replies.pop() if wait is not None else None
        refused: list[Entry] = []
        newest: object = None
        for index, reply in enumerate(replies):
            if isinstance(reply, RespError):
                if self._explicit and _DUPLICATE_ID in str(reply):
                    refused.append(entries[index])
                    continue
                # e.g. OOM or NOPERM: keep this entry and the rest for a retry.
                self.stats.published += index - len(refused)
                log.error("XADD rejected", extra={"error": str(reply), "stream": self._stream})
                self._raise_reply(reply, "XADD")
            newest = reply
        # IDs only grow: the last one is the newest. Noted even if the replicas have not
        # confirmed it: consumers may have read it already, and its ID is taken.
        self._note_top(newest)
        counts = _Counts(published=len(replies) - len(refused))
        if refused:
            recognised, rewritten = await self._settle_refused(connection, refused)
            counts = _Counts(counts.published + rewritten, recognised, rewritten)
            if wait is not None and rewritten:
                (waited,) = await self._execute(connection, [wait])  # covers those too
        if wait is not None:
            try:
                self._require_replicas(waited)
            except NotReplicated:
                self._unconfirmed = (connection, counts, len(entries))
                raise
        self._apply(counts)

    def _apply(self, counts: _Counts) -> None:
        self.stats.published += counts.published
        self.stats.recognised_duplicates += counts.recognised
        self.stats.server_assigned_ids += counts.server_assigned

    def _require_replicas(self, reply: object) -> None:
        """Raise unless the replicas confirmed what this connection wrote."""
        if isinstance(reply, RespError):
            self._raise_reply(reply, self._wait.name)
        if not self._wait.confirmed(reply):
            self.stats.unreplicated += 1
            raise NotReplicated(
                f"{reply!r} of {self._wait.replicas} replicas confirmed the writes within "
                f"{self._wait.timeout_ms} ms: not published yet, waiting again"
            )

    async def _settle_refused(
        self, connection: RespConnection, refused: list[Entry]
    ) -> tuple[int, int]:
        """Entries whose explicit ID Redis refused: already written by us (same payload
        under that ID), or not there at all, then written with a server-assigned ID.
        Returns how many were recognised and how many written again."""
        lookups = [
            pack_command(b"XRANGE", self._stream, entry_id(stamp), entry_id(stamp))
            for stamp, _ in refused
        ]
        found = await self._execute(connection, lookups)
        missing: list[Entry] = []
        recognised = 0
        for (stamp, payload), reply in zip(refused, found, strict=True):
            if isinstance(reply, RespError):
                self._raise_reply(reply, "XRANGE")
            stored = _payload_of(reply)
            if stored == split_payload(payload)[1]:
                recognised += 1
            else:
                missing.append((stamp, payload))
        if not missing:
            return recognised, 0
        log.warning(
            "explicit IDs behind the stream's top: writing with server-assigned IDs",
            extra={"count": len(missing), "stream": self._stream.decode()},
        )
        replies = await self._execute(
            connection, [self._xadd(stamp, payload, False) for stamp, payload in missing]
        )
        for reply in replies:
            if isinstance(reply, RespError):
                self._raise_reply(reply, "XADD")
            self._note_top(reply)
        return recognised, len(missing)

    def _note_top(self, reply: object) -> None:
        # Keep the clock past the stream's newest ID, so explicit IDs stay ahead of it.
        if isinstance(reply, bytes):
            exact = _id_tuple(reply)
            if self._newest_seen is None or exact > self._newest_seen:
                self._newest_seen = exact
            top = id_to_us(reply)
            if top > self._top_us:
                self._top_us = top
                if self._on_stream_top is not None:
                    self._on_stream_top(top)

    async def _execute(self, connection: RespConnection, commands: list[bytes]) -> list[object]:
        # A half-open connection (a partitioned or vanished host) must not hang the writer.
        return await asyncio.wait_for(connection.execute(commands), REPLY_TIMEOUT_S)

    def _xadd(self, stamp_us: int, payload: bytes, explicit: bool) -> bytes:
        trim = self._trim
        entry = entry_id(stamp_us) if explicit else b"*"
        tag, json = split_payload(payload)
        kind_fields = (b"kind", tag) if tag is not None else ()
        if tag is not None or (trim.min_age_s is not None and trim.maxlen is None):
            head: tuple[bytes, ...] = (b"XADD", self._stream)
            if trim.maxlen is not None:
                head += (b"MAXLEN", b"~", str(trim.maxlen).encode())
            elif trim.min_age_s is not None:
                cutoff_ms = max(0, stamp_us // 1000 - int(trim.min_age_s * 1000))
                head += (b"MINID", b"~", b"%d-0" % cutoff_ms)
            return pack_command(*head, entry, b"v", CURRENT_VERSION, *kind_fields,
                                b"payload", json)  # fmt: skip
        # The common case, hot in a burst: a constant head and tail around two values.
        return b"%s$%d\r\n%s\r\n%s$%d\r\n%s\r\n" % (
            self._xadd_head,
            len(entry),
            entry,
            self._xadd_fields,
            len(payload),
            payload,
        )

    async def _connect(self) -> RespConnection:
        if self._connection is not None:
            return self._connection
        connection = await RespConnection.open(self._address)
        # With explicit IDs, always: the clock must stay ahead of the stream's top. Else
        # once something was published: a new master (a failover) may be behind it.
        if self._explicit or self._newest_seen is not None:
            try:
                (top,) = await self._execute(
                    connection,
                    [pack_command(b"XREVRANGE", self._stream, b"+", b"-", b"COUNT", b"1")],
                )
            except BaseException:
                connection.close()
                raise
            if isinstance(top, RespError):
                if self._explicit:
                    connection.close()
                    self._raise_reply(top, "XREVRANGE")
                self._guard_refused(top, "XREVRANGE")
            else:
                await self._stay_past(connection, top[0][0] if top else None)  # type: ignore[index]
        self._connection = connection
        if not self.connected:
            log.info("connected to Redis", extra={"stream": self._stream.decode()})
        self.connected = True
        self.stats.reconnects += 1
        return connection

    async def _stay_past(self, connection: RespConnection, top: bytes | None) -> None:
        """Keep the stream's IDs past the newest this producer has seen.

        A master that took over after a failover may lack the newest entries (lost
        with the old master) and would hand their IDs out again, to other entries:
        XSETID moves the stream's last ID back to where this producer saw it. With
        explicit IDs the clock also moves past a top that is ahead of it.
        """
        seen = self._newest_seen
        if top is not None and (seen is None or _id_tuple(top) >= seen):
            self._note_top(top)
            return
        if seen is None or top is None:
            return  # nothing seen yet; or no stream there (XSETID needs one)
        newest = b"%d-%d" % seen
        reply = (await self._execute(connection, [pack_command(b"XSETID", self._stream, newest)]))[
            0
        ]
        if isinstance(reply, RespError):
            self._guard_refused(reply, "XSETID")
            return
        self.stats.ids_moved_past += 1
        log.warning(
            "the stream's top is behind the newest ID this producer saw (a failover lost "
            "entries?): its last ID moved past it, so no ID is handed out twice",
            extra={
                "stream": self._stream.decode(),
                "top": top.decode() if top else None,
                "newest_seen": newest.decode(),
            },
        )

    def _guard_refused(self, reply: RespError, command: str) -> None:
        """A refused guard command: warned, and publishing goes on (IDs may repeat)."""
        log.warning(
            "cannot keep the stream's IDs past the newest this producer saw",
            extra={
                "command": command,
                "error": str(refusal(reply, command, self._stream.decode())),
            },
        )

    def _raise_reply(self, reply: RespError, command: str) -> NoReturn:
        """A transient reply raises itself (retried); any other becomes RedisRefused."""
        if reply_kind(reply) == "transient":
            raise reply
        raise refusal(reply, command, self._stream.decode()) from reply

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self.connected = False


def _code(exc: BaseException) -> str:
    """The failure's code (``OOM``, ``NOPERM``, ``CONNECTION``, ``UNREPLICATED``...) for
    health and metrics."""
    if isinstance(exc, NotReplicated):
        return "UNREPLICATED"
    return error_code(exc.__cause__ if isinstance(exc, RedisRefused) and exc.__cause__ else exc)
