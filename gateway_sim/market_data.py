"""The simulator's market data: lines, price ticks and option computations (Greeks).

A producer that reports Greeks asks ``reqMktData`` for every option it holds and
must live with IB's limits, so the simulator serves them as IB does (layouts in
``../shared/notes/ib-executions-greeks.md``):

- Each session has a market data type (``reqMarketDataType``, 1 live by default)
  and a table of lines. A streaming line lives until ``cancelMktData``, the
  disconnect or a 1101; a snapshot holds its line ``md_snapshot_delay_s``, then
  sends its values and tickSnapshotEnd (57) and frees it.
- A request gets tickReqParams (81) first, marketDataType (58) when the served
  type is not live, then rounds of bid/ask prices and bid, ask and model
  computations (last in one round of five) every ``md_interval_s``, from
  :func:`black_scholes` at the portfolio's random-walking spot. Delayed data uses
  the delayed tick types (66/67, 80-83).
- Faults: the line limit (101), no subscription for every K-th option (354), a
  delayed-only login (354 live; 10167 and delayed data for types 3/4), a
  competing live session (10197 for live data; togglable at run time), and
  "not computed" values (-1/-2 and IB's unset double) at a given rate.

Unknown contracts get 200, options without an exchange 321 (positions carry
none; a producer must set SMART). With live data permitted, a delayed type is
served live (type 1), as IB does where a subscription exists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import random
import time
from collections import Counter, deque
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from gateway_sim import protocol as tws
from gateway_sim.portfolio import Instrument

if TYPE_CHECKING:
    from gateway_sim.session import ClientSession
    from gateway_sim.simulator import GatewaySimulator, SimulatorConfig

log = logging.getLogger(__name__)

RATE = 0.04  # risk-free rate of the model; no dividends (pvDividend 0)
IV_SPREAD = 0.01  # bid IV this much under the model's, ask IV this much over
LAST_EVERY = 5  # rounds per "last" computation (12/82)
TIMES_KEPT = 32  # computation times kept per conid when not recording

DEFAULT_LINES = 100
DEFAULT_INTERVAL_S = 0.5
DEFAULT_SNAPSHOT_DELAY_S = 0.2
DEFAULT_NOT_COMPUTED = 0.05

LIVE, FROZEN, DELAYED, DELAYED_FROZEN = 1, 2, 3, 4

TEXTS = {
    101: "Max number of tickers has been reached",
    200: "No security definition has been found for the request",
    321: "Error validating request.-'bW' : cause - Please enter exchange",
    322: "Error processing request.-'bX' : cause - Duplicate ticker id",
    354: "Requested market data is not subscribed. Delayed market data is available.",
    10167: "Requested market data is not subscribed. Displaying delayed market data.",
    10197: "No market data during competing live session",
}


@dataclass(frozen=True, slots=True)
class TickTypes:
    bid: int
    ask: int
    bid_greeks: int
    ask_greeks: int
    last_greeks: int
    model_greeks: int


LIVE_TICKS = TickTypes(1, 2, 10, 11, 12, 13)
DELAYED_TICKS = TickTypes(66, 67, 80, 81, 82, 83)


@dataclass(frozen=True, slots=True)
class Greeks:
    """An option's model price and sensitivities, in IB's units."""

    price: float
    delta: float
    gamma: float  # per $1 of the underlying
    vega: float  # per vol point (0.01 of sigma)
    theta: float  # per calendar day


_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / _SQRT2)  # erfc keeps the far tails accurate


def black_scholes(
    spot: float, strike: float, years: float, vol: float, rate: float, right: str
) -> Greeks:
    """Black-Scholes without dividends for a call ("C") or put ("P")."""
    root = vol * math.sqrt(years)
    d1 = (math.log(spot / strike) + (rate + 0.5 * vol * vol) * years) / root
    d2 = d1 - root
    pdf = _INV_SQRT_2PI * math.exp(-0.5 * d1 * d1)
    discounted = strike * math.exp(-rate * years)
    decay = -spot * pdf * vol / (2.0 * math.sqrt(years))
    if right == "C":
        price = spot * _cdf(d1) - discounted * _cdf(d2)
        delta = _cdf(d1)
        theta = decay - rate * discounted * _cdf(d2)
    else:
        price = discounted * _cdf(-d2) - spot * _cdf(-d1)
        delta = -_cdf(-d1)
        theta = decay + rate * discounted * _cdf(-d2)
    gamma = pdf / (spot * root)
    vega = spot * pdf * math.sqrt(years) / 100.0
    return Greeks(price, delta, gamma, vega, theta / 365.0)


def base_vol(conid: int) -> float:
    """A contract's own at-the-money volatility, 0.15-0.45, the same on every run."""
    return random.Random(conid).uniform(0.15, 0.45)


