"""The positions subscriber: every account's positions, as portfolio and position updates.

Accounts: IB streams ``updatePortfolio`` for one account at a time, so the
first selected account (``POSLAKE_IB_ACCOUNTS``, else the login's first) gets
the portfolio stream; every other selected account is covered by IB's
position stream plus a PnL-single subscription per open position, which
fills market value and P&L (market price is derived from the value). A
position that closes is published with position 0; its PnL subscription is
cancelled after a grace period, and every subscribe and cancel goes through
:class:`~producer.pnl_subscriptions.PnlSubscriptions`, which keeps them within
a request budget (ib_async queues anything past 45 requests/s without bound).

After any (re)connect IB resends the snapshot, which is published as new
observations; a position held before that the snapshot no longer mentions was
closed while the producer was away, and its close is published.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from producer import ib_decoders
from producer.ib_connection import SourceStats
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
from shared.snapshots import position_snapshot

log = logging.getLogger(__name__)


class HoldingsListener(Protocol):
    """Told when an account starts or stops holding a contract (the Greeks subscriber)."""

    def opened(self, contract: ContractInfo) -> None: ...

    def closed(self, contract: ContractInfo) -> None: ...


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


class PositionFeed:
    """Publishes position observations of the selected accounts."""

    def __init__(
        self, settings: Settings, ib: Any, outbox: Outbox, clock: UpdateClock, stats: SourceStats
    ) -> None:
        self.settings = settings
        self.ib = ib
        self.outbox = outbox
        self.clock = clock
        self.stats = stats
        self.portfolio_account: str | None = None
        self.position_accounts: frozenset[str] = frozenset()
        self.held: dict[tuple[str, int], HeldPosition] = {}
        # Every open position as last published, kept across reconnects: one missing
        # from the snapshot after a reconnect was closed while the producer was away.
        self.book: dict[tuple[str, int], ContractInfo] = {}
        # What the connect's snapshots mentioned: collected only until they are in (a set
        # of every contract published since would grow with the churn).
        self._seen: set[tuple[str, int]] | None = None
        self.listener: HoldingsListener | None = None
        self.pnl: dict[tuple[str, int], PnlFigures] = {}
        self.subscriptions = PnlSubscriptions(
            ib,
            settings.ib_pnl_requests_per_s,
            settings.ib_pnl_cancel_grace_s,
            settings.ib_pnl_max_subscriptions,
        )

    def install(self, ib: Any) -> None:
        ib.client.apiStart += self._select_accounts
        if self.settings.ib_fast_decode:
            self._demux = ib_decoders.install(ib, self)
        else:
            ib.updatePortfolioEvent += self._on_portfolio_item
            ib.positionEvent += self._on_position_item
            ib.pnlSingleEvent += self._on_pnl_single_item

    # --- the connection's life (producer/ib_connection.py) --------------------------

    def on_connecting(self) -> None:
        self._seen = set()

    async def on_connected(self) -> None:
        settings = self.settings
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
        self._close_vanished()
        self._publish_snapshots()

    async def on_link_restored(self) -> None:
        timeout = self.settings.ib_connect_timeout_s
        self._seen = set()
        if self.portfolio_account:
            await asyncio.wait_for(self.ib.reqAccountUpdatesAsync(self.portfolio_account), timeout)
        # IB forgot every PnL-single: they go out again within the budget.
        self.subscriptions.resubscribe()
        await asyncio.wait_for(self.ib.reqPositionsAsync(), timeout)
        self._close_vanished()
        self._publish_snapshots()

    def on_disconnected(self) -> None:
        # ib_async wipes its subscriptions on disconnect; so do we.
        self.subscriptions.reset()
        self.pnl.clear()
        self.held.clear()

    async def serve(self) -> None:
        """While connected: the PnL-single subscriptions' request pump."""
        await self.subscriptions.run()

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

    def accounts(self) -> list[str]:
        """The accounts followed: the portfolio account, then the positions-only ones."""
        first = [self.portfolio_account] if self.portfolio_account else []
        return first + sorted(self.position_accounts)

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
        key = (account, contract.conid)
        if self._seen is not None:
            self._seen.add(key)
        listener = self.listener
        if position == 0:
            if self.book.pop(key, None) is not None and listener is not None:
                listener.closed(contract)
        else:
            if listener is not None and key not in self.book:
                listener.opened(contract)
            self.book[key] = contract

    def _close_vanished(self) -> None:
        """After a connect's snapshots (positions, portfolio): a position held before
        that the snapshots did not mention was closed while the producer was away (IB
        sends no zero for it); publish its close."""
        followed = set(self.accounts())
        seen, self._seen = self._seen or set(), None
        vanished = [k for k in self.book if k not in seen and k[0] in followed]
        for account, conid in vanished:
            self._publish(account, self.book[(account, conid)], 0.0)
        if vanished:
            self.stats.closed_while_away += len(vanished)
            log.warning(
                "positions closed while disconnected: publishing their close",
                extra={"count": len(vanished)},
            )

    def _publish_snapshots(self) -> None:
        """After a complete download (positionEnd, and the portfolio account's download
        end): every followed account's held contracts, as a position snapshot
        (shared/snapshots.py). The consumer closes what the lake holds open and this
        does not list: positions closed while the producer was not running at all."""
        for account in self.accounts():
            held = [conid for (owner, conid) in self.book if owner == account]
            stamp = self.clock.stamp_us()
            at = UpdateClock.as_datetime(stamp)
            for index, part in enumerate(position_snapshot(account, at, held)):
                self.outbox.put(stamp if index == 0 else self.clock.stamp_us(), part)
            self.stats.snapshots += 1
            log.info("position snapshot published", extra={"account": account, "held": len(held)})

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
