"""Redis refusing the consumer for good: one line naming the right, exit 6, nothing lost.

Each case takes one right away from a user that otherwise may do everything
(ACL users made in the test on a real redis-server); the consumer must stop with
exit code 6 and one line naming the command and what to check, without a
traceback or a crash at exit, with nothing acknowledged; a second run with
every right then lands every entry exactly once.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from shared.errors import ExitCode
from shared.settings import load_settings
from tests.conftest import RedisTarget
from tests.helpers import (
    REPO_ROOT,
    assert_table_exact,
    consumer_env,
    group_pending,
    make_updates,
    publish,
    run_consumer,
    run_python,
)
from tests.redis_users import consumer_keys, login_url, set_user

POISON = {"v": b"1", "payload": b"{not json"}

# (case id, rules that differ from "everything", expected words in the line)
CASES = [
    ("no-xreadgroup", ["-xreadgroup"], ["XREADGROUP", "NOPERM", "grant the right"]),
    ("no-xack", ["-xack"], ["XACK", "NOPERM", "grant the right"]),
    ("no-xautoclaim", ["-xautoclaim"], ["XAUTOCLAIM", "NOPERM"]),
    ("no-xgroup", ["-xgroup"], ["XGROUP", "NOPERM"]),
    ("no-dlq-key", ["dlq"], ["XADD", ":dlq", "NOPERM"]),
]


def _drain(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_python(["-m", "consumer", "--drain"], env, timeout=timeout)


def _assert_refused(done: subprocess.CompletedProcess[str], words: list[str]) -> None:
    assert done.returncode == ExitCode.REFUSED, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("poslake consumer:")]
    assert len(lines) == 1, done.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert "POSLAKE_REDIS_URL" in lines[0]


@pytest.mark.parametrize(("case", "rules", "words"), CASES, ids=[c[0] for c in CASES])
def test_missing_right_stops_with_exit_6_and_loses_nothing(
    redis_any_version: RedisTarget,
    lake: Path,
    stream: str,
    case: str,
    rules: list[str],
    words: list[str],
) -> None:
    redis_url = redis_any_version.url
    updates = make_updates(600, seed=31)
    client = redis.Redis.from_url(redis_url)
    if case != "no-xgroup":
        client.xgroup_create(stream, "lake", id="0", mkstream=True)
    publish(redis_url, stream, updates[:300])
    client.xadd(stream, POISON)  # type: ignore[arg-type]
    publish(redis_url, stream, updates[300:])
    keys = consumer_keys(stream)
    if case == "no-dlq-key":
        keys = [k for k in keys if not k.endswith(":dlq")]
        rules = ["+@all"]
    else:
        rules = ["+@all", *rules]
    url = set_user(redis_url, "limited", "pw-limited", *keys, *rules)
    env = consumer_env(url, lake, "c1", stream, batch_max_entries=1000)

    _assert_refused(_drain(env), words)
    # Nothing acknowledged: every entry the consumer read is still pending (or unread).
    if case not in ("no-xgroup",):
        pending = group_pending(redis_url, stream)
        info = client.xinfo_groups(stream)[0]
        assert pending == info["pending"]
        assert client.xlen(f"{stream}:dlq") == 0
        if case in ("no-xack", "no-dlq-key"):
            assert pending == len(updates) + 1

    full = set_user(redis_url, "full", "pw-full", *consumer_keys(stream), "+@all")
    assert run_consumer(consumer_env(full, lake, "c1", stream)) == 0
    assert_table_exact(lake, updates)
    assert group_pending(redis_url, stream) == 0
    assert client.xlen(f"{stream}:dlq") == 1
    client.close()


def test_wrong_password_at_start_is_exit_6(redis_url: str, lake: Path, stream: str) -> None:
    set_user(redis_url, "consumer", "the-right-one", *consumer_keys(stream), "+@all")
    env = consumer_env(login_url(redis_url, "consumer", "canary-wrong"), lake, "c1", stream)
    done = _drain(env)
    _assert_refused(done, ["Redis refused the login: WRONGPASS", "check the user and password"])
    assert "canary-wrong" not in done.stderr
    assert not (lake / "position_updates").exists()


def test_other_error_reply_is_exit_6(redis_url: str, lake: Path, stream: str) -> None:
    """An error reply that no retry can help (the stream key holds a string): exit 6."""
    client = redis.Redis.from_url(redis_url)
    client.set(stream, b"not a stream")
    done = _drain(consumer_env(redis_url, lake, "c1", stream))
    client.close()
    assert done.returncode == ExitCode.REFUSED, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "WRONGTYPE" in done.stderr


def test_lease_key_refused_is_warned_once_and_shown_by_status(
    redis_url: str, lake: Path, stream: str, tmp_path: Path
) -> None:
    updates = make_updates(400, seed=32)
    publish(redis_url, stream, updates)
    keys = [k for k in consumer_keys(stream) if "maintenance" not in k]
    url = set_user(redis_url, "nolease", "pw", *keys, "+@all")
    log = tmp_path / "c.log"
    env = consumer_env(url, lake, "c1", stream, batch_max_entries=50, maintenance_every_commits=1)
    assert run_consumer(env, log=log) == 0
    assert_table_exact(lake, updates)
    text = log.read_text()
    warnings = [line for line in text.splitlines() if "maintenance lease failed" in line]
    assert len(warnings) == 1, warnings  # eight runs wanted it: one warning
    key = load_settings(stream=stream).maintenance_lease_key
    assert key in warnings[0] and "NOPERM" in warnings[0] and "SET" in warnings[0]

    status = subprocess.run(
        [sys.executable, "-m", "poslake", "status"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    line = next(x for x in status.stdout.splitlines() if x.startswith("maintenance lease"))
    assert "cannot read" in line and "NOPERM" in line and key in line
    admin = redis.Redis.from_url(redis_url)
    admin.set(key, "c9", px=60_000)
    admin.close()
    status = subprocess.run(
        [sys.executable, "-m", "poslake", "status"],
        env=consumer_env(redis_url, lake, "c1", stream),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    line = next(x for x in status.stdout.splitlines() if x.startswith("maintenance lease"))
    match = re.fullmatch(r"maintenance lease: held by c9, expires in (\d+)s", line)
    assert match and 30 <= int(match.group(1)) <= 60, line