def smile_vol(base: float, spot: float, strike: float) -> float:
    """The model's implied volatility: a smile in log-moneyness, steeper below the spot."""
    m = math.log(strike / spot)
    return min(base + 0.8 * m * m + 0.1 * max(-m, 0.0), 1.5)


def years_to(expiry: str, today: date) -> float:
    """Years from today to a YYYYMMDD expiry, at least a day."""
    day = date(int(expiry[:4]), int(expiry[4:6]), int(expiry[6:]))
    return max((day - today).days, 1) / 365.0


@dataclass(slots=True)
class Line:
    """One market-data line: a streaming subscription or a pending snapshot."""

    req_id: int
    instrument: Instrument
    snapshot: bool
    data_type: int  # the type served: 1 live, 2 frozen, 3 delayed, 4 delayed frozen
    vol: float = 0.0  # the contract's base volatility (options)
    years: float = 0.0  # time to expiry (options)
    rounds: int = 0
    timer: asyncio.TimerHandle | None = None  # a snapshot's end

    @property
    def ticks(self) -> TickTypes:
        return DELAYED_TICKS if self.data_type >= DELAYED else LIVE_TICKS


class MarketData:
    """Every session's market-data lines, their rounds of ticks, faults and statistics."""

    def __init__(self, simulator: GatewaySimulator) -> None:
        self.sim = simulator
        self.config = simulator.config
        self._rng = random.Random(simulator.config.seed + 2)
        self._task: asyncio.Task[None] | None = None
        self.max_lines = 0  # the most lines one session held at once, over the run
        self.counts: Counter[str] = Counter()  # requests, cancels, snapshots, rounds...
        self.errors: Counter[int] = Counter()  # errors sent, by code
        self._times: dict[int, deque[float]] = {}  # per conid: when computations went out

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._stream_forever())

    async def stop(self) -> None:
        for session in list(self.sim.sessions):
            self.forget(session)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def forget(self, session: ClientSession) -> None:
        """Free a session's lines (disconnect, 1101: IB forgets the subscriptions)."""
        for req_id in list(session.md_lines):
            self._drop(session, req_id)

    # --- requests -------------------------------------------------------------------

    def set_type(self, session: ClientSession, data_type: int) -> None:
        if data_type not in (LIVE, FROZEN, DELAYED, DELAYED_FROZEN):
            log.warning("ignoring market data type", extra={"type": data_type})
            return
        session.md_type = data_type

    def request(self, session: ClientSession, fields: list[str]) -> None:
        """reqMktData. Legs (BAG) and a delta-neutral contract shift the middle fields, so
        the snapshot flag is read from the end."""
        try:
            req_id = int(fields[2])
            snapshot = fields[-3] == "1"
        except (IndexError, ValueError):
            raise tws.ProtocolError(f"bad reqMktData {fields[:4]!r}") from None
        try:
            conid = int(fields[3])
        except ValueError:
            conid = 0
        self.counts["requests"] += 1
        self.counts["snapshots"] += snapshot
        instrument = self.sim.portfolio.instrument(conid)
        config = self.config
        if req_id in session.md_lines:
            self._error(session, req_id, 322)
            return
        if instrument is None:
            self._error(session, req_id, 200)
            return
        option = instrument.sec_type == "OPT"
        if option and not fields[10]:
            self._error(session, req_id, 321)
            return
        every = config.md_unsubscribed_every
        if option and every > 0 and conid % every == 0:
            self._error(session, req_id, 354)
            return
        asked = session.md_type
        live_asked = asked in (LIVE, FROZEN)
        if live_asked and config.md_competing:
            self._error(session, req_id, 10197)
            return
        if live_asked and config.md_delayed_only:
            self._error(session, req_id, 354)
            return
        if len(session.md_lines) >= config.md_lines:
            self._error(session, req_id, 101)
            return
        # Live where permitted (type 3/4 too: IB serves live where subscribed).
        live_ok = not (config.md_delayed_only or config.md_competing)
        served = asked if live_asked else (LIVE if live_ok else asked)
        line = Line(req_id, instrument, snapshot, served)
        if option:
            line.vol = base_vol(conid)
            line.years = years_to(instrument.expiry, self.sim.portfolio.today)
        session.md_lines[req_id] = line
        self.max_lines = max(self.max_lines, len(session.md_lines))
        session.queue(tws.tick_req_params(req_id, 0.01, "9c0001", 3))
        if config.md_delayed_only:
            self._error(session, req_id, 10167)  # a warning: the line is served
        if served != LIVE:
            session.queue(tws.market_data_type(req_id, served))
        if snapshot:
            self._schedule_end(session, line)
        else:
            self._send_round(session, line)

    def cancel(self, session: ClientSession, req_id: int) -> None:
        self.counts["cancels"] += 1
        self._drop(session, req_id)

    @staticmethod
    def _drop(session: ClientSession, req_id: int) -> None:
        line = session.md_lines.pop(req_id, None)
        if line is not None and line.timer is not None:
            line.timer.cancel()

    def set_competing(self, on: bool) -> None:
        """A live login starts (or ends) elsewhere: every line served live gets 10197
        and is gone; the client asks again once the session ended."""
        self.config.md_competing = on
        if not on:
            return
        for session in [s for s in self.sim.sessions if s.ready]:
            for line in [ln for ln in session.md_lines.values() if ln.data_type < DELAYED]:
                self._drop(session, line.req_id)
                self._error(session, line.req_id, 10197)
            session.flush()

    def _error(self, session: ClientSession, req_id: int, code: int) -> None:
        self.errors[code] += 1
        session.queue(tws.error(req_id, code, TEXTS[code]))

    # --- ticks ----------------------------------------------------------------------

    def _schedule_end(self, session: ClientSession, line: Line) -> None:
        loop = asyncio.get_running_loop()
        delay = self.config.md_snapshot_delay_s
        line.timer = loop.call_later(delay, self._end_snapshot, session, line)

    def _end_snapshot(self, session: ClientSession, line: Line) -> None:
        if session.md_lines.get(line.req_id) is not line or not session.ready:
            return  # cancelled, or the session went away
        if self.sim.paused:  # IB sends nothing between 1100 and its restore
            self._schedule_end(session, line)
            return
        self._send_round(session, line)
        session.queue(tws.tick_snapshot_end(line.req_id))
        del session.md_lines[line.req_id]
        self.counts["snapshots_ended"] += 1
        session.flush()

    async def _stream_forever(self) -> None:
        interval = self.config.md_interval_s
        due = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(due - time.monotonic(), 0.0))
            # A late wake-up skips rounds rather than bursting to catch up.
            due = max(due + interval, time.monotonic())
            if self.sim.paused:
                continue
            for session in [s for s in self.sim.sessions if s.ready and s.md_lines]:
                for line in list(session.md_lines.values()):
                    if not line.snapshot:
                        self._send_round(session, line)
                session.flush()

    def _send_round(self, session: ClientSession, line: Line) -> None:
        """One round of a line: bid and ask, and for options the computations."""
        instrument, ticks, rng = line.instrument, line.ticks, self._rng
        spot = self.sim.portfolio.spot[instrument.symbol]
        req_id = line.req_id
        self.counts["rounds"] += 1
        if instrument.sec_type != "OPT":
            session.queue(tws.tick_price(req_id, ticks.bid, round(spot - 0.01, 2), 100))
            session.queue(tws.tick_price(req_id, ticks.ask, round(spot + 0.01, 2), 100))
            return
        strike, right = instrument.strike, instrument.right
        vol = smile_vol(line.vol, spot, strike)
        bid_vol, ask_vol = max(vol - IV_SPREAD, 0.01), vol + IV_SPREAD
        model = black_scholes(spot, strike, line.years, vol, RATE, right)
        bid = black_scholes(spot, strike, line.years, bid_vol, RATE, right)
        ask = black_scholes(spot, strike, line.years, ask_vol, RATE, right)
        bid_price = max(math.floor(bid.price * 100.0) / 100.0, 0.01)
        ask_price = max(math.ceil(ask.price * 100.0) / 100.0, round(bid_price + 0.01, 2))
        session.queue(tws.tick_price(req_id, ticks.bid, bid_price, rng.randint(1, 50)))
        session.queue(tws.tick_price(req_id, ticks.ask, ask_price, rng.randint(1, 50)))
        sent = [(ticks.bid_greeks, bid_vol, bid), (ticks.ask_greeks, ask_vol, ask),
                (ticks.model_greeks, vol, model)]  # fmt: skip
        if line.rounds % LAST_EVERY == 0:
            sent.append((ticks.last_greeks, vol, model))
        line.rounds += 1
        for tick_type, iv, greeks in sent:
            session.queue(self._computation(req_id, tick_type, iv, greeks, spot))
        self.counts["computations"] += len(sent)
        times = self._times.get(instrument.conid)
        if times is None:
            kept = None if self.config.record else TIMES_KEPT
            times = self._times[instrument.conid] = deque(maxlen=kept)
        times.append(time.monotonic())

    def _computation(
        self, req_id: int, tick_type: int, iv: float, greeks: Greeks, spot: float
    ) -> bytes:
        vega, theta = greeks.vega, greeks.theta
        pv_dividend: float | str = 0.0
        und_price: float | str = spot
        chance = self.config.md_not_computed
        if chance > 0.0:
            rng = self._rng
            if rng.random() < chance:  # IB's "not computed" markers
                iv, vega, theta = -1.0, -2.0, -2.0
            if rng.random() < chance:  # and its unset double, here or there
                if rng.random() < 0.5:
                    und_price = tws.UNSET_DOUBLE_TEXT
                else:
                    pv_dividend = tws.UNSET_DOUBLE_TEXT
        return tws.tick_option_computation(
            req_id, tick_type, iv, greeks.delta, greeks.price, pv_dividend, greeks.gamma,
            vega, theta, und_price,
        )  # fmt: skip

    # --- what tests and --stats read ---------------------------------------------------

    def lines_now(self) -> int:
        return sum(len(s.md_lines) for s in self.sim.sessions)

    def streaming_conids(self) -> set[int]:
        return {
            line.instrument.conid
            for session in self.sim.sessions
            for line in session.md_lines.values()
            if not line.snapshot
        }

    def computation_times(self, conid: int) -> list[float]:
        """When rounds of computations for a contract went out (time.monotonic()): all
        of them when recording, else the last few."""
        return list(self._times.get(conid, ()))

    def stats(self) -> dict[str, Any]:
        names = ("requests", "cancels", "snapshots", "snapshots_ended", "rounds", "computations")
        return {
            "max_lines": self.max_lines,
            "lines_now": self.lines_now(),
            "streaming_now": sum(
                not line.snapshot for s in self.sim.sessions for line in s.md_lines.values()
            ),
            **{name: self.counts[name] for name in names},
            "conids_computed": len(self._times),
            "errors": {str(code): n for code, n in sorted(self.errors.items())},
        }


