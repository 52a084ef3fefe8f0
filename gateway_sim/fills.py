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
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from gateway_sim import protocol as tws
from gateway_sim.portfolio import Holding, Instrument

EXEC_TIME_FORMATS = ("utc", "iana", "abbrev")
_NEW_YORK = ZoneInfo("America/New_York")


@dataclass
class FillFaults:
    """How fills come (probabilities per fill, or per option open for combos)."""

    commission_first: float = 0.0  # the report goes out before the execution
    commission_missing: float = 0.0  # no report, ever
    correction: float = 0.0  # the execution is corrected a little later
    delay_s: tuple[float, float] = (0.02, 0.25)  # a report's delay after its execution
    combo: float = 0.1  # an option opens as a two-leg combo (BAG) order: a vertical


BAG_CONID = 28812380  # IB's contract ID of every combo (BAG) report


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
    # IB's orderRef: what the trader's application tagged the order with; "" (an order
    # placed by hand in TWS) for the simulator's own trading, set by its strategy scenario
    order_ref: str = ""

    @property
    def signed_shares(self) -> float:
        return self.shares if self.side == "BOT" else -self.shares

    def exec_details(self, req_id: int, time_format: str) -> bytes:
        i = self.instrument
        return tws.exec_details(
            req_id, self.order_id, i.wire_contract(), self.exec_id,
            format_exec_time(self.time, time_format), self.account, "CBOE" if
            i.sec_type == "OPT" else i.exchange, self.side, self.shares, self.price,
            self.perm_id, 0, self.cum_qty, self.price, self.order_ref,
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
    # The execution IDs' first segment, new for every run: IB's IDs never repeat, and
    # a second run on the same lake must not look like the first one's repeats. Only
    # the IDs change with it; the seed still decides everything else.
    run_tag: str = field(default_factory=lambda: f"{secrets.randbits(32):08x}")
    max_fills: int = 200_000  # the newest kept (a long soak's memory stays bounded)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed + 7)
        self._perm_id = 1_000

    def fill(
        self, holding: Holding, change: float, realized_pnl: float, perm_id: int | None = None
    ) -> list[SimFill]:
        """The fills for a change of ``change`` shares of ``holding`` (one or two); a
        combo's legs share the combo's ``perm_id``."""
        rng = self._rng
        total = abs(change)
        parts = [total]
        if total >= 2 and rng.random() < 0.3 and perm_id is None:
            first = float(rng.randint(1, int(total) - 1)) if total == int(total) else total / 2
            parts = [first, total - first]
        if perm_id is None:
            self._perm_id += 1
        leg_base = 0 if perm_id is None else sum(
            1 for f in self.fills if f.perm_id == perm_id
        )  # fmt: skip
        perm_id = perm_id or self._perm_id
        side = "BOT" if change > 0 else "SLD"
        made: list[SimFill] = []
        cum = 0.0
        now = datetime.now(UTC).replace(microsecond=0)
        for leg, shares in enumerate(parts, start=1 + leg_base):
            cum += shares
            price = round(holding.market_price * (1 + rng.uniform(-0.002, 0.002)), 4)
            missing = rng.random() < self.faults.commission_missing
            commission = None if missing else round(0.65 * shares + rng.uniform(0, 0.3), 4)
            made.append(
                SimFill(
                    exec_id=f"{self.run_tag}.{perm_id:08x}.{leg:02d}.01",
                    account=holding.account,
                    instrument=holding.instrument,
                    side=side,
                    shares=shares,
                    price=max(price, 0.01),
                    time=now,
                    order_id=perm_id,
                    perm_id=perm_id,
                    cum_qty=cum,
                    commission=commission,
                    realized_pnl=realized_pnl if leg == len(parts) and realized_pnl else None,
                )
            )
        self.fills.extend(made)
        self._bound()
        return made

    def _bound(self) -> None:
        if len(self.fills) > self.max_fills:
            del self.fills[: len(self.fills) - self.max_fills]

    def combo_order(self) -> int:
        """A new order ID for a combo, whose legs then pass it to :meth:`fill`."""
        self._perm_id += 1
        return self._perm_id

    def combo_report(self, legs: list[SimFill], symbol: str) -> SimFill:
        """The combo's own execution (a BAG contract), as IB sends besides its legs."""
        first = legs[0]
        bag = Instrument(BAG_CONID, symbol, "BAG", "", 0.0, "", 1, "SMART")
        net = round(sum(f.price if f.side == "BOT" else -f.price for f in legs), 4)
        report = SimFill(
            exec_id=f"{self.run_tag}.{first.perm_id:08x}.00.01",
            account=first.account,
            instrument=bag,
            side="BOT" if net >= 0 else "SLD",
            shares=first.shares,
            price=abs(net) or 0.01,
            time=first.time,
            order_id=first.order_id,
            perm_id=first.perm_id,
            cum_qty=first.shares,
            commission=None,
            realized_pnl=None,
        )
        self.fills.append(report)
        return report

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
            order_ref=original.order_ref,
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
            if fill.instrument.sec_type == "BAG":
                continue  # the combo's own report: its legs are the executions
            base = fill.exec_id.rpartition(".")[0]
            newest[base] = fill  # corrections come after what they correct
        return newest
