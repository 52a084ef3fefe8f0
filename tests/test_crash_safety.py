"""Crash safety: consumer processes killed with SIGKILL at chosen points, then the table
checked row by row and the group checked for leftovers."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import RedisTarget
from tests.helpers import (
    Lake,
    assert_current_exact,
    assert_table_exact,
    consumer_env,
    group_pending,
    kill,
    make_updates,
    publish,
    run_consumer,
    start_consumer,
    wait_until,
)


@pytest.fixture
def lake(any_lake: Lake) -> Lake:
    """Every test here runs on a local lake and on one on SeaweedFS."""
    return any_lake


def _crash_then_recover(
    redis_url: str, lake: Lake, stream: str, logs: Path, point: str, on: int
) -> None:
    updates = make_updates(2_400, seed=hash(point) % 1000)
    publish(redis_url, stream, updates)
    faulty = consumer_env(
        redis_url, lake, "c1", stream, batch_max_entries=300,
        fault_crash_at=point, fault_crash_on_batch=on,
    )  # fmt: skip
    code = run_consumer(faulty, log=logs / "crash.log")
    assert code == -signal.SIGKILL, f"consumer was not killed at {point}: exit {code}"
    assert group_pending(redis_url, stream) > 0  # the batch in hand was never acked

    # Same consumer name: it first re-reads its own pending entries.
    healthy = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=300)
    assert run_consumer(healthy, log=logs / "recover.log") == 0
    assert_table_exact(lake, updates)
    assert_current_exact(lake, updates)
    assert group_pending(redis_url, stream) == 0


def test_kill_after_read_before_commit(
    redis_url: str, lake: Lake, stream: str, tmp_path: Path
) -> None:
    _crash_then_recover(redis_url, lake, stream, tmp_path, "after_read", on=3)


def test_kill_after_commit_before_ack(
    redis_url: str, lake: Lake, stream: str, tmp_path: Path
) -> None:
    _crash_then_recover(redis_url, lake, stream, tmp_path, "after_commit", on=3)


def test_kill_after_current_merge_before_ack(
    redis_url: str, lake: Lake, stream: str, tmp_path: Path
) -> None:
    _crash_then_recover(redis_url, lake, stream, tmp_path, "after_current", on=2)


def test_kill_in_the_middle_of_a_multi_page_claim(
    redis_any_version: RedisTarget, lake: Lake, stream: str, tmp_path: Path
) -> None:
    url = redis_any_version.url
    updates = make_updates(1_000, seed=5)
    publish(url, stream, updates)
    client = redis.Redis.from_url(url)
    client.xgroup_create(stream, "lake", id="0")
    # A consumer that read everything and died without acking.
    client.xreadgroup("lake", "ghost", {stream: ">"}, count=10_000)
    assert group_pending(url, stream) == 1_000

    claim = {"claim_min_idle_s": 0, "claim_page_size": 150, "batch_max_entries": 2_000}
    faulty = consumer_env(
        url, lake, "c1", stream, fault_crash_at="mid_claim", fault_crash_on_batch=2, **claim
    )
    assert run_consumer(faulty, log=tmp_path / "crash.log") == -signal.SIGKILL
    owners = {c["name"]: c["pending"] for c in client.xpending(stream, "lake")["consumers"]}
    assert owners[b"c1"] == 300 and owners[b"ghost"] == 700  # two pages claimed, then killed

    healthy = consumer_env(url, lake, "c1", stream, **claim)
    assert run_consumer(healthy, log=tmp_path / "recover.log") == 0
    assert_table_exact(lake, updates)
    assert_current_exact(lake, updates)
    assert group_pending(url, stream) == 0


def test_three_consumers_one_killed_for_good(
    redis_url: str, lake: Lake, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(9_000, seed=21)
    common = {"batch_max_entries": 400, "claim_min_idle_s": 1, "claim_interval_s": 0.5}

    def start(name: str, **extra: object) -> subprocess.Popen[bytes]:
        env = consumer_env(redis_url, lake, name, stream, **common, **extra)
        return start_consumer(env, log=tmp_path / f"{name}.log")

    procs = {"c1": start("c1"), "c3": start("c3")}
    publish(redis_url, stream, updates[:3_000])
    # Joins mid-run and dies holding its first batch; it is never restarted.
    procs["c2"] = start("c2", fault_crash_at="after_read", fault_crash_on_batch=1)
    try:
        for first in range(3_000, len(updates), 300):
            publish(redis_url, stream, updates[first : first + 300])
            time.sleep(0.05)
        assert procs["c2"].wait(timeout=60) == -signal.SIGKILL
        client = redis.Redis.from_url(redis_url)
        wait_until(
            lambda: group_pending(redis_url, stream) == 0 and _all_delivered(client, stream), 90
        )
        for name in ("c1", "c3"):
            procs[name].send_signal(signal.SIGTERM)
            assert procs[name].wait(timeout=30) == 0
    finally:
        for proc in procs.values():
            kill(proc)
    assert_table_exact(lake, updates)
    assert_current_exact(lake, updates)


def _all_delivered(client: redis.Redis, stream: str) -> bool:
    group = next(g for g in client.xinfo_groups(stream) if g["name"] == b"lake")
    last = client.xrevrange(stream, count=1)[0][0]  # type: ignore[index]
    return bool(group["last-delivered-id"] == last)


def test_randomized_sigkill_and_restart(
    redis_url: str, lake: Lake, stream: str, tmp_path: Path
) -> None:
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    updates = make_updates(12_000, seed=seed % 97)
    # Producer retries: ~5% of updates are written twice.
    doubled = [u for u in updates for _ in range(2 if rng.random() < 0.05 else 1)]
    publish(redis_url, stream, doubled)
    common = {"batch_max_entries": rng.choice([200, 500, 1_000]), "claim_min_idle_s": 0.5,
              "claim_interval_s": 0.3}  # fmt: skip
    names = ["c1", "c2"]
    procs = {
        n: start_consumer(
            consumer_env(redis_url, lake, n, stream, **common), log=tmp_path / f"{n}.log"
        )
        for n in names
    }
    try:
        for _ in range(6):
            time.sleep(rng.uniform(0.3, 1.8))
            victim = rng.choice(names)
            kill(procs[victim])
            procs[victim] = start_consumer(
                consumer_env(redis_url, lake, victim, stream, **common),
                log=tmp_path / f"{victim}.log",
            )
    finally:
        for proc in procs.values():
            kill(proc)
    # Recover everything with a drain run per name.
    for name in names:
        assert run_consumer(consumer_env(redis_url, lake, name, stream, **common)) == 0, (
            f"seed {seed}"
        )
    assert group_pending(redis_url, stream) == 0, f"seed {seed}"
    assert_table_exact(lake, updates)
    assert_current_exact(lake, updates)
