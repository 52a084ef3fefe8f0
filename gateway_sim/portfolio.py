"""The gateway simulator's synthetic, seeded portfolio.

Several accounts hold stocks and options on them (calls and puts, several
strikes and expiries, multiplier 100). Each :meth:`SyntheticPortfolio.step`
is one event on one holding: its underlying's price takes a random-walk step,
or its position opens, changes or closes (goes to 0, then leaves the book).
The same seed gives the same instruments, holdings and event sequence.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import date, timedelta
from enum import Enum

from gateway_sim import protocol as tws

UNDERLYINGS = (
    ("AAPL", 190.0, "NASDAQ"),
    ("MSFT", 410.0, "NASDAQ"),
    ("SPY", 560.0, "ARCA"),
    ("QQQ", 480.0, "NASDAQ"),
    ("TSLA", 240.0, "NASDAQ"),
    ("NVDA", 120.0, "NASDAQ"),
    ("AMZN", 185.0, "NASDAQ"),
    ("IWM", 215.0, "ARCA"),
    ("META", 520.0, "NASDAQ"),
    ("JPM", 205.0, "NYSE"),
    ("XOM", 115.0, "NYSE"),
    ("GLD", 230.0, "ARCA"),
)


@dataclass(frozen=True, slots=True)
class Instrument:
    """One contract as IB describes it."""

    conid: int
    symbol: str  # the underlying's symbol, for options too
    sec_type: str  # STK or OPT
    expiry: str  # YYYYMMDD, '' for stocks
    strike: float  # 0.0 for stocks
    right: str  # C, P or '' for stocks
    multiplier: int
    exchange: str
    currency: str = "USD"

    @property
    def local_symbol(self) -> str:
        if self.sec_type != "OPT":
            return self.symbol
        # OCC style: root padded to 6, yymmdd, right, strike x 1000 in 8 digits
        return f"{self.symbol:<6}{self.expiry[2:]}{self.right}{round(self.strike * 1000):08d}"

    def wire_contract(self, exchange: str | None = None) -> bytes:
        key = (self.conid, self.symbol, exchange)  # every combo (BAG) shares one conid
        rendered = _WIRE_CONTRACTS.get(key)
        if rendered is None:
            rendered = _WIRE_CONTRACTS[key] = _wire_contract(self, exchange)
        return rendered


# Rendered once per contract: a simulator sends the same contracts over and over.
_WIRE_CONTRACTS: dict[tuple[int, str, str | None], bytes] = {}


def _wire_contract(instrument: Instrument, exchange: str | None) -> bytes:
    return tws.contract_fields(
        instrument.conid,
        instrument.symbol,
        instrument.sec_type,
        instrument.expiry,
        instrument.strike,
        instrument.right,
        str(instrument.multiplier) if instrument.sec_type == "OPT" else "",
        exchange if exchange is not None else instrument.exchange,
        instrument.currency,
        instrument.local_symbol,
        instrument.symbol,
    )


@dataclass(slots=True)
class Holding:
    """One account's position in one instrument, with IB's portfolio figures."""

    account: str
    instrument: Instrument
    position: float
    average_cost: float  # per unit, including the multiplier, as IB reports it
    market_price: float
    realized_pnl: float = 0.0
    open_value: float = 0.0  # market value when the day began, for daily P&L
    # Serialized messages, kept until the holding changes: a snapshot is then a copy.
    wire_portfolio: bytes | None = None
    wire_position: bytes | None = None

    def touch(self) -> None:
        """Forget serialized messages after a change."""
        self.wire_portfolio = None
        self.wire_position = None

    @property
    def market_value(self) -> float:
        return round(self.position * self.market_price * self.instrument.multiplier, 2)

    @property
    def unrealized_pnl(self) -> float:
        return round(self.market_value - self.position * self.average_cost, 2)

    @property
    def daily_pnl(self) -> float:
        return round(self.market_value - self.open_value, 2)


class EventKind(Enum):
    PRICE = "price"
    OPEN = "open"
    CHANGE = "change"
    CLOSE = "close"

    @property
    def moves_position(self) -> bool:
        return self is not EventKind.PRICE


@dataclass(frozen=True, slots=True)
class PortfolioEvent:
    kind: EventKind
    holding: Holding
    change: float = 0.0  # the position's change (its fills' signed shares add up to it)
    realized: float = 0.0  # the P&L this change realized


@dataclass
class SyntheticPortfolio:
    """Accounts, instruments and holdings that evolve one event at a time."""

    accounts: list[str]
    target_positions: int
    seed: int = 1
    today: date = field(default_factory=date.today)
    instruments: list[Instrument] = field(init=False)
    spot: dict[str, float] = field(init=False)
    holdings: dict[tuple[str, int], Holding] = field(init=False)

    def __post_init__(self) -> None:
        if not self.accounts:
            raise ValueError("the simulator needs at least one account")
        self._rng = random.Random(self.seed)
        self.spot = {symbol: price for symbol, price, _ in UNDERLYINGS}
        self.instruments = self._make_instruments()
        self._by_conid = {i.conid: i for i in self.instruments}
        self._stocks = [i for i in self.instruments if i.sec_type == "STK"]
        self.holdings = {}
        # Holdings closed since the start, with position 0: IB's position answer lists a
        # contract closed during the day with quantity 0 until the next day.
        self.closed_today: dict[tuple[str, int], Holding] = {}
        self._order: list[tuple[str, int]] = []
        self._slot: dict[tuple[str, int], int] = {}
        capacity = len(self.accounts) * len(self.instruments)
        if self.target_positions > capacity:
            raise ValueError(
                f"{self.target_positions} positions asked for, but only {capacity} "
                f"(accounts x instruments) exist"
            )
        while len(self.holdings) < self.target_positions:
            self._open_random()
        for holding in self.holdings.values():
            holding.open_value = holding.market_value

    def _make_instruments(self) -> list[Instrument]:
        # Enough contracts that 20,000+ distinct positions fit in a few accounts.
        expiries = [
            self.today + timedelta(days=d) for d in (7, 14, 21, 30, 45, 60, 91, 182, 273, 365)
        ]
        instruments: list[Instrument] = []
        conid = 265_598
        for symbol, price, exchange in UNDERLYINGS:
            instruments.append(Instrument(conid, symbol, "STK", "", 0.0, "", 1, exchange))
            conid += 1
            step = 5.0 if price >= 250 else 1.0
            center = round(price / step) * step
            strikes = [center + step * k for k in range(-50, 51) if center + step * k > 0]
            for expiry in expiries:
                for strike in strikes:
                    for right in ("C", "P"):
                        instruments.append(
                            Instrument(
                                conid,
                                symbol,
                                "OPT",
                                expiry.strftime("%Y%m%d"),
                                strike,
                                right,
                                100,
                                "SMART",
                            )
                        )
                        conid += 1
        return instruments

    def price_of(self, instrument: Instrument) -> float:
        """Stock: the spot. Option: intrinsic value plus a time value that decays."""
        spot = self.spot[instrument.symbol]
        if instrument.sec_type != "OPT":
            return round(spot, 4)
        expiry = date(
            int(instrument.expiry[:4]), int(instrument.expiry[4:6]), int(instrument.expiry[6:])
        )
        years = max((expiry - self.today).days, 1) / 365.0
        intrinsic = max(
            0.0, spot - instrument.strike if instrument.right == "C" else instrument.strike - spot
        )
        distance = abs(spot - instrument.strike) / spot
        time_value = spot * 0.25 * math.sqrt(years) * 0.4 * math.exp(-distance * 8)
        return round(max(0.01, intrinsic + time_value), 4)

    # --- events ---------------------------------------------------------------

    def step(self, moves: bool = True) -> PortfolioEvent:
        """One event on one holding; a closed holding leaves the book after it. Without
        ``moves`` it is a price move (a budget of position changes is spent)."""
        event = self._step(moves)
        event.holding.touch()
        return event

    def _step(self, moves: bool = True) -> PortfolioEvent:
        rng = self._rng
        below_target = len(self.holdings) < self.target_positions
        roll = rng.random()
        if self.holdings and not moves:
            roll = roll * 0.72 + 0.08  # among the price moves' share of the rolls
        if not self.holdings or (below_target and roll < 0.08):
            opened = self._open_random()
            return PortfolioEvent(EventKind.OPEN, opened, opened.position)
        holding = self._random_holding()
        if roll < 0.80:
            self._walk(holding.instrument.symbol)
            holding.market_price = self.price_of(holding.instrument)
            return PortfolioEvent(EventKind.PRICE, holding)
        before, realized = holding.position, holding.realized_pnl
        if roll < 0.95 or len(self.holdings) <= 1:
            self._change(holding)
            kind = EventKind.CHANGE
        else:
            self._close(holding)
            kind = EventKind.CLOSE
        return PortfolioEvent(
            kind, holding, holding.position - before, round(holding.realized_pnl - realized, 2)
        )

    def _walk(self, symbol: str) -> None:
        self.spot[symbol] = round(self.spot[symbol] * math.exp(self._rng.gauss(0.0, 0.002)), 4)

    def _random_holding(self) -> Holding:
        return self.holdings[self._order[self._rng.randrange(len(self._order))]]

    def _add(self, holding: Holding) -> None:
        key = (holding.account, holding.instrument.conid)
        self.closed_today.pop(key, None)
        self.holdings[key] = holding
        self._slot[key] = len(self._order)
        self._order.append(key)

    def _remove(self, key: tuple[str, int]) -> None:
        # Swap-remove keeps random picks O(1) on a book of tens of thousands.
        del self.holdings[key]
        slot = self._slot.pop(key)
        last = self._order.pop()
        if last != key:
            self._order[slot] = last
            self._slot[last] = slot

    def _open_random(self) -> Holding:
        rng = self._rng
        while True:
            account = self.accounts[rng.randrange(len(self.accounts))]
            # A fifth of positions are stocks (there are far fewer stock contracts).
            pool = self._stocks if rng.random() < 0.2 else self.instruments
            instrument = pool[rng.randrange(len(pool))]
            if (account, instrument.conid) not in self.holdings:
                break
        price = self.price_of(instrument)
        quantity = float(rng.choice((-1, 1)) * rng.randint(1, 20))
        if instrument.sec_type == "STK":
            quantity *= 25
        holding = Holding(
            account=account,
            instrument=instrument,
            position=quantity,
            average_cost=round(price * instrument.multiplier, 4),
            market_price=price,
        )
        holding.open_value = holding.market_value
        self._add(holding)
        return holding

    def _change(self, holding: Holding) -> None:
        rng = self._rng
        lot = 25.0 if holding.instrument.sec_type == "STK" else 1.0
        delta = lot * rng.choice((-3, -2, -1, 1, 2, 3))
        if holding.position + delta == 0:
            delta = -delta
        unit_value = holding.market_price * holding.instrument.multiplier
        if (holding.position > 0) == (delta > 0):  # adding: average the cost
            total = holding.position * holding.average_cost + delta * unit_value
            holding.position += delta
            holding.average_cost = round(total / holding.position, 4)
        else:  # reducing (possibly through zero): realize P&L on the closed part
            closed = min(abs(delta), abs(holding.position))
            sign = 1.0 if holding.position > 0 else -1.0
            holding.realized_pnl = round(
                holding.realized_pnl + sign * closed * (unit_value - holding.average_cost), 2
            )
            holding.position += delta
            if (holding.position > 0) != (sign > 0):  # flipped side: new cost basis
                holding.average_cost = round(unit_value, 4)

    def _close(self, holding: Holding) -> None:
        unit_value = holding.market_price * holding.instrument.multiplier
        holding.realized_pnl = round(
            holding.realized_pnl + holding.position * (unit_value - holding.average_cost), 2
        )
        holding.position = 0.0
        key = (holding.account, holding.instrument.conid)
        self._remove(key)
        self.closed_today[key] = holding

    def set_position(self, account: str, conid: int, position: float) -> PortfolioEvent:
        """One chosen event: open (at the current price), change or close a holding."""
        key = (account, conid)
        holding = self.holdings.get(key)
        before = holding.position if holding is not None else 0.0
        if holding is None:
            if position == 0:
                raise ValueError(f"{key} is not held")
            instrument = self._by_conid[conid]
            price = self.price_of(instrument)
            cost = round(price * instrument.multiplier, 4)
            holding = Holding(account, instrument, position, cost, price)
            holding.open_value = holding.market_value
            self._add(holding)
            kind = EventKind.OPEN
        elif position == 0:
            self._close(holding)
            kind = EventKind.CLOSE
        else:
            holding.position = position
            kind = EventKind.CHANGE
        holding.touch()
        return PortfolioEvent(kind, holding, holding.position - before)

    def holdings_of(self, account: str) -> list[Holding]:
        return [h for h in self.holdings.values() if h.account == account]

    def combo_partner(self, holding: Holding) -> Instrument | None:
        """An option's neighbour for a vertical spread: same underlying, expiry and right,
        the next strike, not held in the account yet."""
        first = holding.instrument
        if first.sec_type != "OPT":
            return None
        for conid in (first.conid + 2, first.conid - 2):  # rights alternate per strike
            other = self._by_conid.get(conid)
            if (
                other is not None
                and other.symbol == first.symbol
                and other.expiry == first.expiry
                and other.right == first.right
                and (holding.account, conid) not in self.holdings
            ):
                return other
        return None

    def instrument(self, conid: int) -> Instrument | None:
        return self._by_conid.get(conid)
