"""Every failing path of the operator commands: its exit code and its one line.

Real servers throughout: a redis-server (ACL users, ``maxmemory`` for a
transient refusal), real tables, and for the object store a real HTTP server
on loopback that answers 403 to everything, or a port where nothing listens.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis

from infra.redis_server import free_port
from poslake.cli import EXIT_CODES, build_parser
from shared.errors import ExitCode
from tests.helpers import REPO_ROOT, consumer_env, make_updates, publish, run_consumer
from tests.test_cli import poslake


def one_line(done: subprocess.CompletedProcess[str], command: str, code: int, *says: str) -> str:
    """The command failed with ``code`` and one line on stderr that says ``says``."""
    assert done.returncode == code, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    line = lines[0]
    assert line.startswith(f"poslake {command}: "), line
    for fragment in says:
        assert fragment in line, (fragment, line)
    return line


@pytest.fixture
def small(redis_url: str, lake: Path, stream: str) -> dict[str, str]:
    """Both tables, from 60 updates through one drained consumer."""
    publish(redis_url, stream, make_updates(60))
    env = consumer_env(redis_url, lake, "errors-consumer", stream)
    assert run_consumer(env) == 0
    return env


def test_one_exit_code_table_in_help_and_readme() -> None:
    epilog = " ".join((build_parser().epilog or "").split())
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    meaning = [
        "done",
        "failed",
        "bad input",
        "not found",
        "unreachable",
        "cancelled",
        "refused",
        "consumers behind",
    ]
    assert len(meaning) == len(ExitCode)
    for code, word in zip(ExitCode, meaning, strict=True):
        for text in (EXIT_CODES, epilog, readme):
            assert f"{int(code)} {word}" in text, (code, word)


def test_dlq_list_limit_must_be_positive(small: dict[str, str]) -> None:
    for limit in ("0", "-1"):
        done = poslake(small, "dlq", "list", "--limit", limit)
        one_line(done, "dlq", ExitCode.BAD_INPUT, f"--limit must be at least 1, not {limit}")
    assert poslake(small, "dlq", "list", "--limit", "1").returncode == 0


def test_query_output_in_a_missing_folder(small: dict[str, str], tmp_path: Path) -> None:
    target = "/nonexistent/dir/x.csv"
    for args in (("positions",), ("table", "positions_current"), ("history", "--conid", "1")):
        done = poslake(small, "query", *args, "--format", "csv", "--output", target)
        one_line(done, "query", ExitCode.BAD_INPUT, target, "does not exist")
    folder = poslake(small, "query", "positions", "--output", str(tmp_path))
    one_line(folder, "query", ExitCode.BAD_INPUT, "is a folder")
    written = tmp_path / "x.csv"
    done = poslake(small, "query", "positions", "--format", "csv", "--output", str(written))
    assert done.returncode == 0 and written.read_text().startswith("account,")


def test_positions_current_time_travel(small: dict[str, str]) -> None:
    version = poslake(small, "query", "table", "positions_current", "--version", "9999")
    one_line(version, "query", ExitCode.BAD_INPUT, "version 9999 does not exist (latest is")
    before = poslake(small, "query", "table", "positions_current", "--at", "2000-01-01")
    one_line(before, "query", ExitCode.BAD_INPUT, "before the table existed")
    first = poslake(small, "query", "table", "positions_current", "--version", "0")
    assert first.returncode == 0, first.stderr
    bad = poslake(small, "query", "table", "positions_current", "--at", "tomorrow")
    one_line(bad, "query", ExitCode.BAD_INPUT, "bad time 'tomorrow'")


def _user(redis_url: str, name: str, *rules: str) -> str:
    """An ACL user with these rules; its URL (password in it)."""
    client: Any = redis.Redis.from_url(redis_url)
    password = f"pw-{name}-0123456789"
    client.acl_setuser(name, enabled=True, reset=True, passwords=[f"+{password}"])
    client.execute_command("ACL", "SETUSER", name, *rules)
    client.close()
    return redis_url.replace("redis://", f"redis://{name}:{quote(password, safe='')}@")


def test_replay_without_the_right_to_read_groups_is_refused(
    small: dict[str, str], redis_url: str, stream: str
) -> None:
    no_xinfo = _user(redis_url, "noxinfo", "~*", "+@all", "-xinfo")
    done = poslake({**small, "POSLAKE_REDIS_URL": no_xinfo}, "replay", "--beginning", "--yes")
    line = one_line(done, "replay", ExitCode.REFUSED, "XINFO GROUPS", f"'{stream}'")
    assert "no stream" not in line and "POSLAKE_REDIS_URL" in line
    no_keys = _user(redis_url, "nokeys", "~unrelated", "+@all")
    env = {**small, "POSLAKE_REDIS_URL": no_keys}
    one_line(poslake(env, "replay", "--beginning", "--yes"), "replay", 6, "XINFO GROUPS")
    one_line(poslake(env, "dlq", "list"), "dlq", 6, "XRANGE", f"'{stream}:dlq'")
    one_line(poslake(env, "dlq", "purge", "1-1", "--yes"), "dlq", 6, "XRANGE")
    one_line(poslake(env, "status"), "status", 6, "permissions")
    # A stream that does not exist is still "not found".
    missing = poslake({**small, "POSLAKE_STREAM": "none"}, "replay", "--beginning", "--yes")
    one_line(missing, "replay", ExitCode.NOT_FOUND, "no stream 'none'")


def test_wrong_password_and_unreachable_redis(small: dict[str, str], redis_url: str) -> None:
    wrong = _user(redis_url, "someone", "~*", "+@all").replace("pw-someone", "pw-wrong")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    for args in (("status",), ("dlq", "list"), ("replay", "--beginning", "--yes")):
        refused = poslake({**small, "POSLAKE_REDIS_URL": wrong}, *args)
        line = one_line(
            refused, args[0], ExitCode.REFUSED, "check the user and password in POSLAKE_REDIS_URL"
        )
        assert "pw-wrong" not in line and "someone:***@" in line
        away = poslake({**small, "POSLAKE_REDIS_URL": dead}, *args)
        one_line(away, args[0], ExitCode.UNREACHABLE, f"cannot reach Redis at {dead}")


def test_a_transient_refusal_is_exit_4(small: dict[str, str], redis_url: str, stream: str) -> None:
    client: Any = redis.Redis.from_url(redis_url)
    client.xadd(f"{stream}:dlq", {"v": "1", "payload": "{}", "dlq:reason": "test"})
    client.config_set("maxmemory", 1)  # every write is refused with OOM (noeviction)
    try:
        done = poslake(small, "dlq", "requeue", "--all", "--yes")
        one_line(done, "dlq", ExitCode.UNREACHABLE, "cannot serve XADD right now: OOM", "again")
        assert client.xlen(f"{stream}:dlq") == 1
    finally:
        client.config_set("maxmemory", 0)
    assert poslake(small, "dlq", "requeue", "--all", "--yes").returncode == 0
    assert client.xlen(f"{stream}:dlq") == 0


class _Forbidden(http.server.BaseHTTPRequestHandler):
    def _deny(self) -> None:
        body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
        self.send_response(403)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    # The http.server API: one method per verb.
    def do_GET(self) -> None:
        self._deny()

    def do_HEAD(self) -> None:
        self._deny()

    def do_PUT(self) -> None:
        self._deny()

    def do_POST(self) -> None:
        self._deny()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def forbidding_store() -> Iterator[str]:
    """An S3 endpoint that answers 403 to every request."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def s3_env(env: dict[str, str], endpoint: str) -> dict[str, str]:
    options = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "AKIDCANARY0001",
        "AWS_SECRET_ACCESS_KEY": "canary-store-secret-0001",
        # Fail at once instead of after object_store's default retries.
        "timeout": "3s",
        "max_retries": "0",
        "retry_timeout": "1s",
    }
    return {
        **env,
        "POSLAKE_LAKE_URI": "s3://bucket/lake",
        "POSLAKE_STORAGE_OPTIONS": json.dumps(options),
    }


