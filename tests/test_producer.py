"""The producer against the gateway simulator: real ib_async over TCP, a real redis-server.

Every test compares the stream entry by entry with what the simulator recorded
sending, and fails on any ERROR from ib_async's decoder.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gateway_sim.simulator import SimulatorConfig, SimulatorThread
from tests.helpers import REPO_ROOT, wait_until
from tests.producer_harness import (
    assert_matches_record,
    expected_kinds,
    producer_settings,
    read_stream,
    running_producer,
    running_simulator,
    settle,
    stream_length,
    until,
)

pytestmark = pytest.mark.usefixtures("no_decoder_errors")


@pytest.mark.parametrize("fast_decode", [True, False], ids=["direct-decoders", "ib_async-events"])
def test_snapshot_and_live_pushes_single_account(
    redis_url: str, stream: str, tmp_path: Path, fast_decode: bool
) -> None:
    async def scenario() -> None:
        async with running_simulator(accounts=["DU100001"], positions=40, rate=150) as sim:
            settings = producer_settings(
                redis_url, stream, sim.port, tmp_path / "spool", ib_fast_decode=fast_decode
            )
            async with running_producer(settings) as producer:
                await until(lambda: sim.events >= 300)  # snapshot plus live pushes
                sent = await settle(sim, redis_url, stream, "DU100001")
                assert await producer.stop()
            kinds = {s.kind for s in sent}
            assert kinds == {"portfolio"}
            closes = [s for s in sent if s.position == 0]
            assert closes, "the run should include positions that close (published as 0)"
            assert {s.instrument.sec_type for s in sent} == {"STK", "OPT"}
            assert_matches_record(read_stream(redis_url, stream), sent)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("configured", "portfolio", "positions_only"),
    [
        ([], "DU100001", {"DU100002", "DU100003"}),
        (["DU100003", "DU100001"], "DU100003", {"DU100001"}),
    ],
    ids=["all-accounts-of-login", "configured-subset"],
)
def test_multi_account_login(
    redis_url: str,
    stream: str,
    tmp_path: Path,
    configured: list[str],
    portfolio: str,
    positions_only: set[str],
) -> None:
    """One account gets IB's portfolio stream; the others positions plus PnL-single."""

    async def scenario() -> None:
        accounts = ["DU100001", "DU100002", "DU100003"]
        async with running_simulator(accounts=accounts, positions=45, rate=150) as sim:
            settings = producer_settings(
                redis_url, stream, sim.port, tmp_path / "spool", ib_accounts=configured
            )
            async with running_producer(settings) as producer:
                await until(lambda: sim.events >= 400)
                sent = await settle(sim, redis_url, stream, portfolio, positions_only)
                assert await producer.stop()
                assert producer.source.portfolio_account == portfolio
                assert producer.source.position_accounts == positions_only
            updates = read_stream(redis_url, stream)
            assert {u.account for u in updates} == {portfolio, *positions_only}
            assert {s.kind for s in sent} == {"portfolio", "position", "pnl_single"}
            assert_matches_record(updates, sent)
            # PnL-single fills market value and price for the positions-only accounts.
            from_pnl = [u for u, s in zip(updates, sent, strict=True) if s.kind == "pnl_single"]
            assert all(u.market_value is not None and u.market_price is not None for u in from_pnl)
            for update in from_pnl:
                assert update.market_price is not None and update.market_value is not None
                assert update.market_price * update.position * update.multiplier == pytest.approx(
                    update.market_value
                )

    asyncio.run(scenario())


def test_sigterm_flushes_and_exits_zero(redis_url: str, stream: str, tmp_path: Path) -> None:
    """``python -m producer`` as its own process: SIGTERM flushes, disconnects, exits 0."""
    thread = SimulatorThread(SimulatorConfig(accounts=["DU100001"], positions=25, rate=100))
    port = thread.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSLAKE_")}
    env |= {
        "POSLAKE_REDIS_URL": redis_url,
        "POSLAKE_STREAM": stream,
        "POSLAKE_IB_PORT": str(port),
        "POSLAKE_PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
    }
    log = tmp_path / "producer.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "producer"], env=env, cwd=REPO_ROOT, stdout=out, stderr=out
        )
    try:
        wait_until(lambda: stream_length(redis_url, stream) >= 100, timeout=30)
        thread.run("pause")
        expected = len(expected_kinds(thread.snapshot(), "DU100001", set()))
        wait_until(lambda: stream_length(redis_url, stream) >= expected, timeout=30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        thread.stop()
    text = log.read_text()
    assert "producer stopped" in text and "flushed=True" in text
    assert "ib_async.Decoder" not in text
    sent = expected_kinds(thread.snapshot(), "DU100001", set())
    assert_matches_record(read_stream(redis_url, stream), sent)
