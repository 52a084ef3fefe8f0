"""The metrics and health endpoints answer with the named series while a pipeline runs."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from gateway_sim.simulator import SimulatorConfig, SimulatorThread
from infra.redis_server import free_port
from tests.helpers import REPO_ROOT, consumer_env, kill, start_consumer, table_rows, wait_until


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"no series {series}"
    return float(match.group(1))


def test_metrics_and_health_while_running(
    redis_url: str, stream: str, lake: Path, tmp_path: Path
) -> None:
    thread = SimulatorThread(SimulatorConfig(accounts=["DU1"], positions=30, rate=100))
    ib_port = thread.start()
    consumer_port, producer_port = free_port(), free_port()
    env = consumer_env(redis_url, lake, "metrics-consumer", stream, batch_max_wait_s=0.3)
    consumer = start_consumer({**env, "POSLAKE_METRICS_PORT": str(consumer_port)})
    producer_env = {
        **env,
        "POSLAKE_METRICS_PORT": str(producer_port),
        "POSLAKE_IB_PORT": str(ib_port),
        "POSLAKE_PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
    }
    producer = subprocess.Popen(
        [sys.executable, "-m", "producer"],
        env=producer_env,
        cwd=REPO_ROOT,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: len(table_rows(lake)) >= 100 if (lake / "position_updates").exists() else False,
            timeout=60,
        )
        code, text = _get(producer_port, "/metrics")
        assert code == 200
        assert _value(text, "poslake_producer_published_total") >= 100
        assert _value(text, "poslake_producer_ib_connected") == 1.0
        assert _value(text, "poslake_producer_connects_total") == 1.0
        assert _value(text, "poslake_producer_ib_request_queue") == 0.0
        assert _value(text, "poslake_producer_pnl_subscriptions") == 0.0  # one account only
        for series in (
            "poslake_producer_buffered",
            "poslake_producer_redis_retries_total",
            "poslake_producer_spooled_total",
            "poslake_producer_disconnects_total",
            "poslake_producer_pnl_pending",
            "poslake_producer_pnl_subscribes_total",
        ):
            _value(text, series)
        code, text = _get(consumer_port, "/metrics")
        assert code == 200
        assert _value(text, "poslake_consumer_entries_total") >= 100
        assert _value(text, "poslake_consumer_rows_written_total") >= 100
        assert _value(text, "poslake_consumer_batch_entries_count") >= 1
        assert _value(text, "poslake_consumer_commit_seconds_count") >= 1
        # Every row written is a key the dedup index holds (far below its bound).
        assert _value(text, "poslake_consumer_dedup_index_keys") >= 100
        assert _value(text, "poslake_consumer_dedup_index_contracts") >= 1
        for series in (
            "poslake_consumer_lag",
            "poslake_consumer_pending",
            "poslake_consumer_dead_letters_total",
            "poslake_consumer_commit_retries_total",
        ):
            _value(text, series)
        for port in (producer_port, consumer_port):
            status, body = _get(port, "/healthz")
            assert status == 200 and body.startswith("ok"), body
        assert _get(consumer_port, "/nope")[0] == 404
    finally:
        for process in (producer, consumer):
            process.send_signal(signal.SIGTERM)
        assert producer.wait(timeout=30) == 0
        assert consumer.wait(timeout=30) == 0
        kill(producer)
        kill(consumer)
        thread.stop()


def test_unusable_metrics_port_stops_at_start(redis_url: str, lake: Path, stream: str) -> None:
    env = consumer_env(redis_url, lake, "m", stream, metrics_port=70000)
    done = subprocess.run(
        [sys.executable, "-m", "consumer"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "POSLAKE_METRICS_PORT" in done.stderr