# One of each way in: status, a plain table, a repository table (the others share them).
COMMANDS_ON_THE_STORE = (("status",), ("query", "positions"), ("query", "table", "legs"))


def test_an_object_store_that_answers_403(small: dict[str, str], forbidding_store: str) -> None:
    env = s3_env(small, forbidding_store)
    for args in COMMANDS_ON_THE_STORE:
        done = poslake(env, *args)
        line = one_line(done, args[0], ExitCode.REFUSED, "refused access", "403")
        assert "POSLAKE_STORAGE_OPTIONS" in line
        assert "canary" not in done.stdout + done.stderr and "AKIDCANARY" not in line


def test_an_object_store_that_refuses_connections(small: dict[str, str]) -> None:
    env = s3_env(small, f"http://127.0.0.1:{free_port()}")
    for args in COMMANDS_ON_THE_STORE:
        done = poslake(env, *args)
        line = one_line(done, args[0], ExitCode.UNREACHABLE, "cannot reach the lake's store")
        assert "Connection refused" in line and "canary" not in line


def test_poslake_run_uses_the_same_codes(tmp_path: Path, redis_url: str) -> None:
    wrong = _user(redis_url, "runner", "~*", "+@all").replace("pw-runner", "pw-nope")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSLAKE_")}
    for url, code, says in (
        (wrong, ExitCode.REFUSED, "check the user and password"),
        (f"redis://127.0.0.1:{free_port()}/0", ExitCode.UNREACHABLE, "cannot reach Redis"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "poslake", "run", "--duration", "1", "--data-dir",
             str(tmp_path / "data")],
            env={**env, "POSLAKE_REDIS_URL": url}, cwd=REPO_ROOT, capture_output=True,
            text=True, timeout=60, check=False,
        )  # fmt: skip
        line = one_line(done, "run", code, "redis: ", says)
        assert "pw-nope" not in line
    bad = subprocess.run(
        [sys.executable, "-m", "poslake", "run", "--duration", "1"],
        env={**env, "POSLAKE_REDIS_URL": "redis://127.0.0.1:notaport/0"}, cwd=tmp_path,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    one_line(bad, "run", ExitCode.BAD_INPUT, "POSLAKE_REDIS_URL")


def test_ctrl_c_at_the_prompt_is_cancelled(small: dict[str, str]) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "poslake", "replay", "--beginning"],
        env=small, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    question = process.stdout.read(len("Move group"))  # the prompt: it waits for an answer
    assert question == "Move group"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    one_line(done, "replay", ExitCode.CANCELLED, "cancelled")
