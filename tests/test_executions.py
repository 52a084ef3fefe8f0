"""Executions through the consumer: corrections, late and early commissions, replays.

The table is compared with :func:`expected_executions`, a reference written from
the rules' statement (shared/executions.py), not from the MERGE's SQL.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from deltalake import DeltaTable

from consumer.upsert import UpsertWriter
from shared.executions import (
    CommissionDetails,
    ExecutionDetails,
    ExecutionEntry,
    executions_to_arrow,
    split_exec_id,
)
from shared.kinds import EXECUTIONS
from shared.settings import load_settings
from tests.helpers import (
    Lake,
    consumer_env,
    group_pending,
    publish_entries,
    read_frame,
    run_consumer,
)

T0 = datetime(2026, 12, 2, 14, 30, tzinfo=UTC)


def details(n: int, symbol: str = "SPY", price: float = 5.0) -> ExecutionDetails:
    return ExecutionDetails(
        account=f"DU{100 + n % 3}",
        conid=700_000 + n,
        symbol=symbol,
        sec_type="OPT",
        right="C" if n % 2 else "P",
        strike=500.0 + n,
        expiry=T0.date() + timedelta(days=30),
        multiplier=100.0,
        currency="USD",
        side="BOT" if n % 2 else "SLD",
        shares=1.0 + n % 4,
        price=price,
        time=T0 + timedelta(seconds=n),
        exchange="CBOE",
        order_id=n,
        perm_id=9_000 + n,
        client_id=7,
        order_ref=f"ref-{n}",
        cum_qty=1.0 + n % 4,
        avg_price=price,
        liquidation=0,
    )


def exec_id(n: int, revision: int = 1) -> str:
    return f"0000e0d5.{n:08x}.01.{revision:02d}"


def fill(n: int, revision: int = 1, price: float = 5.0) -> ExecutionEntry:
    return ExecutionEntry(exec_id=exec_id(n, revision), execution=details(n, price=price))


def commission(n: int, revision: int = 1, amount: float = 1.05) -> ExecutionEntry:
    return ExecutionEntry(
        exec_id=exec_id(n, revision),
        commission=CommissionDetails(commission=amount, currency="USD", realized_pnl=None),
    )


def scenario() -> list[ExecutionEntry]:
    """Every case the issue names, interleaved."""
    entries: list[ExecutionEntry] = []
    for n in range(40):
        entries.append(fill(n))  # 0-39: a fill, then its commission below
    for n in range(0, 40, 2):
        entries.append(commission(n, amount=1.0 + n / 100))
    entries.append(commission(100, amount=2.5))  # a commission before its execution
    entries += [fill(1), fill(3)]  # repeats: no-ops
    entries.append(fill(5, revision=2, price=5.25))  # a correction, then its commission
    entries.append(commission(5, revision=2, amount=0.75))
    entries.append(commission(5, revision=1, amount=9.99))  # too late: for the replaced fill
    entries.append(commission(7, revision=2, amount=0.5))  # a correction's commission first
    entries.append(fill(100))  # the execution of the early commission
    entries.append(fill(7, revision=2, price=4.5))
    entries.append(commission(2, amount=8.88))  # a second report: the first stays
    entries.append(fill(9, revision=2, price=6.0))  # corrected, its commission never sent
    # 1, 3, 11, ... odd fills below 40 but 5, 7, 9: commission never sent (kept, null).
    return entries


def expected_executions(entries: list[ExecutionEntry]) -> dict[str, dict[str, Any]]:
    """The final row per execution: the highest revision's details; the first report of
    the highest reported revision, if that is not below the details'."""
    best: dict[str, tuple[int, ExecutionEntry]] = {}
    reports: dict[str, list[tuple[int, ExecutionEntry]]] = {}
    for entry in entries:
        base, revision = split_exec_id(entry.exec_id)
        if entry.execution is not None and (base not in best or revision > best[base][0]):
            best[base] = (revision, entry)
        if entry.commission is not None:
            reports.setdefault(base, []).append((revision, entry))
    rows: dict[str, dict[str, Any]] = {}
    for base in best.keys() | reports.keys():
        row: dict[str, Any] = {"exec_id": None, "commission": None, "price": None}
        revision = -1
        if base in best:
            revision, entry = best[base]
            assert entry.execution is not None
            row.update(exec_id=entry.exec_id, price=entry.execution.price)
            row["time"] = entry.execution.time
        kept = [r for r in reports.get(base, []) if r[0] >= revision]
        if kept:
            top = max(r[0] for r in kept)
            first = next(r[1] for r in kept if r[0] == top)
            assert first.commission is not None
            row.update(commission=first.commission.commission, commission_exec_id=first.exec_id)
        rows[base] = row
    return rows


