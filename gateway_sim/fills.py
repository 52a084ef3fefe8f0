"""The simulator's blotter: the fills that make every position change, and their commissions.

Every open, change and close of a holding is one or two fills whose signed
shares add up to the change, at prices near the market. A fill's commission
report follows after a short random delay. Fault controls (probabilities per
fill): the commission sent before its execution, never sent, and the execution
corrected later (``...01.02`` with another price, and its own commission).

The blotter keeps the day's fills: ``reqExecutions`` is answered from it, so
fills made while a client was disconnected reach it when it reconnects.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from gateway_sim import protocol as tws
from gateway_sim.portfolio import Holding, Instrument

EXEC_TIME_FORMATS = ("utc", "iana", "abbrev")
_NEW_YORK = ZoneInfo("America/New_York")


@dataclass
class FillFaults:
    commission_first: float = 0.0  # the report goes out before the execution
    commission_missing: float = 0.0  # no report, ever
    correction: float = 0.0  # the execution is corrected a little later
    delay_s: tuple[float, float] = (0.02, 0.25)  # a report's delay after its execution


@dataclass(slots=True)
class SimFill:
    """One execution as the simulator made it (a correction is its own SimFill)."""

    exec_id: str
    account: str
    instrument: Instrument
    side: str  # BOT / SLD
    shares: float
    price: float
    time: datetime  # UTC
    order_id: int
    perm_id: int
    cum_qty: float
    commission: float | None  # None: never sent
    realized_pnl: float | None
    commission_sent: bool = False

    @property
    def signed_shares(self) -> float:
        return self.shares if self.side == "BOT" else -self.shares

    def exec_details(self, req_id: int, time_format: str) -> bytes:
        i = self.instrument
        return tws.exec_details(
            req_id, self.order_id, i.wire_contract(), self.exec_id,
            format_exec_time(self.time, time_format), self.account, "CBOE" if
            i.sec_type == "OPT" else i.exchange, self.side, self.shares, self.price,
            self.perm_id, 0, self.cum_qty, self.price, f"sim-{self.perm_id}",
        )  # fmt: skip

    def commission_report(self) -> bytes:
        assert self.commission is not None
        return tws.commission_report(
            self.exec_id, self.commission, self.instrument.currency, self.realized_pnl
        )


def format_exec_time(moment: datetime, time_format: str) -> str:
    if time_format == "utc":
        return moment.astimezone(UTC).strftime("%Y%m%d-%H:%M:%S")
    local = moment.astimezone(_NEW_YORK)
    if time_format == "iana":
        return local.strftime("%Y%m%d %H:%M:%S") + " America/New_York"
    return local.strftime("%Y%m%d %H:%M:%S ") + (local.tzname() or "EST")


@dataclass
class Blotter:
    """The day's fills, in the order they were made."""

    seed: int = 1
    faults: FillFaults = field(default_factory=FillFaults)
    fills: list[SimFill] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed + 7)
        self._perm_id = 1_000

    def fill(self, holding: Holding, change: float, realized_pnl: float) -> list[SimFill]:
        """The fills for a change of ``change`` shares of ``holding`` (one or two)."""
        rng = self._rng
        total = abs(change)
        parts = [total]
        if total >= 2 and rng.random() < 0.3:
            first = float(rng.randint(1, int(total) - 1)) if total == int(total) else total / 2
            parts = [first, total - first]
        self._perm_id += 1
        side = "BOT" if change > 0 else "SLD"
        made: list[SimFill] = []
        cum = 0.0
        now = datetime.now(UTC).replace(microsecond=0)
        for leg, shares in enumerate(parts, start=1):
            cum += shares
            price = round(holding.market_price * (1 + rng.uniform(-0.002, 0.002)), 4)
            missing = rng.random() < self.faults.commission_missing
            commission = None if missing else round(0.65 * shares + rng.uniform(0, 0.3), 4)
            made.append(
                SimFill(
                    exec_id=f"0000sim1.{self._perm_id:08x}.{leg:02d}.01",
                    account=holding.account,
                    instrument=holding.instrument,
                    side=side,
                    shares=shares,
                    price=max(price, 0.01),
                    time=now,
                    order_id=self._perm_id,
                    perm_id=self._perm_id,
                    cum_qty=cum,
                    commission=commission,
                    realized_pnl=realized_pnl if leg == len(parts) and realized_pnl else None,
                )
            )
        self.fills.extend(made)
        return made

    def correct(self, original: SimFill) -> SimFill:
        """A correction of ``original``: the next revision, another price, same shares."""
        base, _, revision = original.exec_id.rpartition(".")
        corrected = SimFill(
            exec_id=f"{base}.{int(revision) + 1:02d}",
            account=original.account,
            instrument=original.instrument,
            side=original.side,
            shares=original.shares,
            price=round(original.price * 1.001 + 0.01, 4),
            time=original.time + timedelta(seconds=1),
            order_id=original.order_id,
            perm_id=original.perm_id,
            cum_qty=original.cum_qty,
            commission=round((original.commission or 0.65) + 0.01, 4),
            realized_pnl=original.realized_pnl,
        )
        self.fills.append(corrected)
        return corrected

    def wants(self, fault: str) -> bool:
        chance: float = getattr(self.faults, fault)
        return self._rng.random() < chance

    def delay_s(self) -> float:
        low, high = self.faults.delay_s
        return self._rng.uniform(low, high)

    def final(self) -> dict[str, SimFill]:
        """The last revision of every execution, by exec_id base."""
        newest: dict[str, SimFill] = {}
        for fill in self.fills:
            base = fill.exec_id.rpartition(".")[0]
            newest[base] = fill  # corrections come after what they correct
        return newest
