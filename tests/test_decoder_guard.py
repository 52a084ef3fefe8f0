"""The decoder-error guard the producer tests rely on can fail."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import gateway_sim.protocol as tws
from tests.producer_harness import (
    DecoderErrors,
    producer_settings,
    read_stream,
    running_producer,
    running_simulator,
    until,
)

ACCOUNT = "DU100001"


def test_decoder_guard_catches_a_malformed_message(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    """The guard this suite relies on can fail: a portfolio message with a missing field
    is logged by the decoder logger and never published."""
    handler = DecoderErrors()
    logger = logging.getLogger("ib_async.Decoder")
    logger.addHandler(handler)

    async def scenario() -> None:
        async with running_simulator(accounts=[ACCOUNT], positions=5, rate=0) as sim:
            settings = producer_settings(redis_url, stream, sim.port, tmp_path / "spool")
            async with running_producer(settings) as producer:
                await until(lambda: len(read_stream(redis_url, stream)) == 5)
                session = next(iter(sim.sessions))
                session.queue(tws.message(7, 8, 265598, "AAPL", "STK"))  # 5 of 20 fields
                session.flush()
                await until(lambda: bool(handler.records))
                assert await producer.stop()

    try:
        asyncio.run(scenario())
    finally:
        logger.removeHandler(handler)
    assert "Error handling fields" in handler.records[0].getMessage()
    assert len(read_stream(redis_url, stream)) == 5
    handler.records.clear()
