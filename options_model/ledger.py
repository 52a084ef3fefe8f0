"""One strategy's accounts: its legs, what each fill opened and closed, its P&L.

Per leg (one contract in one strategy) the open quantity carries an average open
price (the opening fills' weighted average; a partial close keeps it, a fill that
crosses zero starts a new one at its price). A fill's closing part realizes
``closed x (price - open price) x multiplier`` with the sign of the position it
closes. A strategy's realized P&L is its legs' realized sums less every
commission it paid (opening ones too), so once every leg is flat it equals the
fills' cash flow less their commissions, to the cent.

Entry and exit prices are net prices per unit of the structure: the opening
fills' signed ``quantity x price`` (positive a debit, negative a credit) over
the most units the strategy held, and the same for the closing fills once it is
closed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from options_model.classify import Classification, classify_distinct
from options_model.fills import Contract, Fill

FLAT = 1e-9


@dataclass(frozen=True)
class Transaction:
    """What one fill did to one strategy's leg."""

    fill: Fill
    strategy_id: str
    leg_id: str
    effect: str  # "OPEN", "CLOSE" or "CLOSE_OPEN" (crossed zero)
    closed: float  # unsigned quantity closed
    opened: float  # unsigned quantity opened
    realized: float  # gross, on the closing part, multiplier applied

    @property
    def side(self) -> str:
        return "BUY" if self.fill.side == "BOT" else "SELL"


@dataclass
class LegLedger:
    """One contract held by one strategy."""

    leg_id: str
    contract: Contract
    quantity: float = 0.0  # signed
    open_price: float | None = None
    realized: float = 0.0
    opened_at: datetime | None = None
    closed_at: datetime | None = None
    from_fills: bool = True  # False: a position held before any fill was seen

    def apply(self, signed: float, price: float, at: datetime) -> tuple[float, float, float]:
        """``(closed, opened, realized)`` of a signed fill on this leg."""
        closed = 0.0
        realized = 0.0
        if self.quantity and (self.quantity > 0) != (signed > 0):
            closed = min(abs(signed), abs(self.quantity))
            direction = 1.0 if self.quantity > 0 else -1.0
            realized = closed * (price - (self.open_price or 0.0)) * direction
            realized *= self.contract.multiplier
            self.quantity += direction * -closed
            if abs(self.quantity) <= FLAT:
                self.quantity = 0.0
        opened = abs(signed) - closed
        if opened > FLAT:
            direction = 1.0 if signed > 0 else -1.0
            held = abs(self.quantity)
            self.open_price = ((self.open_price or 0.0) * held + price * opened) / (held + opened)
            self.quantity += direction * opened
            self.opened_at = self.opened_at or at
        else:
            opened = 0.0
        if self.quantity == 0.0 and closed:
            self.closed_at = at
        elif opened:
            self.closed_at = None
        self.realized += realized
        return closed, opened, realized

    @property
    def status(self) -> str:
        return "open" if self.quantity else "closed"


@dataclass
class StrategyLedger:
    """One strategy: its origin (how its legs were grouped), legs and totals."""

    strategy_id: str
    account: str
    symbol: str
    origin: str  # "ref:<order ref>", "combo:<perm id>", "fills:<exec id>", "held:<conid>"
    legs: dict[int, LegLedger] = field(default_factory=dict)
    transactions: list[Transaction] = field(default_factory=list)
    commissions: float = 0.0
    missing_commissions: int = 0
    opening_notional: float = 0.0  # signed quantity x price of opening parts
    closing_notional: float = 0.0
    peak_units: float = 0.0
    peak_legs: int = 0
    peak: Classification | None = None  # what it held at its fullest (_units)
    entry_time: datetime | None = None
    exit_time: datetime | None = None
    rolls: int = 0
    rolling_since: datetime | None = None

    def leg(self, contract: Contract) -> LegLedger:
        leg = self.legs.get(contract.conid)
        if leg is None:
            leg = LegLedger(f"{self.strategy_id}-{contract.conid}", contract)
            self.legs[contract.conid] = leg
        return leg

    def hold(self, contract: Contract, quantity: float, price: float | None, at: datetime) -> None:
        """A position held before any fill was seen: it opens at IB's average cost."""
        leg = self.leg(contract)
        leg.from_fills = False
        leg.quantity, leg.open_price, leg.opened_at = quantity, price, at
        self.opening_notional += quantity * (price or 0.0)
        self.entry_time = self.entry_time or at
        self._units()

    def apply(self, fill: Fill, signed: float) -> Transaction:
        """A fill (or the part of one given to this strategy) on its leg."""
        leg = self.leg(fill.contract)
        closed, opened, realized = leg.apply(signed, fill.price, fill.time)
        direction = 1.0 if signed > 0 else -1.0
        self.opening_notional += direction * opened * fill.price
        self.closing_notional += direction * closed * fill.price
        if fill.commission is None:
            self.missing_commissions += 1
        else:
            self.commissions += fill.commission * (abs(signed) / fill.shares)
        effect = "CLOSE_OPEN" if closed and opened else ("CLOSE" if closed else "OPEN")
        done = Transaction(fill, self.strategy_id, leg.leg_id, effect, closed, opened, realized)
        self.transactions.append(done)
        if opened:
            self.entry_time = self.entry_time or fill.time
        self._units()
        if self.is_flat:
            self.exit_time = fill.time
            self.rolling_since = None
        else:
            self.exit_time = None
        return done

    def _units(self) -> None:
        """Keep the structure at its fullest: the most open legs, then the most units.
        Legging in completes it (shares, then the call: a covered call, not 200 shares);
        legging out of it or a partial close does not replace it. Units of different
        structures (shares, spreads) are not compared."""
        now = self.classification
        legs = len(self.open_legs)
        if now.quantity > FLAT and (
            legs > self.peak_legs
            or (legs == self.peak_legs and now.quantity > self.peak_units + FLAT)
        ):
            self.peak_units, self.peak, self.peak_legs = now.quantity, now, legs

    @property
    def open_legs(self) -> list[LegLedger]:
        return [leg for leg in self.legs.values() if leg.quantity]

    @property
    def is_flat(self) -> bool:
        return not self.open_legs

    @property
    def classification(self) -> Classification:
        """What the open legs form now; a closed strategy keeps what it was at its
        peak, with quantity 0."""
        if self.is_flat and self.peak is not None:
            return Classification(self.peak.strategy_type, 0.0, self.peak.detail)
        return classify_distinct(leg.contract.leg(leg.quantity) for leg in self.open_legs)

    @property
    def realized_pnl(self) -> float:
        return sum(leg.realized for leg in self.legs.values()) - self.commissions

    def unrealized_pnl(self, prices: dict[int, float]) -> float | None:
        """Open legs at their current prices against their open prices; None while a
        leg has no price."""
        total = 0.0
        for leg in self.open_legs:
            price = prices.get(leg.contract.conid)
            if price is None or leg.open_price is None:
                return None
            total += leg.quantity * (price - leg.open_price) * leg.contract.multiplier
        return total

    @property
    def status(self) -> str:
        if self.is_flat:
            return "closed"
        return "rolling" if self.rolling_since is not None else "open"

    @property
    def entry_price(self) -> float | None:
        return self.opening_notional / self.peak_units if self.peak_units else None

    @property
    def exit_price(self) -> float | None:
        if not self.is_flat or not self.peak_units:
            return None
        return self.closing_notional / self.peak_units
