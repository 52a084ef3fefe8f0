"""The option Greeks subscriber: IB's option computations for every option position.

IB sends no Greeks with positions: they come from a market-data line per
option (``tickOptionComputation``, message 21). The positions subscriber tells
this one when an account starts or stops holding a contract
(:meth:`GreeksFeed.opened`/:meth:`GreeksFeed.closed`); every option held by any
account gets one line (producer/market_data_lines.py keeps them within the line
budget, rotating snapshots past it, and within the request rate).

This module decodes the market-data messages of its own lines itself
(21 computations, 57 snapshot end, 58 market data type and 4 errors; the price
ticks of its lines are dropped unread), and hands every other request's
messages to ib_async as before. IB's "not computed" (-1 for the volatility and
prices, -2 for the Greeks) and its unset double become null, and so do
non-finite values: ib_async would keep -2 for vega and theta and 1.79e308.

Sampling: the first computation of each contract and tick is published at once;
after that one at least every ``ib_greeks_sample_s`` while IB sends, sooner when
a value moved by more than ``ib_greeks_tolerance`` (relative), never more often
than ``ib_greeks_min_interval_s``; a snapshot's values are published as they come.

Market-data errors of its lines: where live data is not permitted (354, 10089)
the session falls back to delayed data (``ib_greeks_fallback_data_type``) and
the line is asked for again; a contract still refused, delayed data not enabled
(10168), a competing live session (10197) or another refusal wait
``ib_greeks_retry_s``; 101 (too many lines) lowers the line budget; 10167 and
10090 (delayed or part of the data shown) keep the line. Each is logged once per
contract and code and counted by code in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from producer.ib_mapping import ContractInfo, UpdateClock
from producer.market_data_lines import MarketDataLines
from shared.greeks import GREEK_COLUMNS, SOURCE_OF_TICK, OptionGreeks
from shared.settings import Settings

log = logging.getLogger(__name__)
decoder_log = logging.getLogger("ib_async.Decoder")

OPTION_SEC_TYPES = frozenset({"OPT", "FOP", "WAR"})
TICK_PRICE, TICK_SIZE, ERROR = 1, 2, 4
OPTION_COMPUTATION, SNAPSHOT_END, MARKET_DATA_TYPE = 21, 57, 58
# Messages of a market-data line whose request ID is the third field / the second.
_LINE_MESSAGES_AT_2 = (TICK_PRICE, TICK_SIZE, 45, 46, 47)  # price, size, generic, string, EFP
_LINE_MESSAGES_AT_1 = (81,)  # tickReqParams
NOT_PERMITTED_LIVE = frozenset({354, 10089})
SHOWN_PARTLY = frozenset({10167, 10090})  # the line serves (delayed, or part of the data)
TOO_MANY_LINES = 101
_UNSET = 1e300  # IB's unset double is 1.7976931348623157E308
_NOT_COMPUTED = {"implied_vol": -1.0, "opt_price": -1.0, "pv_dividend": -1.0, "und_price": -1.0}
_NOT_COMPUTED.update(delta=-2.0, gamma=-2.0, vega=-2.0, theta=-2.0)
# The wire order of message 21's numbers, after reqId, tickType and tickAttrib.
_WIRE_ORDER = ("implied_vol", "delta", "opt_price", "pv_dividend", "gamma", "vega", "theta",
               "und_price")  # fmt: skip
_AT = tuple(_WIRE_ORDER.index(name) for name in GREEK_COLUMNS)
_RETIRED = 4096  # request IDs of ended lines remembered: their late messages are ours
_TOLD = 100_000  # (conid, code) pairs logged, remembered

Values = tuple[float | None, ...]  # in GREEK_COLUMNS order


@dataclass
class GreeksStats:
    computations: int = 0  # option computations received on the producer's lines
    published: int = 0
    held_back: int = 0  # computations not published (unchanged within the interval)
    not_computed: int = 0  # values IB sent as not computed or unset, published as null
    data_type_fallbacks: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # by IB error code


@dataclass(slots=True)
class Sampled:
    values: Values
    data_type: int
    published_at: float  # monotonic
    pending: tuple[Values, int] | None = None  # received since, not published yet


def _number(text: str, sentinel: float) -> float | None:
    if not text:
        return None
    value = float(text)
    if value == sentinel or not math.isfinite(value) or abs(value) >= _UNSET:
        return None
    return value


def moved(before: Values, after: Values, tolerance: float) -> bool:
    """Whether any value changed by more than ``tolerance``, relative to its size."""
    for old, new in zip(before, after, strict=True):
        if (old is None) != (new is None):
            return True
        if (
            old is not None
            and new is not None
            and abs(new - old) > tolerance * max(abs(old), abs(new), 1e-9)
        ):
            return True
    return False


class GreeksFeed:
    """Publishes ``option_greeks`` entries for every option any followed account holds."""

    def __init__(
        self,
        settings: Settings,
        ib: Any,
        outbox: Any,
        clock: UpdateClock,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.ib = ib
        self.outbox = outbox
        self.clock = clock
        self.monotonic = monotonic
        self.stats = GreeksStats()
        self.lines = MarketDataLines(
            ib,
            settings.ib_greeks_lines,
            settings.ib_greeks_requests_per_s,
            settings.ib_greeks_rotation_s,
            settings.ib_greeks_snapshot_timeout_s,
            settings.ib_greeks_retry_s,
            monotonic,
        )
        self.data_type = settings.ib_greeks_data_type  # the session's market data type
        self.lines.data_type = self.data_type
        self._holders: dict[int, int] = {}  # conid -> accounts holding it
        self._contracts: dict[int, ContractInfo] = {}
        self._sampled: dict[tuple[int, int], Sampled] = {}  # (conid, tick type)
        self.fresh_at: dict[int, float] = {}  # conid -> last computation (or wanted since)
        self._retired: OrderedDict[int, None] = OrderedDict()
        self._told: set[tuple[int, int]] = set()
        self._handlers: dict[int, Callable[[list[str]], None]] = {}

    def install(self, ib: Any) -> None:
        """Register the decoders in ib_async's table; messages of other requests go on
        to ib_async's own handlers."""
        handlers = ib.client.decoder.handlers
        self._handlers = dict(handlers)
        handlers[OPTION_COMPUTATION] = self.on_option_computation
        handlers[SNAPSHOT_END] = self.on_snapshot_end
        handlers[MARKET_DATA_TYPE] = self.on_market_data_type
        handlers[ERROR] = self.on_error
        for msg_id in _LINE_MESSAGES_AT_2:
            handlers[msg_id] = self._route(msg_id, 2)
        for msg_id in _LINE_MESSAGES_AT_1:
            handlers[msg_id] = self._route(msg_id, 1)

    # --- what the positions say ----------------------------------------------------

    def opened(self, contract: ContractInfo) -> None:
        """An account started holding ``contract``."""
        if contract.sec_type not in OPTION_SEC_TYPES:
            return
        conid = contract.conid
        held = self._holders.get(conid, 0)
        self._holders[conid] = held + 1
        if not held:
            self._contracts[conid] = contract
            self.fresh_at[conid] = self.monotonic()
            self.lines.want(contract)

    def closed(self, contract: ContractInfo) -> None:
        """An account stopped holding ``contract``."""
        conid = contract.conid
        held = self._holders.get(conid)
        if held is None:
            return
        if held > 1:
            self._holders[conid] = held - 1
            return
        del self._holders[conid]
        self._contracts.pop(conid, None)
        self.fresh_at.pop(conid, None)
        for tick in SOURCE_OF_TICK:
            self._sampled.pop((conid, tick), None)
        self.lines.drop(conid)

    # --- the connection's life (producer/ib_connection.py) --------------------------

    def on_connecting(self) -> None:
        pass

    async def on_connected(self) -> None:
        if self.data_type != 1:
            self.lines.pending_data_type = self.data_type  # per connection: say it again
        self.lines.pump()

    async def on_link_restored(self) -> None:
        self._retire_all()
        self.lines.forgotten()
        if self.data_type != 1:
            self.lines.pending_data_type = self.data_type

    def on_disconnected(self) -> None:
        self._retire_all()
        self.lines.reset()

    async def serve(self) -> None:
        """While connected: the lines' request pump and the held-back samples."""
        every_s = 0.05
        flush_every = max(1, int(0.25 / every_s))
        for turn in range(2**62):
            await asyncio.sleep(every_s)
            with contextlib.suppress(ConnectionError):
                self.lines.pump()
            if turn % flush_every == 0:
                self.flush_pending()

    def _retire_all(self) -> None:
        for request_id in self.lines.lines:
            self._retire(request_id)

    def _retire(self, request_id: int) -> None:
        self._retired[request_id] = None
        if len(self._retired) > _RETIRED:
            self._retired.popitem(last=False)

    def _ours(self, request_id: int) -> bool:
        return request_id in self.lines.lines or request_id in self._retired

    # --- decoders ------------------------------------------------------------------

    def _route(self, msg_id: int, at: int) -> Callable[[list[str]], None]:
        original = self._handlers.get(msg_id)

        def route(fields: list[str]) -> None:
            try:
                request_id = int(fields[at])
            except (IndexError, ValueError):
                request_id = -1
            if self._ours(request_id):
                return  # a price tick of our line: only the computations matter here
            if original is not None:
                original(fields)

        return route

    def on_option_computation(self, fields: list[str]) -> None:
        try:
            request_id = int(fields[1])
        except (IndexError, ValueError):
            request_id = -1
        conid = self.lines.conid_of(request_id)
        if conid is None:
            if not self._ours(request_id):
                self._pass_on(OPTION_COMPUTATION, fields)
            return
        if conid not in self._holders:
            return  # closed: its line's cancel has not gone out yet
        try:
            tick = int(fields[2])
            numbers = fields[4:12]
            if len(numbers) != len(_WIRE_ORDER):
                raise ValueError(f"{len(fields)} fields, expected 12")
            wire = [
                _number(text, _NOT_COMPUTED[name])
                for text, name in zip(numbers, _WIRE_ORDER, strict=True)
            ]
        except ValueError as exc:
            decoder_log.error("tickOptionComputation not readable: %s: %s", exc, fields[:12])
            return
        if tick not in SOURCE_OF_TICK:
            return  # a custom computation (53): not one of the sources kept
        self.stats.computations += 1
        values = tuple(wire[i] for i in _AT)
        self.stats.not_computed += sum(
            1 for value, text in zip(wire, numbers, strict=True) if value is None and text
        )
        served = self.lines.lines[request_id].served_type
        data_type = served or (3 if tick >= 80 else 1)
        now = self.monotonic()
        self.fresh_at[conid] = now
        key = (conid, tick)
        sampled = self._sampled.get(key)
        if sampled is None or self.lines.is_snapshot(request_id) or self._due(sampled, values, now):
            self._publish(conid, tick, values, data_type, now)
        else:
            sampled.pending = (values, data_type)
            self.stats.held_back += 1

    def _due(self, sampled: Sampled, values: Values, now: float) -> bool:
        settings = self.settings
        since = now - sampled.published_at
        if since >= settings.ib_greeks_sample_s:
            return True
        return since >= settings.ib_greeks_min_interval_s and moved(
            sampled.values, values, settings.ib_greeks_tolerance
        )

    def flush_pending(self) -> None:
        """Publish held-back computations that became due as time passed."""
        now = self.monotonic()
        for (conid, tick), sampled in list(self._sampled.items()):
            if sampled.pending is not None and self._due(sampled, sampled.pending[0], now):
                values, data_type = sampled.pending
                self._publish(conid, tick, values, data_type, now)

    def _publish(self, conid: int, tick: int, values: Values, data_type: int, now: float) -> None:
        contract = self._contracts.get(conid)
        if contract is None or contract.right is None:
            return
        stamp = self.clock.stamp_us()
        try:
            entry = OptionGreeks(
                conid=conid,
                symbol=contract.symbol,
                sec_type=contract.sec_type,
                currency=contract.currency,
                right=contract.right,  # type: ignore[arg-type]  # C/P from the mapping
                strike=contract.strike or 0.0,
                expiry=contract.expiry,  # type: ignore[arg-type]  # options have one
                multiplier=contract.multiplier,
                tick_type=tick,  # type: ignore[arg-type]  # checked against SOURCE_OF_TICK
                data_type=data_type,
                timestamp=UpdateClock.as_datetime(stamp),
                **dict(zip(GREEK_COLUMNS, values, strict=True)),
            )
        except ValueError as exc:
            log.error("option greeks not publishable", extra={"conid": conid, "error": str(exc)})
            return
        self._sampled[(conid, tick)] = Sampled(values, data_type, now)
        self.outbox.put(stamp, entry)
        self.stats.published += 1

    def on_snapshot_end(self, fields: list[str]) -> None:
        request_id = int(fields[2]) if len(fields) > 2 else -1
        if request_id in self.lines.lines:
            self.lines.ended(request_id)
            self._retire(request_id)
        elif not self._ours(request_id):
            self._pass_on(SNAPSHOT_END, fields)

    def on_market_data_type(self, fields: list[str]) -> None:
        try:
            request_id, data_type = int(fields[2]), int(fields[3])
        except (IndexError, ValueError):
            self._pass_on(MARKET_DATA_TYPE, fields)
            return
        line = self.lines.lines.get(request_id)
        if line is not None:
            line.served_type = data_type
        elif not self._ours(request_id):
            self._pass_on(MARKET_DATA_TYPE, fields)

    def on_error(self, fields: list[str]) -> None:
        try:
            request_id, code = int(fields[2]), int(fields[3])
        except (IndexError, ValueError):
            request_id, code = -1, 0
        if not self._ours(request_id):
            self._pass_on(ERROR, fields)
            return
        conid = self.lines.conid_of(request_id)
        if conid is None:
            return  # about a line already ended (a cancel crossing its end)
        text = fields[4] if len(fields) > 4 else ""
        self.stats.errors[str(code)] += 1
        self._tell(conid, code, text)
        if code in SHOWN_PARTLY:
            line = self.lines.lines.get(request_id)
            if code == 10167 and line is not None and line.served_type is None:
                line.served_type = 3  # delayed shown; a 58 says which delayed type
            return
        self._retire(request_id)
        if code == TOO_MANY_LINES:
            self.lines.over_limit(request_id)
        elif code in NOT_PERMITTED_LIVE and self._fall_back(request_id):
            self.lines.refused(request_id, retry_s=0.0)
        else:
            self.lines.refused(request_id)

    def _fall_back(self, request_id: int) -> bool:
        """Live data is not permitted: switch the session to delayed data, once. Whether
        the refused line should be asked for again at once."""
        fallback = self.settings.ib_greeks_fallback_data_type
        line = self.lines.lines.get(request_id)
        asked_with = line.data_type if line is not None else self.data_type
        if fallback == 0 or asked_with >= 3:
            return False  # delayed refused too: the contract waits
        if self.data_type < 3:
            self.data_type = fallback
            self.lines.data_type = fallback
            self.lines.pending_data_type = fallback
            self.stats.data_type_fallbacks += 1
            log.warning(
                "live market data not permitted: falling back to delayed data",
                extra={"data_type": fallback},
            )
        return True

    def _tell(self, conid: int, code: int, text: str) -> None:
        if (conid, code) in self._told:
            return
        if len(self._told) >= _TOLD:
            self._told.clear()
        self._told.add((conid, code))
        level = logging.INFO if code in SHOWN_PARTLY else logging.WARNING
        log.log(level, "market data refused or limited", extra={"conid": conid, "code": code,
                                                             "text": text})  # fmt: skip

    def _pass_on(self, msg_id: int, fields: list[str]) -> None:
        original = self._handlers.get(msg_id)
        if original is not None:
            original(fields)

    # --- what the metrics read ------------------------------------------------------

    def oldest_sample_s(self) -> float:
        """The longest any held option has gone without a computation."""
        if not self.fresh_at:
            return 0.0
        return self.monotonic() - min(self.fresh_at.values())

    @property
    def options(self) -> int:
        return len(self._holders)
