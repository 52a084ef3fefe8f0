"""A seeded synthetic portfolio that stands in for IB when no gateway is configured.

Several accounts hold stocks and options on them (calls and puts, several
strikes and expiries, multiplier 100). Prices move as a random walk; positions
open, change and close (position 0). Timestamps are UTC and strictly
increasing, so every update has its own key.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from shared.model import PositionUpdate

_SYMBOLS = ["AAPL", "MSFT", "SPY", "QQQ", "TSLA", "NVDA", "AMZN", "IWM", "META", "GOOGL"]


@dataclass
class _Holding:
    account: str
    conid: int
    symbol: str
    sec_type: str
    right: str | None
    strike: float | None
    expiry: date | None
    multiplier: float
    price: float
    position: float
    average_cost: float
    realized: float = 0.0


class DemoPortfolio:
    """Synthetic holdings; :meth:`snapshot` lists them all, :meth:`step` moves some."""

    def __init__(
        self, seed: int = 1, accounts: int = 3, symbols: int = 8, options: int = 4
    ) -> None:
        self._rng = random.Random(seed)
        self._last = datetime(1970, 1, 1, tzinfo=UTC)
        self._holdings: list[_Holding] = []
        today = datetime.now(UTC).date()
        for a in range(accounts):
            account = f"DU{1_000_001 + a}"
            for s, symbol in enumerate(_SYMBOLS[:symbols]):
                spot = self._rng.uniform(20, 600)
                self._holdings.append(
                    _Holding(account, 265_000 + s, symbol, "STK", None, None, None, 1.0,
                             spot, float(self._rng.randrange(10, 500)), spot * 0.95)
                )  # fmt: skip
                for o in range(options):
                    strike = round(spot * (0.9 + 0.05 * o), 0)
                    premium = max(0.05, spot * 0.03)
                    self._holdings.append(
                        _Holding(account, 500_000 + s * 100 + o, symbol, "OPT",
                                 "C" if o % 2 else "P", strike,
                                 today + timedelta(days=30 * (1 + o % 3)), 100.0,
                                 premium, float(self._rng.choice([-5, -2, -1, 1, 2, 5])),
                                 premium * 100)
                    )  # fmt: skip

    def _stamp(self) -> datetime:
        now = datetime.now(UTC)
        self._last = now if now > self._last else self._last + timedelta(microseconds=1)
        return self._last

    def _update(self, h: _Holding) -> PositionUpdate:
        value = h.price * h.position * h.multiplier
        return PositionUpdate(
            account=h.account, conid=h.conid, symbol=h.symbol, sec_type=h.sec_type,
            currency="USD", position=h.position, timestamp=self._stamp(), right=h.right,  # type: ignore[arg-type]
            strike=h.strike, expiry=h.expiry, multiplier=h.multiplier,
            market_price=round(h.price, 4), market_value=round(value, 2),
            average_cost=round(h.average_cost, 4),
            unrealized_pnl=round(value - h.average_cost * h.position, 2),
            realized_pnl=round(h.realized, 2),
        )  # fmt: skip

    def snapshot(self) -> list[PositionUpdate]:
        return [self._update(h) for h in self._holdings]

    def step(self, count: int) -> list[PositionUpdate]:
        """``count`` updates: prices walk; now and then a position changes or closes."""
        out: list[PositionUpdate] = []
        for _ in range(count):
            h = self._holdings[self._rng.randrange(len(self._holdings))]
            h.price = max(0.01, h.price * (1 + self._rng.gauss(0, 0.002)))
            roll = self._rng.random()
            if roll < 0.01 and h.position != 0:
                h.realized += (h.price * h.multiplier - h.average_cost) * h.position
                h.position = 0.0  # closed
            elif roll < 0.03:
                h.position += self._rng.choice([-2.0, -1.0, 1.0, 2.0])
                h.average_cost = h.price * h.multiplier if h.sec_type == "OPT" else h.price
            out.append(self._update(h))
        return out
