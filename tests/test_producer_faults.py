"""The producer recovers by itself: IB drops, refusals, silence, link codes, Redis crashes.

Each test drives a fault through the simulator's controls or by killing a real
redis-server, then checks the stream entry by entry against the simulator's record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from infra import redis_conn
from infra.redis_server import RedisServer, find_redis_server
from producer.outbox import Outbox
from producer.resp import RespConnection, pack_command
from shared.wire import decode_entry, encode_payload
from tests.conftest import RedisTarget
from tests.helpers import make_updates
from tests.producer_harness import (
    assert_matches_record,
    producer_settings,
    read_stream,
    running_producer,
    running_simulator,
    settle,
    stream_length,
    until,
    until_at_least,
)

pytestmark = pytest.mark.usefixtures("no_decoder_errors")
ACCOUNT = "DU100001"


def test_drop_and_reconnect(redis_url: str, stream: str, tmp_path: Path) -> None:
    """A gateway that drops every connection (daily restart): reconnect, resubscribe, and
    publish the snapshot IB resends as new observations."""

    async def scenario() -> None:
        async with running_simulator(accounts=[ACCOUNT], positions=30, rate=100) as sim:
            settings = producer_settings(redis_url, stream, sim.port, tmp_path / "spool")
            async with running_producer(settings) as producer:
                await until(lambda: sim.events >= 100)
                for round_ in range(2):
                    await settle(sim, redis_url, stream, ACCOUNT)
                    assert sim.drop_connections() == 1
                    await until_at_least(lambda: producer.source.stats.connects, round_ + 2)
                    sim.resume()
                    await until_at_least(lambda: sim.events, sim.events + 100)
                sent = await settle(sim, redis_url, stream, ACCOUNT)
                assert await producer.stop()
            assert producer.source.stats.disconnects == 2
            # Three snapshots of the whole book plus the live pushes, nothing lost.
            assert sim.connections == 3
            assert_matches_record(read_stream(redis_url, stream), sent)

    asyncio.run(scenario())


def test_client_id_in_use_backs_off_then_connects(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    """Error 326: recognised at once (not after connectAsync's timeout), backed off, retried."""

    async def scenario() -> None:
        async with running_simulator(
            accounts=[ACCOUNT], positions=20, rate=50, refused_client_ids={17}
        ) as sim:
            settings = producer_settings(
                redis_url, stream, sim.port, tmp_path / "spool", ib_connect_timeout_s=30.0
            )
            started = time.monotonic()
            async with running_producer(settings) as producer:
                await until(lambda: producer.source.stats.client_id_refusals >= 2, timeout=10)
                # Two refusals well inside one 30 s connect timeout: the race works.
                assert time.monotonic() - started < 10
                assert producer.source.stats.connects == 0
                sim.config.refused_client_ids.clear()
                await until(lambda: producer.source.stats.connects == 1, timeout=10)
                await until_at_least(lambda: sim.events, sim.events + 50)
                sent = await settle(sim, redis_url, stream, ACCOUNT)
                assert await producer.stop()
            assert sent
            assert_matches_record(read_stream(redis_url, stream), sent)

    asyncio.run(scenario())


def test_second_client_with_same_id_is_refused(redis_url: str, stream: str, tmp_path: Path) -> None:
    """The simulator refuses a client ID that a live connection holds, as TWS does."""

    async def scenario() -> None:
        async with running_simulator(accounts=[ACCOUNT], positions=10, rate=20) as sim:
            first = producer_settings(redis_url, stream, sim.port, tmp_path / "a")
            second = producer_settings(redis_url, stream, sim.port, tmp_path / "b")
            async with running_producer(first) as one:
                await until(lambda: one.source.stats.connects == 1)
                async with running_producer(second) as two:
                    await until(lambda: two.source.stats.client_id_refusals >= 1, timeout=10)
                    assert two.source.stats.connects == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("request_name", ["positions", "account_updates", "executions"])
def test_unanswered_startup_request(
    redis_url: str, stream: str, tmp_path: Path, request_name: str
) -> None:
    """A startup request left unanswered fails that connect (raiseSyncErrors); the next
    attempt succeeds and publishing goes on."""

    async def scenario() -> None:
        async with running_simulator(
            accounts=[ACCOUNT], positions=20, rate=50, unanswered=Counter({request_name: 1})
        ) as sim:
            settings = producer_settings(
                redis_url, stream, sim.port, tmp_path / "spool", ib_connect_timeout_s=1.0
            )
            # No events while the first connection fails: one sent as the producer drops
            # that connection would be in the simulator's record but never read.
            sim.pause()
            async with running_producer(settings) as producer:
                await until(lambda: producer.source.stats.connects == 1, timeout=15)
                assert sim.connections == 2  # the first connection's sync failed
                sim.resume()
                await until_at_least(lambda: sim.events, sim.events + 50)
                sent = await settle(sim, redis_url, stream, ACCOUNT)
                assert await producer.stop()
            assert_matches_record(read_stream(redis_url, stream), sent)

    asyncio.run(scenario())


def test_link_codes(
    redis_url: str, stream: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1100 is logged; 1101 (data lost) makes the producer resubscribe, and the resent
    snapshot is published; 1102 (data kept) is logged and changes nothing."""

    async def scenario() -> None:
        async with running_simulator(accounts=[ACCOUNT], positions=25, rate=80) as sim:
            settings = producer_settings(redis_url, stream, sim.port, tmp_path / "spool")
            async with running_producer(settings) as producer:
                await until(lambda: sim.events >= 80)
                before = len(await settle(sim, redis_url, stream, ACCOUNT))
                sim.resume()
                sim.send_link_code(1100)
                await asyncio.sleep(0.3)
                sim.send_link_code(1101)  # the simulator drops this session's subscriptions
                held = len(sim.portfolio.holdings_of(ACCOUNT))
                await until(lambda: stream_length(redis_url, stream) >= before + held)
                sim.send_link_code(1102)
                await until_at_least(lambda: sim.events, sim.events + 60)
                sent = await settle(sim, redis_url, stream, ACCOUNT)
                assert await producer.stop()
            assert producer.source.stats.connects == 1  # recovered without reconnecting
            assert_matches_record(read_stream(redis_url, stream), sent)

    with caplog.at_level(logging.INFO, logger="producer.ib_source"):
        asyncio.run(scenario())
    messages = " ".join(r.getMessage() for r in caplog.records)
    for code in ("1100", "1101", "1102"):
        assert code in messages


def test_quiet_gateway_is_probed_and_reconnected(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    """No data for ib_idle_probe_s: the producer asks for the current time; an unanswered
    probe means a dead link, so it reconnects and resubscribes."""

    async def scenario() -> None:
        async with running_simulator(
            accounts=[ACCOUNT], positions=15, rate=0, unanswered=Counter({"current_time": 1})
        ) as sim:
            settings = producer_settings(
                redis_url,
                stream,
                sim.port,
                tmp_path / "spool",
                ib_idle_probe_s=0.5,
                ib_connect_timeout_s=1.0,
                ib_greeks=False,  # market data would keep the gateway from being quiet
            )
            async with running_producer(settings) as producer:
                await until(lambda: producer.source.stats.probes_failed == 1, timeout=15)
                await until(lambda: producer.source.stats.connects == 2, timeout=15)
                sent = await settle(sim, redis_url, stream, ACCOUNT)
                # The second probe is answered: no further reconnects.
                await asyncio.sleep(1.5)
                assert producer.source.stats.connects == 2
                assert await producer.stop()
            assert len(sent) == 30  # two snapshots of 15 positions
            assert_matches_record(read_stream(redis_url, stream), sent)

    asyncio.run(scenario())


@pytest.mark.parametrize("explicit_ids", [False, True], ids=["auto-ids", "explicit-ids"])
def test_redis_killed_and_restarted(tmp_path: Path, stream: str, explicit_ids: bool) -> None:
    """SIGKILL the redis-server (AOF, fsync always) mid-run, restart it after a while:
    the producer buffers, spools past its memory bound, and every update the simulator
    sent reaches the stream, in order."""
    binary = find_redis_server()
    if binary is None:
        pytest.skip("needs a redis-server binary")
    server = RedisServer(binary, tmp_path / "redis", appendonly=True, appendfsync="always").start()

    async def scenario() -> None:
        async with running_simulator(accounts=[ACCOUNT], positions=30, rate=200) as sim:
            settings = producer_settings(
                server.url,
                stream,
                sim.port,
                tmp_path / "spool",
                producer_buffer_max=50,  # small, so the outage spills to the spool file
                producer_explicit_ids=explicit_ids,
            )
            async with running_producer(settings) as producer:
                await until(lambda: stream_length(server.url, stream) >= 100)
                server.kill()
                await until(lambda: producer.outbox.stats.retries >= 2)
                await until(lambda: producer.outbox.stats.spooled >= 100)
                restart_redis()
                await until_at_least(lambda: sim.events, sim.events + 100)
                sent = await settle(sim, server.url, stream, ACCOUNT)
                assert await producer.stop()
                assert producer.outbox.stats.replayed_from_spool >= 100
            assert_matches_record(read_stream(server.url, stream), sent)

    def restart_redis() -> None:
        restarted = RedisServer(
            binary, tmp_path / "redis", port=server.port, appendonly=True, appendfsync="always"
        )
        restarted.start()
        servers.append(restarted)

    servers = [server]
    try:
        asyncio.run(scenario())
    finally:
        for each in servers:
            each.stop()


def test_outbox_spools_at_exit_and_replays_in_order(tmp_path: Path, stream: str) -> None:
    """Redis down for a whole run: close() keeps everything on disk, in order; the next
    outbox on the same spool publishes it first, then what comes after."""
    binary = find_redis_server()
    if binary is None:
        pytest.skip("needs a redis-server binary")
    server = RedisServer(binary, tmp_path / "redis")  # its port, not started yet
    updates = make_updates(300)
    spool = tmp_path / "spool" / "s.spool"

    async def first_run() -> None:
        outbox = Outbox(server.url, stream, spool_path=spool, memory_limit=100,
                        retry_initial_s=0.01, retry_max_s=0.05)  # fmt: skip
        outbox.start()
        for index, update in enumerate(updates[:200]):
            outbox.put(index + 1, update)
        await asyncio.sleep(0.2)
        assert not await outbox.close(timeout_s=0.5)
        assert outbox.stats.published == 0

    async def second_run() -> None:
        outbox = Outbox(server.url, stream, spool_path=spool, memory_limit=100)
        outbox.start()
        for index, update in enumerate(updates[200:]):
            outbox.put(201 + index, update)
        await until(lambda: stream_length(server.url, stream) >= 300)
        assert await outbox.close(timeout_s=5)
        # While a spool is being replayed new updates queue behind it, on disk.
        assert outbox.stats.replayed_from_spool == 300

    asyncio.run(first_run())
    assert spool.stat().st_size > 0
    server.start()
    try:
        asyncio.run(second_run())
        assert read_stream(server.url, stream) == updates
        assert spool.stat().st_size == 0  # fully replayed, started over
    finally:
        server.stop()


def test_explicit_ids_recognise_a_retried_chunk(redis_target: RedisTarget, stream: str,
                                                tmp_path: Path) -> None:  # fmt: skip
    """A chunk sent again after its replies were lost is not written twice."""
    updates = make_updates(20)

    async def scenario() -> None:
        outbox = Outbox(redis_target.url, stream, spool_path=tmp_path / "s.spool",
                        explicit_ids=True)  # fmt: skip
        entries = [(1_800_000_000_000_000 + i, update) for i, update in enumerate(updates)]
        for stamp, update in entries[:12]:
            outbox.put(stamp, update)
        outbox.start()
        await until(lambda: stream_length(redis_target.url, stream) == 12)
        # What a retry after a lost reply does: the same entries again, then new ones.
        for stamp, update in entries:
            outbox.put(stamp, update)
        await until(lambda: outbox.buffered == 0)
        assert await outbox.close(timeout_s=5)
        assert outbox.stats.recognised_duplicates == 12

    asyncio.run(scenario())
    assert read_stream(redis_target.url, stream) == updates


def test_resp_connection_round_trip(redis_target: RedisTarget) -> None:
    async def scenario() -> None:
        connection = await RespConnection.open(redis_conn.RedisTarget.parse(redis_target.url))
        (pong,) = await connection.execute([pack_command(b"PING")])
        assert pong == b"PONG"
        connection.close()

    asyncio.run(scenario())


def test_explicit_ids_never_drop_an_update_behind_a_server_assigned_entry(
    redis_target: RedisTarget, stream: str, tmp_path: Path
) -> None:
    """An entry added with '*' in between (a requeued dead letter, another writer) puts the
    stream's top past our stamps: the refused updates are looked up, found missing, and
    written with server-assigned IDs, never counted as duplicates."""
    updates = make_updates(8)
    client: Any = redis.Redis.from_url(redis_target.url)

    async def scenario() -> None:
        outbox = Outbox(
            redis_target.url, stream, spool_path=tmp_path / "s.spool", explicit_ids=True
        )
        outbox.start()
        stamp = 1_700_000_000_000_000  # in 2023: behind the '*' entry added now
        outbox.put(stamp, updates[0])
        await until(lambda: stream_length(redis_target.url, stream) == 1)
        client.xadd(stream, {"v": b"1", "payload": b"{}"})  # e.g. a requeued dead letter
        for offset, update in enumerate(updates[1:], start=1):
            outbox.put(stamp + offset, update)
        await until(lambda: outbox.buffered == 0)
        assert await outbox.close(timeout_s=5)
        assert outbox.stats.recognised_duplicates == 0
        assert outbox.stats.server_assigned_ids == 7

    asyncio.run(scenario())
    kept = [decode_entry(f) for _, f in client.xrange(stream) if f[b"payload"] != b"{}"]
    assert kept == updates


def test_spool_replay_after_a_crash_between_xadd_and_offset(
    redis_target: RedisTarget, stream: str, tmp_path: Path
) -> None:
    """A spool whose first entries already reached the stream (killed before the offset
    was saved): with explicit IDs those are recognised, the rest written once."""
    updates = make_updates(6)
    stamps = [1_800_000_000_000_000 + i for i in range(6)]
    spool = tmp_path / "spool" / "s.spool"
    spool.parent.mkdir()
    spool.write_bytes(
        b"".join(b"%d %s\n" % (s, encode_payload(u)) for s, u in zip(stamps, updates, strict=True))
    )
    client: Any = redis.Redis.from_url(redis_target.url)
    for stamp, update in list(zip(stamps, updates, strict=True))[:2]:
        ms, us = divmod(stamp, 1000)
        client.xadd(stream, {"v": b"1", "payload": encode_payload(update)}, id=f"{ms}-{us}")

    async def scenario() -> None:
        outbox = Outbox(redis_target.url, stream, spool_path=spool, explicit_ids=True)
        outbox.start()
        await until(lambda: stream_length(redis_target.url, stream) == 6)
        assert await outbox.close(timeout_s=5)
        assert outbox.stats.recognised_duplicates == 2
        assert outbox.stats.server_assigned_ids == 0

    asyncio.run(scenario())
    assert read_stream(redis_target.url, stream) == updates


def test_a_torn_spool_line_is_dropped_not_sent(
    redis_target: RedisTarget, stream: str, tmp_path: Path
) -> None:
    """Killed mid-write: the partial last line is cut at start, later appends are clean."""
    updates = make_updates(4)
    spool = tmp_path / "spool" / "s.spool"
    spool.parent.mkdir()
    good = b"".join(b"%d %s\n" % (i + 1, encode_payload(u)) for i, u in enumerate(updates[:3]))
    spool.write_bytes(good + b'4 {"account":"DU1","co')

    async def scenario() -> None:
        outbox = Outbox(redis_target.url, stream, spool_path=spool)
        outbox.put(5, updates[3])  # queued behind the replay
        outbox.start()
        await until(lambda: stream_length(redis_target.url, stream) == 4)
        assert await outbox.close(timeout_s=5)

    asyncio.run(scenario())
    assert read_stream(redis_target.url, stream) == updates
