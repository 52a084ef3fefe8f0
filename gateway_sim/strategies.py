"""The simulator's strategy scenario: it trades multi-leg strategies as a trader does,
and keeps its own record of them for the tests to compare the book with.

Every structure the book knows (iron condor, iron butterfly, vertical, straddle,
strangle, butterfly, calendar, diagonal, ratio spread, covered call, collar,
cash-secured put) is opened three ways, each in its own account: as one combo
(BAG) order, as separate leg orders sharing an order reference (IB's orderRef),
and as separate untagged orders. Some strategies are held from before the
producer started (positions with no fill in the day's blotter). Then some are
partly closed, verticals are rolled up (one four-leg combo, or four orders under
their reference; untagged, the close and the new vertical are two strategies),
and some are closed, held ones included.

Each structure trades on its own underlying (the untagged ones cannot run into
each other), so a strategy's contracts are its own. The record is what a trader
knows: per strategy its structure, account, underlying, legs held, execution IDs,
rolls and whether it is closed; its money follows from the fills as the
simulator finally made them (corrections applied), see :func:`expected`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway_sim.fills import SimFill
from gateway_sim.portfolio import UNDERLYINGS, Instrument, SyntheticPortfolio

if TYPE_CHECKING:
    from gateway_sim.simulator import GatewaySimulator

MODES = ("combo", "ref", "untagged")
UNITS = 2.0  # every strategy opens two of its structure
Legs = list[tuple[Instrument, float]]  # instrument, signed quantity per unit


class Chain:
    """Contracts of one underlying by expiry (index into the simulator's expiries),
    strike steps from the money and right."""

    def __init__(self, portfolio: SyntheticPortfolio, symbol: str) -> None:
        self.symbol = symbol
        mine = [i for i in portfolio.instruments if i.symbol == symbol]
        self.stock = next(i for i in mine if i.sec_type == "STK")
        self._options = {(i.expiry, i.strike, i.right): i for i in mine if i.sec_type == "OPT"}
        self.expiries = sorted({i.expiry for i in mine if i.sec_type == "OPT"})
        spot = portfolio.spot[symbol]
        self.step = 5.0 if spot >= 250 else 1.0
        self.center = round(spot / self.step) * self.step

    def opt(self, right: str, steps: int, expiry: int = 2) -> Instrument:
        return self._options[(self.expiries[expiry], self.center + steps * self.step, right)]


STRUCTURES: dict[str, Callable[[Chain], Legs]] = {
    "iron_condor": lambda c: [
        (c.opt("P", -4), 1), (c.opt("P", -2), -1), (c.opt("C", 2), -1), (c.opt("C", 4), 1),
    ],
    "iron_butterfly": lambda c: [
        (c.opt("P", -3), 1), (c.opt("P", 0), -1), (c.opt("C", 0), -1), (c.opt("C", 3), 1),
    ],
    "vertical_spread": lambda c: [(c.opt("C", 0), 1), (c.opt("C", 2), -1)],
    "straddle": lambda c: [(c.opt("C", 0), 1), (c.opt("P", 0), 1)],
    "strangle": lambda c: [(c.opt("C", 3), -1), (c.opt("P", -3), -1)],
    "butterfly": lambda c: [(c.opt("C", -2), 1), (c.opt("C", 0), -2), (c.opt("C", 2), 1)],
    "calendar_spread": lambda c: [(c.opt("C", 0, 1), -1), (c.opt("C", 0, 4), 1)],
    "diagonal_spread": lambda c: [(c.opt("C", 2, 1), -1), (c.opt("C", 0, 4), 1)],
    "ratio_spread": lambda c: [(c.opt("C", 0), 1), (c.opt("C", 3), -2)],
    "covered_call": lambda c: [(c.stock, 100), (c.opt("C", 3), -1)],
    "collar": lambda c: [(c.stock, 100), (c.opt("C", 3), -1), (c.opt("P", -3), 1)],
    "cash_secured_put": lambda c: [(c.opt("P", -2), -1)],
}  # fmt: skip
PARTLY_CLOSED = ("iron_condor", "straddle", "butterfly")
CLOSED = ("strangle", "calendar_spread")
HELD = ("iron_condor", "covered_call", "cash_secured_put")  # held from before, closed: the first


@dataclass
class MadeStrategy:
    """One strategy as the scenario made it."""

    key: str  # "<structure>/<mode>"
    structure: str
    mode: str  # combo, ref, untagged, held
    account: str
    symbol: str
    ref: str = ""
    held: dict[int, float] = field(default_factory=dict)  # conid -> signed quantity
    exec_bases: list[str] = field(default_factory=list)
    # held from before the day: conid -> (quantity, open price: IB's average cost / multiplier)
    held_before: dict[int, tuple[float, float]] = field(default_factory=dict)
    rolls: int = 0

    @property
    def closed(self) -> bool:
        return not any(self.held.values())


def trade(
    sim: GatewaySimulator, account: str, legs: Legs, *, ref: str = "", combo: bool = False
) -> list[SimFill]:
    """One order (``combo``: every leg under one perm_id, with the BAG's own report)
    or one order per leg, tagged ``ref``: fills, then each leg's position updates."""
    sessions = [s for s in sim.sessions if s.ready]
    events, made = [], []
    order = sim.blotter.combo_order() if combo else None
    for instrument, change in legs:
        held = sim.portfolio.holdings.get((account, instrument.conid))
        event = sim.portfolio.set_position(
            account, instrument.conid, (held.position if held else 0.0) + change
        )
        events.append(event)
        made += sim.blotter.fill(event.holding, change, 0.0, perm_id=order)
    for one in made:
        one.order_ref = ref
    if combo:
        report = sim.blotter.combo_report(made, legs[0][0].symbol)
        report.order_ref = ref
        for session in sessions:
            session.queue(report.exec_details(-1, sim.config.exec_time_format))
    for one in made:
        sim.book.book(one)
        sim.send_fill(one, sessions)
    for event in events:
        sim.events += 1
        for session in sessions:
            sim.send_event(session, event.kind, event.holding)
    for session in sessions:
        session.flush()
    return made


class StrategyScenario:
    """The script: :meth:`hold_before` before any client connects, then
    :meth:`open_all`, :meth:`partly_close`, :meth:`roll`, :meth:`close` (the tests let
    the pipeline take each phase in between)."""

    def __init__(self, sim: GatewaySimulator, accounts: Mapping[str, str]) -> None:
        self.sim = sim
        self.accounts = dict(accounts)  # mode -> account; modes, and "held"
        symbols = [symbol for symbol, _, _ in UNDERLYINGS]
        self.chains = {
            name: Chain(sim.portfolio, symbol)
            for name, symbol in zip(STRUCTURES, symbols, strict=True)
        }
        self.made: dict[str, MadeStrategy] = {}

    def _new(self, structure: str, mode: str, suffix: str = "") -> MadeStrategy:
        key = f"{structure}/{mode}{suffix}"
        ref = f"{structure}-{mode}{suffix}" if mode in ("ref",) else ""
        made = MadeStrategy(
            key, structure, mode, self.accounts[mode], self.chains[structure].symbol, ref
        )
        self.made[key] = made
        return made

    def _trade(self, made: MadeStrategy, legs: Legs, units: float) -> None:
        sized = [(i, q * units) for i, q in legs]
        if made.mode == "combo":
            fills = trade(self.sim, made.account, sized, combo=True)
        else:
            fills = [f for leg in sized for f in trade(self.sim, made.account, [leg], ref=made.ref)]
        made.exec_bases += [f.exec_id.rpartition(".")[0] for f in fills]
        for instrument, change in sized:
            made.held[instrument.conid] = made.held.get(instrument.conid, 0.0) + change

    def hold_before(self) -> None:
        """Positions from an earlier day: held, with no fill in today's blotter."""
        for structure in HELD:
            made = self._new(structure, "held")
            for instrument, quantity in STRUCTURES[structure](self.chains[structure]):
                event = self.sim.portfolio.set_position(
                    made.account, instrument.conid, quantity * UNITS
                )
                made.held[instrument.conid] = quantity * UNITS
                made.held_before[instrument.conid] = (
                    quantity * UNITS,
                    event.holding.average_cost / instrument.multiplier,
                )

    def open_all(self) -> None:
        for mode in MODES:
            for structure, build in STRUCTURES.items():
                self._trade(self._new(structure, mode), build(self.chains[structure]), UNITS)

    def partly_close(self) -> None:
        for mode in MODES:
            for structure in PARTLY_CLOSED:
                legs = STRUCTURES[structure](self.chains[structure])
                self._trade(self.made[f"{structure}/{mode}"], [(i, -q) for i, q in legs], 1.0)

    def roll(self) -> None:
        """Verticals rolled up three strikes: the old spread closed, a new one opened."""
        chain = self.chains["vertical_spread"]
        old = STRUCTURES["vertical_spread"](chain)
        new = [(chain.opt("C", 3), 1.0), (chain.opt("C", 5), -1.0)]
        for mode in MODES:
            made = self.made[f"vertical_spread/{mode}"]
            closing = [(i, -q) for i, q in old]
            if mode == "untagged":  # nothing ties the new spread to the old: two strategies
                self._trade(made, closing, UNITS)
                self._trade(self._new("vertical_spread", mode, "#2"), new, UNITS)
                continue
            self._trade(made, closing + new, UNITS)
            made.rolls += 1

    def close(self) -> None:
        for mode in MODES:
            for structure in CLOSED:
                legs = STRUCTURES[structure](self.chains[structure])
                self._trade(self.made[f"{structure}/{mode}"], [(i, -q) for i, q in legs], UNITS)
        held = self.made[f"{HELD[0]}/held"]
        legs = STRUCTURES[HELD[0]](self.chains[HELD[0]])
        untagged = MadeStrategy(held.key, held.structure, "untagged", held.account, held.symbol)
        self._trade(untagged, [(i, -q) for i, q in legs], UNITS)  # closed by hand, untagged
        held.exec_bases += untagged.exec_bases
        for conid, change in untagged.held.items():
            held.held[conid] += change


@dataclass(frozen=True)
class Expected:
    """What the book must say of a made strategy, from the final fills."""

    realized_pnl: float  # closing fills against average open prices, less commissions
    commissions: float
    units: float
    entry_price: float  # opening notional per unit at its peak


def expected(made: MadeStrategy, final: Mapping[str, SimFill]) -> Expected:
    """Average-cost accounting per leg, as a trader's blotter keeps it; a held leg
    opens at IB's average cost."""
    position: dict[int, float] = {}
    cost: dict[int, float] = {}  # average open price per leg
    realized = commissions = opening = 0.0
    for conid, (quantity, price) in made.held_before.items():
        position[conid], cost[conid] = quantity, price
        opening += quantity * price
    fills = sorted((final[b] for b in made.exec_bases), key=lambda f: (f.time, f.exec_id))
    for fill in fills:
        conid, signed = fill.instrument.conid, fill.signed_shares
        multiplier = fill.instrument.multiplier
        held = position.get(conid, 0.0)
        commissions += fill.commission or 0.0
        if held and (held > 0) != (signed > 0):
            closed = min(abs(held), abs(signed))
            direction = 1.0 if held > 0 else -1.0
            realized += closed * (fill.price - cost[conid]) * direction * multiplier
            position[conid] = held + closed * (1.0 if signed > 0 else -1.0)
            signed -= closed * (1.0 if signed > 0 else -1.0)
        if abs(signed) > 1e-9:
            now = position.get(conid, 0.0)
            cost[conid] = (abs(now) * cost.get(conid, 0.0) + abs(signed) * fill.price) / (
                abs(now) + abs(signed)
            )
            position[conid] = now + signed
            opening += signed * fill.price
    return Expected(realized - commissions, commissions, UNITS, opening / UNITS)
