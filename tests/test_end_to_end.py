"""End to end: gateway simulator -> producer -> Redis -> consumer -> Delta, as processes.

The producer and consumer are separate programs (``python -m producer``,
``python -m consumer``); the simulator runs in this process so its record is
at hand. The table is then compared row by row with the stream, and the
stream entry by entry with what the simulator sent.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import redis

from gateway_sim.simulator import SimulatorConfig, SimulatorThread
from tests.helpers import (
    REPO_ROOT,
    assert_table_exact,
    consumer_env,
    kill,
    start_consumer,
    table_rows,
    wait_until,
)
from tests.producer_harness import assert_matches_record, pause_and_drain, read_stream

ACCOUNTS = ["DU100001", "DU100002"]


def test_simulator_to_table(redis_url: str, stream: str, lake: Path, tmp_path: Path) -> None:
    thread = SimulatorThread(SimulatorConfig(accounts=ACCOUNTS, positions=60, rate=150, seed=5))
    port = thread.start()
    env = consumer_env(redis_url, lake, "e2e-consumer", stream, batch_max_wait_s=0.5)
    producer_env = env | {
        "POSLAKE_IB_PORT": str(port),
        "POSLAKE_PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
        "POSLAKE_PRODUCER_EXPLICIT_IDS": "true",
    }
    producer_log = tmp_path / "producer.log"
    with producer_log.open("wb") as out:
        producer = subprocess.Popen(
            [sys.executable, "-m", "producer"],
            env=producer_env,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=out,
        )
    consumer = start_consumer(env, log=tmp_path / "consumer.log")
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: thread.simulator.events >= 600, timeout=60)
        sent = pause_and_drain(thread, producer, redis_url, stream, lake, ACCOUNTS, timeout=30)
        consumer.send_signal(signal.SIGTERM)
        assert consumer.wait(timeout=30) == 0
    finally:
        kill(producer)
        kill(consumer)
        thread.stop()
        client.close()
    assert "ib_async.Decoder" not in producer_log.read_text()
    updates = read_stream(redis_url, stream)
    assert_matches_record(updates, sent)
    assert_table_exact(lake, updates)
    rows = table_rows(lake)
    assert {r["account"] for r in rows} == set(ACCOUNTS)
    assert len({r["symbol"] for r in rows}) >= 5
