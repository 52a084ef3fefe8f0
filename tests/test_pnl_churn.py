"""PnL-single subscriptions under open/close churn: the real ib_async client against the
simulator. Requests stay within the budget (counted where the simulator receives them),
a position that closes and reopens within the grace period keeps its subscription, and
every open position still gets its PnL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway_sim import protocol as tws
from gateway_sim.simulator import GatewaySimulator
from tests.producer_harness import (
    most_in_window,
    producer_settings,
    read_stream,
    running_producer,
    running_simulator,
    until,
)

PORTFOLIO, OTHER = "DU100001", "DU100002"
PNL_REQUESTS = {tws.Incoming.REQ_PNL_SINGLE, tws.Incoming.CANCEL_PNL_SINGLE}


def pnl_request_times(sim: GatewaySimulator, conid: int | None = None) -> list[float]:
    return sorted(
        r.at
        for r in sim.requests
        if r.msg_id in PNL_REQUESTS and (conid is None or r.conid == conid)
    )


def priced_positions(redis_url: str, stream: str, account: str) -> dict[int, float]:
    """Per contract of the account, the position of its newest update carrying PnL figures."""
    priced: dict[int, float] = {}
    for update in read_stream(redis_url, stream):
        if update.account == account and update.market_value is not None:
            priced[update.conid] = update.position
    return priced


def test_churn_stays_within_budget_and_every_position_gets_pnl(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    budget, churn_s = 12, 2.5

    async def scenario() -> None:
        async with running_simulator(
            accounts=[PORTFOLIO, OTHER], positions=80, rate=1500, seed=7
        ) as sim:
            settings = producer_settings(
                redis_url, stream, sim.port, tmp_path / "spool",
                ib_accounts=[PORTFOLIO, OTHER], ib_pnl_requests_per_s=budget,
                ib_pnl_cancel_grace_s=0.3,
            )  # fmt: skip
            async with running_producer(settings) as producer:
                subscriptions = producer.source.subscriptions
                await until(producer.source.ib.isConnected)
                queued, started = 0, asyncio.get_running_loop().time()
                while asyncio.get_running_loop().time() - started < churn_s:
                    queued = max(queued, subscriptions.ib_queue())
                    await asyncio.sleep(0.02)
                sim.pause()
                opened = sum(1 for s in sim.record if s.kind == "position" and s.account == OTHER)
                # The churn asked for far more than the budget: the old one-request-per-
                # open-and-close would have sent `opened` requests, over ib_async's 45/s.
                assert opened > 3 * budget * churn_s
                assert subscriptions.stats.deferred > 0
                held = {h.instrument.conid: h.position for h in sim.portfolio.holdings_of(OTHER)}
                assert held
                # Every open position gets its PnL, and closed ones are cancelled.
                await until(
                    lambda: all(
                        priced_positions(redis_url, stream, OTHER).get(c) == p
                        for c, p in held.items()
                    ),
                    timeout=20,
                )
                await until(lambda: subscriptions.closing == 0 and subscriptions.pending == 0)
                assert subscriptions.active == len(held)
                assert await producer.stop()
        times = pnl_request_times(sim)
        assert len(times) > budget  # the budget was used
        # Counted on arrival; a 0.9 s window leaves room for network jitter.
        assert most_in_window(times, 0.9) <= budget
        every = sorted(r.at for r in sim.requests)
        assert most_in_window(every, 0.9) < 45
        assert queued == 0  # nothing waited in ib_async's throttle queue

    asyncio.run(scenario())


@pytest.mark.parametrize("fast_decode", [True, False])
def test_reopen_within_grace_keeps_the_subscription(
    redis_url: str, stream: str, tmp_path: Path, fast_decode: bool
) -> None:
    grace_s = 1.0

    async def scenario() -> None:
        async with running_simulator(accounts=[PORTFOLIO, OTHER], positions=6, rate=0) as sim:
            settings = producer_settings(
                redis_url, stream, sim.port, tmp_path / "spool",
                ib_accounts=[PORTFOLIO, OTHER], ib_pnl_cancel_grace_s=grace_s,
                ib_fast_decode=fast_decode,
            )  # fmt: skip
            async with running_producer(settings) as producer:
                subscriptions = producer.source.subscriptions
                holdings = sim.portfolio.holdings_of(OTHER)
                assert holdings
                conid = holdings[0].instrument.conid
                await until(lambda: conid in priced_positions(redis_url, stream, OTHER))
                sim.set_position(OTHER, conid, 0)
                await asyncio.sleep(0.3)
                sim.set_position(OTHER, conid, 3.0)
                # The reopened position is priced through the subscription it kept.
                await until(lambda: priced_positions(redis_url, stream, OTHER).get(conid) == 3.0)
                assert subscriptions.stats.reused == 1
                await asyncio.sleep(grace_s)  # past the grace period of the first close
                requests = [r.msg_id for r in sim.requests if r.conid == conid]
                assert requests == [tws.Incoming.REQ_PNL_SINGLE]
                # Closed for good: cancelled once the grace period is over, not before.
                loop = asyncio.get_running_loop()
                closed_at = loop.time()
                sim.set_position(OTHER, conid, 0)
                await until(lambda: len(pnl_request_times(sim, conid)) == 2, timeout=5)
                cancel = [r for r in sim.requests if r.conid == conid][-1]
                assert cancel.msg_id == tws.Incoming.CANCEL_PNL_SINGLE
                assert cancel.at - closed_at >= grace_s
                assert subscriptions.active == len(sim.portfolio.holdings_of(OTHER))
                assert await producer.stop()

    asyncio.run(scenario())
