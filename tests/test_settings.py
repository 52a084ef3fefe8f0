"""Settings that pass a type check and would fail later stop every program at start.

Each bad value is given to the consumer, the producer and an operator command as
real processes: exit 2, one message naming the variable, no traceback, and no
secret repeated.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from infra.redis_conn import RedisTarget, redacted_url
from shared.errors import ConfigError
from shared.settings import load_settings, unknown_variables
from tests.helpers import REPO_ROOT, run_python

CANARY = "Canary-S3cret-7731"

PROGRAMS = [
    ["-m", "consumer", "--drain"],
    ["-m", "producer"],
    ["-m", "poslake", "status"],
    ["-m", "poslake", "run", "--duration", "1"],
]

BAD_SETTINGS = [
    ("POSLAKE_REDIS_URL", f"redis://:{CANARY}@127.0.0.1:notaport/0"),
    ("POSLAKE_REDIS_URL", f"redis://:{CANARY}@127.0.0.1:99999/0"),
    ("POSLAKE_REDIS_URL", f"redis://:{CANARY}@127.0.0.1:6390/notadb"),
    ("POSLAKE_REDIS_URL", f"rediss://:{CANARY}@127.0.0.1:6390/0?ssl_cert_reqs=maybe"),
    ("POSLAKE_REDIS_URL", f"redis://:{CANARY}@127.0.0.1:6390/0?sslcafile=/x"),
    ("POSLAKE_RETRY_MAX_S", "inf"),
    ("POSLAKE_BATCH_MAX_WAIT_S", "nan"),
    ("POSLAKE_CLAIM_MIN_IDLE_S", "1e300"),
    ("POSLAKE_PRODUCER_FLUSH_TIMEOUT_S", "-inf"),
    ("POSLAKE_LAKE_URI", f"ftp://user:{CANARY}@host/lake"),
    ("POSLAKE_METRICS_HOST", "not a host!"),
    ("POSLAKE_STORAGE_OPTIONS", '{"aws_secret_access_key": 1234577310}'),
    ("POSLAKE_STORAGE_OPTIONS", '{"aws_secret_access_key": "' + CANARY + '",}'),
    ("POSLAKE_STORAGE_OPTIONS", '["' + CANARY + '"]'),
]


def _run(program: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_python(program, env, cwd=cwd, timeout=60)


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSLAKE_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["POSLAKE_LAKE_URI"] = str(tmp_path / "lake")
    env["POSLAKE_PRODUCER_SPOOL_DIR"] = str(tmp_path / "spool")
    # Nothing listens here: a program that got past its settings would fail differently.
    env["POSLAKE_REDIS_URL"] = "redis://127.0.0.1:9/0"
    return env


def _assert_stopped_at_start(done: subprocess.CompletedProcess[str], name: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert name in output, output
    assert "Traceback" not in output, output
    assert CANARY not in output and "1234577310" not in output, output
    assert len(done.stderr.strip().splitlines()) == 1, output


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS)
def test_bad_setting_stops_the_consumer_at_start(tmp_path: Path, name: str, value: str) -> None:
    env = {**_clean_env(tmp_path), name: value}
    _assert_stopped_at_start(_run(["-m", "consumer", "--drain"], env, tmp_path), name)


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: " ".join(p[1:3]))
def test_bad_settings_stop_every_program_at_start(tmp_path: Path, program: list[str]) -> None:
    # Every program reads the settings through the same function; one of each kind.
    for name, value in (BAD_SETTINGS[0], BAD_SETTINGS[5], BAD_SETTINGS[9], BAD_SETTINGS[11]):
        env = {**_clean_env(tmp_path), name: value}
        _assert_stopped_at_start(_run(program, env, tmp_path), name)


def test_metrics_host_that_is_no_address_here_names_the_host(tmp_path: Path) -> None:
    # A well-formed address this machine does not have: only the bind can tell.
    env = {
        **_clean_env(tmp_path),
        "POSLAKE_METRICS_HOST": "192.0.2.1",  # TEST-NET-1, never local
        "POSLAKE_METRICS_PORT": "9",
    }
    done = _run(["-m", "consumer", "--drain"], env, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "POSLAKE_METRICS_HOST=192.0.2.1" in done.stderr
    assert "POSLAKE_METRICS_PORT" not in done.stderr


def test_unknown_variable_gets_the_nearest_name() -> None:
    warnings = unknown_variables(
        {"POSLAKE_BATCH_MAX_WAIT": "3", "POSLAKE_STREAM": "s", "POSLAKE_TEST_REDIS_URL": "x"}
    )
    assert warnings == [
        "POSLAKE_BATCH_MAX_WAIT is not a setting and is ignored; "
        "did you mean POSLAKE_BATCH_MAX_WAIT_S?"
    ]


def test_unknown_variable_warns_and_the_program_still_runs(tmp_path: Path) -> None:
    env = {**_clean_env(tmp_path), "POSLAKE_BATCH_MAX_WAIT": "3"}
    done = _run(["-m", "poslake", "status"], env, tmp_path)
    assert "did you mean POSLAKE_BATCH_MAX_WAIT_S?" in done.stderr
    assert done.returncode == 4, done.stderr  # got past the settings: Redis unreachable


def test_redis_url_options_are_parsed_once_for_every_client() -> None:
    target = RedisTarget.parse(
        f"rediss://poslake:{CANARY}@redis.internal:6380/3"
        "?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem"
    )
    assert (target.host, target.port, target.db, target.username) == (
        "redis.internal",
        6380,
        3,
        "poslake",
    )
    assert target.password == CANARY
    assert target.tls is not None and target.tls.cert_reqs == "required"
    assert target.tls.check_hostname and target.tls.certfile == "/c.pem"
    assert CANARY not in repr(target) and CANARY not in target.redacted
    assert target.redacted.startswith("rediss://poslake:***@redis.internal:6380/3")
    unverified = RedisTarget.parse("rediss://h?ssl_cert_reqs=none")
    assert unverified.tls is not None and not unverified.tls.check_hostname
    assert RedisTarget.parse("unix:///run/redis.sock?db=2").db == 2
    assert redacted_url(f"redis://u:{CANARY}@h:bad/0") == "redis://u:***@h:bad/0"


def test_settings_errors_never_repeat_a_secret() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            redis_url=f"redis://:{CANARY}@h:0/0",
            storage_options={"aws_secret_access_key": 7731},
            lake_uri=f"gopher://{CANARY}",
        )
    text = str(caught.value)
    for variable in ("POSLAKE_REDIS_URL", "POSLAKE_STORAGE_OPTIONS", "POSLAKE_LAKE_URI"):
        assert variable in text
    assert CANARY not in text and "7731" not in text
