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
from shared.snapshots import account_snapshot

log = logging.getLogger(__name__)

_MAX_VALUES = 100_000  # (account, key, currency) remembered; IB sends ~150 per account


@dataclass
class AccountValueStats:
    published: int = 0
    unchanged: int = 0
    unreadable: int = 0
    snapshots: int = 0


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
        # What this connect's account downloads sent, per account, until they are in.
        self._downloaded: dict[str, set[tuple[str, str]]] | None = None

    def install(self, ib: Any) -> None:
        ib.accountValueEvent += self.on_account_value
        ib.pnlEvent += self.on_pnl

    # --- the connection's life (producer/ib_connection.py) --------------------------

    def on_connecting(self) -> None:
        self._downloaded = {}

    async def on_connected(self) -> None:
        self._publish_snapshots()
        self.subscribe_pnl(self.ib, self.accounts())

    def _publish_snapshots(self) -> None:
        """After the connect's account downloads: per account whose download ib_async
        waited for, the (key, currency) pairs it sent, as an account snapshot
        (shared/snapshots.py); the consumer closes the values IB stopped sending.

        ib_async waits for every account's download up to ``MaxSyncedSubAccounts``
        accounts in the login; past that only the portfolio account's is complete."""
        downloaded, self._downloaded = self._downloaded or {}, None
        followed = self.accounts()
        limit = getattr(self.ib, "MaxSyncedSubAccounts", 50)
        complete = followed if len(self.ib.managedAccounts()) <= limit else followed[:1]
        for account in complete:
            held = sorted(downloaded.get(account, set()))
            stamp = self.clock.stamp_us()
            at = UpdateClock.as_datetime(stamp)
            for index, part in enumerate(account_snapshot(account, at, held)):
                self.outbox.put(stamp if index == 0 else self.clock.stamp_us(), part)
            self.stats.snapshots += 1

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
        if self._downloaded is not None:
            self._downloaded.setdefault(value.account, set()).add((value.tag, value.currency))
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