def table_executions(lake: Path | Lake) -> dict[str, dict[str, Any]]:
    frame = read_frame(lake, "executions")
    assert frame["exec_base"].is_unique().all()
    return {row["exec_base"]: row for row in frame.to_dicts()}


def assert_executions_exact(lake: Path | Lake, entries: list[ExecutionEntry]) -> None:
    expected = expected_executions(entries)
    actual = table_executions(lake)
    assert actual.keys() == expected.keys()
    for base, want in expected.items():
        got = actual[base]
        for name, value in want.items():
            assert got[name] == value, (base, name, got[name], value)


def test_every_case_lands_once_and_a_replay_changes_nothing(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    entries = scenario()
    publish_entries(redis_url, stream, entries)
    # Small batches: fills and their commissions land in different commits.
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=7)
    assert run_consumer(env, log=tmp_path / "c.log") == 0
    assert group_pending(redis_url, stream) == 0
    assert_executions_exact(lake, entries)
    rows = table_executions(lake)
    corrected = rows[split_exec_id(exec_id(5))[0]]
    assert (corrected["exec_id"], corrected["commission"]) == (exec_id(5, 2), 0.75)
    never = rows[split_exec_id(exec_id(9))[0]]
    assert never["exec_id"] == exec_id(9, 2) and never["commission"] is None
    early = rows[split_exec_id(exec_id(100))[0]]
    assert (early["symbol"], early["commission"]) == ("SPY", 2.5)
    assert rows[split_exec_id(exec_id(2))[0]]["commission"] == 1.02
    before = DeltaTable(str(lake / "executions")).version()

    client = redis.Redis.from_url(redis_url)
    client.xgroup_setid(stream, "lake", "0")
    assert run_consumer(env, log=tmp_path / "c.log") == 0
    assert_executions_exact(lake, entries)
    assert DeltaTable(str(lake / "executions")).version() == before


def test_any_order_and_any_batching_give_the_same_table(tmp_path: Path) -> None:
    entries = scenario()
    rng = random.Random(5)
    expected = expected_executions(entries)
    for attempt in range(4):
        lake = tmp_path / f"lake{attempt}"
        settings = load_settings(lake_uri=str(lake))
        writer = UpsertWriter(settings, EXECUTIONS)
        shuffled = entries[:]
        # Arrival order is free except that two reports of one revision keep theirs.
        rng.shuffle(shuffled)
        shuffled = _keep_report_order(shuffled, entries)
        at = 0
        while at < len(shuffled):
            size = rng.randint(1, 15)
            piece = shuffled[at : at + size]
            ids = [f"{at + i + 1}-0".encode() for i in range(len(piece))]
            writer.commit_isolating(executions_to_arrow(piece, ids))
            at += size
        actual = table_executions(lake)
        assert actual.keys() == expected.keys()
        for base, want in expected.items():
            for name, value in want.items():
                assert actual[base][name] == value, (attempt, base, name)


def _keep_report_order(
    shuffled: list[ExecutionEntry], original: list[ExecutionEntry]
) -> list[ExecutionEntry]:
    """``shuffled`` with the reports that share an exec_id back in their original order
    (the first report of a revision wins, so their order matters)."""
    by_id: dict[str, list[ExecutionEntry]] = {}
    for entry in original:
        if entry.commission is not None:
            by_id.setdefault(entry.exec_id, []).append(entry)
    queues = {k: list(v) for k, v in by_id.items()}
    return [queues[e.exec_id].pop(0) if e.commission is not None else e for e in shuffled]
