"""No secret in anything a program prints, logs or serves: a canary over every command.

A real redis-server with a password, storage options with secret keys (on a
local lake, which must still work with them), the real producer against the
gateway simulator, real consumers, ``poslake run`` and every operator command;
Redis reachable, unreachable and with a wrong password; bad settings. Every
stdout, stderr, log file (text and JSON), file the programs write, and
``/metrics`` and ``/healthz`` page is searched for the canaries: no hit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis

from gateway_sim.simulator import SimulatorConfig, SimulatorThread
from infra.redis_server import RedisServer, find_redis_server, free_port
from tests.helpers import make_updates, publish

# Every canary holds "canary" in some case; a search for it, case-insensitive,
# finds a leak of any of them, whole or in part.
PASSWORD = "Canary-Redis-PW:9@q/x"  # ':', '@' and '/' are percent-encoded in the URL
WRONG_PASSWORD = "Canary-Wrong-PW-1234"
STORE_KEY_ID = "AKIDCANARY00042"
STORE_SECRET = "canary-store-SK+/=77"
STORE_TOKEN = "canary-store-TOKEN-5151"
NUMBER_SECRET = "987654321987"  # a secret key given as a JSON number (a bad setting)
STORAGE_OPTIONS = {
    "AWS_ACCESS_KEY_ID": STORE_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": STORE_SECRET,
    "AWS_SESSION_TOKEN": STORE_TOKEN,
    "AWS_REGION": "us-east-1",
}


def leaks(text: str) -> bool:
    return "canary" in text.lower() or NUMBER_SECRET in text


def url(port: int, password: str = PASSWORD) -> str:
    return f"redis://:{quote(password, safe='')}@127.0.0.1:{port}/0"


@dataclass
class Transcript:
    """Everything the programs said, by where it came from."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, label: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        self.texts[f"{label} #{len(self.texts)}"] = text

    def add_tree(self, label: str, root: Path) -> None:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                self.add(f"{label}/{path.relative_to(root)}", path.read_bytes())

    def assert_clean(self) -> None:
        assert self.texts, "nothing was captured"
        found = {label: text for label, text in self.texts.items() if leaks(text)}
        excerpts = {
            label: [line for line in text.splitlines() if leaks(line)][:3]
            for label, text in found.items()
        }
        assert not found, f"secrets shown in {len(found)} outputs: {excerpts}"


