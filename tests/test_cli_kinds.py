"""The operator commands over every kind: status, query executions and account values."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import polars as pl
import redis

from shared.account_values import AccountValue
from shared.wire import encode_update
from tests.helpers import consumer_env, make_updates, publish, publish_entries, run_consumer
from tests.test_cli import poslake
from tests.test_executions import T0, commission, fill


def _loaded(redis_url: str, lake: Path, stream: str, tmp_path: Path) -> dict[str, str]:
    publish(redis_url, stream, make_updates(200, seed=3))
    publish_entries(redis_url, stream, [fill(n) for n in range(12)] + [commission(3)])
    client = redis.Redis.from_url(redis_url)
    for i in range(6):
        value = AccountValue(
            account="DU100001", key="NetLiquidation", currency="USD",
            value=f"{1000 + i}.0", timestamp=T0 + timedelta(minutes=i),
        )  # fmt: skip
        client.xadd(stream, encode_update(value))  # type: ignore[arg-type]
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=50)
    assert run_consumer(env, log=tmp_path / "c.log") == 0
    return env


def test_status_query_executions_and_account_values(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    env = _loaded(redis_url, lake, stream, tmp_path)
    status = poslake(env, "status")
    assert status.returncode == 0, status.stderr
    for name in ("position_updates", "positions_current", "executions", "account_values",
                  "account_values_current"):  # fmt: skip
        assert f"/lake/{name}: version" in status.stdout, status.stdout

    fills = poslake(env, "query", "executions", "--account", "DU101", "--format", "csv")
    assert fills.returncode == 0, fills.stderr
    frame = pl.read_csv(io.StringIO(fills.stdout))
    # fill(n) is in account DU{100 + n % 3}: n = 1, 4, 7, 10.
    assert frame["order_id"].to_list() == [1, 4, 7, 10]
    assert frame.filter(pl.col("order_id") == 4)["commission"].to_list() == [None]
    window = ["--since", (T0 + timedelta(seconds=6)).isoformat(),
              "--until", (T0 + timedelta(seconds=9)).isoformat()]  # fmt: skip
    since = poslake(env, "query", "executions", *window, "--format", "csv")
    assert pl.read_csv(io.StringIO(since.stdout))["order_id"].to_list() == [6, 7, 8]
    with_commission = poslake(env, "query", "executions", "--format", "csv")
    rows = pl.read_csv(io.StringIO(with_commission.stdout))
    assert rows.filter(pl.col("order_id") == 3)["commission"].to_list() == [1.05]

    now = poslake(env, "query", "account-values", "--format", "csv")
    assert now.returncode == 0, now.stderr
    assert pl.read_csv(io.StringIO(now.stdout))["value"].to_list() == [1005.0]
    as_of = (T0 + timedelta(minutes=2, seconds=30)).isoformat()
    then = poslake(env, "query", "account-values", "--as-of", as_of, "--format", "csv")
    assert pl.read_csv(io.StringIO(then.stdout))["value"].to_list() == [1002.0]
    bad = poslake(env, "query", "account-values", "--symbol", "SPY")
    assert bad.returncode != 0 and "no symbol" in bad.stderr
    table = poslake(env, "query", "table", "executions", "--format", "csv")
    assert table.returncode == 0, table.stderr
    assert pl.read_csv(io.StringIO(table.stdout)).height == 12
