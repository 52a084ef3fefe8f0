"""Which strategy each fill belongs to: the book's fold over one account and underlying.

Evidence, strongest first (the issue's order):

0. a trader's override (options_model/overrides.py): fills and holdings given one
   label are one strategy (``user:<label>``), whatever else says;
1. the order reference (IB's ``orderRef``): fills with one reference belong to one
   strategy, across orders and days (``ref:<reference>``; a reference used again
   after its strategy closed and the roll window passed starts ``ref:<reference>#2``);
2. a combo (BAG) order: the legs filled under one ``perm_id`` (two contracts or
   more) form one strategy (``combo:<perm id>``), unless a leg closes what a
   strategy holds: then the whole combo joins that one (a closing or rolling combo);
3. otherwise a fill first closes what strategies hold in its contract (the oldest
   first), and what it opens waits ``group_window_s`` for other untagged opening
   fills on the underlying; the cluster is split into known structures
   (options_model/classify.py) and each becomes a strategy (``fills:<exec id>``),
   what is left a single leg.

Positions held before the known fills (opened before the pipeline ran: the position
now less every known fill) are grouped the same way into ``held:<conid>`` strategies
at the start,
open at IB's average cost. A ``rolling`` strategy (reference or combo) had a leg
closed while others stay open; it is ``open`` again when new legs join within
``roll_window_s`` (a roll: counted), or once the window passes without one.

The fold is a pure function of its inputs in a fixed order (fill time, then
execution ID), so a rebuild gives the same strategies, IDs included.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import combinations

from options_model.classify import classify
from options_model.fills import Contract, Fill, Holding
from options_model.ledger import FLAT, StrategyLedger

ALONE = frozenset({"single_leg", "cash_secured_put", "stock", "custom"})
FULL_SEARCH_LEGS = 24  # above this, one expiry's legs are only paired (2-leg structures)


@dataclass(frozen=True)
class BookRules:
    """The grouping's two windows (settings: POSLAKE_BOOK_GROUP_WINDOW_S, ..._ROLL_WINDOW_S)."""

    group_window_s: float = 60.0
    roll_window_s: float = 3600.0


def strategy_id(account: str, symbol: str, origin: str) -> str:
    """A short stable ID: the same origin gives the same ID in every rebuild."""
    digest = hashlib.sha256(f"{account}\x1f{symbol}\x1f{origin}".encode()).hexdigest()
    return digest[:12]


def split_structures(legs: Sequence[tuple[Contract, float]]) -> list[list[int]]:
    """The conids of each known structure in ``legs`` (largest first), then each
    leftover leg alone; deterministic for a given set of legs."""
    remaining = sorted(legs, key=lambda item: _leg_order(item[0]))
    groups: list[list[int]] = []
    if _known(remaining):
        return [[contract.conid for contract, _ in remaining]]
    by_expiry: dict[object, list[tuple[Contract, float]]] = defaultdict(list)
    for item in remaining:
        by_expiry[item[0].expiry].append(item)
    leftovers: list[tuple[Contract, float]] = []
    for expiry in sorted(by_expiry, key=lambda e: (e is None, str(e))):
        found, rest = _take_structures(by_expiry[expiry], (4, 3, 2))
        groups += found
        leftovers += rest
    # across expiries: calendars, diagonals, covered calls and collars (shares have none)
    found, rest = _take_structures(sorted(leftovers, key=lambda i: _leg_order(i[0])), (3, 2))
    groups += found
    groups += [[contract.conid] for contract, _ in rest]
    return groups


def _leg_order(contract: Contract) -> tuple[object, ...]:
    return (str(contract.expiry), contract.right or "", contract.strike or 0.0, contract.conid)


def _known(legs: Sequence[tuple[Contract, float]]) -> bool:
    return len(legs) > 1 and classify(c.leg(q) for c, q in legs).strategy_type not in ALONE


def _take_structures(
    legs: list[tuple[Contract, float]], sizes: tuple[int, ...]
) -> tuple[list[list[int]], list[tuple[Contract, float]]]:
    found: list[list[int]] = []
    if len(legs) > FULL_SEARCH_LEGS:
        sizes = (2,)
    for size in sizes:
        searching = True
        while searching and len(legs) >= size:
            searching = False
            for subset in combinations(legs, size):
                if _known(subset):
                    found.append([contract.conid for contract, _ in subset])
                    legs = [item for item in legs if item not in subset]
                    searching = True
                    break
    return found, legs


