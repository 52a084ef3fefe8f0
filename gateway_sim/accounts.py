"""The simulator's account figures: values and P&L that follow its portfolio and fills.

Each account starts the day with cash; every fill moves it (price x shares x
multiplier, and the commission). The values IB sends for an account
(``updateAccountValue``/``accountUpdateMulti``) and its P&L (``reqPnL``) are
computed from the holdings and that cash whenever they are sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway_sim.fills import SimFill
from gateway_sim.portfolio import Holding

STARTING_CASH = 1_000_000.0


@dataclass
class AccountBook:
    """Cash and realized P&L per account, moved by fills."""

    accounts: list[str]
    cash: dict[str, float] = field(init=False)
    realized: dict[str, float] = field(init=False)
    # (account, key) IB no longer sends (a currency no longer held, say): gone from
    # every download from then on.
    withheld: set[tuple[str, str]] = field(default_factory=set)
    # (account, key) -> value text set behind every client's back: only a new download
    # (a new subscription) shows it, the periodic resends do not.
    overrides: dict[tuple[str, str], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cash = dict.fromkeys(self.accounts, STARTING_CASH)
        self.realized = dict.fromkeys(self.accounts, 0.0)

    def book(self, made: SimFill, realized: float = 0.0) -> None:
        amount = made.signed_shares * made.price * made.instrument.multiplier
        self.cash[made.account] -= amount + (made.commission or 0.0)
        self.realized[made.account] += realized

    def correct(self, original: SimFill, corrected: SimFill) -> None:
        """A correction replaces the original fill's money, commission included."""
        multiplier = original.instrument.multiplier
        self.cash[original.account] += original.signed_shares * original.price * multiplier + (
            original.commission or 0.0
        )
        self.book(corrected)

    def values(
        self, account: str, holdings: Iterable[Holding], download: bool = True
    ) -> list[tuple[str, str, str]]:
        """``(key, value, currency)`` of every value IB sends for the account: in a new
        download, or (``download`` False) in a periodic resend."""
        held = list(holdings)
        market = sum(h.market_value for h in held)
        gross = sum(abs(h.market_value) for h in held)
        unrealized = sum(h.unrealized_pnl for h in held)
        cash = self.cash[account]
        net = cash + market
        margin = 0.25 * gross
        money = {
            "NetLiquidation": net,
            "TotalCashValue": cash,
            "GrossPositionValue": gross,
            "MaintMarginReq": margin,
            "AvailableFunds": net - margin,
            "BuyingPower": 4 * (net - margin),
            "UnrealizedPnL": unrealized,
            "RealizedPnL": self.realized[account],
        }
        rows = [
            (key, (download and self.overrides.get((account, key))) or f"{value:.2f}", "USD")
            for key, value in money.items()
        ]
        rows.append(("AccountType", "INDIVIDUAL", ""))
        return [row for row in rows if (account, row[0]) not in self.withheld]

    def pnl(self, account: str, holdings: Iterable[Holding]) -> tuple[float, float, float]:
        """reqPnL's (daily, unrealized, realized) for the account."""
        held = list(holdings)
        daily = round(sum(h.daily_pnl for h in held) + self.realized[account], 2)
        unrealized = round(sum(h.unrealized_pnl for h in held), 2)
        return daily, unrealized, round(self.realized[account], 2)
