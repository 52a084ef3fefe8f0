"""The connection keeper: one ib_async connection kept up, and the feeds told about it.

Connect with backoff and jitter (longer after error 326, client ID in use);
after IB has been quiet for ``ib_idle_probe_s`` ask for the current time and
reconnect if no answer comes; on 1101 (IB link restored, data lost) every feed
subscribes again. Each kind's subscriber (positions, executions, account values)
is a :class:`Feed`: told when a connection is being made, when it is up (its
startup snapshots in), when IB forgot its subscriptions, and when it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from infra.backoff import backoff_s
from shared.settings import Settings

log = logging.getLogger(__name__)

LINK_LOST, LINK_RESTORED_DATA_LOST, LINK_RESTORED_DATA_KEPT = 1100, 1101, 1102
CLIENT_ID_IN_USE = 326


@dataclass
class SourceStats:
    received: int = 0
    published: int = 0
    unmappable: int = 0
    connects: int = 0
    disconnects: int = 0
    client_id_refusals: int = 0
    probes_failed: int = 0
    closed_while_away: int = 0  # positions gone from IB's snapshot after a reconnect
    snapshots: int = 0  # position snapshots published (one per account and download)


class ClientIdInUse(ConnectionError):
    """IB refused the client ID (error 326)."""


class Feed(Protocol):
    """One kind's subscriber, as the keeper drives it."""

    def on_connecting(self) -> None: ...

    async def on_connected(self) -> None: ...

    async def on_link_restored(self) -> None: ...

    def on_disconnected(self) -> None: ...

    async def serve(self) -> None: ...


class ConnectionKeeper:
    """Keeps ``ib`` connected until stopped, and the feeds in step with it."""

    def __init__(
        self, settings: Settings, ib: Any, stats: SourceStats, feeds: Sequence[Feed]
    ) -> None:
        self.settings = settings
        self.ib = ib
        self.stats = stats
        self.feeds = list(feeds)
        self._refused: asyncio.Future[None] | None = None
        self._disconnected = asyncio.Event()
        self._resubscribe = asyncio.Event()
        self.last_data_at = time.monotonic()
        ib.errorEvent += self._on_error
        ib.disconnectedEvent += self._on_disconnected
        ib.client.conn.hasData += self._on_socket_data

    def _on_error(self, req_id: int, code: int, text: str, contract: Any = None) -> None:
        if code == CLIENT_ID_IN_USE:
            self.stats.client_id_refusals += 1
            if self._refused is not None and not self._refused.done():
                self._refused.set_exception(ClientIdInUse(text))
        elif code == LINK_LOST:
            log.warning("IB link lost (1100)", extra={"text": text})
        elif code == LINK_RESTORED_DATA_LOST:
            log.warning("IB link restored, data lost (1101): resubscribing", extra={"text": text})
            self._resubscribe.set()
        elif code == LINK_RESTORED_DATA_KEPT:
            log.info("IB link restored, data kept (1102)", extra={"text": text})

    def _on_socket_data(self, _data: bytes) -> None:
        self.last_data_at = time.monotonic()

    def _on_disconnected(self) -> None:
        self._disconnected.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected and publishing until ``stop`` is set."""
        attempt = 0
        while not stop.is_set():
            delay = 0.0
            try:
                await self._connect()
                attempt = 0
                await self._serve(stop)
            except ClientIdInUse:
                log.error(
                    "IB refused client id (326): another client uses it",
                    extra={"client_id": self.settings.ib_client_id},
                )
                delay = self.settings.ib_client_id_backoff_s
            except (ConnectionError, OSError, TimeoutError) as exc:
                log.warning("IB connection failed", extra={"error": repr(exc), "attempt": attempt})
            finally:
                self._forget_connection()
            if stop.is_set():
                break
            delay = max(delay, self._backoff(attempt))
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        self.ib.disconnect()

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        return backoff_s(attempt, s.ib_reconnect_initial_s, s.ib_reconnect_max_s)

    async def _connect(self) -> None:
        settings = self.settings
        self._disconnected.clear()
        self._resubscribe.clear()
        for feed in self.feeds:
            feed.on_connecting()
        loop = asyncio.get_running_loop()
        self._refused = loop.create_future()
        connecting = asyncio.ensure_future(
            self.ib.connectAsync(
                settings.ib_host,
                settings.ib_port,
                clientId=settings.ib_client_id,
                timeout=settings.ib_connect_timeout_s,
                readonly=True,
                account=settings.ib_accounts[0] if settings.ib_accounts else "",
                raiseSyncErrors=True,
            )
        )
        # A refused client ID only fails connectAsync after its whole timeout: race it.
        done, _ = await asyncio.wait(
            {connecting, self._refused}, return_when=asyncio.FIRST_COMPLETED
        )
        if self._refused in done:
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            self._refused.result()
        self._refused.cancel()
        await connecting
        self.stats.connects += 1
        log.info(
            "connected to IB",
            extra={
                "host": settings.ib_host,
                "port": settings.ib_port,
                "accounts": self.ib.managedAccounts(),
            },
        )
        # ib_async's startup requests are answered (the snapshots are in): now the feeds.
        for feed in self.feeds:
            await feed.on_connected()

    async def _serve(self, stop: asyncio.Event) -> None:
        """Wait for stop or a disconnect; probe liveness when IB is quiet; resubscribe on 1101."""
        idle_s = self.settings.ib_idle_probe_s
        check_every_s = min(1.0, idle_s / 4)

        async def tick() -> None:
            await asyncio.sleep(check_every_s)

        waiters: dict[str, Callable[[], Coroutine[Any, Any, object]]] = {
            "stop": stop.wait,
            "disconnected": self._disconnected.wait,
            "resubscribe": self._resubscribe.wait,
            "tick": tick,
        }
        self.last_data_at = time.monotonic()
        pumps = [asyncio.create_task(feed.serve()) for feed in self.feeds]
        try:
            await self._serve_loop(stop, waiters, idle_s)
        finally:
            for pump in pumps:
                pump.cancel()
            for pump in pumps:
                with contextlib.suppress(asyncio.CancelledError):
                    await pump

    async def _serve_loop(
        self,
        stop: asyncio.Event,
        waiters: dict[str, Callable[[], Coroutine[Any, Any, object]]],
        idle_s: float,
    ) -> None:
        while True:
            tasks = {asyncio.ensure_future(wait()): name for name, wait in waiters.items()}
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            fired = {tasks[task] for task in done}
            if "stop" in fired:
                return
            if "disconnected" in fired:
                self.stats.disconnects += 1
                raise ConnectionError("IB closed the connection")
            if "resubscribe" in fired:
                self._resubscribe.clear()
                for feed in self.feeds:
                    await feed.on_link_restored()
            if time.monotonic() - self.last_data_at >= idle_s:
                await self._probe()
                self.last_data_at = time.monotonic()

    async def _probe(self) -> None:
        timeout = min(self.settings.ib_connect_timeout_s, 10.0)
        try:
            await asyncio.wait_for(self.ib.reqCurrentTimeAsync(), timeout)
        except (TimeoutError, ConnectionError) as exc:
            self.stats.probes_failed += 1
            log.warning(
                "IB did not answer a liveness probe: reconnecting", extra={"error": repr(exc)}
            )
            self.ib.disconnect()
            raise ConnectionError("liveness probe failed") from exc

    def _forget_connection(self) -> None:
        if self.ib.isConnected():
            self.ib.disconnect()
        for feed in self.feeds:
            feed.on_disconnected()