@dataclass
class Canary:
    server: RedisServer
    url: str
    tmp: Path
    transcript: Transcript
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started: int = 0
    stderr: dict[int, Path] = field(default_factory=dict)

    def env(self, **settings: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSLAKE_")}
        env.update(
            {
                "POSLAKE_REDIS_URL": self.url,
                "POSLAKE_LAKE_URI": str(self.tmp / "lake"),
                "POSLAKE_STORAGE_OPTIONS": json.dumps(STORAGE_OPTIONS),
                "POSLAKE_STREAM": "secret-stream",
                "POSLAKE_LOG_LEVEL": "DEBUG",
                "POSLAKE_BATCH_MAX_WAIT_S": "0.2",
                "POSLAKE_RETRY_INITIAL_S": "0.05",
                "POSLAKE_RETRY_MAX_S": "0.5",
                "POSLAKE_PRODUCER_SPOOL_DIR": str(self.tmp / "spool"),
                "POSLAKE_IB_CONNECT_TIMEOUT_S": "3",
                "POSLAKE_IB_RECONNECT_INITIAL_S": "0.1",
                "POSLAKE_IB_RECONNECT_MAX_S": "0.5",
            }
        )
        env.update({f"POSLAKE_{k.upper()}": v for k, v in settings.items()})
        return env

    def poslake(self, env: dict[str, str], *args: str, timeout: float = 120) -> int:
        done = subprocess.run(
            [sys.executable, "-m", "poslake", *args],
            env=env, cwd=self.tmp, capture_output=True, text=True, timeout=timeout,
            check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.transcript.add(f"{' '.join(args)} stdout", done.stdout)
        self.transcript.add(f"{' '.join(args)} stderr", done.stderr)
        return done.returncode

    def many(self, env: dict[str, str], commands: Sequence[Sequence[str]]) -> list[int]:
        """Independent commands, three at a time."""
        with ThreadPoolExecutor(3) as pool:
            return list(pool.map(lambda args: self.poslake(env, *args), commands))

    def start(self, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
        """A long-running command; its output goes to files (a pipe would fill up)."""
        self.started += 1
        out = (self.tmp / "out" / f"{self.started}-{args[0]}.stdout").open("wb")
        err = (self.tmp / "out" / f"{self.started}-{args[0]}.stderr").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "poslake", *args],
            env=env, cwd=self.tmp, stdout=out, stderr=err,
        )  # fmt: skip
        out.close()
        err.close()
        self.running.append(process)
        self.stderr[process.pid] = Path(err.name)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> int:
        """SIGTERM; what it printed is in ``out/``."""
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=60)

    def stop_when_it_said(self, *processes: subprocess.Popen[bytes]) -> None:
        """SIGTERM each once it has written to stderr; SIGKILL what outstays 5 s
        (here only what they say matters, not how they end)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            self.stderr[p.pid].stat().st_size or p.poll() is not None for p in processes
        ):
            time.sleep(0.1)
        time.sleep(1)  # a few more attempts' lines
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.kill()
                process.wait()
        self.transcript.add_tree("output of", self.tmp / "out")

    def page(self, port: int, path: str) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                body: bytes = reply.read()
        except urllib.error.HTTPError as exc:  # /healthz answers 503 when unhealthy
            body = exc.read()
        self.transcript.add(f"{path} on {port}", body)
        return body.decode()


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Canary]:
    """A redis-server that wants the canary password."""
    binary = find_redis_server()
    if binary is None:
        pytest.skip("needs a redis-server binary")
    server = RedisServer(binary, tmp_path / "redis").start()
    client: Any = redis.Redis(port=server.port)
    client.config_set("requirepass", PASSWORD)
    client.close()
    transcript = Transcript()
    (tmp_path / "out").mkdir()
    found = Canary(server, url(server.port), tmp_path, transcript)
    try:
        yield found
    finally:
        found.close()
        server.stop()
    transcript.assert_clean()


def _wait(
    condition: Any, timeout: float, what: str, processes: Sequence[subprocess.Popen[bytes]]
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        for process in processes:
            assert process.poll() is None, f"{process.args!r} exited with {process.returncode}"
        time.sleep(0.2)


def _table_rows(lake: Path) -> int:
    log = lake / "position_updates" / "_delta_log"
    return len(list(log.glob("*.json"))) if log.exists() else 0


@pytest.mark.parametrize("log_json", ["false", "true"], ids=["text-logs", "json-logs"])
def test_the_pipeline_shows_no_secret(canary: Canary, log_json: str) -> None:
    """Producer and consumer side by side (with /metrics and /healthz), a drain, then
    ``poslake run`` against the same password-protected Redis."""
    simulator = SimulatorThread(SimulatorConfig(accounts=["DU1"], positions=20, rate=40))
    ib_port = simulator.start()
    producer_metrics, consumer_metrics = free_port(), free_port()
    env = canary.env(log_json=log_json, ib_port=str(ib_port))
    try:
        producer = canary.start({**env, "POSLAKE_METRICS_PORT": str(producer_metrics)}, "produce")
        consumer = canary.start(
            {**env, "POSLAKE_METRICS_PORT": str(consumer_metrics), "POSLAKE_CONSUMER_NAME": "c1"},
            "consume",
        )
        _wait(
            lambda: _table_rows(canary.tmp / "lake") >= 2,
            60,
            "the consumer's commits",
            [producer, consumer],
        )
        for port in (producer_metrics, consumer_metrics):
            assert "_total" in canary.page(port, "/metrics")
            canary.page(port, "/healthz")
        assert canary.stop(producer) == 0
        assert canary.stop(consumer) == 0
    finally:
        simulator.stop()
    assert canary.poslake(env, "consume", "--drain") == 0
    data = canary.tmp / "run-data"
    run_env = canary.env(log_json=log_json, stream="run-stream")
    del run_env["POSLAKE_LAKE_URI"]  # the run's own lake, under its data folder
    code = canary.poslake(run_env, "run", "--duration", "4", "--no-live", "--data-dir", str(data))
    assert code == 0, canary.transcript.texts
    assert any("poslake query positions" in text for text in canary.transcript.texts.values())
    assert _table_rows(data / "lake") >= 1  # the storage options did not stop a local lake
    canary.transcript.add_tree("run data", data)
    canary.transcript.add_tree("lake", canary.tmp / "lake")
    canary.transcript.add_tree("spool", canary.tmp / "spool")


def test_operator_commands_show_no_secret(canary: Canary) -> None:
    env = canary.env()
    updates = make_updates(80)
    publish(canary.url, "secret-stream", updates)
    client: Any = redis.Redis.from_url(canary.url)
    client.xadd("secret-stream", {"v": "1", "payload": "{broken"})  # one dead letter
    client.close()
    assert canary.poslake(env, "consume", "--drain") == 0
    codes = canary.many(
        env,
        [
            ["status"],
            ["status", "--json"],
            ["dlq", "list"],
            ["query", "positions"],
            ["query", "positions", "--format", "csv", "--version", "0"],
            ["query", "history", "--conid", str(updates[0].conid)],
            ["query", "table", "positions_current"],
            ["query", "table", "legs"],  # not found: a message
        ],
    )
    assert codes == [0, 0, 0, 0, 0, 0, 0, 3], codes
    assert canary.poslake(env, "dlq", "requeue", "--all", "--yes") == 0
    assert canary.poslake(env, "consume", "--drain") == 0
    assert canary.poslake(env, "dlq", "purge", "--all", "--yes") == 0
    assert canary.poslake(env, "replay", "--beginning", "--yes") == 0
    assert canary.poslake(env, "maintain") == 0
    canary.transcript.add_tree("lake", canary.tmp / "lake")


CALLS = [
    ["status"],
    ["status", "--json"],
    ["dlq", "list"],
    ["dlq", "purge", "--all", "--yes"],
    ["replay", "--beginning", "--yes"],
]


def test_unreachable_and_refused_redis_show_no_secret(canary: Canary) -> None:
    dead = canary.env(redis_url=url(free_port()), ib_port=str(free_port()))
    wrong = canary.env(redis_url=url(canary.server.port, WRONG_PASSWORD), ib_port=str(free_port()))
    assert canary.many(dead, CALLS) == [4] * len(CALLS)
    assert canary.many(wrong, CALLS) == [6] * len(CALLS)
    for env, label in ((dead, "unreachable"), (wrong, "wrong password")):
        # Whatever they do about it (retry, spool, stop), they say it without the secret.
        consumer = canary.start(env, "consume", "--drain")
        producer = canary.start(env, "produce")
        canary.stop_when_it_said(consumer, producer)
        data = canary.tmp / f"run-{label}"
        assert canary.poslake(env, "run", "--duration", "1", "--data-dir", str(data)) in (4, 6)
        canary.transcript.add_tree(f"run {label}", data)
    canary.transcript.add_tree("spool", canary.tmp / "spool")


def test_bad_settings_show_no_secret(canary: Canary) -> None:
    everything_wrong = canary.env(
        redis_url=f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:notaport/0",
        storage_options=json.dumps({"AWS_SECRET_ACCESS_KEY": int(NUMBER_SECRET)}),
        lake_uri=f"ftp://user:{STORE_SECRET}@host/lake",
    )
    broken_json = canary.env(
        redis_url=f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:6390/notadb",
        storage_options='{"AWS_SECRET_ACCESS_KEY": "' + STORE_SECRET + '", ',
    )
    tls_option = canary.env(redis_url=canary.url + "?ssl_cert_reqs=none&db=x")
    commands = [
        *CALLS,
        ["maintain"],
        ["query", "positions"],
        ["consume", "--drain"],
        ["produce"],
        ["run", "--duration", "1", "--data-dir", str(canary.tmp / "bad-run")],
    ]
    assert canary.many(everything_wrong, commands) == [2] * len(commands)
    # The same check runs for every program (load_settings_or_report): one of each kind.
    some = [["status"], ["consume"], ["produce"], ["run", "--duration", "1"]]
    assert canary.many(broken_json, some) == [2] * len(some)
    assert canary.poslake(tls_option, "status") == 2
    # Each names what is wrong, without the value.
    said = "\n".join(canary.transcript.texts.values())
    for name in ("POSLAKE_REDIS_URL", "POSLAKE_STORAGE_OPTIONS", "POSLAKE_LAKE_URI"):
        assert name in said
