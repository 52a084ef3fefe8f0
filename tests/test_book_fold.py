"""options_model.grouping and .ledger: strategies from fills and holdings, case by case."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest

from options_model.fills import Contract, Fill, Holding
from options_model.grouping import BookFold, BookRules, split_structures, strategy_id
from options_model.ledger import StrategyLedger

T0 = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
JAN, FEB = date(2027, 1, 15), date(2027, 2, 19)
_ids = itertools.count(1)


def option(right: str, strike: float, expiry: date = JAN) -> Contract:
    conid = int(strike * 10) + (1 if right == "C" else 2) * 100_000 + expiry.month * 1_000_000
    return Contract(conid, "OPT", right, strike, expiry, 100.0)


STOCK = Contract(756733, "STK")


def fill(
    contract: Contract,
    quantity: float,
    price: float,
    seconds: float = 0,
    *,
    ref: str | None = None,
    perm: int | None = None,
    commission: float | None = 1.0,
) -> Fill:
    n = next(_ids)
    return Fill(
        exec_base=f"0000e0d5.{n:08x}.01",
        account="DU1",
        symbol="SPY",
        contract=contract,
        side="BOT" if quantity > 0 else "SLD",
        shares=abs(quantity),
        price=price,
        time=T0 + timedelta(seconds=seconds),
        order_id=perm if perm is not None else n,
        perm_id=perm if perm is not None else 10_000 + n,
        order_ref=ref,
        commission=commission,
    )


def run(fills: list[Fill], holdings: list[Holding] | None = None) -> list[StrategyLedger]:
    as_of = max((f.time for f in fills), default=T0) + timedelta(seconds=1)
    return BookFold("DU1", "SPY", BookRules()).run(fills, holdings or [], as_of)


def condor_fills(n: float, at: float, **tags: object) -> list[Fill]:
    return [
        fill(option("P", 90), n, 0.50, at, **tags),  # type: ignore[arg-type]
        fill(option("P", 95), -n, 1.20, at, **tags),  # type: ignore[arg-type]
        fill(option("C", 105), -n, 1.10, at, **tags),  # type: ignore[arg-type]
        fill(option("C", 110), n, 0.40, at, **tags),  # type: ignore[arg-type]
    ]


def cash_flow(fills: list[Fill]) -> float:
    return -sum(f.signed * f.price * f.contract.multiplier for f in fills) - sum(
        f.commission or 0.0 for f in fills
    )


def test_an_iron_condor_by_reference_opens_shrinks_and_closes() -> None:
    opening = condor_fills(2, 0, ref="IC-1")
    (only,) = run(opening)
    assert only.classification.strategy_type == "iron_condor"
    assert (only.status, only.classification.quantity) == ("open", 2)
    assert only.entry_price == pytest.approx(0.50 - 1.20 - 1.10 + 0.40)  # a credit
    half = [
        fill(option("P", 90), -1, 0.20, 3600, ref="IC-1"),
        fill(option("P", 95), 1, 0.60, 3600, ref="IC-1"),
        fill(option("C", 105), 1, 0.50, 3600, ref="IC-1"),
        fill(option("C", 110), -1, 0.10, 3600, ref="IC-1"),
    ]
    (partly,) = run(opening + half)
    assert (partly.status, partly.classification.quantity) == ("open", 1)
    rest = [fill(f.contract, -f.signed / 2, f.price / 2, 7200, ref="IC-1") for f in opening]
    (closed,) = run(opening + half + rest)
    assert closed.status == "closed"
    assert closed.classification.strategy_type == "iron_condor"
    assert closed.exit_time == T0 + timedelta(seconds=7200)
    assert round(closed.realized_pnl, 2) == round(cash_flow(opening + half + rest), 2)
    effects = [t.effect for t in closed.transactions]
    assert effects == ["OPEN"] * 4 + ["CLOSE"] * 8
    assert closed.peak_units == 2


def test_a_combo_is_one_strategy_and_its_closing_combo_joins_it() -> None:
    opening = condor_fills(1, 0, perm=777)
    closing = [fill(f.contract, -f.signed, 0.05, 600, perm=888) for f in opening]
    strategies = run(opening + closing)
    assert len(strategies) == 1
    (combo,) = strategies
    assert combo.origin == "combo:777" and combo.status == "closed"
    assert combo.strategy_id == strategy_id("DU1", "SPY", "combo:777")
    assert round(combo.realized_pnl, 2) == round(cash_flow(opening + closing), 2)


def test_untagged_legs_within_the_window_are_split_into_structures() -> None:
    legs = [
        fill(option("C", 100), 1, 3.0, 0),
        fill(option("C", 105), -1, 1.5, 10),
        fill(option("P", 90), 2, 0.8, 20),
        fill(option("P", 85), -2, 0.4, 30),
        fill(option("C", 120, FEB), 1, 0.7, 40),
    ]
    found = {s.classification.strategy_type: s for s in run(legs)}
    assert set(found) == {"vertical_spread", "single_leg"}
    verticals = [s for s in run(legs) if s.classification.strategy_type == "vertical_spread"]
    assert sorted(v.classification.detail or "" for v in verticals) == [
        "call debit",
        "put debit",
    ]


def test_untagged_legs_apart_in_time_stay_single() -> None:
    legs = [fill(option("C", 100), 1, 3.0, 0), fill(option("C", 105), -1, 1.5, 120)]
    types = sorted(s.classification.strategy_type for s in run(legs))
    assert types == ["single_leg", "single_leg"]


def test_an_untagged_iron_condor_in_four_orders() -> None:
    legs = [fill(f.contract, f.signed, f.price, i * 5) for i, f in enumerate(condor_fills(1, 0))]
    (condor,) = run(legs)
    assert condor.classification.strategy_type == "iron_condor"
    assert condor.origin == f"fills:{legs[0].exec_base}"


def test_positions_held_before_any_fill_are_grouped_and_closed_by_fills() -> None:
    held = [
        Holding("DU1", "SPY", f.contract, f.signed, f.price * 100, f.price, T0)
        for f in condor_fills(3, 0)
    ]
    (condor,) = run([], held)
    assert condor.origin.startswith("held:")
    assert (condor.classification.strategy_type, condor.classification.quantity) == (
        "iron_condor",
        3,
    )
    assert condor.legs[held[1].contract.conid].open_price == pytest.approx(1.20)
    # one condor bought back, untagged, after the holdings were recorded
    later = [fill(h.contract, -h.position / 3, 0.1, 60) for h in held]
    # what was held before the known fills stays what it was: the fills close part
    (after,) = run(later, held)
    assert after.classification.quantity == 2
    assert all(t.effect == "CLOSE" for t in after.transactions)


def test_a_fill_crossing_zero_closes_and_opens() -> None:
    legs = [
        fill(option("C", 100), 1, 3.0, 0, ref="x"),
        fill(option("C", 100), -2, 4.0, 60, ref="x"),
    ]
    (single,) = run(legs)
    crossing = single.transactions[-1]
    assert (crossing.effect, crossing.closed, crossing.opened) == ("CLOSE_OPEN", 1, 1)
    assert crossing.realized == pytest.approx(100.0)
    assert single.legs[legs[0].contract.conid].quantity == -1
    assert single.legs[legs[0].contract.conid].open_price == 4.0


def test_rolling_the_untested_side_under_one_reference() -> None:
    opening = condor_fills(1, 0, ref="IC-2")
    close_puts = [
        fill(option("P", 90), -1, 0.05, 600, ref="IC-2"),
        fill(option("P", 95), 1, 0.10, 600, ref="IC-2"),
    ]
    (rolling,) = run(opening + close_puts)
    assert rolling.status == "rolling"
    new_puts = [
        fill(option("P", 97), 1, 0.9, 660, ref="IC-2"),
        fill(option("P", 100), -1, 1.6, 660, ref="IC-2"),
    ]
    (rolled,) = run(opening + close_puts + new_puts)
    assert (rolled.status, rolled.rolls) == ("open", 1)
    assert rolled.classification.strategy_type == "iron_condor"
    assert len(rolled.legs) == 6 and len(rolled.open_legs) == 4


def test_a_roll_in_one_combo_joins_the_strategy_it_closes() -> None:
    opening = condor_fills(1, 0, perm=5)
    roll = [
        fill(option("C", 110, FEB), 1, 0.9, 900, perm=6),  # the new legs come first by ID
        fill(option("C", 105, FEB), -1, 1.9, 900, perm=6),
        fill(option("C", 105), 1, 0.3, 900, perm=6),
        fill(option("C", 110), -1, 0.1, 900, perm=6),
    ]
    (rolled,) = run(opening + roll)
    assert (rolled.origin, rolled.status, rolled.rolls) == ("combo:5", "open", 1)
    assert len(rolled.open_legs) == 4


def test_a_legged_out_side_stops_rolling_after_the_window() -> None:
    opening = condor_fills(1, 0, ref="IC-3")
    close_puts = [
        fill(option("P", 90), -1, 0.05, 600, ref="IC-3"),
        fill(option("P", 95), 1, 0.10, 600, ref="IC-3"),
    ]
    fold = BookFold("DU1", "SPY", BookRules(roll_window_s=3600))
    (strategy,) = fold.run(opening + close_puts, [], T0 + timedelta(seconds=600 + 3601))
    assert strategy.status == "open"
    assert strategy.classification.strategy_type == "vertical_spread"


def test_a_reference_used_again_after_its_strategy_closed_is_a_new_strategy() -> None:
    first = [
        fill(option("C", 100), 1, 3.0, 0, ref="weekly"),
        fill(option("C", 100), -1, 3.5, 60, ref="weekly"),
    ]
    again = [fill(option("C", 101), 1, 3.0, 86_400, ref="weekly")]
    origins = sorted(s.origin for s in run(first + again))
    assert origins == ["ref:weekly", "ref:weekly#2"]


def test_a_missing_commission_is_counted_not_guessed() -> None:
    legs = [fill(option("C", 100), 1, 3.0, 0, ref="c", commission=None)]
    (single,) = run(legs)
    assert single.missing_commissions == 1 and single.commissions == 0.0


def test_the_fold_is_the_same_whatever_order_fills_come_in() -> None:
    fills = (
        condor_fills(1, 0, ref="A")
        + condor_fills(2, 100, perm=42)
        + [fill(option("C", 100), 1, 3.0, 200), fill(option("C", 105), -1, 1.5, 210)]
        + [fill(STOCK, 100, 500.0, 300), fill(option("C", 520), -1, 4.0, 310)]
    )
    reference = _summary(run(fills))
    for seed in range(5):
        shuffled = fills[:]
        random.Random(seed).shuffle(shuffled)
        assert _summary(run(shuffled)) == reference
    types = sorted(t for _, t, _, _ in reference)
    assert types == ["covered_call", "iron_condor", "iron_condor", "vertical_spread"]


def _summary(strategies: list[StrategyLedger]) -> list[tuple[str, str, float, float]]:
    return sorted(
        (
            s.strategy_id,
            s.classification.strategy_type,
            s.classification.quantity,
            round(s.realized_pnl, 6),
        )
        for s in strategies
    )


def test_split_structures_pairs_calendars_across_expiries() -> None:
    near, far = option("C", 100), option("C", 100, FEB)
    groups = split_structures([(near, -1), (far, 1), (option("P", 80), 1)])
    assert sorted(map(sorted, groups)) == sorted(
        [sorted([near.conid, far.conid]), [option("P", 80).conid]]
    )


def test_a_trader_label_beats_every_other_evidence() -> None:
    """Overrides (options_model/overrides.py): a label groups fills across references,
    combos and time, and takes held positions with it; unlabelled fills group as before."""
    tagged = [replace(f, group="mine") for f in condor_fills(1, 0, ref="IC-1")[:2]]
    rest = condor_fills(1, 0, ref="IC-1")[2:]
    far = replace(fill(option("C", 120), 1, 0.2, 7_200, perm=77), group="mine")
    held = Holding("DU1", "SPY", option("P", 80), -1.0, 30.0, 0.3, T0, group="mine")
    strategies = {s.origin: s for s in run([*tagged, *rest, far], [held])}
    assert set(strategies) == {"user:mine", "ref:IC-1"}
    mine = strategies["user:mine"]
    assert mine.strategy_id == strategy_id("DU1", "SPY", "user:mine")
    labelled = [tagged[0].contract, tagged[1].contract, far.contract, held.contract]
    assert sorted(mine.legs) == sorted(c.conid for c in labelled)
    assert sorted(strategies["ref:IC-1"].legs) == sorted(f.contract.conid for f in rest)
