"""Redis that survives losing its master: a real master, replica and three sentinels on
loopback (failover in ~3 s), the real producer on the gateway simulator and consumer
processes, all reaching Redis by a ``redis+sentinel://`` URL.

The master is killed mid-run after its replica was cut off, so it dies holding
entries no replica has. Without ``POSLAKE_PRODUCER_WAIT_REPLICAS`` those entries,
which the producer was told were written, are lost, and nothing else is; with it,
the producer takes them as not yet published, sends them again to the new master
and the table holds every update once.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from infra.redis_conn import RedisTarget, sync_client
from infra.redis_server import SentinelSet, find_redis_server
from producer.outbox import Outbox
from producer.replica_wait import ReplicaWait
from shared.errors import RedisRefused
from shared.model import PositionUpdate
from shared.wire import decode_entry
from tests.helpers import (
    Lake,
    consumer_env,
    kill,
    run_consumer,
    run_python,
    start_consumer,
)
from tests.producer_harness import (
    assert_matches_record,
    expected_kinds,
    producer_settings,
    running_producer,
    running_simulator,
    until,
)
from tests.redis_users import set_user

PASSWORD = "sentinel-test-password"


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[SentinelSet]:
    binary = find_redis_server()
    if binary is None:
        pytest.skip("needs a redis-server binary")
    servers = SentinelSet(binary, tmp_path / "ha", password=PASSWORD).start()
    try:
        yield servers
    finally:
        servers.stop()


def test_sentinel_urls_parse_and_never_show_the_password() -> None:
    target = RedisTarget.parse("redis+sentinel://:pw@h1:26380,h2,[::1]:26381/main/2")
    assert target.sentinels == (("h1", 26380), ("h2", 26379), ("::1", 26381))
    assert (target.master_name, target.db, target.password, target.tls) == ("main", 2, "pw", None)
    assert "pw" not in target.redacted and "pw" not in repr(target)
    assert target.where == "master 'main' via sentinels h1:26380,h2:26379,::1:26381"
    tls = RedisTarget.parse("rediss+sentinel://h1/main?ssl_cert_reqs=none")
    assert tls.tls is not None and tls.tls.cert_reqs == "none" and tls.db == 0
    for bad, message in [
        ("redis+sentinel://h1", "master's name"),
        ("redis+sentinel:///main", "at least one sentinel"),
        ("redis+sentinel://h1:99999/main", "port"),
        ("redis+sentinel://h1/main/x", "database"),
        ("redis+sentinel://h1/main?ssl_ca_certs=/x", "rediss+sentinel"),
        ("redis+sentinel://::1:26379/main", "in brackets"),
        ("redis+sentinel://[::1/main", "[IPv6 address]"),
        ("redis+sentinel://h1,[::1]x/main", "bracketed"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            RedisTarget.parse(bad)


def _table_updates(lake: Lake) -> list[Any]:
    rows = lake.table("position_updates").to_pyarrow_table().to_pylist()
    rows.sort(key=lambda r: r["timestamp"])
    return [SimpleNamespace(**row) for row in rows]


def _entries(client: Any, stream: str, after: str) -> list[tuple[str, PositionUpdate]]:
    found = client.xrange(stream, min=f"({after}" if after != "0-0" else "-")
    return [(i.decode(), decode_entry(f)) for i, f in found if b"kind" not in f]


@pytest.mark.parametrize(
    ("wait_replicas", "explicit"),
    [(0, False), (1, False), (1, True)],
    ids=["no-wait", "wait-1", "wait-1-explicit-ids"],
)
def test_failover_mid_run(
    ha: SentinelSet, stream: str, tmp_path: Path, wait_replicas: int, explicit: bool
) -> None:
    """Producer and consumers follow the new master by themselves; what is lost is
    exactly what the README says can be: without waiting, the entries the old master
    accepted after its replica was cut off; with waiting, nothing."""
    lake = Lake(str(tmp_path / "lake"))
    assert ha.master is not None and ha.replica is not None
    old_master: Any = sync_client(ha.master.url)
    replica: Any = sync_client(ha.replica.url)

    def env(name: str) -> dict[str, str]:
        return consumer_env(
            ha.url, lake, name, stream, batch_max_entries=200, claim_min_idle_s=1,
        )  # fmt: skip

    logs = [tmp_path / f"c{n}.log" for n in range(2)]
    consumers = [start_consumer(env(f"c{n}"), log=logs[n]) for n in range(2)]
    unreplicated: list[tuple[str, PositionUpdate]] = []

    async def scenario() -> list[Any]:
        config = {"accounts": ["DU1"], "positions": 30, "rate": 150}
        async with running_simulator(**config) as sim:
            settings = producer_settings(
                ha.url, stream, sim.port, tmp_path / "spool",
                producer_wait_replicas=wait_replicas, producer_wait_timeout_ms=100,
                producer_explicit_ids=explicit,
            )  # fmt: skip
            async with running_producer(settings) as producer:
                await until(lambda: int(replica.xlen(stream)) >= 150, 20)
                # The consumers sleep through the window: nothing read from the old
                # master after the cut reaches the table that way.
                for process in consumers:
                    process.send_signal(signal.SIGSTOP)
                ha.cut_replication()
                await asyncio.sleep(0.3)  # the link is down
                (cut_at,) = replica.xrevrange(stream, count=1)
                await asyncio.sleep(1.0)  # ~150 updates the replica never gets
                # (a loaded machine may take longer to publish the first of them)
                after_cut = cut_at[0].decode()
                await until(lambda: bool(_entries(old_master, stream, after_cut)), 15)
                unreplicated.extend(_entries(old_master, stream, after_cut))
                assert unreplicated, "the old master accepted nothing after the cut"
                ha.master.kill()  # type: ignore[union-attr]
                await until(lambda: ha.current_master() == ("127.0.0.1", ha.replica.port), 20)  # type: ignore[union-attr]
                for process in consumers:
                    process.send_signal(signal.SIGCONT)
                if wait_replicas:
                    # A replica to confirm again: the old master, back as the new one's.
                    ha.restart_old_master()
                await asyncio.sleep(2.0)  # the producer publishes to the new master
                sim.pause()
                outbox = producer.outbox
                await until(lambda: outbox.buffered == 0 and not outbox._spooling, 30)
                if wait_replicas:
                    assert outbox.stats.unreplicated > 0  # WAIT held them back
                    assert outbox.health.counts().get("UNREPLICATED", 0) > 0
                sent = expected_kinds(sim.record, "DU1", set())
        return sent

    try:
        sent = asyncio.run(scenario())
    finally:
        for process in consumers:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in consumers]
        for process in consumers:
            kill(process)
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    assert run_consumer(env("c-drain")) == 0
    table = _table_updates(lake)
    keys = [(u.account, u.conid, u.timestamp) for u in table]
    assert len(keys) == len(set(keys)), "a key landed twice"
    stamps = [u.timestamp for _, u in unreplicated]
    assert len(stamps) == len(set(stamps)), "an unconfirmed chunk was written twice"
    if wait_replicas:
        assert_matches_record(table, sent)  # every update, once
    else:
        # Consumers may have read and committed some of them before the master died:
        # those are in the table. The rest are lost, and nothing else is.
        landed = {u.timestamp for u in table}
        lost = [SimpleNamespace(**_row(u)) for _, u in unreplicated if u.timestamp not in landed]
        assert lost, "the window lost nothing: the test did not cut what it meant to"
        merged = sorted([*table, *lost], key=lambda u: u.timestamp)
        assert_matches_record(merged, sent)


def _row(update: PositionUpdate) -> dict[str, Any]:
    return {f: getattr(update, f) for f in update.__struct_fields__}


def test_a_client_follows_the_master_through_a_failover(ha: SentinelSet) -> None:
    client: Any = sync_client(ha.url, socket_timeout=2, socket_connect_timeout=1)
    client.set("before", "1")
    assert ha.master is not None and ha.replica is not None
    ha.master.kill()
    written = False
    for _ in range(200):
        try:
            client.set("after", "1")
            written = True
            break
        except redis.ConnectionError:  # MasterNotFoundError too, until the switch
            time.sleep(0.1)
    assert written and client.get("before") == b"1"
    assert ha.current_master() == ("127.0.0.1", ha.replica.port)


def _status_lag(redis_url: str, stream: str, tmp_path: Path) -> int:
    env = consumer_env(redis_url, tmp_path / "lake", "status", stream)
    done = run_python(["-m", "poslake", "status", "--json"], env)
    assert done.returncode == 0, done.stderr
    (group,) = json.loads(done.stdout)["groups"]
    assert not group["lag_at_least"]
    lag: int = group["lag"]
    return lag


def _read_and_ack(client: Any, stream: str, count: int) -> None:
    client.xgroup_create(stream, "lake", id="0")
    ((_, entries),) = client.xreadgroup("lake", "c1", {stream: ">"}, count=count)
    client.xack(stream, "lake", *[entry_id for entry_id, _ in entries])


def test_lag_is_true_after_a_promotion(ha: SentinelSet, stream: str, tmp_path: Path) -> None:
    assert ha.master is not None and ha.replica is not None
    client: Any = sync_client(ha.url, socket_timeout=2)
    for i in range(100):
        client.xadd(stream, {"n": i})
    _read_and_ack(client, stream, 40)
    assert client.wait(1, 2000) == 1
    ha.master.kill()
    for _ in range(200):
        if ha.current_master() == ("127.0.0.1", ha.replica.port):
            break
        time.sleep(0.1)
    promoted: Any = sync_client(ha.replica.url)
    for _ in range(100):  # until it takes writes as a master
        if promoted.info("replication")["role"] == "master":
            break
        time.sleep(0.1)
    (group,) = promoted.xinfo_groups(stream)
    assert group.get("lag") is None  # what Redis says after a promotion (6.2: no field)
    assert _status_lag(ha.url, stream, tmp_path) == 60


def test_lag_is_true_after_an_aof_restart(redis_aof: Any, stream: str, tmp_path: Path) -> None:
    server = redis_aof.server
    client: Any = redis.Redis.from_url(redis_aof.url)
    for i in range(300):
        client.xadd(stream, {"n": i})
    _read_and_ack(client, stream, 300)
    server.kill()
    server.start()
    client = redis.Redis.from_url(redis_aof.url)
    assert _status_lag(redis_aof.url, stream, tmp_path) == 0  # drained
    for i in range(30):
        client.xadd(stream, {"n": i})
    (group,) = client.xinfo_groups(stream)
    assert group.get("entries-read") is None  # Redis cannot tell after the restart
    assert _status_lag(redis_aof.url, stream, tmp_path) == 30


@pytest.mark.parametrize("aof", [False, True], ids=["wait", "waitaof"])
def test_waiting_without_the_right_stops_the_producer_at_start(
    redis_url: str, stream: str, tmp_path: Path, aof: bool
) -> None:
    url = set_user(redis_url, "producer", "pw-producer", f"~{stream}", "+xadd")
    outbox = Outbox(
        url, stream,
        spool_path=tmp_path / "spool", wait=ReplicaWait(1, 100, aof),
    )  # fmt: skip
    command = "WAITAOF" if aof else "WAIT"
    with pytest.raises(RedisRefused, match=command):
        asyncio.run(outbox.check_access())


def test_waiting_with_the_right_starts(redis_url: str, stream: str, tmp_path: Path) -> None:
    url = set_user(redis_url, "producer", "pw-producer", f"~{stream}", "+xadd", "+wait")
    outbox = Outbox(url, stream, spool_path=tmp_path / "spool", wait=ReplicaWait(1, 100))
    asyncio.run(outbox.check_access())  # no replica needed to start: WAIT 0 0 answers
    assert outbox.health.ok


@pytest.mark.parametrize("granted", [True, False], ids=["with-xsetid", "without-xsetid"])
def test_after_a_failover_no_stream_id_is_handed_out_twice(
    redis_url: str, stream: str, tmp_path: Path, granted: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A new master that lacks the newest entries (lost with the old one) would give
    their IDs to new entries: the producer moves the stream's last ID past the newest it
    got (XSETID) when it reconnects. Here the lost entries are deleted and the stream's
    last ID set back, as a promoted replica would have them, and the connection cut."""
    rules = [f"~{stream}", "+xadd", "+xrevrange", *(["+xsetid"] if granted else [])]
    url = set_user(redis_url, "producer", "pw-producer", *rules)
    admin: Any = redis.Redis.from_url(redis_url)

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        async with running_simulator(accounts=["DU1"], positions=20, rate=200) as sim:
            settings = producer_settings(url, stream, sim.port, tmp_path / "spool")
            async with running_producer(settings) as producer:
                outbox = producer.outbox
                await until(lambda: outbox.stats.published >= 60)
                sim.pause()
                await until(lambda: outbox.buffered == 0)
                entries = admin.xrange(stream)
                lost = [entry_id for entry_id, _ in entries[-20:]]
                admin.xdel(stream, *lost)
                admin.execute_command("XSETID", stream, entries[-21][0])
                admin.execute_command("CLIENT", "KILL", "USER", "producer")
                sim.resume()
                await until(lambda: int(admin.xlen(stream)) >= len(entries) + 20)
                moved = outbox.stats.ids_moved_past
                assert moved == (1 if granted else 0)
                assert outbox.health.ok
                after = [i for i, _ in admin.xrange(stream)][len(entries) - 20 :]
                return lost, after

    with caplog.at_level("WARNING", logger="producer.outbox"):
        lost, after = asyncio.run(scenario())
    newest_lost = max(_id_key(i) for i in lost)
    if granted:
        assert all(_id_key(i) > newest_lost for i in after)  # none reuses a lost one's
        assert "last ID moved past it" in caplog.text
    else:
        warned = [r for r in caplog.records if "cannot keep the stream's IDs" in r.getMessage()]
        assert [getattr(r, "command", None) for r in warned] == ["XSETID"]
        assert "NOPERM" in getattr(warned[0], "error", "")


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)


def test_replica_wait_commands_and_replies() -> None:
    """WAIT's and WAITAOF's command and reply as Redis documents them (WAITAOF itself
    needs Redis 7.2, which this machine lacks: its reply shape is checked here)."""
    assert ReplicaWait().command is None  # off by default
    wait = ReplicaWait(2, 300)
    assert wait.command == b"*3\r\n$4\r\nWAIT\r\n$1\r\n2\r\n$3\r\n300\r\n"
    assert wait.confirmed(2) and wait.confirmed(3) and not wait.confirmed(1)
    aof = ReplicaWait(1, 300, aof=True)
    assert aof.command == b"*4\r\n$7\r\nWAITAOF\r\n$1\r\n1\r\n$1\r\n1\r\n$3\r\n300\r\n"
    assert aof.confirmed([1, 1]) and aof.confirmed([1, 2])
    assert not aof.confirmed([0, 1]) and not aof.confirmed([1, 0]) and not aof.confirmed(1)
    local_only = ReplicaWait(0, 300, aof=True)  # the master's own fsync only
    assert local_only.command is not None and local_only.confirmed([1, 0])
