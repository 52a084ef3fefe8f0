"""The account values subscriber: every account's values and P&L, published when they change.

IB sends the portfolio account's values (``updateAccountValue``) and, for every
account, ``accountUpdateMulti`` (ib_async subscribes both at connect; it fires
``accountValueEvent`` for each), and resends them all about every 3 minutes.
Only a value that changed is published, plus the full set after every
(re)connect, so the table holds each value's history without IB's repeats. The
account's P&L comes from ``reqPnL`` (one subscription per account, redone after a
reconnect) and is published under :data:`~shared.account_values.PNL_KEYS`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from producer.ib_mapping import UpdateClock
from shared.account_values import PNL_KEYS, AccountValue

log = logging.getLogger(__name__)

_MAX_VALUES = 100_000  # (account, key, currency) remembered; IB sends ~150 per account


@dataclass
class AccountValueStats:
    published: int = 0
    unchanged: int = 0
    unreadable: int = 0


class AccountValueFeed:
    """Publishes ``account_value`` entries from ib_async's account events."""

    def __init__(
        self, ib: Any, outbox: Any, clock: UpdateClock, accounts: Callable[[], list[str]]
    ) -> None:
        self.ib = ib
        self.accounts = accounts
        self.outbox = outbox
        self.clock = clock
        self.stats = AccountValueStats()
        self._last: dict[tuple[str, str, str], str] = {}

    def install(self, ib: Any) -> None:
        ib.accountValueEvent += self.on_account_value
        ib.pnlEvent += self.on_pnl

    # --- the connection's life (producer/ib_connection.py) --------------------------

    def on_connecting(self) -> None:
        pass

    async def on_connected(self) -> None:
        self.subscribe_pnl(self.ib, self.accounts())

    async def on_link_restored(self) -> None:
        self.subscribe_pnl(self.ib, self.accounts(), again=True)

    def on_disconnected(self) -> None:
        self.forget()

    async def serve(self) -> None:
        pass

    def forget(self) -> None:
        """After a disconnect: publish the full set again."""
        self._last.clear()

    def subscribe_pnl(self, ib: Any, accounts: list[str], again: bool = False) -> None:
        """One reqPnL per account not yet subscribed on this connection (ib_async forgets
        them on disconnect); ``again`` after a 1101, when IB forgot them."""
        for account in accounts:
            if (account, "") in ib.wrapper.pnlKey2ReqId:
                if not again:
                    continue
                ib.cancelPnL(account)
            ib.reqPnL(account)

    def on_account_value(self, value: Any) -> None:
        if value.modelCode:
            return  # a model portfolio's figure, not the account's
        self.publish(value.account, value.tag, value.currency, str(value.value))

    def on_pnl(self, pnl: Any) -> None:
        figures = {
            "daily": pnl.dailyPnL,
            "unrealized": pnl.unrealizedPnL,
            "realized": pnl.realizedPnL,
        }
        for name, figure in figures.items():
            if figure is None or not math.isfinite(figure) or abs(figure) > 1e300:
                continue  # IB's unset value: not known yet
            self.publish(pnl.account, PNL_KEYS[name], "BASE", repr(float(figure)))

    def publish(self, account: str, key: str, currency: str, text: str) -> None:
        ident = (account, key, currency)
        if self._last.get(ident) == text:
            self.stats.unchanged += 1
            return
        stamp = self.clock.stamp_us()
        try:
            entry = msgspec.convert(
                {
                    "account": account,
                    "key": key,
                    "currency": currency,
                    "value": text,
                    "timestamp": UpdateClock.as_datetime(stamp).isoformat(),
                },
                AccountValue,
            )
        except msgspec.ValidationError as exc:
            self.stats.unreadable += 1
            log.error("account value not publishable", extra={"key": key, "error": str(exc)})
            return
        if len(self._last) >= _MAX_VALUES:
            self._last.clear()  # a login with absurdly many values: republish, never grow
        self._last[ident] = text
        self.outbox.put(stamp, entry)
        self.stats.published += 1
