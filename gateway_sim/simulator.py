"""A TWS-protocol gateway simulator: the real ib_async client connects to it over TCP.

It serves a :class:`~gateway_sim.portfolio.SyntheticPortfolio` (size, update
rate and seed are settings), pushes updates at a steady rate to every
subscribed connection, and records every position-bearing message it sends
(:attr:`GatewaySimulator.record`) so tests can compare the lake with it.

Every position change is made by fills (gateway_sim/fills.py: commissions after
a delay, before the fill or never, corrections, two-leg combos with their BAG
report; ``reqExecutions`` answered with the day's fills), and every account's
values and P&L follow the book (gateway_sim/accounts.py), resent every
``account_values_every_s``.

Market data (gateway_sim/market_data.py): reqMktData lines streaming or
snapshotting bid/ask and Black-Scholes option computations (Greeks).

Fault controls: drop connections after a time or at random, refuse a client ID
(error 326), leave a startup request unanswered, send the link codes
1100/1101/1102, the fill faults above, and market data's: the line limit (101),
unsubscribed options (354), a delayed-only login (354/10167), a competing live
session (10197, also switched at run time) and not-computed Greeks.

Runs on its own (``python -m gateway_sim --port 4002 --positions 200 --rate 50``:
gateway_sim/cli.py), inside a test's event loop, or in a thread (:class:`SimulatorThread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway_sim import market_data as md
from gateway_sim import protocol as tws
from gateway_sim.accounts import AccountBook
from gateway_sim.fills import EXEC_TIME_FORMATS, Blotter, FillFaults, SimFill
from gateway_sim.portfolio import (
    EventKind,
    Holding,
    Instrument,
    PortfolioEvent,
    SyntheticPortfolio,
)
from gateway_sim.session import ClientSession, SentUpdate, prerender

log = logging.getLogger(__name__)

TICK_S = 0.01


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    at: float  # time.monotonic()
    msg_id: int
    conid: int | None  # PnL-single subscribe and cancel only


STARTUP_REQUESTS = frozenset(
    {
        "positions",
        "open_orders",
        "completed_orders",
        "account_updates",
        "account_updates_multi",
        "executions",
        "current_time",
    }
)


@dataclass
class SimulatorConfig:
    """What the simulated gateway holds and does."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (see GatewaySimulator.port)
    accounts: list[str] = field(default_factory=lambda: ["DU100001"])
    positions: int = 50
    rate: float = 10.0  # portfolio events per second over all accounts
    seed: int = 1
    record: bool = True
    # Faults.
    drop_after_s: float | None = None  # close each connection this long after startApi
    drop_probability_per_s: float = 0.0  # chance per second of dropping every connection
    refused_client_ids: set[int] = field(default_factory=set)
    unanswered: Counter[str] = field(default_factory=Counter)  # request -> connections left
    fills: bool = True  # every position change is made by fills (gateway_sim/fills.py)
    fill_faults: FillFaults = field(default_factory=FillFaults)
    exec_time_format: str = "utc"  # how execution times are written (gateway_sim/fills.py)
    account_values_every_s: float = 5.0  # IB resends every ~3 min; faster here
    # At most this many position changes (opens, changes, closes: the fills) a second;
    # the other events move prices. None: as the seeded rolls fall (~20% of events).
    position_changes_per_s: float | None = None
    max_day_fills: int = 200_000  # the blotter keeps the day's newest fills, no more
    # Market data (gateway_sim/market_data.py).
    md_lines: int = md.DEFAULT_LINES  # per connection; error 101 past them
    md_interval_s: float = md.DEFAULT_INTERVAL_S  # between rounds of a streaming line
    md_snapshot_delay_s: float = md.DEFAULT_SNAPSHOT_DELAY_S  # a snapshot holds its line
    md_not_computed: float = md.DEFAULT_NOT_COMPUTED  # chance per computation
    md_unsubscribed_every: int = 0  # options with conid % K == 0 get 354; 0: none
    md_delayed_only: bool = False  # no live permission: 354, or 10167 and delayed data
    md_competing: bool = False  # a competing live session: 10197 for live data

    def __post_init__(self) -> None:
        unknown = set(self.unanswered) - STARTUP_REQUESTS
        if unknown:
            raise ValueError(f"unknown startup requests {sorted(unknown)}")
        if self.rate < 0 or self.positions < 0:
            raise ValueError("rate and positions must not be negative")
        if self.exec_time_format not in EXEC_TIME_FORMATS:
            raise ValueError(f"exec_time_format must be one of {EXEC_TIME_FORMATS}")
        md.check_config(self)


