"""Symbols whose partition folder needs percent-encoding, with several consumers.

``BRK B``, ``BF B`` and ``MOG A`` are real IB symbols (class shares); the others
stand for what the wire format allows. Each consumer reads the rows the other
committed (the dedup index's sync) before each of its own commits.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import (
    Lake,
    assert_current_exact,
    assert_table_exact,
    consumer_env,
    group_pending,
    make_updates,
    publish,
    run_consumer,
    start_consumer,
    wait_until,
)
from tests.test_cli import poslake


@pytest.fixture
def lake(any_lake: Lake) -> Lake:
    """On a local folder and on SeaweedFS: the folder names are object keys there."""
    return any_lake


SYMBOLS = ["BRK B", "BF B", "MOG A", "A/B", "x%y", "R&D+1", "\u00e9t\u00e9", "AAPL"]


def test_two_consumers_commit_side_by_side_with_encoded_symbols(
    redis_url: str, lake: Lake, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(3_000, seed=5, symbols=SYMBOLS)
    client: Any = redis.Redis.from_url(redis_url)
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"c{i}.log" for i in range(2)]
    for i in range(2):
        env = consumer_env(
            redis_url, lake, f"c{i}", stream, batch_max_entries=150, read_count=50,
            batch_max_wait_s=0.05,
        )  # fmt: skip
        procs.append(start_consumer(env, log=logs[i]))
    try:
        # Published while both run, so both take part and each syncs the other's commits.
        for start in range(0, len(updates), 300):
            publish(redis_url, stream, updates[start : start + 300])
        wait_until(lambda: _table_rows(lake) == len(updates), timeout=90)
        wait_until(lambda: group_pending(redis_url, stream) == 0)
        assert all(p.poll() is None for p in procs), "a consumer exited"
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=30) for proc in procs]
    assert codes == [0, 0]
    for log in logs:
        text = log.read_text()
        assert "batch settled" in text, "each consumer must have committed"
        assert "Traceback" not in text and "re-bootstrapped" not in text
    assert_table_exact(lake, updates)
    assert_current_exact(lake, updates)
    assert client.xlen(f"{stream}:dlq") == 0

    # A replay of old entries after a restart: the fresh dedup index starts past the
    # newest timestamp, so these keys are checked in the table (the cold path).
    publish(redis_url, stream, updates[:400])
    replay_env = consumer_env(redis_url, lake, "c2", stream, batch_max_entries=150)
    replay_log = tmp_path / "replay.log"
    assert run_consumer(replay_env, log=replay_log) == 0
    assert_table_exact(lake, updates)
    duplicates = re.findall(r"batch settled .*? duplicates=(\d+)", replay_log.read_text())
    assert sum(int(n) for n in duplicates) == 400

    # Operator reads of the same tables, by symbol.
    env = consumer_env(redis_url, lake, "reader", stream)
    for symbol in ("MOG A", "x%y"):
        shown = poslake(env, "query", "positions", "--symbol", symbol, "--format", "csv")
        assert shown.returncode == 0, shown.stderr
        newest: dict[tuple[str, int], float] = {}
        for u in sorted(updates, key=lambda u: u.timestamp):
            if u.symbol == symbol:
                newest[(u.account, u.conid)] = u.position
        open_positions = sum(1 for position in newest.values() if position != 0)
        assert open_positions > 0
        assert len(shown.stdout.strip().splitlines()) - 1 == open_positions, shown.stdout
        assert symbol in shown.stdout


def _table_rows(lake: Lake) -> int:
    try:
        return int(lake.table("position_updates").to_pyarrow_dataset().count_rows())
    except Exception:
        return -1
