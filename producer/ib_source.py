"""The IB side of the producer: one ib_async connection, kept up, turned into updates.

Accounts: IB streams ``updatePortfolio`` for one account at a time, so the
first selected account (``POSLAKE_IB_ACCOUNTS``, else the login's first) gets
the portfolio stream; every other selected account is covered by IB's
position stream plus a PnL-single subscription per open position, which
fills market value and P&L (market price is derived from the value). A
position that closes is published with position 0; its PnL subscription is
cancelled after a grace period, and every subscribe and cancel goes through
:class:`~producer.pnl_subscriptions.PnlSubscriptions`, which keeps them within
a request budget (ib_async queues anything past 45 requests/s without bound).

Staying up: connect with backoff and jitter (longer after error 326, client
ID in use); after IB has been quiet for ``ib_idle_probe_s`` ask for the
current time and reconnect if no answer comes; on 1101 (IB link restored,
data lost) resubscribe. After any reconnect IB resends the snapshot, which is
published as new observations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ib_async import IB

from infra.backoff import backoff_s
from producer import ib_decoders
from producer.account_values import AccountValueFeed
from producer.executions import ExecutionFeed
from producer.ib_mapping import (
    ContractInfo,
    MappingError,
    UpdateClock,
    build_update,
    map_ib_contract,
    number,
    price_from_value,
)
from producer.outbox import Outbox
from producer.pnl_subscriptions import PnlSubscriptions
from shared.settings import Settings

log = logging.getLogger(__name__)

LINK_LOST, LINK_RESTORED_DATA_LOST, LINK_RESTORED_DATA_KEPT = 1100, 1101, 1102
CLIENT_ID_IN_USE = 326


@dataclass(slots=True)
class HeldPosition:
    contract: ContractInfo
    position: float
    average_cost: float | None


@dataclass(slots=True)
class PnlFigures:
    position: float
    unrealized_pnl: float | None
    realized_pnl: float | None
    value: float | None


@dataclass
class SourceStats:
    received: int = 0
    published: int = 0
    unmappable: int = 0
    connects: int = 0
    disconnects: int = 0
    client_id_refusals: int = 0
    probes_failed: int = 0


class ClientIdInUse(ConnectionError):
    """IB refused the client ID (error 326)."""


class IbSource:
    """Connects, subscribes and publishes every position observation to the outbox."""

    def __init__(self, settings: Settings, outbox: Outbox, clock: UpdateClock) -> None:
        self.settings = settings
        self.outbox = outbox
        self.clock = clock
        self.stats = SourceStats()
        self.ib = IB()
        self.portfolio_account: str | None = None
        self.position_accounts: frozenset[str] = frozenset()
        self.held: dict[tuple[str, int], HeldPosition] = {}
        self.pnl: dict[tuple[str, int], PnlFigures] = {}
        self.subscriptions = PnlSubscriptions(
            self.ib,
            settings.ib_pnl_requests_per_s,
            settings.ib_pnl_cancel_grace_s,
            settings.ib_pnl_max_subscriptions,
        )
        self.executions = ExecutionFeed(outbox, clock, settings.ib_timezone)
        self.account_values = AccountValueFeed(outbox, clock)
        self._refused: asyncio.Future[None] | None = None
        self._disconnected = asyncio.Event()
        self._resubscribe = asyncio.Event()
        self.last_data_at = time.monotonic()
        self._wire_events()

    # --- events -----------------------------------------------------------------

    def _wire_events(self) -> None:
        ib = self.ib
        ib.client.apiStart += self._select_accounts
        ib.errorEvent += self._on_error
        ib.disconnectedEvent += self._on_disconnected
        ib.client.conn.hasData += self._on_socket_data
        self.executions.install(ib)
        self.account_values.install(ib)
        if self.settings.ib_fast_decode:
            self._demux = ib_decoders.install(ib, self)
        else:
            ib.updatePortfolioEvent += self._on_portfolio_item
            ib.positionEvent += self._on_position_item
            ib.pnlSingleEvent += self._on_pnl_single_item

    def _select_accounts(self) -> None:
        # apiStart fires once managedAccounts arrived, before any startup request.
        login = list(self.ib.client.getAccounts())
        wanted = self.settings.ib_accounts or login
        missing = [a for a in wanted if a not in login]
        if missing:
            log.error("configured accounts are not in this login", extra={"missing": missing})
        selected = [a for a in wanted if a in login]
        self.portfolio_account = selected[0] if selected else None
        self.position_accounts = frozenset(selected[1:])
        log.info(
            "accounts selected",
            extra={
                "portfolio": self.portfolio_account,
                "positions": sorted(self.position_accounts),
            },
        )

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

    def wants_positions_of(self, account: str) -> bool:
        return account in self.position_accounts

    def on_unmappable(self, error: MappingError) -> None:
        self.stats.unmappable += 1
        log.error("update skipped: IB contract does not fit the model", extra={"error": str(error)})

    # --- updates ------------------------------------------------------------------

    def _publish(
        self,
        account: str,
        contract: ContractInfo,
        position: float,
        market_price: float | None = None,
        market_value: float | None = None,
        average_cost: float | None = None,
        unrealized_pnl: float | None = None,
        realized_pnl: float | None = None,
    ) -> None:
        stamp = self.clock.stamp_us()
        try:
            update = build_update(
                account,
                contract,
                position,
                UpdateClock.as_datetime(stamp),
                market_price,
                market_value,
                average_cost,
                unrealized_pnl,
                realized_pnl,
            )
        except MappingError as exc:
            self.on_unmappable(exc)
            return
        self.outbox.put(stamp, update)
        self.stats.published += 1

    def on_portfolio(
        self,
        account: str,
        contract: ContractInfo,
        position: float,
        market_price: float | None,
        market_value: float | None,
        average_cost: float | None,
        unrealized_pnl: float | None,
        realized_pnl: float | None,
    ) -> None:
        self.stats.received += 1
        if account != self.portfolio_account:
            return
        self._publish(
            account,
            contract,
            position,
            market_price,
            market_value,
            average_cost,
            unrealized_pnl,
            realized_pnl,
        )

    def on_position(
        self, account: str, contract: ContractInfo, position: float, average_cost: float | None
    ) -> None:
        self.stats.received += 1
        if account not in self.position_accounts:
            return  # the portfolio account is covered by updatePortfolio
        key = (account, contract.conid)
        figures = self.pnl.get(key)
        values: dict[str, float | None] = {"average_cost": average_cost}
        if figures is not None and figures.position == position:
            values.update(self._pnl_values(figures, contract))
        self._publish(account, contract, position, **values)
        if position == 0:
            self.held.pop(key, None)
            self.pnl.pop(key, None)
            self.subscriptions.drop(key)
        else:
            self.held[key] = HeldPosition(contract, position, average_cost)
            self.subscriptions.want(key)

    def on_pnl_single(
        self,
        req_id: int,
        position: float,
        daily_pnl: float | None,
        unrealized_pnl: float | None,
        realized_pnl: float | None,
        value: float | None,
    ) -> None:
        self.stats.received += 1
        key = self.subscriptions.key_of(req_id)
        if key is None:
            return
        held = self.held.get(key)
        if held is None or position == 0:
            return  # a close is published from the position stream
        figures = PnlFigures(position, unrealized_pnl, realized_pnl, value)
        self.pnl[key] = figures
        self._publish(
            key[0],
            held.contract,
            position,
            average_cost=held.average_cost,
            **self._pnl_values(figures, held.contract),
        )

    @staticmethod
    def _pnl_values(figures: PnlFigures, contract: ContractInfo) -> dict[str, float | None]:
        return {
            "market_value": figures.value,
            "market_price": price_from_value(figures.value, figures.position, contract.multiplier),
            "unrealized_pnl": figures.unrealized_pnl,
            "realized_pnl": figures.realized_pnl,
        }

    # ib_async's own events (POSLAKE_IB_FAST_DECODE=false) feed the same methods.

    def _on_portfolio_item(self, item: Any) -> None:
        try:
            contract = map_ib_contract(item.contract)
        except MappingError as exc:
            self.on_unmappable(exc)
            return
        self.on_portfolio(
            item.account,
            contract,
            float(item.position),
            number(item.marketPrice),
            number(item.marketValue),
            number(item.averageCost),
            number(item.unrealizedPNL),
            number(item.realizedPNL),
        )

    def _on_position_item(self, item: Any) -> None:
        try:
            contract = map_ib_contract(item.contract)
        except MappingError as exc:
            self.on_unmappable(exc)
            return
        self.on_position(item.account, contract, float(item.position), number(item.avgCost))

    def _on_pnl_single_item(self, item: Any) -> None:
        req_id = self.ib.wrapper.pnlSingleKey2ReqId.get((item.account, item.modelCode, item.conId))
        if req_id is not None:
            self.on_pnl_single(
                req_id,
                float(item.position),
                number(item.dailyPnL),
                number(item.unrealizedPnL),
                number(item.realizedPnL),
                number(item.value),
            )

    # --- connection lifecycle -----------------------------------------------------

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
        if (
            not settings.ib_accounts
            and self.portfolio_account
            and len(self.ib.managedAccounts()) > 1
        ):
            # ib_async only subscribes a multi-account login's portfolio when told which.
            await asyncio.wait_for(
                self.ib.reqAccountUpdatesAsync(self.portfolio_account),
                settings.ib_connect_timeout_s,
            )
        self.account_values.subscribe_pnl(self.ib, self._accounts())

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
        pump = asyncio.create_task(self.subscriptions.run())
        try:
            await self._serve_loop(stop, waiters, idle_s)
        finally:
            pump.cancel()
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
                await self._redo_subscriptions()
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

    async def _redo_subscriptions(self) -> None:
        timeout = self.settings.ib_connect_timeout_s
        if self.portfolio_account:
            await asyncio.wait_for(self.ib.reqAccountUpdatesAsync(self.portfolio_account), timeout)
        # IB forgot every PnL-single: they go out again within the budget.
        self.subscriptions.resubscribe()
        await asyncio.wait_for(self.ib.reqPositionsAsync(), timeout)
        self.account_values.subscribe_pnl(self.ib, self._accounts(), again=True)
        # Fills made while the link was down: the day's executions again (repeats skipped).
        await asyncio.wait_for(self.ib.reqExecutionsAsync(), timeout)

    def _accounts(self) -> list[str]:
        """The accounts followed: the portfolio account, then the positions-only ones."""
        first = [self.portfolio_account] if self.portfolio_account else []
        return first + sorted(self.position_accounts)

    def _forget_connection(self) -> None:
        # ib_async wipes its subscriptions on disconnect; so do we.
        if self.ib.isConnected():
            self.ib.disconnect()
        self.subscriptions.reset()
        self.account_values.forget()
        self.pnl.clear()
        self.held.clear()
