"""Option Greeks from IB market data: the real ib_async client and the producer against
the simulator's market data (Black-Scholes computations, its line limit and faults).

Checked: every option held gets Greeks rows; IB's not-computed and unset values are
null; a closed position loses its line and a reconnect restores them all; past the
line budget the simulator never sees more lines than the budget and every option gets a
fresh sample within the rotation interval; delayed-only and unsubscribed contracts, a
competing session: rows carry the data type, nothing crashes, the metrics count them;
requests stay within the budget under churn."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import redis
from prometheus_client import generate_latest

from gateway_sim import protocol as tws
from gateway_sim.simulator import GatewaySimulator
from producer.metrics import ProducerMetrics
from shared.greeks import GREEK_COLUMNS, OptionGreeks
from shared.wire import decode_observation
from tests.producer_harness import (
    most_in_window,
    producer_settings,
    running_producer,
    running_simulator,
    until,
)

PORTFOLIO, OTHER = "DU100001", "DU100002"
MARKET_DATA_REQUESTS = {tws.Incoming.REQ_MKT_DATA, tws.Incoming.CANCEL_MKT_DATA,
                        tws.Incoming.REQ_MARKET_DATA_TYPE}  # fmt: skip


def stream_greeks(redis_url: str, stream: str) -> list[OptionGreeks]:
    client = redis.Redis.from_url(redis_url)
    try:
        entries: Any = client.xrange(stream)
    finally:
        client.close()
    return [
        observation
        for _, fields in entries
        if fields.get(b"kind") == b"option_greeks"
        and isinstance(observation := decode_observation(fields), OptionGreeks)
    ]


def held_options(sim: GatewaySimulator) -> set[int]:
    return {
        h.instrument.conid
        for h in sim.portfolio.holdings.values()
        if h.instrument.sec_type == "OPT"
    }


def test_every_option_gets_greeks_closes_cancel_and_a_reconnect_restores(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with running_simulator(
            accounts=[PORTFOLIO, OTHER], positions=24, rate=30, seed=5, fills=False,
            md_interval_s=0.2, md_not_computed=0.3,
        ) as sim:  # fmt: skip
            settings = producer_settings(
                redis_url, stream, sim.port, tmp_path / "spool",
                ib_accounts=[PORTFOLIO, OTHER], ib_greeks_sample_s=0.5,
                ib_greeks_min_interval_s=0.1,
            )  # fmt: skip
            async with running_producer(settings) as producer:
                await until(producer.source.ib.isConnected)
                await asyncio.sleep(3.0)  # opens and closes while lines come and go
                sim.pause()
                held = held_options(sim)
                assert len(held) >= 10
                # Closed positions lost their line; every held option has one.
                await until(lambda: sim.streaming_conids() == held, timeout=15)
                await asyncio.sleep(1.0)
                # Nothing is kept for options no longer held (a late tick of a closed
                # one's line included): the freshness it reports is of held ones.
                assert set(producer.source.greeks.fresh_at) == held
                rows = stream_greeks(redis_url, stream)
                assert {g.conid for g in rows} >= held
                _check_values(rows)
                assert producer.source.greeks.stats.not_computed > 0
                # A reconnect: every line is requested again and rows come again.
                before = len(rows)
                sim.drop_connections()
                await until(lambda: sim.connections >= 2 and producer.source.ib.isConnected())
                await until(lambda: sim.streaming_conids() == held, timeout=15)
                await asyncio.sleep(1.0)
                again = stream_greeks(redis_url, stream)[before:]
                assert {g.conid for g in again} >= held
                assert sim.market_data.max_lines <= settings.ib_greeks_lines

    asyncio.run(scenario())


def _check_values(rows: list[OptionGreeks]) -> None:
    """IB's sentinels never reach the stream; signs follow the model."""
    nulls = 0
    for g in rows:
        for name in GREEK_COLUMNS:
            value = getattr(g, name)
            nulls += value is None
            assert value is None or (math.isfinite(value) and abs(value) < 1e300), (name, g)
        assert g.delta is None or (0 < g.delta < 1 if g.right == "C" else -1 < g.delta < 0)
        assert g.vega is None or g.vega > 0
        assert g.gamma is None or g.gamma > 0
        assert g.und_price is None or g.und_price > 0
        assert g.data_type == 1 and g.tick_type in (10, 11, 12, 13)
    assert nulls > 0  # md_not_computed sent some: they are null, not -2 or 1.79e308
    assert {g.source for g in rows} >= {"model", "bid", "ask"}


