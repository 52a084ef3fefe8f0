"""Failures around the consumer: unwritable lake, Redis restarts, slow consumers, SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from deltalake import DeltaTable

from infra.redis_server import RedisServer
from tests.conftest import RedisTarget
from tests.helpers import (
    assert_table_exact,
    consumer_env,
    group_pending,
    kill,
    make_updates,
    publish,
    run_consumer,
    start_consumer,
    table_rows,
    wait_until,
)


@contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """Make ``folder`` refuse new files, also for root (chattr +i), for the duration."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("running as root without chattr: cannot make a folder read-only")
        subprocess.run(["chattr", "+i", str(folder)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)


def test_failed_commit_loses_nothing_and_lands_when_writable(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    first, second = make_updates(1_000, seed=8)[:400], make_updates(1_000, seed=8)[400:]
    publish(redis_url, stream, first)
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=300)
    assert run_consumer(env, log=tmp_path / "c.log") == 0
    log_dir = lake / "position_updates" / "_delta_log"
    version = DeltaTable(str(lake / "position_updates")).version()

    proc = start_consumer(env, log=tmp_path / "c.log")
    try:
        with unwritable(log_dir):
            publish(redis_url, stream, second)
            time.sleep(3)  # several failed commits and retries
            assert proc.poll() is None, "consumer died on a failed commit"
            assert DeltaTable(str(lake / "position_updates")).version() == version
            assert group_pending(redis_url, stream) > 0  # nothing acked
        wait_until(lambda: group_pending(redis_url, stream) == 0, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        kill(proc)
    assert "commit failed, will retry" in (tmp_path / "c.log").read_text()
    assert_table_exact(lake, first + second)


def test_consumer_survives_redis_restart(
    redis_aof: RedisTarget, lake: Path, stream: str, tmp_path: Path
) -> None:
    server = redis_aof.server
    assert server is not None
    updates = make_updates(3_000, seed=12)
    env = consumer_env(server.url, lake, "c1", stream, batch_max_entries=200)
    proc = start_consumer(env, log=tmp_path / "c.log")
    try:
        publish(server.url, stream, updates[:1_500])
        wait_until((lake / "position_updates" / "_delta_log").exists, timeout=30)
        wait_until(lambda: len(table_rows(lake)) > 0, timeout=30)
        time.sleep(1.1)  # AOF everysec: let the last second reach the disk
        server.kill()
        time.sleep(1.0)
        restarted = RedisServer(
            server.binary, server.data_dir, port=server.port, appendonly=True, appendfsync="always"
        ).start()
        redis_aof.server = restarted
        publish(restarted.url, stream, updates[1_500:])
        client = redis.Redis.from_url(restarted.url)
        wait_until(
            lambda: (
                group_pending(restarted.url, stream) == 0
                and len(table_rows(lake)) >= len({u.key for u in updates})
            ),
            timeout=60,
        )
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert client.xlen(stream) >= 3_000
    finally:
        kill(proc)
        if redis_aof.server is not None:
            redis_aof.server.stop()
    assert "redis unavailable, retrying" in (tmp_path / "c.log").read_text()
    assert_table_exact(lake, updates)


def test_slow_consumer_and_its_claimer_do_not_both_write(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    """A consumer paused while holding a batch has it claimed; when it wakes it must not
    write the rows a second time."""
    updates = make_updates(800, seed=14)
    slow = start_consumer(
        consumer_env(redis_url, lake, "slow", stream, batch_max_entries=10_000, batch_max_wait_s=4),
        log=tmp_path / "slow.log",
    )
    try:
        publish(redis_url, stream, updates)
        wait_until(lambda: group_pending(redis_url, stream) == len(updates), timeout=20)
        slow.send_signal(signal.SIGSTOP)  # holds the whole batch, not yet committed
        claimer = consumer_env(redis_url, lake, "claimer", stream, claim_min_idle_s=0.5)
        time.sleep(0.6)
        assert run_consumer(claimer, log=tmp_path / "claimer.log") == 0
        assert_table_exact(lake, updates)
        version = DeltaTable(str(lake / "position_updates")).version()
        slow.send_signal(signal.SIGCONT)
        time.sleep(5)  # its batch window closes and it commits what it holds
        slow.send_signal(signal.SIGTERM)
        assert slow.wait(timeout=30) == 0
    finally:
        slow.send_signal(signal.SIGCONT)
        kill(slow)
    assert "duplicates=800" in (tmp_path / "slow.log").read_text()
    assert DeltaTable(str(lake / "position_updates")).version() == version
    assert_table_exact(lake, updates)
    assert group_pending(redis_url, stream) == 0


def test_sigterm_commits_and_acks_the_batch_in_hand(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(500, seed=15)
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=10_000, batch_max_wait_s=30)
    proc = start_consumer(env, log=tmp_path / "c.log")
    try:
        publish(redis_url, stream, updates)
        wait_until(lambda: group_pending(redis_url, stream) == len(updates), timeout=20)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - started < 10  # did not wait out the 30 s batch window
    finally:
        kill(proc)
    assert_table_exact(lake, updates)
    assert group_pending(redis_url, stream) == 0
