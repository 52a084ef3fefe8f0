"""``poslake book``: one instance at a time (a lease in Redis), a second one waits and takes
over when the first stops; its metrics and health."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from shared.settings import Settings
from tests.helpers import (
    REPO_ROOT,
    consumer_env,
    make_updates,
    publish,
    run_consumer,
    stop,
    wait_until,
)


def _book(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "poslake", "book"], env=env, cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            body: bytes = answer.read()
            return body
    except OSError:  # not serving yet
        return b""


def test_a_second_instance_waits_then_takes_over(
    redis_url: str, stream: str, lake: Path, tmp_path: Path
) -> None:
    env = consumer_env(redis_url, lake, "lease-consumer", stream)
    publish(redis_url, stream, make_updates(200, seed=3))
    assert run_consumer(env) == 0
    settings = Settings.model_validate({"redis_url": redis_url, "stream": stream})
    client = redis.Redis.from_url(redis_url)
    port = _free_port()
    first = _book(
        env | {"POSLAKE_BOOK_INTERVAL_S": "0.2", "POSLAKE_METRICS_PORT": str(port)},
        tmp_path / "first.log",
    )
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: client.get(settings.book_lease_key) is not None, 30)
        holder = client.get(settings.book_lease_key)
        wait_until((lake / "positions").exists, 30)  # held positions: strategies
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: b"poslake_book_steps" in _get(f"{url}/metrics"), 30)
        assert urllib.request.urlopen(f"{url}/healthz").status == 200
        second = _book(env | {"POSLAKE_BOOK_INTERVAL_S": "0.2"}, tmp_path / "second.log")
        wait_until(lambda: b"holds the lease" in (tmp_path / "second.log").read_bytes(), 30)
        time.sleep(1.0)
        assert client.get(settings.book_lease_key) == holder  # still the first's
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
        wait_until(lambda: client.get(settings.book_lease_key) not in (None, holder), 30)
        assert second.poll() is None
        progress = client.get(settings.book_progress_key)
        assert progress is not None and progress.split()[0].isdigit()
    finally:
        stop(first, second)
        client.close()
