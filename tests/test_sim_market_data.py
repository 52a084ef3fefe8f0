"""The simulator's market data, through the real ib_async client: Black-Scholes Greeks,
the line limit, snapshots, cancels and IB's market-data faults."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from ib_async import IB, Contract

from gateway_sim import market_data as md
from gateway_sim.cli import build_parser
from gateway_sim.portfolio import Instrument
from gateway_sim.protocol import UNSET_DOUBLE
from gateway_sim.simulator import GatewaySimulator, SimulatorConfig, SimulatorThread
from tests.producer_harness import running_simulator, until

pytestmark = pytest.mark.usefixtures("no_decoder_errors")

FAST = {"accounts": ["DU1"], "positions": 0, "rate": 0, "md_interval_s": 0.1}


@dataclass
class Client:
    """A connected ib_async client and the errors it was sent: (code, conid)."""

    ib: Any
    errors: list[tuple[int, int]] = field(default_factory=list)
    tick_types: set[int] = field(default_factory=set)  # price ticks that reached tickers

    def stream(self, instrument: Instrument, exchange: str = "SMART") -> Any:
        return self.ib.reqMktData(Contract(conId=instrument.conid, exchange=exchange))

    def codes(self, conid: int) -> list[int]:
        return [code for code, c in self.errors if c == conid]


@contextlib.asynccontextmanager
async def connected(sim: GatewaySimulator, client_id: int = 7) -> AsyncIterator[Client]:
    ib = IB()
    client = Client(ib)

    def on_error(req_id: int, code: int, text: str, contract: Any) -> None:
        if req_id > 0:
            client.errors.append((code, contract.conId if contract else 0))

    def on_tickers(tickers: Any) -> None:
        client.tick_types.update(t.tickType for ticker in tickers for t in ticker.ticks)

    ib.errorEvent += on_error
    ib.pendingTickersEvent += on_tickers
    await ib.connectAsync("127.0.0.1", sim.port, clientId=client_id, readonly=True, timeout=5)
    try:
        yield client
    finally:
        ib.disconnect()


def option(sim: GatewaySimulator, strike: float, right: str, days: int = 30) -> Instrument:
    expiry = (sim.portfolio.today + timedelta(days=days)).strftime("%Y%m%d")
    return next(
        i
        for i in sim.portfolio.instruments
        if i.symbol == "AAPL" and i.expiry == expiry and i.strike == strike and i.right == right
    )


def options(sim: GatewaySimulator, count: int, days: int = 45) -> list[Instrument]:
    return [option(sim, 180.0 + k, "C", days) for k in range(count)]


def has_greeks(ticker: Any) -> bool:
    return bool(ticker.modelGreeks and ticker.bidGreeks and ticker.askGreeks)


def years(sim: GatewaySimulator, instrument: Instrument) -> float:
    return md.years_to(instrument.expiry, sim.portfolio.today)


def test_black_scholes_textbook_values() -> None:
    call = md.black_scholes(100.0, 100.0, 1.0, 0.2, 0.05, "C")
    put = md.black_scholes(100.0, 100.0, 1.0, 0.2, 0.05, "P")
    assert call.price == pytest.approx(10.4506, abs=1e-4)
    assert put.price == pytest.approx(5.5735, abs=1e-4)
    assert call.price - put.price == pytest.approx(100.0 - 100.0 * math.exp(-0.05), abs=1e-12)
    assert call.delta == pytest.approx(0.63683, abs=1e-5)
    assert put.delta == pytest.approx(call.delta - 1.0, abs=1e-12)
    assert call.gamma == pytest.approx(0.018762, abs=1e-6) and put.gamma == call.gamma
    assert call.vega == pytest.approx(0.37524, abs=1e-5)  # per vol point
    assert call.theta == pytest.approx(-6.4140 / 365, abs=1e-5)  # per calendar day
    assert put.theta == pytest.approx(-1.6579 / 365, abs=1e-5)


def test_model_greeks_are_black_scholes_at_the_spot() -> None:
    async def scenario() -> None:
        async with running_simulator(**FAST, md_not_computed=0.0) as sim, connected(sim) as c:
            call, put = option(sim, 190.0, "C"), option(sim, 190.0, "P")
            stock = sim.portfolio.instrument(265_598)
            assert stock is not None and stock.symbol == "AAPL"
            tickers = [c.stream(call), c.stream(put), c.stream(stock)]
            await until(lambda: all(map(has_greeks, tickers[:2])) and tickers[2].bid > 0, 5)
            for instrument, ticker in zip((call, put), tickers[:2], strict=True):
                model, bid, ask = ticker.modelGreeks, ticker.bidGreeks, ticker.askGreeks
                assert model.undPrice == sim.portfolio.spot["AAPL"] == 190.0
                assert model.pvDividend == 0.0 and 0.15 <= model.impliedVol <= 0.6
                want = md.black_scholes(model.undPrice, 190.0, years(sim, instrument),
                                        model.impliedVol, md.RATE, instrument.right)  # fmt: skip
                got = (model.optPrice, model.delta, model.gamma, model.vega, model.theta)
                assert got == pytest.approx(
                    (want.price, want.delta, want.gamma, want.vega, want.theta), rel=1e-12
                )
                assert model.gamma > 0 and model.vega > 0 and model.theta < 0
                assert bid.impliedVol < model.impliedVol < ask.impliedVol
                assert bid.optPrice < model.optPrice < ask.optPrice
                assert 0 < ticker.bid <= bid.optPrice < ask.optPrice <= ticker.ask
                assert ticker.marketDataType == 1 and ticker.minTick == 0.01
            assert 0 < tickers[0].modelGreeks.delta < 1
            assert -1 < tickers[1].modelGreeks.delta < 0
            assert tickers[2].modelGreeks is None
            assert (tickers[2].bid, tickers[2].ask) == (189.99, 190.01)
            assert sim.streaming_conids() == {call.conid, put.conid, stock.conid}
            # The spot moves: the next rounds follow it.
            delta = tickers[0].modelGreeks.delta
            sim.portfolio.spot["AAPL"] = 200.0
            await until(lambda: tickers[0].modelGreeks.undPrice == 200.0, 3)
            assert tickers[0].modelGreeks.delta > delta
            await until(lambda: len(sim.market_data.computation_times(call.conid)) >= 5, 3)
            times = sim.market_data.computation_times(call.conid)  # [0]: at the request
            assert all(0.05 < b - a < 0.5 for a, b in itertools.pairwise(times[1:]))
            assert c.codes(call.conid) == [] and set(c.tick_types) <= {1, 2}

    asyncio.run(scenario())


def test_line_limit_gives_101() -> None:
    async def scenario() -> None:
        async with running_simulator(**FAST, md_lines=4) as sim, connected(sim) as c:
            wanted = options(sim, 7)
            tickers = [c.stream(i) for i in wanted[:6]]
            await until(lambda: len(c.errors) == 2, 5)
            assert c.errors == [(101, wanted[4].conid), (101, wanted[5].conid)]
            assert sim.lines_now() == 4
            await until(lambda: all(t.modelGreeks for t in tickers[:4]), 3)
            assert tickers[4].modelGreeks is None and tickers[5].modelGreeks is None
            c.ib.cancelMktData(tickers[0].contract)
            await until(lambda: sim.lines_now() == 3, 3)
            late = c.stream(wanted[6])
            await until(lambda: late.modelGreeks is not None, 3)
            c.stream(wanted[0])  # one more: full again
            await until(lambda: len(c.errors) == 3, 3)
            assert c.errors[2] == (101, wanted[0].conid) and sim.lines_now() == 4
            stats = sim.sent_stats()["market_data"]
            assert stats["max_lines"] == 4 and stats["errors"] == {"101": 3}
            assert stats["requests"] == 8 and stats["cancels"] == 1

    asyncio.run(scenario())


def test_delayed_only_login() -> None:
    async def scenario() -> None:
        config = {**FAST, "md_delayed_only": True}
        async with running_simulator(**config) as sim, connected(sim) as c:
            first, second = options(sim, 2)
            ticker = c.stream(first)
            await until(lambda: c.codes(first.conid) == [354], 3)
            assert sim.lines_now() == 0 and ticker.modelGreeks is None
            c.ib.reqMarketDataType(3)
            ticker = c.stream(first)
            await until(lambda: ticker.modelGreeks is not None, 3)  # from tick 83
            assert c.codes(first.conid) == [354, 10167]
            assert ticker.marketDataType == 3 and ticker.bidGreeks and ticker.askGreeks
            assert 0 < ticker.bid < ticker.ask and {66, 67} <= c.tick_types
            assert not c.tick_types & {1, 2}
            c.ib.reqMarketDataType(4)
            frozen = c.stream(second)
            await until(lambda: frozen.modelGreeks is not None and frozen.marketDataType == 4, 3)
            assert sim.lines_now() == 2

    asyncio.run(scenario())


def test_unsubscribed_unknown_and_exchangeless_requests() -> None:
    async def scenario() -> None:
        async with running_simulator(**FAST, md_unsubscribed_every=7) as sim, connected(sim) as c:
            candidates = options(sim, 10)
            refused = next(i for i in candidates if i.conid % 7 == 0)
            served, bare = [i for i in candidates if i.conid % 7 != 0][:2]
            ticker = c.stream(served)
            c.stream(refused)
            c.stream(bare, exchange="")
            c.ib.reqMktData(Contract(conId=1, exchange="SMART"))
            await until(lambda: len(c.errors) == 3 and ticker.modelGreeks is not None, 3)
            assert sorted(c.errors) == [(200, 1), (321, bare.conid), (354, refused.conid)]
            c.ib.reqMarketDataType(3)  # no subscription at all: delayed is refused too
            c.stream(refused)
            await until(lambda: c.codes(refused.conid) == [354, 354], 3)
            assert sim.streaming_conids() == {served.conid}
            errors = sim.sent_stats()["market_data"]["errors"]
            assert errors == {"200": 1, "321": 1, "354": 2}

    asyncio.run(scenario())


def test_competing_live_session() -> None:
    async def scenario() -> None:
        async with running_simulator(**FAST, md_competing=True) as sim, connected(sim) as c:
            first, second = options(sim, 2)
            c.stream(first)
            await until(lambda: c.codes(first.conid) == [10197], 3)
            assert sim.lines_now() == 0
            c.ib.reqMarketDataType(3)  # delayed data is not affected
            delayed = c.stream(first)
            await until(lambda: delayed.modelGreeks is not None, 3)
            assert delayed.marketDataType == 3 and c.codes(first.conid) == [10197]
            sim.set_competing_session(False)
            c.ib.reqMarketDataType(1)
            live = c.stream(second)
            await until(lambda: live.modelGreeks is not None, 3)
            assert live.marketDataType == 1 and sim.lines_now() == 2
            sim.set_competing_session(True)  # the live line is taken away
            await until(lambda: c.codes(second.conid) == [10197], 3)
            assert sim.streaming_conids() == {first.conid}

    asyncio.run(scenario())


def test_snapshot_ends_and_frees_its_line() -> None:
    async def scenario() -> None:
        config = {**FAST, "md_snapshot_delay_s": 0.3}
        async with running_simulator(**config) as sim, connected(sim) as c:
            first, second = options(sim, 2)
            ticker = c.ib.reqMktData(Contract(conId=first.conid, exchange="SMART"), "", True)
            await until(lambda: sim.lines_now() == 1, 3)
            assert ticker.modelGreeks is None and sim.streaming_conids() == set()
            await until(lambda: sim.lines_now() == 0, 3)
            # The line is freed as the snapshot is sent: the client may not have read it yet.
            await until(lambda: ticker.modelGreeks is not None and ticker.lastGreeks is not None, 3)
            assert ticker.bidGreeks and ticker.askGreeks and ticker.bid > 0
            # reqTickersAsync waits for tickSnapshotEnd (57): its arrival ends the wait.
            contract = Contract(conId=second.conid, exchange="SMART")
            (done,) = await asyncio.wait_for(c.ib.reqTickersAsync(contract), 3)
            assert done.modelGreeks is not None and sim.lines_now() == 0
            stats = sim.sent_stats()["market_data"]
            assert (stats["snapshots"], stats["snapshots_ended"], stats["rounds"]) == (2, 2, 2)
            assert len(sim.market_data.computation_times(first.conid)) == 1

    asyncio.run(scenario())


def test_cancel_disconnect_and_1101_free_lines() -> None:
    async def scenario() -> None:
        async with running_simulator(**FAST) as sim:
            first, second = options(sim, 2)
            async with connected(sim) as c:
                tickers = [c.stream(first), c.stream(second)]
                await until(lambda: all(t.modelGreeks for t in tickers), 3)
                c.ib.cancelMktData(tickers[0].contract)
                await until(lambda: sim.lines_now() == 1, 3)
                sent = len(sim.market_data.computation_times(first.conid))
                await asyncio.sleep(0.35)
                assert len(sim.market_data.computation_times(first.conid)) == sent
                assert sim.streaming_conids() == {second.conid}
                sim.send_link_code(1101)  # restored, data lost: subscriptions are gone
                assert sim.lines_now() == 0
                c.stream(first)
                await until(lambda: sim.lines_now() == 1, 3)
            await until(lambda: sim.lines_now() == 0, 3)  # the disconnect frees it
            assert sim.sent_stats()["market_data"]["cancels"] == 1

    asyncio.run(scenario())


def test_not_computed_values_reach_ib_async() -> None:
    async def scenario() -> None:
        async with running_simulator(**FAST, md_not_computed=1.0) as sim, connected(sim) as c:
            ticker = c.stream(option(sim, 190.0, "C"))
            await until(lambda: has_greeks(ticker), 3)
            for greeks in (ticker.modelGreeks, ticker.bidGreeks, ticker.askGreeks):
                # ib_async turns -1/-2 into None except vega and theta (its quirk).
                assert greeks.impliedVol is None
                assert greeks.vega == -2.0 and greeks.theta == -2.0
                assert 0 < greeks.delta < 1 and greeks.gamma > 0 and greeks.optPrice > 0
                # IB's unset double passes through as 1.79e308, in one of the two.
                assert (greeks.undPrice == UNSET_DOUBLE) != (greeks.pvDividend == UNSET_DOUBLE)

    asyncio.run(scenario())


def test_flags_config_and_stats() -> None:
    args = build_parser().parse_args(
        ["--md-lines", "3", "--md-interval", "0.25", "--md-snapshot-delay", "1.5",
         "--md-not-computed", "0.5", "--md-unsubscribed-every", "9", "--md-delayed-only",
         "--md-competing"]
    )  # fmt: skip
    config = SimulatorConfig(**md.config_values(args))
    assert (config.md_lines, config.md_interval_s, config.md_snapshot_delay_s) == (3, 0.25, 1.5)
    assert (config.md_not_computed, config.md_unsubscribed_every) == (0.5, 9)
    assert config.md_delayed_only and config.md_competing
    defaults = SimulatorConfig(**md.config_values(build_parser().parse_args([])))
    assert (defaults.md_lines, defaults.md_interval_s, defaults.md_not_computed) == (100, 0.5, 0.05)
    assert not defaults.md_delayed_only and not defaults.md_competing
    with pytest.raises(ValueError, match="probability"):
        SimulatorConfig(md_not_computed=1.5)
    with pytest.raises(ValueError, match="md_interval_s"):
        SimulatorConfig(md_interval_s=0)
    stats = json.loads(json.dumps(GatewaySimulator(defaults).sent_stats()))["market_data"]
    assert stats["max_lines"] == 0 and stats["lines_now"] == 0 and stats["errors"] == {}


def test_competing_session_switched_from_another_thread() -> None:
    thread = SimulatorThread(SimulatorConfig(accounts=["DU1"], positions=0, rate=0))
    thread.start()
    try:
        thread.run("set_competing_session", True)
        assert thread.simulator.config.md_competing
        assert thread.run("lines_now") == 0 and thread.run("streaming_conids") == set()
        thread.run("set_competing_session", False)
        assert not thread.simulator.config.md_competing
    finally:
        thread.stop()
