"""Transient Redis failures and a password that changes while running: stay up, say so
on /healthz and in the metrics, recover by themselves, lose nothing.

Real redis-server processes owned by the test (CONFIG SET and ACL SETUSER change
them), real Delta tables, real consumer processes; the producer's outbox runs
in-process against the same real server.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway_sim.simulator import SimulatorConfig, SimulatorThread
from infra.redis_server import RedisServer, free_port, server_version
from producer.outbox import Outbox
from shared.wire import encode_payload
from tests.conftest import RedisTarget
from tests.helpers import (
    REPO_ROOT,
    assert_current_exact,
    assert_table_exact,
    consumer_env,
    group_pending,
    kill,
    make_updates,
    publish,
    start_consumer,
    table_rows,
    wait_until,
)
from tests.producer_harness import until
from tests.redis_users import admin_command, consumer_keys, set_user

POISON = {"v": b"1", "payload": b"{not json"}


@pytest.fixture
def own_redis(redis_target: RedisTarget) -> Iterator[str]:
    """A server this test may reconfigure (never a shared one)."""
    if redis_target.server is None:
        pytest.skip("needs a redis-server of its own to reconfigure")
    yield redis_target.url


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""  # not listening yet


def _series(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"no series {series}"
    return float(match.group(1))


def _counted(port: int, series: str) -> float:
    """A series' value from /metrics, 0 while it is not there."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", _get(port, "/metrics")[1], re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _fill_memory(client: redis.Redis) -> None:
    """maxmemory below what is used, under noeviction: every write is refused (OOM)."""
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(used // 2))
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("probe", "x")


def _rows(lake: Path) -> int:
    return len(table_rows(lake)) if (lake / "position_updates").exists() else 0


def test_consumer_under_maxmemory_starts_commits_and_settles_once_freed(
    own_redis: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(500, seed=41)
    client = redis.Redis.from_url(own_redis)
    client.xgroup_create(stream, "lake", id="0", mkstream=True)
    publish(own_redis, stream, updates[:450])
    client.xadd(stream, POISON)  # type: ignore[arg-type]
    publish(own_redis, stream, updates[450:])
    _fill_memory(client)
    port = free_port()
    env = consumer_env(own_redis, lake, "c1", stream, metrics_port=port, batch_max_entries=100)
    proc = start_consumer(env, log=tmp_path / "c.log")
    try:
        # XGROUP CREATE is refused (OOM), the group exists: the consumer starts, reads
        # (XREADGROUP is allowed), commits, and acknowledges batches without dead
        # letters (a lone XACK is allowed); the batch with the poison entry cannot
        # settle (its MULTI is refused) and stays pending, with the ones after it.
        wait_until(lambda: _rows(lake) == 500, timeout=60)
        wait_until(lambda: _get(port, "/healthz")[0] == 503, timeout=30)
        reason = _get(port, "/healthz")[1]
        assert "OOM" in reason, reason
        metrics = _get(port, "/metrics")[1]
        assert _series(metrics, "poslake_consumer_redis_ok") == 0.0
        assert _series(metrics, 'poslake_consumer_redis_errors_total{code="OOM"}') >= 1
        pending = group_pending(own_redis, stream)
        assert 0 < pending <= 101, pending  # the poison's batch and the last one at most
        assert client.xlen(f"{stream}:dlq") == 0
        assert proc.poll() is None

        client.config_set("maxmemory", "0")
        wait_until(lambda: group_pending(own_redis, stream) == 0, timeout=30)
        wait_until(lambda: _get(port, "/healthz")[0] == 200, timeout=30)
        metrics = _get(port, "/metrics")[1]
        assert _series(metrics, "poslake_consumer_redis_ok") == 1.0
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        kill(proc)
    assert code == 0, (tmp_path / "c.log").read_text()[-3000:]
    assert_table_exact(lake, updates)
    assert_current_exact(lake, updates)
    assert client.xlen(f"{stream}:dlq") == 1
    client.close()


def test_consumer_waits_for_memory_to_create_its_group(
    own_redis: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(200, seed=42)
    publish(own_redis, stream, updates)
    client = redis.Redis.from_url(own_redis)
    _fill_memory(client)
    proc = start_consumer(consumer_env(own_redis, lake, "c1", stream), drain=True)
    try:
        with pytest.raises(AssertionError):  # no group can be made: it waits, stays up
            wait_until(lambda: proc.poll() is not None, timeout=3)
        client.config_set("maxmemory", "0")
        assert proc.wait(timeout=60) == 0
    finally:
        kill(proc)
    assert_table_exact(lake, updates)
    client.close()


def test_consumer_waits_out_a_changed_password(
    own_redis: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(600, seed=43)
    url = set_user(own_redis, "consumer", "canary-pw-1", *consumer_keys(stream), "+@all")
    port = free_port()
    env = consumer_env(url, lake, "c1", stream, metrics_port=port)
    proc = start_consumer(env, log=tmp_path / "c.log")
    try:
        publish(own_redis, stream, updates[:300])
        wait_until(lambda: _rows(lake) == 300 and group_pending(own_redis, stream) == 0, 60)
        # The password changes under the running consumer; its connections are cut.
        admin_command(own_redis, "ACL", "SETUSER", "consumer", "resetpass", ">canary-pw-2")
        admin_command(own_redis, "CLIENT", "KILL", "USER", "consumer")
        publish(own_redis, stream, updates[300:])
        wait_until(lambda: "WRONGPASS" in _get(port, "/healthz")[1], timeout=30)
        assert _get(port, "/healthz")[0] == 503
        metrics = _get(port, "/metrics")[1]
        assert _series(metrics, 'poslake_consumer_redis_errors_total{code="WRONGPASS"}') >= 1
        assert proc.poll() is None
        assert _rows(lake) == 300  # nothing read meanwhile
        admin_command(own_redis, "ACL", "SETUSER", "consumer", ">canary-pw-1")
        wait_until(lambda: _rows(lake) == 600 and group_pending(own_redis, stream) == 0, 60)
        wait_until(lambda: _get(port, "/healthz")[0] == 200, timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        kill(proc)
    assert code == 0
    log = (tmp_path / "c.log").read_text()
    assert "Traceback" not in log and "canary-pw" not in log
    assert_table_exact(lake, updates)


def test_outbox_keeps_everything_through_a_changed_password_and_oom(
    own_redis: str, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(300, seed=44)
    url = set_user(own_redis, "producer", "canary-pw-1", f"~{stream}", "+@all")
    admin = redis.Redis.from_url(own_redis)

    async def scenario() -> None:
        outbox = Outbox(url, stream, spool_path=tmp_path / "s.spool", memory_limit=50,
                        retry_initial_s=0.02, retry_max_s=0.2)  # fmt: skip
        await outbox.check_access()
        assert not admin.exists(stream)  # the probe wrote nothing
        outbox.start()
        stamp = 1_000_000
        for update in updates[:50]:
            stamp += 1
            outbox.put(stamp, update)
        await until(lambda: outbox.buffered == 0 and admin.xlen(stream) == 50)
        assert outbox.health.ok

        admin_command(own_redis, "ACL", "SETUSER", "producer", "resetpass", ">canary-pw-2")
        admin_command(own_redis, "CLIENT", "KILL", "USER", "producer")
        for update in updates[50:150]:
            stamp += 1
            outbox.put(stamp, update)
        await until(lambda: "WRONGPASS" in outbox.health.reason())
        assert outbox.stats.spooled > 0  # memory full: the rest waits on disk
        assert outbox.health.counts()["WRONGPASS"] >= 1
        admin_command(own_redis, "ACL", "SETUSER", "producer", ">canary-pw-1")
        await until(lambda: admin.xlen(stream) == 150 and outbox.health.ok)

        # A right taken away while running: unhealthy, nothing dropped, back when granted.
        admin_command(own_redis, "ACL", "SETUSER", "producer", "-xadd")
        for update in updates[150:200]:
            stamp += 1
            outbox.put(stamp, update)
        await until(lambda: "NOPERM" in outbox.health.reason())
        assert "XADD" in outbox.health.reason()
        admin_command(own_redis, "ACL", "SETUSER", "producer", "+xadd")
        await until(lambda: admin.xlen(stream) == 200 and outbox.health.ok)

        _fill_memory(admin)
        for update in updates[200:]:
            stamp += 1
            outbox.put(stamp, update)
        await until(lambda: "OOM" in outbox.health.reason())
        assert admin.xlen(stream) == 200
        admin.config_set("maxmemory", "0")
        await until(lambda: admin.xlen(stream) == 300 and outbox.health.ok)
        assert await outbox.close(timeout_s=5)

    asyncio.run(scenario())
    entries: Any = admin.xrange(stream)
    payloads = [fields[b"payload"] for _, fields in entries]
    assert payloads == [encode_payload(u) for u in updates]  # all, once, in order
    admin.close()


def _loaded(url: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("persistence")["loading"]) == 0
    finally:
        client.close()


def _redis7() -> str | None:
    """A redis-server 7.x binary (its loading can be slowed down and stays responsive)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / "redis-server"
        if candidate.is_file() and server_version(str(candidate)).split(".")[0] >= "7":
            return str(candidate)
    return None


def test_consumer_waits_while_a_restarted_redis_is_loading(
    lake: Path, stream: str, tmp_path: Path
) -> None:
    """Redis restarts and answers LOADING for seconds: retried, unhealthy, then exact."""
    binary = _redis7()
    if binary is None:
        pytest.skip("needs redis-server 7 (key-load-delay, loading-process-events-interval)")
    server = RedisServer(binary, tmp_path / "redis").start()
    updates = make_updates(600, seed=45)
    client = redis.Redis.from_url(server.url)
    filler = client.pipeline(transaction=False)
    for index in range(20_000):  # loading them takes seconds with key-load-delay
        filler.set(f"filler:{index}", b"x")
    filler.execute()
    port = free_port()
    log = tmp_path / "c.log"
    proc = start_consumer(consumer_env(server.url, lake, "c1", stream, metrics_port=port), log=log)
    try:
        publish(server.url, stream, updates[:300])
        wait_until(lambda: _rows(lake) == 300 and group_pending(server.url, stream) == 0, 60)
        client.save()  # the restarted server loads this snapshot
        client.close()
        server.kill()
        server = RedisServer(
            binary, server.data_dir, port=server.port,
            # µs per key: ~3 s of LOADING, answering clients (LOADING) meanwhile
            extra_args=["--key-load-delay", "150",
                        "--loading-process-events-interval-bytes", "1024"],
        ).start()  # fmt: skip
        wait_until(lambda: _loaded(server.url), timeout=60)
        loading = 'poslake_consumer_redis_errors_total{code="LOADING"}'
        wait_until(lambda: _counted(port, loading) >= 1, timeout=30)
        publish(server.url, stream, updates[300:])
        wait_until(lambda: _rows(lake) == 600 and group_pending(server.url, stream) == 0, 60)
        wait_until(lambda: _get(port, "/healthz")[0] == 200, timeout=30)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        kill(proc)
        server.stop()
    assert code == 0
    assert "code=LOADING" in log.read_text()
    assert_table_exact(lake, updates)


def test_start_up_probe_passes_and_writes_nothing(
    redis_any_version: RedisTarget, stream: str, tmp_path: Path
) -> None:
    """The producer's XADD probe (ID 0-0) is refused after the ACL check, on 6.2 and 7."""
    url = set_user(redis_any_version.url, "producer", "pw", f"~{stream}", "+@all")
    for explicit in (False, True):
        outbox = Outbox(url, stream, spool_path=tmp_path / "s.spool", explicit_ids=explicit)

        async def probe(box: Outbox = outbox) -> None:
            await box.check_access()
            assert box.health.ok, box.health.reason()
            await box.close(0)

        asyncio.run(probe())
    admin = redis.Redis.from_url(redis_any_version.url)
    assert not admin.exists(stream)
    admin.close()


def test_producer_healthz_shows_a_changed_password_and_recovers(
    own_redis: str, stream: str, tmp_path: Path
) -> None:
    thread = SimulatorThread(SimulatorConfig(accounts=["DU1"], positions=20, rate=200))
    ib_port = thread.start()
    url = set_user(own_redis, "producer", "canary-pw-1", f"~{stream}", "+@all")
    port = free_port()
    env = consumer_env(url, tmp_path / "lake", "p", stream)
    env.update(
        {
            "POSLAKE_IB_PORT": str(ib_port),
            "POSLAKE_METRICS_PORT": str(port),
            "POSLAKE_PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
        }
    )
    log = tmp_path / "p.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer"],
        env=env,
        cwd=REPO_ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    admin = redis.Redis.from_url(own_redis)
    try:
        wait_until(lambda: admin.exists(stream) and _get(port, "/healthz")[0] == 200, 60)
        admin_command(own_redis, "ACL", "SETUSER", "producer", "resetpass", ">canary-pw-2")
        admin_command(own_redis, "CLIENT", "KILL", "USER", "producer")
        wait_until(lambda: "WRONGPASS" in _get(port, "/healthz")[1], timeout=30)
        assert _get(port, "/healthz")[0] == 503
        metrics = _get(port, "/metrics")[1]
        assert _series(metrics, "poslake_producer_redis_ok") == 0.0
        assert _series(metrics, 'poslake_producer_redis_errors_total{code="WRONGPASS"}') >= 1
        length = admin.xlen(stream)
        admin_command(own_redis, "ACL", "SETUSER", "producer", ">canary-pw-1")
        wait_until(lambda: _get(port, "/healthz")[0] == 200, timeout=30)
        wait_until(lambda: admin.xlen(stream) > length, timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        kill(proc)
        thread.stop()
        admin.close()
    assert code == 0
    text = log.read_text()
    assert "Traceback" not in text and "canary-pw" not in text


def test_consumer_makes_a_vanished_group_again(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(600, seed=46)
    log = tmp_path / "c.log"
    proc = start_consumer(consumer_env(redis_url, lake, "c1", stream), log=log)
    client = redis.Redis.from_url(redis_url)
    try:
        publish(redis_url, stream, updates[:300])
        wait_until(lambda: _rows(lake) == 300 and group_pending(redis_url, stream) == 0, 60)
        client.xgroup_destroy(stream, "lake")
        publish(redis_url, stream, updates[300:])
        wait_until(lambda: _rows(lake) == 600 and group_pending(redis_url, stream) == 0, 60)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        kill(proc)
        client.close()
    assert code == 0
    assert "consumer group missing, creating it again" in log.read_text()
    assert_table_exact(lake, updates)