@dataclass
class _Cluster:
    """Untagged opening fills waiting for the window to close."""

    started: datetime
    parts: list[tuple[Fill, float]] = field(default_factory=list)

    def holds_opposite(self, fill: Fill) -> bool:
        return any(
            f.contract.conid == fill.contract.conid and (q > 0) != (fill.signed > 0)
            for f, q in self.parts
        )


class BookFold:
    """The fold for one account and underlying; :meth:`run` once per input."""

    def __init__(self, account: str, symbol: str, rules: BookRules) -> None:
        self.account, self.symbol, self.rules = account, symbol, rules
        self.strategies: dict[str, StrategyLedger] = {}
        self._by_ref: dict[str, StrategyLedger] = {}
        self._ref_uses: dict[str, int] = defaultdict(int)
        self._by_perm: dict[int, StrategyLedger] = {}
        self._cluster: _Cluster | None = None
        self._window = timedelta(seconds=rules.group_window_s)
        self._roll_window = timedelta(seconds=rules.roll_window_s)

    def run(
        self, fills: Iterable[Fill], holdings: Iterable[Holding], as_of: datetime
    ) -> list[StrategyLedger]:
        ordered = sorted(
            (f for f in fills if f.contract.sec_type != "BAG"), key=lambda f: f.sort_key
        )
        self._hold(ordered, list(holdings))
        combos = _combo_fills([f for f in ordered if not f.group])
        done: set[str] = set()
        for fill in ordered:
            if fill.exec_base in done:
                continue
            self._close_cluster_if(fill)
            if fill.group:
                self._to(self._user_strategy(fill.group), fill, fill.signed)
            elif fill.perm_id is not None and fill.perm_id in combos:
                legs = combos[fill.perm_id]
                self._combo(legs)
                done.update(f.exec_base for f in legs)
            elif fill.order_ref:
                self._to(self._ref_strategy(fill), fill, fill.signed)
            else:
                self._untagged(fill)
        self._finish_cluster()
        for strategy in self.strategies.values():
            self._expire_roll(strategy, as_of)
        return list(self.strategies.values())

    # --- evidence ---------------------------------------------------------------

    def _new(self, origin: str) -> StrategyLedger:
        sid = strategy_id(self.account, self.symbol, origin)
        strategy = StrategyLedger(sid, self.account, self.symbol, origin)
        self.strategies[sid] = strategy
        return strategy

    def _user_strategy(self, label: str) -> StrategyLedger:
        sid = strategy_id(self.account, self.symbol, f"user:{label}")
        return self.strategies.get(sid) or self._new(f"user:{label}")

    def _ref_strategy(self, fill: Fill) -> StrategyLedger:
        ref = fill.order_ref or ""
        strategy = self._by_ref.get(ref)
        exited = strategy.exit_time if strategy is not None and strategy.is_flat else None
        if exited is not None and fill.time - exited > self._roll_window:
            strategy = None  # closed for good: a new use of the reference
        if strategy is None:
            self._ref_uses[ref] += 1
            uses = self._ref_uses[ref]
            strategy = self._new(f"ref:{ref}" + (f"#{uses}" if uses > 1 else ""))
            self._by_ref[ref] = strategy
        return strategy

    def _combo(self, legs: list[Fill]) -> None:
        perm = legs[0].perm_id
        assert perm is not None
        target = self._by_perm.get(perm)
        closing = [f for f in legs if self._holders(f)]
        if target is None:
            if legs[0].order_ref:
                target = self._ref_strategy(legs[0])
            elif closing:
                target = self._holders(closing[0])[0]
            else:
                target = self._new(f"combo:{perm}")
            self._by_perm[perm] = target
        # closing legs first, so a roll is seen as one: legs closed, then new ones
        for fill in sorted(legs, key=lambda f: (f not in closing, f.sort_key)):
            self._to(target, fill, fill.signed)

    def _untagged(self, fill: Fill) -> None:
        left = fill.signed
        for holder in self._holders(fill):
            held = holder.legs[fill.contract.conid].quantity
            part = max(-abs(held), min(abs(held), left)) if left else 0.0
            if part:
                self._to(holder, fill, part)
                left -= part
            if abs(left) <= FLAT:
                return
        if self._cluster is None:
            self._cluster = _Cluster(fill.time)
        self._cluster.parts.append((fill, left))

    def _holders(self, fill: Fill) -> list[StrategyLedger]:
        """Strategies holding the fill's contract on the other side, oldest first."""
        conid = fill.contract.conid
        return [
            s
            for s in self.strategies.values()
            if conid in s.legs
            and s.legs[conid].quantity
            and (s.legs[conid].quantity > 0) != (fill.signed > 0)
        ]

    def _to(self, strategy: StrategyLedger, fill: Fill, signed: float) -> None:
        self._expire_roll(strategy, fill.time)
        leg = strategy.legs.get(fill.contract.conid)
        was_open = bool(leg and leg.quantity)
        others_open = any(
            lg.quantity for c, lg in strategy.legs.items() if c != fill.contract.conid
        )
        reopening = strategy.is_flat and strategy.exit_time is not None
        done = strategy.apply(fill, signed)
        tagged = not strategy.origin.startswith(("fills:", "held:"))
        if not tagged:
            return
        if was_open and not strategy.legs[fill.contract.conid].quantity and others_open:
            strategy.rolling_since = strategy.rolling_since or fill.time
        elif done.opened and not was_open and strategy.rolling_since is not None:
            strategy.rolls += 1
            strategy.rolling_since = None
        elif done.opened and reopening:
            strategy.rolls += 1  # closed, then opened again under its reference in the window

    def _expire_roll(self, strategy: StrategyLedger, now: datetime) -> None:
        since = strategy.rolling_since
        if since is not None and now - since > self._roll_window:
            strategy.rolling_since = None

    # --- untagged clusters ---------------------------------------------------

    def _close_cluster_if(self, fill: Fill) -> None:
        cluster = self._cluster
        if cluster is None:
            return
        if fill.time - cluster.started > self._window or cluster.holds_opposite(fill):
            self._finish_cluster()

    def _finish_cluster(self) -> None:
        cluster, self._cluster = self._cluster, None
        if cluster is None:
            return
        net: dict[int, float] = defaultdict(float)
        contracts: dict[int, Contract] = {}
        for fill, part in cluster.parts:
            net[fill.contract.conid] += part
            contracts[fill.contract.conid] = fill.contract
        legs = [(contracts[c], q) for c, q in net.items() if abs(q) > FLAT]
        groups = split_structures(legs) if legs else []
        owner: dict[int, StrategyLedger] = {}
        for group in groups:
            first = min(
                (f for f, _ in cluster.parts if f.contract.conid in group),
                key=lambda f: f.sort_key,
            )
            strategy = self._new(f"fills:{first.exec_base}")
            owner.update(dict.fromkeys(group, strategy))
        for fill, part in cluster.parts:
            target = owner.get(fill.contract.conid)
            if target is None:  # netted to nothing inside the window
                target = self._new(f"fills:{fill.exec_base}")
                owner[fill.contract.conid] = target
            self._to(target, fill, part)

    # --- positions with no known opening fill -----------------------------------

    def _hold(self, fills: list[Fill], holdings: list[Holding]) -> None:
        legs: list[tuple[Contract, float]] = []
        info: dict[int, Holding] = {}
        for holding in holdings:
            residual = holding.position  # held before every known fill (options_model/fills.py)
            if abs(residual) > FLAT and holding.group:
                strategy = self._user_strategy(holding.group)
                strategy.hold(holding.contract, residual, holding.open_price, holding.first_seen)
            elif abs(residual) > FLAT:
                legs.append((holding.contract, residual))
                info[holding.contract.conid] = holding
        quantity = dict((c.conid, q) for c, q in legs)
        for group in split_structures(legs):
            strategy = self._new(f"held:{min(group)}")
            for conid in sorted(group):
                held = info[conid]
                strategy.hold(held.contract, quantity[conid], held.open_price, held.first_seen)


def _combo_fills(fills: list[Fill]) -> dict[int, list[Fill]]:
    """perm_id -> its fills, for orders that filled two contracts or more (combos)."""
    by_perm: dict[int, list[Fill]] = defaultdict(list)
    for fill in fills:
        if fill.perm_id is not None:
            by_perm[fill.perm_id].append(fill)
    return {
        perm: legs for perm, legs in by_perm.items() if len({f.contract.conid for f in legs}) > 1
    }
