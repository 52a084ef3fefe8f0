"""The IB side of the producer: one ib_async connection, kept up, turned into entries.

:class:`IbSource` puts the parts together: the connection keeper
(producer/ib_connection.py) and one subscriber per kind (producer/positions.py,
producer/executions.py, producer/account_values.py, producer/greeks.py), all on one
``ib_async.IB``.
"""

from __future__ import annotations

import asyncio

from ib_async import IB

from producer.account_values import AccountValueFeed
from producer.executions import ExecutionFeed
from producer.greeks import GreeksFeed
from producer.ib_connection import (
    CLIENT_ID_IN_USE,
    LINK_LOST,
    LINK_RESTORED_DATA_KEPT,
    LINK_RESTORED_DATA_LOST,
    ClientIdInUse,
    ConnectionKeeper,
    Feed,
    SourceStats,
)
from producer.ib_mapping import UpdateClock
from producer.outbox import Outbox
from producer.pnl_subscriptions import PnlSubscriptions
from producer.positions import PositionFeed
from shared.settings import Settings

__all__ = [
    "CLIENT_ID_IN_USE",
    "LINK_LOST",
    "LINK_RESTORED_DATA_KEPT",
    "LINK_RESTORED_DATA_LOST",
    "ClientIdInUse",
    "IbSource",
    "SourceStats",
]


class IbSource:
    """Connects, subscribes and publishes every observation of every kind to the outbox."""

    def __init__(self, settings: Settings, outbox: Outbox, clock: UpdateClock) -> None:
        self.settings = settings
        self.outbox = outbox
        self.clock = clock
        self.stats = SourceStats()
        self.ib = IB()
        self.positions = PositionFeed(settings, self.ib, outbox, clock, self.stats)
        self.executions = ExecutionFeed(
            outbox, clock, settings.ib_timezone, settings.ib_connect_timeout_s
        )
        self.account_values = AccountValueFeed(self.ib, outbox, clock, self.positions.accounts)
        self.greeks = GreeksFeed(settings, self.ib, outbox, clock)
        self.positions.install(self.ib)
        self.executions.install(self.ib)
        self.account_values.install(self.ib)
        feeds: list[Feed] = [self.positions, self.executions, self.account_values]
        if settings.ib_greeks:
            self.greeks.install(self.ib)
            self.positions.listener = self.greeks
            feeds.append(self.greeks)
        self.keeper = ConnectionKeeper(settings, self.ib, self.stats, feeds)

    @property
    def subscriptions(self) -> PnlSubscriptions:
        return self.positions.subscriptions

    @property
    def portfolio_account(self) -> str | None:
        return self.positions.portfolio_account

    @property
    def position_accounts(self) -> frozenset[str]:
        return self.positions.position_accounts

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected and publishing until ``stop`` is set."""
        await self.keeper.run(stop)
