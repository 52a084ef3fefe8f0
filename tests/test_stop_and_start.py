"""SIGTERM at any moment of start-up or of a run ends with exit 0 and nothing lost;
Redis refusing the producer at start is exit 6 with one line.

Real processes (``python -m consumer`` / ``python -m producer``), a real
redis-server and real Delta tables; the stop is a real SIGTERM.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.redis_server import free_port
from shared.errors import ExitCode
from tests.conftest import RedisTarget
from tests.helpers import (
    REPO_ROOT,
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
from tests.redis_users import login_url, set_user


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill(proc)


def _log_has(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


@pytest.mark.parametrize("delay_s", [0.0, 0.02, 0.2, 0.45, 0.9])
def test_consumer_sigterm_during_start_up_is_exit_0(
    redis_url: str, lake: Path, stream: str, tmp_path: Path, delay_s: float
) -> None:
    """While Python imports deltalake and pyarrow, or connects, or opens the tables."""
    updates = make_updates(400, seed=51)
    publish(redis_url, stream, updates)
    proc = start_consumer(consumer_env(redis_url, lake, "c1", stream), log=tmp_path / "c.log")
    time.sleep(delay_s)
    assert _terminate(proc) == 0, (tmp_path / "c.log").read_text()[-2000:]
    assert group_pending(redis_url, stream) == 0 if _log_has(tmp_path / "c.log", "group") else True
    assert run_consumer(consumer_env(redis_url, lake, "c1", stream)) == 0
    assert_table_exact(lake, updates)


def test_consumer_sigterm_while_the_table_cannot_be_opened(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("the lake cannot live under a file")
    log = tmp_path / "c.log"
    proc = start_consumer(consumer_env(redis_url, not_a_folder / "lake", "c1", stream), log=log)
    try:
        wait_until(lambda: _log_has(log, "cannot open table, retrying"), timeout=60)
        started = time.monotonic()
        assert _terminate(proc) == 0, log.read_text()[-2000:]
        assert time.monotonic() - started < 5
    finally:
        kill(proc)
    assert "Traceback" not in log.read_text()


def test_consumer_sigterm_while_redis_is_away_at_start(
    lake: Path, stream: str, tmp_path: Path
) -> None:
    log = tmp_path / "c.log"
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    proc = start_consumer(consumer_env(nowhere, lake, "c1", stream), log=log)
    try:
        wait_until(lambda: _log_has(log, "redis unavailable, retrying"), timeout=60)
        assert _terminate(proc, timeout=10) == 0, log.read_text()[-2000:]
    finally:
        kill(proc)


def test_consumer_sigterm_mid_run_settles_what_it_holds(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(4_000, seed=52)
    publish(redis_url, stream, updates)
    env = consumer_env(redis_url, lake, "c1", stream, batch_max_entries=200)
    proc = start_consumer(env, log=tmp_path / "c.log")
    try:
        wait_until(
            lambda: (lake / "position_updates").exists() and len(table_rows(lake)) >= 200, 60
        )
        assert _terminate(proc) == 0
    finally:
        kill(proc)
    # Everything it read was committed and acknowledged: nothing left pending.
    assert group_pending(redis_url, stream) == 0
    assert len(table_rows(lake)) < len(updates)  # stopped mid-run indeed
    assert run_consumer(env) == 0
    assert_table_exact(lake, updates)


# -- producer ----------------------------------------------------------------------


def _producer_env(redis_url: str, stream: str, tmp_path: Path, ib_port: int) -> dict[str, str]:
    env = consumer_env(redis_url, tmp_path / "lake", "p", stream)
    env.update(
        {
            "POSLAKE_IB_PORT": str(ib_port),
            "POSLAKE_IB_CONNECT_TIMEOUT_S": "60",
            "POSLAKE_PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
        }
    )
    return env


@contextlib.contextmanager
def _silent_gateway() -> Iterator[int]:
    """A port that accepts connections and never answers: an IB connect hangs on it."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def _start_producer(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "producer"], env=env, cwd=REPO_ROOT, stdout=out, stderr=out
    )


@pytest.mark.parametrize("moment", ["imports", "ib-connect"])
def test_producer_sigterm_during_start_up_is_exit_0(
    redis_url: str, stream: str, tmp_path: Path, moment: str
) -> None:
    log = tmp_path / "p.log"
    with _silent_gateway() as ib_port:
        proc = _start_producer(_producer_env(redis_url, stream, tmp_path, ib_port), log)
        try:
            if moment == "imports":
                time.sleep(0.15)
            else:
                wait_until(lambda: _log_has(log, "producer started"), timeout=60)
                time.sleep(0.3)  # inside ib_async's connect, which never completes
            started = time.monotonic()
            assert _terminate(proc) == 0, log.read_text()[-2000:]
            assert time.monotonic() - started < 15
        finally:
            kill(proc)
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize(
    ("case", "rules", "explicit", "words"),
    [
        ("wrong-password", None, False, ["Redis refused the login: WRONGPASS"]),
        ("no-xadd", ["+@all", "-xadd"], False, ["XADD", "NOPERM", "grant the right"]),
        ("no-stream-key", ["+@all"], False, ["XADD", "NOPERM"]),
        ("no-xrevrange", ["+@all", "-xrevrange"], True, ["XREVRANGE", "NOPERM"]),
    ],
)
def test_producer_refused_at_start_is_exit_6(
    redis_any_version: RedisTarget,
    stream: str,
    tmp_path: Path,
    case: str,
    rules: list[str] | None,
    explicit: bool,
    words: list[str],
) -> None:
    redis_url = redis_any_version.url
    keys = ["~other-stream"] if case == "no-stream-key" else [f"~{stream}"]
    url = set_user(redis_url, "producer", "right-pw", *keys, *(rules or ["+@all"]))
    if case == "wrong-password":
        url = login_url(redis_url, "producer", "canary-wrong-pw")
    env = _producer_env(url, stream, tmp_path, free_port())
    env["POSLAKE_PRODUCER_EXPLICIT_IDS"] = "true" if explicit else "false"
    done = subprocess.run(
        [sys.executable, "-m", "producer"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == ExitCode.REFUSED, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "canary-wrong-pw" not in done.stderr and "right-pw" not in done.stderr
    lines = [x for x in done.stderr.splitlines() if x.startswith("poslake producer:")]
    assert len(lines) == 1, done.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert "POSLAKE_REDIS_URL" in lines[0]