def test_more_options_than_lines_rotate_within_the_interval(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    rotation_s, budget = 6.0, 10

    async def scenario() -> None:
        async with running_simulator(
            accounts=[PORTFOLIO], positions=45, rate=0, seed=3, fills=False,
            md_lines=budget + 2, md_interval_s=0.3, md_snapshot_delay_s=0.2,
        ) as sim:  # fmt: skip
            settings = producer_settings(
                redis_url, stream, sim.port, tmp_path / "spool", ib_accounts=[PORTFOLIO],
                ib_greeks_lines=budget, ib_greeks_rotation_s=rotation_s,
                ib_greeks_sample_s=1.0,
            )  # fmt: skip
            async with running_producer(settings) as producer:
                await until(producer.source.ib.isConnected)
                started = asyncio.get_running_loop().time()
                await asyncio.sleep(3 * rotation_s)
                lines = producer.source.greeks.lines
                assert lines.rotating and lines.stats.snapshots > 0
                assert len(lines.streaming) == budget - budget // 3
                elapsed = asyncio.get_running_loop().time() - started
        held = held_options(sim)
        assert len(held) > 3 * budget
        # The simulator never saw more lines than the budget, snapshots included.
        assert sim.market_data.max_lines <= budget
        rows = stream_greeks(redis_url, stream)
        stamps: dict[int, list[float]] = defaultdict(list)
        for g in rows:
            if g.source == "model":
                stamps[g.conid].append(g.timestamp.timestamp())
        assert stamps.keys() == held
        end = max(max(t) for t in stamps.values())
        for conid, times in stamps.items():
            gaps = [b - a for a, b in itertools.pairwise(sorted(times))] + [end - max(times)]
            assert max(gaps) <= rotation_s + 1.0, (conid, max(gaps))
        assert elapsed >= 3 * rotation_s

    asyncio.run(scenario())


def test_delayed_only_unsubscribed_and_competing_session_are_counted_not_fatal(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with running_simulator(
            accounts=[PORTFOLIO], positions=30, rate=0, seed=8, fills=False,
            md_delayed_only=True, md_unsubscribed_every=4, md_interval_s=0.3,
        ) as sim:  # fmt: skip
            settings = producer_settings(
                redis_url, stream, sim.port, tmp_path / "spool", ib_accounts=[PORTFOLIO],
                ib_greeks_retry_s=1.0, ib_greeks_sample_s=0.5, metrics_port=0,
            )  # fmt: skip
            async with running_producer(settings) as producer:
                greeks = producer.source.greeks
                await until(producer.source.ib.isConnected)
                held = held_options(sim)
                unsubscribed = {c for c in held if c % 4 == 0}
                assert unsubscribed and held - unsubscribed
                await until(lambda: {g.conid for g in stream_greeks(redis_url, stream)}
                            >= held - unsubscribed, timeout=15)  # fmt: skip
                await asyncio.sleep(3.0)  # unsubscribed ones are retried every second
                errors = dict(greeks.stats.errors)
                assert greeks.data_type == 4 and greeks.stats.data_type_fallbacks == 1
                assert errors.get("10167", 0) >= len(held - unsubscribed)
                # Retried at the retry pace, not in a loop: ~5 s / 1 s per contract.
                assert len(unsubscribed) <= errors["354"] <= 9 * len(unsubscribed) + len(held)
                rows = stream_greeks(redis_url, stream)
                assert not {g.conid for g in rows} & unsubscribed
                assert {(g.data_type, g.tick_type >= 80) for g in rows} == {(4, True)}
                metrics = ProducerMetrics(producer.source, producer.outbox)
                text = _scrape(metrics)
                assert 'poslake_producer_greeks_errors_total{code="354"}' in text
                assert "poslake_producer_greeks_data_type 4.0" in text
                assert producer.source.ib.isConnected()

    asyncio.run(scenario())


def test_competing_session_waits_and_comes_back(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with running_simulator(
            accounts=[PORTFOLIO], positions=20, rate=0, seed=4, fills=False, md_interval_s=0.2,
        ) as sim:  # fmt: skip
            settings = producer_settings(
                redis_url, stream, sim.port, tmp_path / "spool", ib_accounts=[PORTFOLIO],
                ib_greeks_retry_s=1.5, ib_greeks_sample_s=0.3, ib_greeks_fallback_data_type=0,
            )  # fmt: skip
            async with running_producer(settings) as producer:
                greeks = producer.source.greeks
                await until(producer.source.ib.isConnected)
                held = held_options(sim)
                await until(lambda: sim.streaming_conids() == held, timeout=15)
                sim.set_competing_session(True)
                await until(lambda: greeks.stats.errors.get("10197", 0) >= len(held))
                assert sim.streaming_conids() == set()
                await asyncio.sleep(2.0)
                sim.set_competing_session(False)
                await until(lambda: sim.streaming_conids() == held, timeout=15)
                assert producer.source.ib.isConnected()
                # Asked again at the retry pace: a few refusals per contract, no flood.
                assert greeks.stats.errors["10197"] <= 4 * len(held)

    asyncio.run(scenario())


def test_requests_stay_within_the_budget_under_churn(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with running_simulator(
            accounts=[PORTFOLIO, OTHER], positions=80, rate=600, seed=12, fills=False,
        ) as sim:  # fmt: skip
            settings = producer_settings(
                redis_url, stream, sim.port, tmp_path / "spool", ib_accounts=[PORTFOLIO, OTHER],
                ib_greeks_requests_per_s=15, ib_greeks_lines=40,
            )  # fmt: skip
            async with running_producer(settings) as producer:
                await until(producer.source.ib.isConnected)
                queued, started = 0, asyncio.get_running_loop().time()
                while asyncio.get_running_loop().time() - started < 4.0:
                    queued = max(queued, len(producer.source.ib.client._msgQ))
                    await asyncio.sleep(0.02)
                sim.pause()
                assert producer.source.greeks.lines.stats.requests > 30
        times = sorted(r.at for r in sim.requests if r.msg_id in MARKET_DATA_REQUESTS)
        assert most_in_window(times, 1.0) <= 15 + 1  # a window's edges
        assert queued <= 5  # ib_async's own throttle queue stays (nearly) empty
        assert sim.market_data.max_lines <= 40

    asyncio.run(scenario())


def _scrape(metrics: ProducerMetrics) -> str:
    return generate_latest(metrics.registry).decode()
