"""Repositories of the options data model against real Delta tables in temp dirs."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from options_model.repository import (
    StrategyPositionRepository,
    TableRepository,
    greeks,
    legs,
    transactions,
)
from options_model.tables import POSITIONS
from shared.errors import RepositoryError

T0 = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)


def position(
    strategy_id: str, symbol: str, status: str = "open", minutes: int = 0, **extra: Any
) -> dict[str, Any]:
    row = {
        "strategy_id": strategy_id,
        "account": "DU1",
        "strategy_type": "iron_condor",
        "symbol": symbol,
        "status": status,
        "entry_date": date(2026, 11, 1),
        "exit_date": None,
        "entry_price": 2.15,
        "exit_price": None,
        "quantity": 2.0,
        "delta": -0.05,
        "gamma": 0.01,
        "theta": 12.5,
        "vega": -30.0,
        "unrealized_pnl": 40.0,
        "realized_pnl": 0.0,
        "timestamp": T0 + timedelta(minutes=minutes),
    }
    row.update(extra)
    return row


def leg(
    leg_id: str, strategy_id: str, symbol: str, minutes: int = 0, **extra: Any
) -> dict[str, Any]:
    row = {
        "leg_id": leg_id,
        "strategy_id": strategy_id,
        "account": "DU1",
        "symbol": symbol,
        "strike": 450.0,
        "expiry": date(2026, 12, 18),
        "right": "C",
        "quantity": -1.0,
        "open_price": 3.1,
        "current_price": 2.9,
        "delta": -0.2,
        "gamma": 0.01,
        "theta": 5.0,
        "vega": -10.0,
        "status": "open",
        "timestamp": T0 + timedelta(minutes=minutes),
    }
    row.update(extra)
    return row


def test_positions_latest_by_symbol_open_and_history(tmp_path: Path) -> None:
    repo = StrategyPositionRepository(str(tmp_path))
    rows = [
        position("ic-1", "SPY"),
        position("ic-2", "QQQ"),
        position("vs-1", "SPY", strategy_type="vertical_spread"),
        position("ic-1", "SPY", minutes=5, unrealized_pnl=55.0),
        position("vs-1", "SPY", status="closed", minutes=9, exit_price=1.0),
    ]
    assert repo.append(rows) == 5
    latest = repo.latest()
    assert latest["strategy_id"].to_list() == ["ic-1", "ic-2", "vs-1"]
    assert latest.filter(latest["strategy_id"] == "ic-1")["unrealized_pnl"].to_list() == [55.0]
    assert repo.by_symbol("SPY")["strategy_id"].to_list() == ["ic-1", "vs-1"]
    assert repo.open_positions()["strategy_id"].to_list() == ["ic-1", "ic-2"]
    assert repo.open_positions(symbol="QQQ")["strategy_id"].to_list() == ["ic-2"]
    assert repo.history(symbol="SPY").height == 4
    # Partitioned by symbol, so a symbol read touches that partition's files only.
    files = DeltaTable(repo.uri).file_uris()
    assert all("symbol=" in f for f in files)


def test_time_travel_by_version_and_time(tmp_path: Path) -> None:
    repo = StrategyPositionRepository(str(tmp_path))
    repo.append([position("ic-1", "SPY")])
    first = repo.version
    time.sleep(0.05)
    between = datetime.now(UTC)
    time.sleep(0.05)
    repo.append([position("ic-1", "SPY", minutes=10, status="closed")])
    assert repo.latest()["status"].to_list() == ["closed"]
    assert repo.at_version(first)["status"].to_list() == ["open"]
    assert repo.at_time(between)["status"].to_list() == ["open"]
    assert repo.at_time(datetime.now(UTC))["status"].to_list() == ["closed"]
    with pytest.raises(RepositoryError, match="version 99 does not exist"):
        repo.at_version(99)
    with pytest.raises(RepositoryError, match="before the table existed"):
        repo.at_time(datetime(2000, 1, 1, tzinfo=UTC))


def test_update_is_a_merge_and_keeps_the_old_version(tmp_path: Path) -> None:
    repo = StrategyPositionRepository(str(tmp_path))
    repo.append([position("ic-1", "SPY"), position("ic-2", "SPY")])
    before = repo.version
    repo.update("ic-1", status="rolling", delta=0.12)
    now = repo.latest()
    row = now.filter(now["strategy_id"] == "ic-1").row(0, named=True)
    assert (row["status"], row["delta"]) == ("rolling", 0.12)
    assert row["timestamp"] > T0
    assert repo.history().height == 2  # changed in place: no extra row
    old = repo.at_version(before)
    assert old.filter(old["strategy_id"] == "ic-1")["status"].to_list() == ["open"]
    operations = [h["operation"] for h in DeltaTable(repo.uri).history()]
    assert operations[0] == "MERGE"
    with pytest.raises(RepositoryError, match="unknown strategy 'nope'"):
        repo.update("nope", status="closed")
    with pytest.raises(RepositoryError, match="cannot update"):
        repo.update("ic-1", colour="red")
    with pytest.raises(RepositoryError, match="'done' is not one of"):
        repo.update("ic-1", status="done")


def test_bad_rows_are_refused_with_the_reason(tmp_path: Path) -> None:
    repo = StrategyPositionRepository(str(tmp_path))
    with pytest.raises(RepositoryError, match="row 1, field 'quantity'"):
        repo.append([position("a", "SPY"), position("b", "SPY", quantity="two")])
    with pytest.raises(RepositoryError, match="row 0, field 'symbol' is required"):
        repo.append([position("a", None)])  # type: ignore[arg-type]
    with pytest.raises(RepositoryError, match="unknown fields"):
        repo.append([position("a", "SPY", colour="red")])
    with pytest.raises(RepositoryError, match="strategy_type"):
        repo.append([position("a", "SPY", strategy_type="yolo")])
    with pytest.raises(RepositoryError, match="does not exist yet"):
        repo.latest()  # nothing of the refused calls was written


def test_legs_and_greeks_read_calls(tmp_path: Path) -> None:
    leg_repo = legs(str(tmp_path))
    leg_repo.append(
        [
            leg("l1", "ic-1", "SPY"),
            leg("l2", "ic-1", "SPY", right="P"),
            leg("l1", "ic-1", "SPY", minutes=3, current_price=2.5),
            leg("l9", "ic-9", "QQQ"),
        ]
    )
    version = leg_repo.version
    assert leg_repo.latest(strategy_id="ic-1")["current_price"].to_list() == [2.5, 2.9]
    assert leg_repo.by_symbol("QQQ")["leg_id"].to_list() == ["l9"]
    assert leg_repo.at_version(version).height == 3
    with pytest.raises(RepositoryError, match="'X' is not one of"):
        leg_repo.append([leg("l3", "ic-1", "SPY", right="X")])
    greek_repo = greeks(str(tmp_path))
    snapshot = {
        "strategy_id": "ic-1",
        "account": "DU1",
        "symbol": "SPY",
        "delta": 0.1,
        "gamma": 0.01,
        "theta": 3.0,
        "vega": -2.0,
        "portfolio_delta": 1.5,
        "portfolio_gamma": 0.2,
    }
    greek_repo.append(
        [
            {**snapshot, "timestamp": T0},
            {**snapshot, "delta": 0.3, "timestamp": T0 + timedelta(minutes=1)},
        ]
    )
    assert greek_repo.latest()["delta"].to_list() == [0.3]
    assert greek_repo.history(symbol="SPY").height == 2
    assert greek_repo.at_time(datetime.now(UTC), symbol="SPY").height == 1


def test_transactions_are_deduplicated_by_id(tmp_path: Path) -> None:
    repo = transactions(str(tmp_path))
    fills = [
        {
            "transaction_id": f"t{i}",
            "strategy_id": "ic-1",
            "leg_id": "l1",
            "account": "DU1",
            "symbol": "SPY",
            "side": "SELL",
            "effect": "OPEN",
            "quantity": 1.0,
            "price": 3.1,
            "commission": 0.65,
            "timestamp": T0 + timedelta(seconds=i),
        }
        for i in range(5)
    ]
    assert repo.append(fills[:3]) == 3
    assert repo.append(fills) == 2  # a retried append with two new fills
    assert repo.append(fills) == 0
    assert repo.append([fills[0], fills[0]]) == 0
    assert sorted(repo.history()["transaction_id"].to_list()) == [f"t{i}" for i in range(5)]
    as_arrow = pa.Table.from_pylist([{**fills[0], "transaction_id": "t9"}])
    assert repo.append(as_arrow) == 1
    with pytest.raises(RepositoryError, match="'HOLD' is not one of"):
        repo.append([{**fills[0], "transaction_id": "t10", "side": "HOLD"}])


def test_update_refuses_an_ambiguous_latest_row(tmp_path: Path) -> None:
    repo = StrategyPositionRepository(str(tmp_path))
    repo.append([position("ic-1", "SPY"), position("ic-1", "SPY", quantity=3.0)])  # same time
    with pytest.raises(RepositoryError, match="2 rows at its latest timestamp"):
        repo.update("ic-1", status="closed")
    assert set(repo.history()["status"]) == {"open"}  # nothing written


def test_an_append_is_one_commit(tmp_path: Path) -> None:
    repo = TableRepository(str(tmp_path), POSITIONS, batch_rows=3)  # several record batches
    repo.append([position(f"s{i}", "SPY") for i in range(10)])
    assert repo.version == 1 and repo.history().height == 10
