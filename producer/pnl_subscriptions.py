"""PnL-single subscriptions kept within a request budget.

IB answers a PnL-single subscription per (account, contract); the producer
wants one for every open position of the accounts it follows through the
position stream. Sending a request per open and a cancel per close does not
scale: ib_async throttles everything it sends to 45 messages a second and
queues the rest without bound, so under churn its queue (and the producer's
memory) grows and subscriptions lag further and further.

:class:`PnlSubscriptions` holds the wanted state per contract and reconciles
it with what was sent, at most ``requests_per_s`` requests in any one second
(well under ib_async's 45, which other requests share):

- a position that opens is queued for a subscription (oldest first); one that
  closes before its turn costs nothing;
- a position that closes keeps its subscription for ``grace_s``: if it reopens
  meanwhile, nothing is sent at all;
- nothing is sent while ib_async's own queue holds messages, and at most
  ``max_subscriptions`` are held: past that, closed ones are cancelled first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (account, conid)
PUMP_INTERVAL_S = 0.05


@dataclass
class SubscriptionStats:
    subscribes: int = 0
    cancels: int = 0
    reused: int = 0  # reopened within the grace period: no request sent
    deferred: int = 0  # times the budget or ib_async's queue held requests back


class PnlSubscriptions:
    """Wanted PnL-single subscriptions and the requests that realise them."""

    def __init__(
        self,
        ib: Any,
        requests_per_s: int,
        grace_s: float,
        max_subscriptions: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ib = ib
        self.requests_per_s = requests_per_s
        self.grace_s = grace_s
        self.max_subscriptions = max_subscriptions
        self.clock = clock
        self.stats = SubscriptionStats()
        self._wanted: dict[Key, None] = {}  # open, not subscribed yet: insertion order = age
        self._active: dict[Key, int] = {}  # subscribed: key -> request ID
        self._by_request: dict[int, Key] = {}
        self._closing: dict[Key, float] = {}  # subscribed, closed at (monotonic), oldest first
        self._sent_at: deque[float] = deque()  # send times within the last second
        self._turn_cancel = False  # alternate when both queues have work

    # --- what the position stream says ------------------------------------------

    def want(self, key: Key) -> None:
        """The position is open: it should have a subscription."""
        if self._closing.pop(key, None) is not None:
            self.stats.reused += 1
            return
        if key not in self._active:
            self._wanted[key] = None
        self.pump()

    def drop(self, key: Key) -> None:
        """The position closed: cancel its subscription once the grace period is over."""
        if key in self._wanted:
            del self._wanted[key]  # never sent: nothing to undo
            return
        if key in self._active and key not in self._closing:
            self._closing[key] = self.clock()

    def key_of(self, request_id: int) -> Key | None:
        return self._by_request.get(request_id)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def pending(self) -> int:
        return len(self._wanted)

    @property
    def closing(self) -> int:
        return len(self._closing)

    def ib_queue(self) -> int:
        """Messages ib_async holds back under its own throttle."""
        return len(self.ib.client._msgQ)

    # --- connection changes -------------------------------------------------------

    def reset(self) -> None:
        """The connection is gone, and with it every subscription (ib_async forgets them)."""
        self._wanted.clear()
        self._active.clear()
        self._by_request.clear()
        self._closing.clear()

    def resubscribe(self) -> None:
        """IB lost its subscriptions (1101): every open position's must be sent again."""
        wrapper = self.ib.wrapper
        reopen = [key for key in self._active if key not in self._closing]
        for key, request_id in self._active.items():
            # IB has forgotten them: a cancel would only spend the budget.
            wrapper.pnlSingleKey2ReqId.pop((key[0], "", key[1]), None)
            wrapper.reqId2PnlSingle.pop(request_id, None)
        self._active.clear()
        self._by_request.clear()
        self._closing.clear()
        self._wanted = dict.fromkeys([*reopen, *self._wanted])
        self.pump()

    # --- sending --------------------------------------------------------------------

    def pump(self) -> int:
        """Send what the budget allows now; returns how many requests went out."""
        if not (self._wanted or self._closing) or not self.ib.isConnected():
            return 0
        now = self.clock()
        sent_at = self._sent_at
        while sent_at and now - sent_at[0] >= 1.0:
            sent_at.popleft()
        sent = 0
        expired_before = now - self.grace_s
        while True:
            can_cancel = bool(self._closing) and (
                next(iter(self._closing.values())) <= expired_before
                or len(self._active) >= self.max_subscriptions
            )
            can_subscribe = bool(self._wanted) and len(self._active) < self.max_subscriptions
            if not (can_cancel or can_subscribe):
                break
            if len(sent_at) >= self.requests_per_s or self.ib_queue():
                self.stats.deferred += 1
                break
            cancel = can_cancel and (self._turn_cancel or not can_subscribe)
            self._turn_cancel = not cancel
            if cancel:
                self._cancel_oldest_closed()
            else:
                self._subscribe_oldest_wanted()
            sent_at.append(now)
            sent += 1
        return sent

    def _subscribe_oldest_wanted(self) -> None:
        key = next(iter(self._wanted))
        del self._wanted[key]
        account, conid = key
        self.ib.reqPnLSingle(account, "", conid)
        request_id = self.ib.wrapper.pnlSingleKey2ReqId[(account, "", conid)]
        self._active[key] = request_id
        self._by_request[request_id] = key
        self.stats.subscribes += 1

    def _cancel_oldest_closed(self) -> None:
        key = next(iter(self._closing))
        del self._closing[key]
        request_id = self._active.pop(key)
        self._by_request.pop(request_id, None)
        self.ib.cancelPnLSingle(key[0], "", key[1])
        self.stats.cancels += 1

    async def run(self) -> None:
        """Pump until cancelled: budget freed by time and expired grace periods."""
        while True:
            await asyncio.sleep(PUMP_INTERVAL_S)
            with contextlib.suppress(ConnectionError):
                self.pump()
