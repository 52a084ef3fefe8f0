"""A minimal pipelined Redis connection for the producer's XADD path.

redis-py's asyncio pipeline builds every command in Python and awaits every
reply; measured here it tops out near 27,000 XADD/s, which caps a snapshot
burst. This connection writes pre-packed RESP commands in one write and
parses the replies with hiredis in bulk (about 85,000 XADD/s on the same
machine, bench/producer_burst.py). It speaks only what the producer needs:
connect (TCP, TLS or a Unix socket, AUTH, SELECT: the URL means what it
means to redis-py, infra/redis_conn.py), send a batch, read its replies.
Error replies come back as :class:`RespError` values in the reply list, so one
rejected XADD (e.g. an explicit ID already written) does not hide the others.
A refused AUTH or SELECT (wrong password, missing right) or a TLS set-up that
cannot succeed raises :class:`shared.errors.RedisRefused` from
:meth:`RespConnection.open`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Sequence

import hiredis

from infra.redis_conn import TLS_VERDICT_WAIT_S, RedisTarget, tls_failure
from infra.redis_errors import refusal, reply_kind

READ_SIZE = 1 << 16


class RespError(Exception):
    """An error reply from Redis (kept as a value in the reply list)."""


def pack_command(*args: bytes) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


async def _tls_verdict(writer: asyncio.StreamWriter) -> None:
    """Wait for the server's verdict on our certificate (TLS 1.3 session tickets or an
    alert), as :func:`infra.redis_conn.await_tls_verdict` does for redis-py."""
    tls: ssl.SSLObject | None = writer.get_extra_info("ssl_object")
    if tls is None or tls.version() != "TLSv1.3":
        return
    deadline = time.monotonic() + TLS_VERDICT_WAIT_S
    while time.monotonic() < deadline and not writer.is_closing():
        session = tls.session
        if session is not None and session.has_ticket:
            return
        await asyncio.sleep(0.002)


async def master_address(address: RedisTarget, timeout_s: float) -> tuple[str, int]:
    """The master's address as the first sentinel that answers names it (asked on every
    connect: after a failover the sentinels name the new master)."""
    assert address.master_name is not None
    context = address.tls.context() if address.tls is not None else None
    failures: list[str] = []
    for host, port in address.sentinels:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context), timeout_s
            )
        except ssl.SSLError as exc:
            if tls_failure(exc) is not None:
                raise refusal(exc) from exc  # a certificate that cannot work: exit 6
            failures.append(f"{host}:{port} {type(exc).__name__}")
            continue
        except (OSError, TimeoutError) as exc:
            failures.append(f"{host}:{port} {type(exc).__name__}")
            continue
        sentinel = RespConnection(reader, writer)
        try:
            query = pack_command(
                b"SENTINEL", b"get-master-addr-by-name", address.master_name.encode()
            )
            (reply,) = await asyncio.wait_for(sentinel.execute([query]), timeout_s)
        except (OSError, TimeoutError, ConnectionError) as exc:
            failures.append(f"{host}:{port} {type(exc).__name__}")
            continue
        finally:
            sentinel.close()
        if isinstance(reply, list) and len(reply) == 2:
            return reply[0].decode(), int(reply[1])
        said = f"answered {reply}" if isinstance(reply, RespError) else "does not know it"
        failures.append(f"{host}:{port} {said}")
    raise ConnectionError(
        f"no sentinel names the master {address.master_name!r}: {'; '.join(failures)}"
    )


class RespConnection:
    """One connection; not shared between tasks (the producer has one writer task)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = hiredis.Reader(replyError=RespError)

    @classmethod
    async def open(cls, address: RedisTarget, timeout_s: float = 5.0) -> RespConnection:
        """Connect as redis-py would for the same URL (TLS options included).

        A TLS set-up that cannot succeed (certificate not trusted, client certificate
        missing or refused) raises :class:`shared.errors.RedisRefused`, like a refused
        AUTH: retrying it would spool for ever.
        """
        try:
            return await cls._open(address, timeout_s)
        except ssl.SSLError as exc:
            if tls_failure(exc) is None:
                raise  # e.g. the server went away mid-handshake: retried
            raise refusal(exc) from exc

    @classmethod
    async def _open(cls, address: RedisTarget, timeout_s: float) -> RespConnection:
        if address.path is not None:
            opening = asyncio.open_unix_connection(address.path)
        else:
            context = address.tls.context() if address.tls is not None else None
            host, port = address.host, address.port
            if address.master_name is not None:
                host, port = await master_address(address, timeout_s)
            opening = asyncio.open_connection(host, port, ssl=context)
        reader, writer = await asyncio.wait_for(opening, timeout_s)
        if address.tls is not None:
            await _tls_verdict(writer)
        raw = writer.get_extra_info("socket")
        if raw is not None and address.path is None:
            # Notice a vanished peer on an idle connection too.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        connection = cls(reader, writer)
        try:
            setup: list[bytes] = []
            names: list[str] = []
            if address.password is not None:
                auth = [b"AUTH"]
                if address.username:
                    auth.append(address.username.encode())
                setup.append(pack_command(*auth, address.password.encode()))
                names.append("AUTH")
            if address.db:
                setup.append(pack_command(b"SELECT", str(address.db).encode()))
                names.append("SELECT")
            if address.tls is not None and not setup:
                # A server that wants a client certificate says so only after the
                # handshake: one round trip here (HELLO needs no ACL right) hears it.
                setup.append(pack_command(b"HELLO", b"2"))
                names.append("HELLO")
            if setup:
                replies = await asyncio.wait_for(connection.execute(setup), timeout_s)
                for name, reply in zip(names, replies, strict=True):
                    if not isinstance(reply, RespError):
                        continue
                    if reply_kind(reply) == "fatal":  # WRONGPASS, NOPERM, a bad database
                        raise refusal(reply, name) from reply
                    raise ConnectionError(f"Redis refused {name} for now: {reply}")
        except (ConnectionError, OSError) as exc:
            connection.close()
            # The server's TLS alert (client certificate refused) may close the
            # connection while a command is on its way: the write then fails with a
            # reset, and the alert itself is what the stream recorded.
            stored = reader.exception()
            if address.tls is not None and isinstance(stored, ssl.SSLError):
                raise stored from exc
            raise
        except BaseException:
            connection.close()
            raise
        return connection

    async def execute(self, packed: Sequence[bytes]) -> list[object]:
        """Send packed commands in one write; return their replies in order."""
        self._writer.write(b"".join(packed))
        await self._writer.drain()
        replies: list[object] = []
        wanted = len(packed)
        parser = self._parser
        while len(replies) < wanted:
            reply = parser.gets()
            if reply is False:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                parser.feed(data)
                continue
            replies.append(reply)
        return replies

    def close(self) -> None:
        self._writer.close()