# --- configuration ---------------------------------------------------------------------


def check_config(config: SimulatorConfig) -> None:
    if config.md_lines < 0 or config.md_unsubscribed_every < 0:
        raise ValueError("md_lines and md_unsubscribed_every must not be negative")
    if config.md_interval_s <= 0 or config.md_snapshot_delay_s < 0:
        raise ValueError("md_interval_s must be positive, md_snapshot_delay_s not negative")
    if not 0.0 <= config.md_not_computed <= 1.0:
        raise ValueError("md_not_computed is a probability (0 to 1)")


_VALUE_FLAGS: tuple[tuple[str, type, float, str], ...] = (
    ("--md-lines", int, DEFAULT_LINES, "market-data lines per connection (101 past them)"),
    ("--md-interval", float, DEFAULT_INTERVAL_S, "seconds between a streaming line's rounds"),
    ("--md-snapshot-delay", float, DEFAULT_SNAPSHOT_DELAY_S, "seconds a snapshot holds its line"),
    ("--md-not-computed", float, DEFAULT_NOT_COMPUTED, "chance per computation of not-computed"),
    ("--md-unsubscribed-every", int, 0, "options whose conid is a multiple of this get 354"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("market data (reqMktData: lines, ticks and Greeks)")
    for flag, kind, default, text in _VALUE_FLAGS:
        group.add_argument(flag, type=kind, default=default, help=text)
    group.add_argument("--md-delayed-only", action="store_true",
                       help="no live data: 354 live, 10167 and delayed data for 3/4")  # fmt: skip
    group.add_argument("--md-competing", action="store_true",
                       help="a competing live session: 10197 for live data")  # fmt: skip


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The SimulatorConfig fields of :func:`add_arguments`' flags."""
    return {
        "md_lines": args.md_lines,
        "md_interval_s": args.md_interval,
        "md_snapshot_delay_s": args.md_snapshot_delay,
        "md_not_computed": args.md_not_computed,
        "md_unsubscribed_every": args.md_unsubscribed_every,
        "md_delayed_only": args.md_delayed_only,
        "md_competing": args.md_competing,
    }
