"""Running the real producer against the gateway simulator inside a test's event loop.

The simulator is a real TCP server and the producer's IB side is the real,
unmodified ib_async client; Redis is a real server. Both run on the test's
event loop (``asyncio.run`` per test), so a test can pause the simulator, drop
its connections or send link codes between steps and read what it recorded.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from gateway_sim.session import SentUpdate
from gateway_sim.simulator import GatewaySimulator, SimulatorConfig, SimulatorThread
from producer.cli import build_outbox
from producer.ib_mapping import UpdateClock
from producer.ib_source import IbSource
from producer.outbox import Outbox
from shared.model import PositionUpdate
from shared.settings import Settings, load_settings
from shared.wire import decode_entry
from tests.helpers import Lake, group_pending, table_rows, wait_until


class DecoderErrors(logging.Handler):
    """Collects ERROR records of ib_async's decoder: a malformed message is otherwise
    dropped silently, so every producer test fails on one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def producer_settings(
    redis_url: str, stream: str, ib_port: int, spool: Path, **extra: Any
) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "stream": stream,
        "ib_port": ib_port,
        "ib_connect_timeout_s": 5.0,
        "ib_reconnect_initial_s": 0.05,
        "ib_reconnect_max_s": 0.5,
        "ib_client_id_backoff_s": 0.2,
        "producer_spool_dir": str(spool),
        "retry_initial_s": 0.05,
        "retry_max_s": 0.5,
    }
    values.update(extra)
    return load_settings(**values)


@dataclass
class RunningProducer:
    settings: Settings
    outbox: Outbox
    source: IbSource
    task: asyncio.Task[None]
    stop_event: asyncio.Event

    async def stop(self) -> bool:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 15)
        return await self.outbox.close(self.settings.producer_flush_timeout_s)


@contextlib.asynccontextmanager
async def running_producer(settings: Settings) -> AsyncIterator[RunningProducer]:
    clock = UpdateClock()
    outbox = build_outbox(settings, clock)
    source = IbSource(settings, outbox, clock)
    outbox.start()
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    running = RunningProducer(settings, outbox, source, task, stop)
    try:
        yield running
    finally:
        if not task.done():
            await running.stop()


@contextlib.asynccontextmanager
async def running_simulator(**config: Any) -> AsyncIterator[GatewaySimulator]:
    simulator = GatewaySimulator(SimulatorConfig(**config))
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


async def until_at_least(read: Callable[[], int], minimum: int, timeout: float = 20) -> None:
    await until(lambda: read() >= minimum, timeout)


def most_in_window(times: list[float], window_s: float) -> int:
    """The most of the sorted ``times`` within any window of ``window_s`` seconds."""
    counts = (bisect.bisect_left(times, t + window_s) - i for i, t in enumerate(times))
    return max(counts, default=0)


def read_stream(redis_url: str, stream: str) -> list[PositionUpdate]:
    client = redis.Redis.from_url(redis_url)
    try:
        entries: Any = client.xrange(stream)
        return [decode_entry(fields) for _, fields in entries if b"kind" not in fields]
    finally:
        client.close()


def stream_length(redis_url: str, stream: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.xlen(stream))
    finally:
        client.close()


async def settle(
    simulator: GatewaySimulator,
    redis_url: str,
    stream: str,
    portfolio_account: str,
    position_accounts: set[str] | None = None,
) -> list[SentUpdate]:
    """Pause the simulator, wait until the stream caught up with what it sent; return that."""
    simulator.pause()
    await asyncio.sleep(0.05)  # let in-flight messages through the producer
    sent = expected_kinds(simulator.record, portfolio_account, position_accounts or set())
    # Position entries only: the stream also carries the options' Greeks and the rest.
    await until(lambda: len(read_stream(redis_url, stream)) >= len(sent))
    await asyncio.sleep(0.1)  # anything beyond would show up now, and fail the comparison
    return sent


# --- what the stream should hold, from the simulator's record ------------------


def expected_kinds(
    record: Sequence[SentUpdate], portfolio_account: str, position_accounts: set[str]
) -> list[SentUpdate]:
    """The sent messages that each become one stream entry, in order."""
    kept = []
    for sent in record:
        if sent.kind == "portfolio":
            wanted = sent.account == portfolio_account
        elif sent.kind == "position":
            wanted = sent.account in position_accounts
        else:  # a PnL-single of a closed position adds nothing to its close
            wanted = sent.account in position_accounts and sent.position != 0
        if wanted:
            kept.append(sent)
    return kept


def assert_matches_record(updates: Sequence[PositionUpdate], sent: Sequence[SentUpdate]) -> None:
    """Entry i is message i: same account, contract, position, and the figures that
    message kind carries; timestamps strictly increase."""
    assert len(updates) == len(sent), f"{len(updates)} entries for {len(sent)} sent messages"
    for index, (update, message) in enumerate(zip(updates, sent, strict=True)):
        instrument = message.instrument
        expected: dict[str, Any] = {
            "account": message.account,
            "conid": instrument.conid,
            "symbol": instrument.symbol,
            "sec_type": instrument.sec_type,
            "currency": instrument.currency,
            "position": message.position,
            "multiplier": float(instrument.multiplier),
            "right": instrument.right or None,
            "strike": instrument.strike if instrument.sec_type == "OPT" else None,
            "expiry": instrument.expiry or None,
        }
        if message.kind == "portfolio":
            expected.update(
                market_price=message.market_price,
                market_value=message.market_value,
                average_cost=message.average_cost,
                unrealized_pnl=message.unrealized_pnl,
                realized_pnl=message.realized_pnl,
            )
        elif message.kind == "position":
            expected.update(average_cost=message.average_cost)
        else:
            expected.update(
                market_value=message.market_value,
                unrealized_pnl=message.unrealized_pnl,
                realized_pnl=message.realized_pnl,
            )
        actual = {name: getattr(update, name) for name in expected}
        if actual["expiry"] is not None:
            actual["expiry"] = actual["expiry"].strftime("%Y%m%d")
        assert actual == expected, f"entry {index} ({message.kind}): {actual} != {expected}"
    stamps = [u.timestamp for u in updates]
    assert all(a < b for a, b in itertools.pairwise(stamps)), "timestamps not increasing"


def pause_and_drain(
    thread: SimulatorThread,
    producer: subprocess.Popen[bytes],
    redis_url: str,
    stream: str,
    lake: Path | Lake,
    accounts: Sequence[str],
    timeout: float = 60,
) -> list[SentUpdate]:
    """End a run of process pipelines: pause the simulator, wait until the stream holds
    what it sent (the first account's portfolio, the others' positions), stop the
    producer (exit 0), then wait until the group has settled every position entry into
    the table. Returns what was sent."""
    thread.run("pause")
    sent = expected_kinds(thread.snapshot(), accounts[0], set(accounts[1:]))
    wait_until(lambda: len(read_stream(redis_url, stream)) >= len(sent), timeout=timeout)
    producer.send_signal(signal.SIGTERM)
    assert producer.wait(timeout=30) == 0
    wait_until(
        lambda: (
            group_pending(redis_url, stream) == 0
            and len(table_rows(lake)) == len(read_stream(redis_url, stream))
        ),
        timeout=2 * timeout,
    )
    return sent