class GatewaySimulator:
    """The asyncio server: sessions, the event ticker and the fault controls."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.accounts = list(config.accounts)
        self.portfolio = SyntheticPortfolio(self.accounts, config.positions, seed=config.seed)
        self.blotter = Blotter(config.seed, config.fill_faults, max_fills=config.max_day_fills)
        self.book = AccountBook(self.accounts)
        # The book before the first event: what fills change it from (checks of the truth).
        self.initial_positions = {
            key: holding.position for key, holding in self.portfolio.holdings.items()
        }
        self.record: list[SentUpdate] = []
        self.fills_sent: list[tuple[str, int]] = []  # (exec_id, send time in ns), if recording
        self.sent_count: Counter[str] = Counter()
        self.first_sent_ns: dict[str, int] = {}
        self.last_sent_ns: dict[str, int] = {}
        # What clients asked: counts per message ID, and (when recording) each request
        # as (monotonic time, message ID, conid for PnL-single requests else None).
        self.received_count: Counter[int] = Counter()
        self.requests: list[ReceivedRequest] = []
        prerender(self.portfolio.holdings.values())
        self.sessions: set[ClientSession] = set()
        self.connections = 0  # sessions that passed startApi, over the run
        self.events = 0
        self.paused = False  # between 1100 and 1101/1102: IB sends nothing
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._rng = random.Random(config.seed + 1)
        self._change_tokens = 0.0
        self._tokens_at = time.monotonic()
        self.market_data = md.MarketData(self)
        self.port = config.port

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._on_connect, self.config.host, self.config.port
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ticker = asyncio.create_task(self._tick_forever())
        self.market_data.start()
        log.info("gateway simulator listening", extra={"port": self.port})
        return self.port

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self.market_data.stop()
        # Close gracefully: what was sent before the stop reaches the clients.
        for session in list(self.sessions):
            session.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = ClientSession(self, reader, writer)
        self.sessions.add(session)
        await session.serve()

    def forget(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        self.market_data.forget(session)

    def note_request(self, msg_id: int, fields: list[str]) -> None:
        self.received_count[msg_id] += 1
        if not self.config.record:
            return  # a long run keeps counts only
        conid = None
        with contextlib.suppress(IndexError, ValueError):
            if msg_id == tws.Incoming.REQ_PNL_SINGLE:
                conid = int(fields[4])
            elif msg_id == tws.Incoming.CANCEL_PNL_SINGLE:
                sessions = [s for s in self.sessions if int(fields[1]) in s.pnl_by_req]
                conid = sessions[0].pnl_by_req[int(fields[1])][1] if sessions else None
        self.requests.append(ReceivedRequest(time.monotonic(), msg_id, conid))

    def set_position(self, account: str, conid: int, position: float) -> None:
        """Open, change or close one holding now and send the event (tests of churn)."""
        self.emit([self.portfolio.set_position(account, conid, position)])

    # --- faults -------------------------------------------------------------

    def client_id_taken(self, client_id: int, asking: ClientSession) -> bool:
        if client_id in self.config.refused_client_ids:
            return True
        return any(s.ready and s.client_id == client_id for s in self.sessions if s is not asking)

    def take_unanswered(self, request: str) -> bool:
        """Whether to leave this request unanswered on this connection (counts down)."""
        if self.config.unanswered[request] > 0:
            self.config.unanswered[request] -= 1
            log.info("leaving startup request unanswered", extra={"request": request})
            return True
        return False

    def drop_connections(self) -> int:
        """Abort every connection, as a gateway restart does; returns how many."""
        dropped = [s for s in self.sessions if s.ready]
        for session in dropped:
            session.abort()
        log.info("dropped connections", extra={"count": len(dropped)})
        return len(dropped)

    def set_competing_session(self, on: bool) -> None:
        """Start or end a competing live session: live lines get 10197 and are dropped."""
        self.market_data.set_competing(on)

    def lines_now(self) -> int:
        return self.market_data.lines_now()

    def streaming_conids(self) -> set[int]:
        return self.market_data.streaming_conids()

    def new_day(self) -> None:
        """Start the next trading day: contracts closed earlier no longer appear at 0 in
        the position answer, and the day's executions start empty (reqExecutions covers
        today only). A producer away overnight sees its closed positions simply gone."""
        self.portfolio.closed_today.clear()
        self.blotter.fills.clear()

    # Drift on purpose (``poslake reconcile`` must catch each):

    def fill_unseen(self, account: str, conid: int, change: float) -> None:
        """A fill that never reaches a client live (its position change does): IB's
        blotter has it, so only a new reqExecutions shows it."""
        holding = self.portfolio.holdings[(account, conid)]
        event = self.portfolio.set_position(account, conid, holding.position + change)
        for made in self.blotter.fill(event.holding, event.change, 0.0):
            self.book.book(made)
        self._emit_without_fills(event)

    def change_without_fill(self, account: str, conid: int, position: float) -> None:
        """A position change with no execution anywhere (not even in IB's blotter)."""
        self._emit_without_fills(self.portfolio.set_position(account, conid, position))

    def set_value_quietly(self, account: str, key: str, value: str) -> None:
        """An account value changes without any message: only a new download shows it."""
        self.book.overrides[(account, key)] = value

    def _emit_without_fills(self, event: PortfolioEvent) -> None:
        fills, self.config.fills = self.config.fills, False
        try:
            self.emit([event])
        finally:
            self.config.fills = fills

    def stop_sending_value(self, account: str, key: str) -> None:
        """IB stops sending one of the account's values (no message says so)."""
        self.book.withheld.add((account, key))

    def pause(self) -> None:
        """Stop generating events (connections stay up)."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def send_link_code(self, code: int) -> None:
        """1100: IB link lost (nothing is sent until restored); 1101: restored, data
        lost (subscriptions are gone and must be redone); 1102: restored, data kept."""
        text = tws.LINK_TEXTS[code]
        self.paused = code == 1100
        for session in self.sessions:
            if not session.ready:
                continue
            session.queue(tws.error(-1, code, text))
            if code == 1101:
                session.forget_subscriptions()
            session.flush()

    # --- events ---------------------------------------------------------------

    async def _tick_forever(self) -> None:
        start = time.monotonic()
        emitted = 0
        next_drop_roll = start + 1.0
        next_values = start + self.config.account_values_every_s
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            if self.config.drop_after_s is not None:
                for session in [s for s in self.sessions if s.ready]:
                    if now - session.connected_at >= self.config.drop_after_s:
                        session.abort()
            if now >= next_values and not self.paused:
                next_values = now + self.config.account_values_every_s
                self.send_account_figures()
            if now >= next_drop_roll:
                next_drop_roll += 1.0
                if self._rng.random() < self.config.drop_probability_per_s:
                    self.drop_connections()
            due = int((now - start) * self.config.rate) - emitted
            if self.paused or due <= 0:
                emitted += max(due, 0)
                continue
            emitted += due
            self.emit(self._steps(due, now))

    def _steps(self, due: int, now: float) -> Iterable[PortfolioEvent]:
        budget = self.config.position_changes_per_s
        for _ in range(due):
            if budget is None:
                yield self.portfolio.step()
                continue
            # A token bucket of position changes, refilled at the budget's rate.
            self._change_tokens = min(
                max(1.0, budget), self._change_tokens + (now - self._tokens_at) * budget
            )
            self._tokens_at = now
            event = self.portfolio.step(moves=self._change_tokens >= 1.0)
            if event.kind.moves_position:
                self._change_tokens -= 1.0
            yield event

    def emit(self, events: Iterable[PortfolioEvent]) -> None:
        """Send each event to the connections subscribed to it, in order; a position's
        change goes out as its fills first."""
        sessions = [s for s in self.sessions if s.ready]
        for event in events:
            self.events += 1
            holding = event.holding
            if event.change and self.config.fills:
                partner = (
                    self.portfolio.combo_partner(holding)
                    if event.kind is EventKind.OPEN and self.blotter.wants("combo")
                    else None
                )
                if partner is not None:
                    self._open_combo(event, partner, sessions)
                    continue
                for made in self.blotter.fill(holding, event.change, event.realized):
                    self.book.book(made)
                    self.send_fill(made, sessions)
            self.book.realized[holding.account] += event.realized
            for session in sessions:
                self.send_event(session, event.kind, holding)
        for session in sessions:
            session.flush()

    # --- fills ----------------------------------------------------------------

    def _open_combo(
        self, event: PortfolioEvent, partner: Instrument, sessions: list[ClientSession]
    ) -> None:
        """An option opened with a second leg as one combo order: the BAG's own report,
        then each leg's fill, then each leg's position updates."""
        holding = event.holding
        second = self.portfolio.set_position(holding.account, partner.conid, -event.change)
        order = self.blotter.combo_order()
        legs = [
            *self.blotter.fill(holding, event.change, 0.0, perm_id=order),
            *self.blotter.fill(second.holding, second.change, 0.0, perm_id=order),
        ]
        report = self.blotter.combo_report(legs, holding.instrument.symbol)
        for session in sessions:
            session.queue(report.exec_details(-1, self.config.exec_time_format))
        for made in legs:
            self.book.book(made)
            self.send_fill(made, sessions)
        for leg_event in (event, second):
            self.events += leg_event is second
            for session in sessions:
                self.send_event(session, leg_event.kind, leg_event.holding)

    def send_fill(self, made: SimFill, sessions: list[ClientSession]) -> None:
        """A live fill (req_id -1) to every connection, as to a master client; its
        commission after a delay, before it, or never, by the fault settings."""
        blotter, fmt = self.blotter, self.config.exec_time_format
        if self.config.record:
            self.fills_sent.append((made.exec_id, time.time_ns()))
        first = made.commission is not None and blotter.wants("commission_first")
        for session in sessions:
            if first:
                session.queue(made.commission_report())
            session.queue(made.exec_details(-1, fmt))
        if made.commission is not None and not first:
            self._later(blotter.delay_s(), self._send_commission, made)
        if blotter.wants("correction"):
            self._later(2 * blotter.delay_s(), self._send_correction, made)

    def _send_commission(self, made: SimFill) -> None:
        for session in [s for s in self.sessions if s.ready]:
            session.queue(made.commission_report())
            session.flush()

    def _send_correction(self, original: SimFill) -> None:
        corrected = self.blotter.correct(original)
        self.book.correct(original, corrected)
        for session in [s for s in self.sessions if s.ready]:
            session.queue(corrected.exec_details(-1, self.config.exec_time_format))
            session.queue(corrected.commission_report())
            session.flush()

    @staticmethod
    def _later(delay_s: float, action: Any, *args: object) -> None:
        asyncio.get_running_loop().call_later(delay_s, action, *args)

    def send_account_figures(self) -> None:
        """Every subscribed account value and P&L to every connection, now."""
        for session in [s for s in self.sessions if s.ready]:
            session.send_account_figures()
            session.flush()

    def account_figures(self) -> dict[str, dict[tuple[str, str], str]]:
        """Every account's values now, by (key, currency): what IB would send."""
        return {
            account: {
                (key, currency): value
                for key, value, currency in self.book.values(
                    account, self.portfolio.holdings_of(account)
                )
            }
            for account in self.accounts
        }

    def executions_reply(self, req_id: int) -> list[bytes]:
        """reqExecutions' answer: the day's fills, each with its report if it has one."""
        messages = []
        for made in self.blotter.fills:
            messages.append(made.exec_details(req_id, self.config.exec_time_format))
            if made.commission is not None:
                messages.append(made.commission_report())
        return messages

    @staticmethod
    def send_event(session: ClientSession, kind: EventKind, holding: Holding) -> None:
        if session.portfolio_account == holding.account:
            session.send_portfolio(holding)
        if kind.moves_position and session.positions_subscribed:
            session.send_position(holding)
        req_id = session.pnl_by_key.get((holding.account, holding.instrument.conid))
        if req_id is not None:
            session.send_pnl_single(req_id, holding)

    def sent_stats(self) -> dict[str, dict[str, Any]]:
        """Per message kind: how many were sent, and when the first and last were; per
        request message ID, how many were received; market data's lines and counts."""
        return {"count": dict(self.sent_count), "first_ns": self.first_sent_ns,
                "last_ns": self.last_sent_ns,
                "received": {str(k): v for k, v in self.received_count.items()},
                "market_data": self.market_data.stats()}  # fmt: skip

    def final_state(self) -> list[dict[str, object]]:
        """The book now: one row per open holding."""
        return [
            {
                "account": h.account,
                "conid": h.instrument.conid,
                "symbol": h.instrument.symbol,
                "position": h.position,
                "market_price": h.market_price,
                "average_cost": h.average_cost,
            }
            for h in self.portfolio.holdings.values()
        ]


class SimulatorThread:
    """The simulator on its own event loop in a daemon thread (tests, ``poslake run``)."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.simulator = GatewaySimulator(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> int:
        self._thread.start()
        return self.call(self.simulator.start())

    def call(self, coroutine: Coroutine[Any, Any, int]) -> int:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def run(self, action: str, *args: object) -> object:
        """Run one simulator method on its loop (fault controls from another thread)."""

        async def invoke() -> object:
            return getattr(self.simulator, action)(*args)

        return asyncio.run_coroutine_threadsafe(invoke(), self._loop).result(timeout=10)

    def do(self, action: Callable[..., object], *args: object) -> object:
        """Run any callable on the simulator's loop (the strategy scenario's phases)."""

        async def invoke() -> object:
            return action(*args)

        return asyncio.run_coroutine_threadsafe(invoke(), self._loop).result(timeout=30)

    def snapshot(self) -> list[SentUpdate]:
        return list(self.simulator.record)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.simulator.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
