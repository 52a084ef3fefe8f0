"""The operator CLI against a real redis-server and a real table, bad input included."""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import redis
from deltalake import DeltaTable, write_deltalake
from rich.console import Console

from options_model.repository import StrategyPositionRepository
from poslake.live_view import render
from poslake.status import ConsumerStatus, GroupStatus, Status, TableStatus
from shared.table import POSITION_UPDATES_SCHEMA, updates_to_arrow
from tests.helpers import (
    assert_table_exact,
    consumer_env,
    group_pending,
    make_updates,
    publish,
    run_consumer,
    run_python,
    table_rows,
)
from tests.test_repository import position


def poslake(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return run_python(["-m", "poslake", *args], env, stdin=stdin)


@pytest.fixture
def loaded(redis_url: str, lake: Path, stream: str) -> dict[str, Any]:
    """A stream of 300 updates, consumed into the table by one drained consumer."""
    updates = make_updates(300)
    publish(redis_url, stream, updates)
    env = consumer_env(redis_url, lake, "cli-consumer", stream)
    assert run_consumer(env) == 0
    return {"env": env, "updates": updates}


def test_every_command_has_help() -> None:
    for command in ("run", "consume", "produce", "status", "replay", "dlq", "maintain", "query"):
        done = poslake(dict(os.environ), command, "--help")
        assert done.returncode == 0 and "usage: poslake" in done.stdout, command


def test_status(loaded: dict[str, Any], stream: str) -> None:
    done = poslake(loaded["env"], "status")
    assert done.returncode == 0, done.stderr
    assert f"stream {stream}: 300 entries" in done.stdout
    assert "group lake: lag 0" in done.stdout and "pending 0" in done.stdout
    assert "cli-consumer: pending 0" in done.stdout
    assert "dead letters" in done.stdout and "300 rows" in done.stdout
    as_json = poslake(loaded["env"], "status", "--json")
    assert '"length": 300' in as_json.stdout


def test_status_of_unreachable_redis(lake: Path) -> None:
    env = consumer_env("redis://127.0.0.1:1/0", lake, "x")
    done = poslake(env, "status")
    assert done.returncode == 4 and "cannot reach Redis" in done.stderr


def test_replay_to_the_beginning_leaves_the_table_unchanged(
    loaded: dict[str, Any], redis_url: str, lake: Path, stream: str
) -> None:
    before = table_rows(lake)
    cancelled = poslake(loaded["env"], "replay", "--beginning", stdin="n\n")
    assert cancelled.returncode == 5 and "300 entries will be delivered again" in cancelled.stdout
    done = poslake(loaded["env"], "replay", "--beginning", "--yes")
    assert done.returncode == 0, done.stderr
    client: Any = redis.Redis.from_url(redis_url)
    group = client.xinfo_groups(stream)[0]
    assert group["last-delivered-id"] == b"0-0"
    assert run_consumer(loaded["env"]) == 0
    assert table_rows(lake) == before
    assert_table_exact(lake, loaded["updates"])
    group = client.xinfo_groups(stream)[0]
    assert group_pending(redis_url, stream) == 0 and group.get("lag") in (0, None)


def test_replay_to_a_time_and_an_id(redis_url: str, lake: Path, stream: str) -> None:
    # Two bursts a little apart, so a time falls between them (a burst can share a ms).
    early, late = make_updates(300)[:150], make_updates(300)[150:]
    publish(redis_url, stream, early)
    time.sleep(0.05)
    publish(redis_url, stream, late)
    env = consumer_env(redis_url, lake, "c1", stream)
    assert run_consumer(env) == 0
    client: Any = redis.Redis.from_url(redis_url)
    ids = [entry_id.decode() for entry_id, _ in client.xrange(stream)]
    millis = int(ids[150].split("-")[0])
    at = pl.Series([millis], dtype=pl.Datetime("ms", "UTC")).dt.to_string("%Y-%m-%dT%H:%M:%S%.3fZ")
    done = poslake(env, "replay", "--to-time", at[0], "--yes")
    assert done.returncode == 0, done.stderr
    assert "150 entries will be delivered again" in done.stdout
    done = poslake(env, "replay", "--to-id", ids[49], "--yes")
    assert done.returncode == 0, done.stderr
    assert "100 entries will be delivered again" in done.stdout  # ids[50:150]
    ahead = poslake(env, "replay", "--to-id", ids[200], "--yes")
    assert ahead.returncode == 2 and "would skip entries" in ahead.stderr
    assert run_consumer(env) == 0
    assert_table_exact(lake, early + late)


def test_replay_bad_input(loaded: dict[str, Any]) -> None:
    env = loaded["env"]
    unknown = poslake(env, "replay", "--beginning", "--group", "nope", "--yes")
    assert unknown.returncode == 3 and "no group 'nope'" in unknown.stderr
    bad_id = poslake(env, "replay", "--to-id", "abc", "--yes")
    assert bad_id.returncode == 2 and "bad entry ID" in bad_id.stderr
    bad_time = poslake(env, "replay", "--to-time", "yesterday", "--yes")
    assert bad_time.returncode == 2 and "bad time" in bad_time.stderr
    neither = poslake(env, "replay")
    assert neither.returncode == 2  # argparse: one of the positions is required


def test_dlq_list_requeue_purge(redis_url: str, lake: Path, stream: str) -> None:
    client: Any = redis.Redis.from_url(redis_url)
    good = make_updates(5)
    publish(redis_url, stream, good)
    client.xadd(stream, {"v": b"1", "payload": b"{broken"})
    client.xadd(stream, {"v": b"7", "payload": b"{}"})
    env = consumer_env(redis_url, lake, "dlq-consumer", stream)
    assert run_consumer(env) == 0
    listing = poslake(env, "dlq", "list")
    assert listing.returncode == 0 and "2 of 2 dead letters" in listing.stdout
    assert "JSON is malformed" in listing.stdout and "unknown schema version 7" in listing.stdout
    dead = [entry_id.decode() for entry_id, _ in client.xrange(f"{stream}:dlq")]
    missing = poslake(env, "dlq", "requeue", "1-1", "--yes")
    assert missing.returncode == 3
    requeue = poslake(env, "dlq", "requeue", dead[0], "--yes")
    assert requeue.returncode == 0 and "1 dead letters requeued" in requeue.stdout
    last = client.xrevrange(stream, count=1)[0][1]
    assert last == {b"v": b"1", b"payload": b"{broken"}  # the original fields only
    assert client.xlen(f"{stream}:dlq") == 1
    purge = poslake(env, "dlq", "purge", "--all", "--yes")
    assert purge.returncode == 0 and client.xlen(f"{stream}:dlq") == 0
    assert_table_exact(lake, good)


def test_maintain(loaded: dict[str, Any], lake: Path) -> None:
    env = loaded["env"]
    refused = poslake(env, "maintain", "--retention-hours", "1")
    assert refused.returncode == 2 and "would break time travel" in refused.stderr
    done = poslake(env, "maintain", "--retention-hours", "0", "--force")
    assert done.returncode == 0, done.stderr
    assert "compacted" in done.stdout and "checkpoint written" in done.stdout
    assert "removed" in done.stdout
    assert_table_exact(lake, loaded["updates"])
    # A changed history setting reaches both tables' tombstone and log retention.
    longer = {**env, "POSLAKE_HISTORY_RETENTION_HOURS": "48"}
    changed = poslake(longer, "maintain", "--skip-compact", "--skip-vacuum")
    assert changed.returncode == 0, changed.stderr
    for name in ("position_updates", "positions_current"):
        configuration = DeltaTable(str(lake / name)).metadata().configuration
        for key in ("delta.deletedFileRetentionDuration", "delta.logRetentionDuration"):
            assert configuration[key] == f"interval {50 * 3600} seconds", (name, key)
    missing = poslake({**env, "POSLAKE_LAKE_URI": str(lake / "none")}, "maintain")
    assert missing.returncode == 3 and "no table" in missing.stderr


def test_query_positions_history_and_time_travel(
    loaded: dict[str, Any], lake: Path, tmp_path: Path
) -> None:
    env = loaded["env"]
    updates = loaded["updates"]
    latest: dict[tuple[str, int], Any] = {}
    for update in sorted(updates, key=lambda u: u.timestamp):
        latest[(update.account, update.conid)] = update
    open_ = {k: u for k, u in latest.items() if u.position != 0}
    done = poslake(env, "query", "positions", "--format", "csv")
    assert done.returncode == 0, done.stderr
    shown = pl.read_csv(io.StringIO(done.stdout))
    assert {(r["account"], r["conid"], r["position"]) for r in shown.iter_rows(named=True)} == {
        (k[0], k[1], u.position) for k, u in open_.items()
    }
    with_closed = poslake(env, "query", "positions", "--include-closed", "--format", "csv")
    assert pl.read_csv(io.StringIO(with_closed.stdout)).height == len(latest)

    symbol = updates[0].symbol
    account = updates[0].account
    filtered = poslake(env, "query", "positions", "--symbol", symbol, "--account", account,
                       "--format", "parquet", "--output", str(tmp_path / "p.parquet"))  # fmt: skip
    assert filtered.returncode == 0, filtered.stderr
    frame = pl.read_parquet(tmp_path / "p.parquet")
    assert set(frame["symbol"]) <= {symbol} and set(frame["account"]) <= {account}
    assert frame.height == sum(1 for (a, _), u in open_.items() if a == account
                               and u.symbol == symbol)  # fmt: skip

    conid = updates[0].conid
    history = poslake(env, "query", "history", "--conid", str(conid), "--format", "csv")
    rows = pl.read_csv(io.StringIO(history.stdout))
    assert rows.height == sum(1 for u in updates if u.conid == conid)

    # Version 0 is the empty table the consumer created; the first batch came after it.
    at_zero = poslake(env, "query", "positions", "--version", "0", "--format", "csv")
    assert at_zero.returncode == 0 and at_zero.stdout.count("\n") <= 1
    table_time = poslake(env, "query", "positions", "--at", "2099-01-01T00:00:00Z")
    assert table_time.returncode == 0

    # --as-of: the newest row per contract observed by then, from the rows themselves.
    ordered = sorted(updates, key=lambda u: u.timestamp)
    cut = ordered[len(ordered) // 2].timestamp
    then: dict[tuple[str, int], Any] = {}
    for update in ordered:
        if update.timestamp <= cut:
            then[(update.account, update.conid)] = update
    as_of = poslake(env, "query", "positions", "--as-of", cut.isoformat(), "--include-closed",
                    "--format", "csv")  # fmt: skip
    assert as_of.returncode == 0, as_of.stderr
    stood = pl.read_csv(io.StringIO(as_of.stdout))
    assert {(r["account"], r["conid"], r["position"]) for r in stood.iter_rows(named=True)} == {
        (k[0], k[1], u.position) for k, u in then.items()
    }
    assert then != latest


def test_query_bad_input(loaded: dict[str, Any], lake: Path) -> None:
    env = loaded["env"]
    assert poslake(env, "query", "positions", "--version", "999").returncode == 2
    before = poslake(env, "query", "positions", "--at", "2001-01-01T00:00:00Z")
    assert before.returncode == 2 and "before the table existed" in before.stderr
    assert poslake(env, "query", "positions", "--at", "soon").returncode == 2
    parquet = poslake(env, "query", "positions", "--format", "parquet")
    assert parquet.returncode == 2 and "needs --output" in parquet.stderr
    unknown = poslake(env, "query", "history", "--conid", "1")
    assert unknown.returncode == 3
    missing = poslake({**env, "POSLAKE_LAKE_URI": str(lake / "none")}, "query", "positions")
    assert missing.returncode == 3 and "no table" in missing.stderr
    bad_setting = poslake({**env, "POSLAKE_BATCH_MAX_WAIT_S": "-1"}, "query", "positions")
    assert bad_setting.returncode == 2 and "POSLAKE_BATCH_MAX_WAIT_S" in bad_setting.stderr


def test_time_travel_past_the_kept_log_names_the_history_setting(
    loaded: dict[str, Any], tmp_path: Path
) -> None:
    lake = tmp_path / "short-log"
    uri = str(lake / "position_updates")
    config = {"delta.checkpointInterval": "3", "delta.logRetentionDuration": "interval 1 seconds"}
    DeltaTable.create(uri, POSITION_UPDATES_SCHEMA, partition_by=["symbol"], configuration=config)
    updates = make_updates(60, seed=41)
    for i in range(0, 60, 10):
        write_deltalake(
            uri, updates_to_arrow(updates[i : i + 10], [b"1-%d" % i] * 10), mode="append"
        )
        if i == 20:
            time.sleep(1.5)  # the commits before this expire; the next checkpoint drops them
    assert DeltaTable(uri).history()[-1]["version"] > 0
    env = {**loaded["env"], "POSLAKE_LAKE_URI": str(lake)}
    old = poslake(env, "query", "positions", "--at", "2001-01-01T00:00:00Z")
    assert old.returncode == 2 and "POSLAKE_HISTORY_RETENTION_HOURS" in old.stderr
    assert "--as-of" in old.stderr
    version_one = poslake(env, "query", "positions", "--version", "1")
    assert version_one.returncode == 2 and "POSLAKE_HISTORY_RETENTION_HOURS" in version_one.stderr
    as_of = poslake(env, "query", "positions", "--as-of", "2001-01-01T00:00:00Z", "--format", "csv")
    assert as_of.returncode == 0 and as_of.stdout.count("\n") <= 1  # nothing observed by then


def test_query_model_tables_and_current(loaded: dict[str, Any], lake: Path) -> None:
    env = loaded["env"]
    repo = StrategyPositionRepository(str(lake))
    repo.append([position("ic-1", "SPY"), position("ic-2", "QQQ")])
    first = repo.version
    repo.append([position("ic-1", "SPY", minutes=5, status="closed")])
    latest = poslake(env, "query", "table", "positions", "--format", "csv")
    assert latest.returncode == 0, latest.stderr
    frame = pl.read_csv(io.StringIO(latest.stdout))
    assert dict(zip(frame["strategy_id"], frame["status"], strict=True)) == {
        "ic-1": "closed",
        "ic-2": "open",
    }
    old = poslake(
        env,
        "query",
        "table",
        "positions",
        "--version",
        str(first),
        "--symbol",
        "SPY",
        "--format",
        "csv",
    )
    assert pl.read_csv(io.StringIO(old.stdout))["status"].to_list() == ["open"]
    history = poslake(
        env, "query", "table", "positions", "--history", "--strategy", "ic-1", "--format", "csv"
    )
    assert pl.read_csv(io.StringIO(history.stdout)).height == 2
    missing = poslake(env, "query", "table", "legs")
    assert missing.returncode == 3 and "does not exist yet" in missing.stderr
    current = poslake(env, "query", "table", "positions_current", "--format", "csv")
    assert current.returncode == 0, current.stderr
    newest = {(u.account, u.conid) for u in loaded["updates"]}
    assert pl.read_csv(io.StringIO(current.stdout)).height == len(newest)


def test_replay_on_each_redis_version(redis_any_version: Any, lake: Path, stream: str) -> None:
    """ENTRIESREAD is set where the server has it (7.x), so the group's lag stays right."""
    url = redis_any_version.url
    updates = make_updates(120)
    publish(url, stream, updates)
    env = consumer_env(url, lake, "c1", stream)
    assert run_consumer(env) == 0
    done = poslake(env, "replay", "--beginning", "--yes")
    assert done.returncode == 0, done.stderr
    client: Any = redis.Redis.from_url(url)
    group = client.xinfo_groups(stream)[0]
    if redis_any_version.version.startswith("7"):
        assert group["entries-read"] == 0 and group["lag"] == 120
    status = poslake(env, "status")
    assert "lag 120" in status.stdout
    assert run_consumer(env) == 0
    assert "lag 0" in poslake(env, "status").stdout
    assert_table_exact(lake, updates)


def test_live_view_renders_the_flow() -> None:
    status = Status(
        "positions",
        1200,
        "1-0",
        "9-0",
        [GroupStatus("lake", "9-0", 1200, 3, 5, [ConsumerStatus("c1", 5, 1500, 2)])],
        4,
        TableStatus("position_updates", "lake/position_updates", 7, 1195, 12, "now"),
    )
    console = Console(record=True, width=100)
    console.print(render(status, 250.0, 240.0))
    text = console.export_text()
    for shown in (
        "250 -> 240",
        "1200 entries",
        "lag 3, pending 5",
        "c1",
        "dead letters",
        "version 7, 1,195 rows, 12 files",
    ):
        assert shown in text, shown


def test_replay_keeps_the_lag_right_after_trimming(
    redis_any_version: Any, lake: Path, stream: str
) -> None:
    url = redis_any_version.url
    publish(url, stream, make_updates(100))
    client: Any = redis.Redis.from_url(url)
    client.xtrim(stream, maxlen=60, approximate=False)
    env = consumer_env(url, lake, "c1", stream)
    assert run_consumer(env) == 0
    done = poslake(env, "replay", "--beginning", "--yes")
    assert done.returncode == 0 and "60 entries will be delivered again" in done.stdout
    assert "lag 60" in poslake(env, "status").stdout
    if redis_any_version.version.startswith("7"):
        assert client.xinfo_groups(stream)[0]["lag"] == 60
