"""Where the lake and IB disagree: the categories ``poslake reconcile`` reports.

Pure comparisons of an :class:`~poslake.ib_state.IbState` with the lake's tables
(read with polars), each difference one :class:`Difference`:

- ``position``: ``positions_current`` vs IB per (account, conid): the quantity
  exactly, the average cost within a tolerance, a contract held on one side only;
- ``execution``: today's executions (after corrections) missing from ``executions``,
  present only there, at another revision, or with another commission;
- ``account_value``: ``account_values_current`` vs IB for :data:`RECONCILED_KEYS`,
  within a relative tolerance for the values that move with the market;
- ``fills``: inside the lake, per (account, conid), the signed fills since the
  account's newest complete position snapshot do not add up to the position's
  change since then.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl

from poslake.ib_state import IbState

CATEGORIES = ("position", "execution", "account_value", "fills")

# Values compared, and whether they move with the market between two reads.
RECONCILED_KEYS: dict[str, bool] = {
    "NetLiquidation": True,
    "TotalCashValue": False,
    "MaintMarginReq": True,
    "GrossPositionValue": True,
    "AvailableFunds": True,
    "BuyingPower": True,
    "UnrealizedPnL": True,
    "RealizedPnL": False,
}
# Fills this close to the baseline snapshot may fall on either side of it (IB's
# execution times have whole seconds, the producer stamps its receive time).
BASELINE_MARGIN = timedelta(seconds=2)


COST_TOLERANCE = 1e-4  # relative, plus a cent
VALUE_TOLERANCE = 0.005  # relative, for values that move with the market


@dataclass(frozen=True, slots=True)
class Tolerances:
    average_cost: float = COST_TOLERANCE
    market_value: float = VALUE_TOLERANCE
    commission: float = 1e-6  # absolute


@dataclass(frozen=True, slots=True)
class Difference:
    category: str
    account: str
    item: str  # the conid, exec ID or value key
    what: str  # e.g. "quantity", "only in IB", "commission"
    ib: str
    lake: str

    @property
    def key(self) -> tuple[str, ...]:
        """What identifies it across runs (logged once while it lasts)."""
        return (self.category, self.account, self.item, self.what)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _close(a: float, b: float, relative: float, absolute: float = 0.0) -> bool:
    return math.isclose(a, b, rel_tol=relative, abs_tol=absolute)


def compare_positions(
    ib: IbState, current: pl.DataFrame, tolerances: Tolerances
) -> list[Difference]:
    lake = {
        (r["account"], r["conid"]): r
        for r in current.filter(pl.col("account").is_in(ib.accounts)).to_dicts()
    }
    out: list[Difference] = []
    for key in sorted(set(lake) | set(ib.positions)):
        account, conid = key
        theirs, ours = ib.positions.get(key), lake.get(key)
        ib_qty = theirs.position if theirs else 0.0
        lake_qty = float(ours["position"]) if ours else 0.0
        if ib_qty == 0 and lake_qty == 0:
            continue
        item = str(conid)
        if ib_qty != lake_qty:
            what = (
                "only in IB" if lake_qty == 0 else "only in the lake" if ib_qty == 0 else "quantity"
            )
            out.append(
                Difference("position", account, item, what, _number(ib_qty), _number(lake_qty))
            )
            continue
        ib_cost = theirs.average_cost if theirs else None
        lake_cost = ours.get("average_cost") if ours else None
        if (
            ib_cost is not None
            and lake_cost is not None
            and not _close(ib_cost, float(lake_cost), tolerances.average_cost, 0.01)
        ):
            out.append(
                Difference(
                    "position",
                    account,
                    item,
                    "average cost",
                    _number(ib_cost),
                    _number(float(lake_cost)),
                )
            )
    return out


def compare_executions(
    ib: IbState, executions: pl.DataFrame, since: datetime, tolerances: Tolerances
) -> list[Difference]:
    """IB's executions of the day vs the lake's rows with a time at or after ``since`` (or
    whose details are missing, a commission that came alone)."""
    rows = executions.filter(
        pl.col("account").is_in(ib.accounts).or_(pl.col("account").is_null())
        & (pl.col("time").is_null() | (pl.col("time") >= since))
    )
    lake = {r["exec_base"]: r for r in rows.to_dicts()}
    out: list[Difference] = []
    for base in sorted(set(lake) | set(ib.executions)):
        theirs, ours = ib.executions.get(base), lake.get(base)
        if ours is not None and ours.get("exec_id") is None and theirs is None:
            continue  # a commission whose execution is older than the day
        account = (theirs.account if theirs else ours.get("account") if ours else "") or ""
        if ours is None or ours.get("exec_id") is None:
            assert theirs is not None
            out.append(
                Difference(
                    "execution",
                    account,
                    theirs.exec_id,
                    "only in IB",
                    f"{theirs.signed_shares:g} of {theirs.conid}",
                    "-",
                )
            )
            continue
        if theirs is None:
            out.append(
                Difference(
                    "execution",
                    account,
                    str(ours["exec_id"]),
                    "only in the lake",
                    "-",
                    f"{ours['shares']:g} {ours['side']} of {ours['conid']}",
                )
            )
            continue
        if theirs.exec_id != ours["exec_id"]:
            out.append(
                Difference(
                    "execution", account, base, "revision", theirs.exec_id, str(ours["exec_id"])
                )
            )
            continue
        lake_commission = ours.get("commission")
        if theirs.commission is None and lake_commission is None:
            continue
        if (theirs.commission is None) != (lake_commission is None) or not _close(
            float(theirs.commission or 0.0),
            float(lake_commission or 0.0),
            0.0,
            tolerances.commission,
        ):
            out.append(
                Difference(
                    "execution",
                    account,
                    theirs.exec_id,
                    "commission",
                    _number(theirs.commission),
                    _number(None if lake_commission is None else float(lake_commission)),
                )
            )
    return out


def compare_values(ib: IbState, current: pl.DataFrame, tolerances: Tolerances) -> list[Difference]:
    lake = {
        (r["account"], r["key"], r["currency"]): r["value"]
        for r in current.filter(
            pl.col("account").is_in(ib.accounts) & pl.col("key").is_in(list(RECONCILED_KEYS))
        ).to_dicts()
    }
    theirs = {k: v for k, v in ib.values.items() if k[1] in RECONCILED_KEYS}
    out: list[Difference] = []
    for key in sorted(set(lake) | set(theirs)):
        account, name, currency = key
        item = f"{name} {currency}".strip()
        ib_text, lake_text = theirs.get(key), lake.get(key) or None
        if ib_text is None or lake_text is None:
            if ib_text is None and lake_text is None:
                continue
            what = "only in IB" if lake_text is None else "only in the lake"
            out.append(
                Difference("account_value", account, item, what, ib_text or "-", lake_text or "-")
            )
            continue
        try:
            a, b = float(ib_text), float(lake_text)
        except ValueError:
            if ib_text != lake_text:
                out.append(Difference("account_value", account, item, "value", ib_text, lake_text))
            continue
        relative = tolerances.market_value if RECONCILED_KEYS[name] else 0.0
        if not _close(a, b, relative, 0.01):
            out.append(Difference("account_value", account, item, "value", ib_text, lake_text))
    return out


def check_fills_add_up(
    accounts: Iterable[str],
    snapshots: pl.DataFrame,
    updates: pl.DataFrame,
    executions: pl.DataFrame,
) -> list[Difference]:
    """Per (account, conid): the position now minus the position at the account's newest
    complete snapshot equals the signed fills after it. Contracts with a fill within
    :data:`BASELINE_MARGIN` of the snapshot are not judged (either side is right)."""
    out: list[Difference] = []
    for account in accounts:
        baseline = _newest_complete(snapshots, account)
        if baseline is None:
            continue
        mine = updates.filter(pl.col("account") == account).sort("timestamp")
        before = (
            mine.filter(pl.col("timestamp") <= baseline)
            .group_by("conid")
            .agg(pl.col("position").last().alias("start"))
        )
        now = mine.group_by("conid").agg(pl.col("position").last().alias("end"))
        fills = executions.filter(
            (pl.col("account") == account)
            & pl.col("time").is_not_null()
            & (pl.col("time") > baseline - BASELINE_MARGIN)
        )
        near = set(fills.filter(pl.col("time") < baseline + BASELINE_MARGIN)["conid"].to_list())
        signed = (
            fills.filter(pl.col("time") >= baseline + BASELINE_MARGIN)
            .with_columns(
                pl.when(pl.col("side") == "BOT")
                .then(pl.col("shares"))
                .otherwise(-pl.col("shares"))
                .alias("signed")
            )
            .group_by("conid")
            .agg(pl.col("signed").sum())
        )
        joined = now.join(before, on="conid", how="left").join(
            signed, on="conid", how="full", coalesce=True
        )
        for row in joined.to_dicts():
            conid = row["conid"]
            if conid in near:
                continue
            change = (row["end"] or 0.0) - (row["start"] or 0.0)
            filled = row["signed"] or 0.0
            if not math.isclose(change, filled, abs_tol=1e-9):
                out.append(
                    Difference(
                        "fills",
                        account,
                        str(conid),
                        "fills vs position change",
                        f"fills {filled:g}",
                        f"position change {change:g}",
                    )
                )
    return out


def _newest_complete(snapshots: pl.DataFrame, account: str) -> datetime | None:
    mine = snapshots.filter(pl.col("account") == account)
    if mine.is_empty():
        return None
    complete = (
        mine.group_by("timestamp")
        .agg(pl.col("part").n_unique().alias("found"), pl.col("parts").max())
        .filter(pl.col("found") == pl.col("parts"))
    )
    if complete.is_empty():
        return None
    newest: datetime = complete["timestamp"].max()  # type: ignore[assignment]
    return newest


def day_start(now: float) -> datetime:
    """The start of the UTC day of ``now``: IB's reqExecutions covers the day."""
    moment = datetime.fromtimestamp(now, UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def as_rows(differences: Iterable[Difference]) -> list[dict[str, Any]]:
    return [d.as_dict() for d in differences]
