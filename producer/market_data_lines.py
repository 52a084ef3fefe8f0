"""Market-data lines for the option positions, kept within a line budget and a request rate.

IB serves a limited number of simultaneous market-data lines (100 by default
per login; error 101 past it) and ib_async queues anything past 45 requests a
second without bound. :class:`MarketDataLines` holds the wanted options (one
entry per contract, whatever the accounts holding it) and reconciles them with
the lines in use, at most ``requests_per_s`` requests in any one second and
nothing while ib_async's own queue holds messages:

- While the wanted options fit in the budget, each has a streaming line: one
  request when it opens, one cancel when it closes, one again after a
  reconnect.
- Past the budget, a third of the lines (the "snapshot lines") serve snapshot
  requests in rotation and the rest stay streaming (the oldest wanted keep
  theirs): every rotated option is asked for a snapshot, least recently
  sampled first, once its last one is ``due_fraction`` x ``rotation_s`` old, so
  each gets a fresh sample within ``rotation_s`` as long as the rate allows
  (rotated options / (0.75 x rotation_s) snapshots per second; README.md says
  the bound). A running snapshot holds its line until IB ends it (57) or
  ``snapshot_timeout_s`` passed (then it is cancelled).
- Rotation stops only once the options fit in the streaming share again, so a
  count that wavers around the budget does not flip every line back and forth.
- A contract IB refused (no permission, competing session) waits ``retry_s``;
  a 101 lowers the budget to the lines IB did serve (another session uses the
  rest) until the next connection.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ib_async import Contract

from producer.ib_mapping import ContractInfo

log = logging.getLogger(__name__)

DUE_FRACTION = 0.75  # of the rotation interval: leaves room for queueing and the snapshot itself
SNAPSHOT_SHARE = 3  # past the budget, 1/3 of the lines serve snapshots


@dataclass(slots=True)
class Line:
    conid: int
    snapshot: bool
    started: float  # monotonic
    data_type: int  # the session's market data type when it was asked for
    served_type: int | None = None  # the type IB said it serves (58), if it did


@dataclass
class LineStats:
    requests: int = 0  # every request sent: subscribe, snapshot, cancel, market data type
    subscribes: int = 0
    snapshots: int = 0
    cancels: int = 0
    snapshot_timeouts: int = 0


_QUOTED_ON = {"OPT": "SMART", "STK": "SMART"}  # others: their own exchange


def ib_contract(contract: ContractInfo) -> Contract:
    """The contract to ask market data for: IB wants an exchange besides the conId.
    Stock options are quoted on SMART (their positions come without an exchange);
    futures options are not routed by SMART: they are asked on their own exchange
    (the one their position or portfolio item names)."""
    expiry = contract.expiry.strftime("%Y%m%d") if contract.expiry else ""
    multiplier = contract.multiplier
    return Contract(
        conId=contract.conid,
        symbol=contract.symbol,
        secType=contract.sec_type,
        lastTradeDateOrContractMonth=expiry,
        strike=contract.strike or 0.0,
        right=contract.right or "",
        multiplier=str(int(multiplier)) if multiplier == int(multiplier) else str(multiplier),
        exchange=_QUOTED_ON.get(contract.sec_type, contract.exchange or "SMART"),
        currency=contract.currency,
    )


class MarketDataLines:
    """Wanted options and the market-data requests that serve them."""

    def __init__(
        self,
        ib: Any,
        budget: int,
        requests_per_s: int,
        rotation_s: float,
        snapshot_timeout_s: float,
        retry_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ib = ib
        self.budget = budget
        self.requests_per_s = requests_per_s
        self.rotation_s = rotation_s
        self.snapshot_timeout_s = snapshot_timeout_s
        self.retry_s = retry_s
        self.clock = clock
        self.stats = LineStats()
        self.wanted: dict[int, ContractInfo] = {}  # conid -> contract; insertion order = age
        self.lines: dict[int, Line] = {}  # request ID -> line
        self.streaming: dict[int, int] = {}  # conid -> request ID
        self.snapshotting: dict[int, int] = {}  # conid -> request ID
        self.sampled_at: dict[int, float] = {}  # conid -> last snapshot asked (monotonic)
        self.held_off: dict[int, float] = {}  # conid -> not before (monotonic)
        self.limit: int = budget  # lowered by a 101 until the next connection
        self.rotating = False
        self.data_type = 1  # the session's market data type (reqMarketDataType)
        self.pending_data_type: int | None = None  # a reqMarketDataType to send first
        self._sent_at: deque[float] = deque()

    # --- what the positions say -------------------------------------------------------

    def want(self, contract: ContractInfo) -> None:
        self.wanted.setdefault(contract.conid, contract)

    def drop(self, conid: int) -> None:
        """No account holds the option any more: its line goes (a snapshot ends alone)."""
        self.wanted.pop(conid, None)
        self.sampled_at.pop(conid, None)
        self.held_off.pop(conid, None)

    def conid_of(self, request_id: int) -> int | None:
        line = self.lines.get(request_id)
        return None if line is None else line.conid

    def is_snapshot(self, request_id: int) -> bool:
        line = self.lines.get(request_id)
        return line is not None and line.snapshot

    @property
    def in_use(self) -> int:
        return len(self.lines)

    @property
    def rotated(self) -> int:
        """Wanted options without a streaming line (served by snapshots, or waiting)."""
        return len(self.wanted) - len(self.streaming)

    # --- what IB says ----------------------------------------------------------------

    def ended(self, request_id: int) -> None:
        """A snapshot ended (57), or IB refused the request: its line is free."""
        line = self.lines.pop(request_id, None)
        if line is None:
            return
        table = self.snapshotting if line.snapshot else self.streaming
        if table.get(line.conid) == request_id:
            del table[line.conid]

    def refused(self, request_id: int, retry_s: float | None = None) -> None:
        """IB refused the line: free it and ask again after ``retry_s``."""
        conid = self.conid_of(request_id)
        self.ended(request_id)
        if conid is not None and conid in self.wanted:
            self.held_off[conid] = self.clock() + (self.retry_s if retry_s is None else retry_s)

    def over_limit(self, request_id: int) -> None:
        """101: IB serves fewer lines than the budget (other sessions hold some)."""
        served = max(1, self.in_use - 1)
        if served < self.limit:
            self.limit = served
            log.warning(
                "IB refused a market-data line (101): using fewer lines",
                extra={"lines": served, "budget": self.budget},
            )
        self.refused(request_id, retry_s=1.0)

    def reset(self) -> None:
        """The connection is gone, and with it every line (IB and ib_async forget them)."""
        self.lines.clear()
        self.streaming.clear()
        self.snapshotting.clear()
        self.sampled_at.clear()
        self.held_off.clear()
        self.limit = self.budget
        self.rotating = False

    def forgotten(self) -> None:
        """IB lost its lines (1101) but the connection stays: ask for them all again."""
        self.lines.clear()
        self.streaming.clear()
        self.snapshotting.clear()
        self.sampled_at.clear()

    # --- sending --------------------------------------------------------------------

    def _room(self, now: float) -> bool:
        sent_at = self._sent_at
        while sent_at and now - sent_at[0] >= 1.0:
            sent_at.popleft()
        return len(sent_at) < self.requests_per_s and not self.ib.client._msgQ

    def _sent(self, now: float) -> None:
        self._sent_at.append(now)
        self.stats.requests += 1

    def pump(self) -> int:
        """Send what the budget allows now; returns how many requests went out."""
        if not self.ib.isConnected():
            return 0
        now = self.clock()
        sent = 0
        for action in (
            self._send_data_type,
            self._cancel_unwanted,
            self._expire_snapshots,
            self._subscribe,
            self._snapshot,
        ):
            while self._room(now):
                if not action(now):
                    break
                self._sent(now)
                sent += 1
            else:
                break
        return sent

    def _send_data_type(self, now: float) -> bool:
        if self.pending_data_type is None:
            return False
        self.ib.client.reqMarketDataType(self.pending_data_type)
        self.pending_data_type = None
        return True

    def _streaming_share(self) -> int:
        """Streaming lines allowed now; past the budget the rest serve snapshots."""
        limit = self.limit
        reserve = max(1, limit // SNAPSHOT_SHARE) if limit > 1 else 0
        if len(self.wanted) > limit:
            self.rotating = True
        elif self.rotating and len(self.wanted) <= limit - reserve:
            self.rotating = False
        return limit - reserve if self.rotating else limit

    def _cancel_unwanted(self, now: float) -> bool:
        """One cancel: a closed option's line, else the newest line past the streaming
        share (just rotating, or the budget lowered)."""
        for conid in self.streaming:
            if conid not in self.wanted:
                self._cancel(conid)
                return True
        if len(self.streaming) > self._streaming_share():
            self._cancel(next(reversed(self.streaming)))
            return True
        return False

    def _cancel(self, conid: int) -> None:
        request_id = self.streaming.pop(conid)
        self.lines.pop(request_id, None)
        if conid in self.wanted:
            self.sampled_at[conid] = self.clock()  # it was streaming: fresh until now
        self.ib.client.cancelMktData(request_id)
        self.stats.cancels += 1

    def _expire_snapshots(self, now: float) -> bool:
        oldest = next(iter(self.snapshotting.items()), None)
        if oldest is None:
            return False
        conid, request_id = oldest
        if now - self.lines[request_id].started < self.snapshot_timeout_s:
            return False
        del self.snapshotting[conid]
        self.lines.pop(request_id, None)
        self.ib.client.cancelMktData(request_id)
        self.stats.snapshot_timeouts += 1
        return True

    def _ready(self, conid: int, now: float) -> bool:
        until = self.held_off.get(conid)
        if until is None:
            return True
        if now >= until:
            del self.held_off[conid]
            return True
        return False

    def _subscribe(self, now: float) -> bool:
        """One streaming line for the oldest wanted option without one, if room."""
        if len(self.streaming) >= self._streaming_share() or self.in_use >= self.limit:
            return False
        for conid, contract in self.wanted.items():
            if conid in self.streaming or conid in self.snapshotting:
                continue
            if not self._ready(conid, now):
                continue
            self._request(contract, now, snapshot=False)
            return True
        return False

    def _snapshot(self, now: float) -> bool:
        """One snapshot for the least recently sampled rotated option, once it is due."""
        if not self.rotating or self.in_use >= self.limit:
            return False
        due_before = now - DUE_FRACTION * self.rotation_s
        best: int | None = None
        best_at = due_before
        for conid in self.wanted:
            if conid in self.streaming or conid in self.snapshotting:
                continue
            at = self.sampled_at.get(conid, -1.0)
            if at <= best_at and self._ready(conid, now):
                best, best_at = conid, at
                if at < 0:
                    break  # never sampled: first
        if best is None:
            return False
        self._request(self.wanted[best], now, snapshot=True)
        self.sampled_at[best] = now
        return True

    def _request(self, contract: ContractInfo, now: float, snapshot: bool) -> None:
        request_id = self.ib.client.getReqId()
        self.ib.client.reqMktData(request_id, ib_contract(contract), "", snapshot, False, [])
        self.lines[request_id] = Line(contract.conid, snapshot, now, self.data_type)
        if snapshot:
            self.snapshotting[contract.conid] = request_id
            self.stats.snapshots += 1
        else:
            self.streaming[contract.conid] = request_id
            self.stats.subscribes += 1
