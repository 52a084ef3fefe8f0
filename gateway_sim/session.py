"""One client connection to the gateway simulator: handshake, requests, subscriptions.

A session answers what ib_async asks at connect (positions, open and completed
orders, account updates for one account at a time, account updates per
account, executions) and keeps the subscriptions it was given: the account
whose portfolio it streams, position updates, and PnL-single per contract.
It also holds its market data type and market-data lines; its thin handlers for
reqMktData, cancelMktData and reqMarketDataType leave the rest to
gateway_sim/market_data.py. What it writes is appended to the simulator's
record as it is sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from gateway_sim import protocol as tws
from gateway_sim.market_data import LIVE, Line
from gateway_sim.portfolio import Holding, Instrument

if TYPE_CHECKING:
    from gateway_sim.simulator import GatewaySimulator

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SentUpdate:
    """One position-bearing message as the simulator sent it (its record of truth)."""

    seq: int
    sent_ns: int
    client_id: int
    kind: str  # "portfolio" (msg 7), "position" (msg 61) or "pnl_single" (msg 95)
    account: str
    instrument: Instrument
    position: float
    market_price: float | None = None
    market_value: float | None = None
    average_cost: float | None = None
    unrealized_pnl: float | None = None
    realized_pnl: float | None = None
    daily_pnl: float | None = None


FLUSH_BYTES = 64 * 1024


class ClientSession:
    """The server side of one TWS API connection."""

    def __init__(
        self,
        simulator: GatewaySimulator,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.sim = simulator
        self.reader = reader
        self.writer = writer
        self.client_id: int | None = None
        self.ready = False
        self.connected_at = time.monotonic()
        self.portfolio_account: str | None = None
        self.positions_subscribed = False
        self.pnl_by_key: dict[tuple[str, int], int] = {}
        self.account_multi: dict[int, str] = {}  # accountUpdateMulti subscriptions
        self.account_pnl: dict[int, str] = {}  # reqPnL subscriptions
        self.pnl_by_req: dict[int, tuple[str, int]] = {}
        self.md_type = LIVE  # reqMarketDataType, per connection
        self.md_lines: dict[int, Line] = {}  # market-data lines by reqId
        self._out = bytearray()

    # --- output ---------------------------------------------------------------

    def queue(self, data: bytes) -> None:
        self._out += data
        if len(self._out) >= FLUSH_BYTES:
            # Stream a long snapshot out as it is built, as a gateway does.
            self.flush()

    def flush(self) -> None:
        if self._out and not self.writer.is_closing():
            self.writer.write(bytes(self._out))
        self._out.clear()

    def close(self) -> None:
        self.flush()
        self.ready = False
        self.writer.close()

    def abort(self) -> None:
        """Drop the connection the way a crashing gateway does."""
        self.ready = False
        self._out.clear()
        transport = self.writer.transport
        transport.abort()

    # --- position-bearing messages (recorded) ---------------------------------

    def send_portfolio(self, holding: Holding) -> None:
        self.queue(holding.wire_portfolio or serialize(holding)[0])
        self._record("portfolio", holding)

    def send_position(self, holding: Holding) -> None:
        self.queue(holding.wire_position or serialize(holding)[1])
        self._record("position", holding)

    def send_pnl_single(self, req_id: int, holding: Holding) -> None:
        self.queue(
            tws.pnl_single(
                req_id,
                holding.position,
                holding.daily_pnl,
                holding.unrealized_pnl,
                holding.realized_pnl,
                holding.market_value,
            )
        )
        self._record("pnl_single", holding)

    def _record(self, kind: str, holding: Holding) -> None:
        sim = self.sim
        now = time.time_ns()
        sim.sent_count[kind] += 1
        sim.first_sent_ns.setdefault(kind, now)
        sim.last_sent_ns[kind] = now
        if not sim.config.record:
            return
        values: dict[str, float] = {}
        if kind == "portfolio":
            values = {
                "market_price": holding.market_price,
                "market_value": holding.market_value,
                "average_cost": holding.average_cost,
                "unrealized_pnl": holding.unrealized_pnl,
                "realized_pnl": holding.realized_pnl,
            }
        elif kind == "position":
            values = {"average_cost": holding.average_cost}
        else:
            values = {
                "market_value": holding.market_value,
                "unrealized_pnl": holding.unrealized_pnl,
                "realized_pnl": holding.realized_pnl,
                "daily_pnl": holding.daily_pnl,
            }
        sim.record.append(
            SentUpdate(
                seq=len(sim.record),
                sent_ns=now,
                client_id=self.client_id or 0,
                kind=kind,
                account=holding.account,
                instrument=holding.instrument,
                position=holding.position,
                **values,
            )
        )

    # --- requests ---------------------------------------------------------------

    async def serve(self) -> None:
        try:
            await self._handshake()
            buffer = bytearray()
            while True:
                chunk = await self.reader.read(65536)
                if not chunk:
                    return
                buffer += chunk
                for fields in tws.split_frames(buffer):
                    self._handle(fields)
                    if self.writer.is_closing():
                        return
                self.flush()
        except (tws.ProtocolError, asyncio.IncompleteReadError) as exc:
            log.warning("closing connection: %s", exc, extra={"client_id": self.client_id})
        except (ConnectionError, OSError):
            pass  # the client went away
        finally:
            self.ready = False
            self.sim.forget(self)
            if not self.writer.is_closing():
                self.writer.close()

    async def _handshake(self) -> None:
        prefix = await self.reader.readexactly(len(tws.HANDSHAKE_PREFIX))
        if prefix != tws.HANDSHAKE_PREFIX:
            raise tws.ProtocolError(f"expected API\\0, got {prefix!r}")
        length = int.from_bytes(await self.reader.readexactly(4), "big")
        if length > 1024:
            raise tws.ProtocolError("version announcement too long")
        text = (await self.reader.readexactly(length)).decode(errors="replace")
        low, high = tws.parse_version_range(text)
        if high < tws.MIN_CLIENT_VERSION or low > tws.SERVER_VERSION:
            raise tws.ProtocolError(f"no common version with client range {low}..{high}")
        _, reply = tws.handshake_reply(high, datetime.now(UTC))
        self.writer.write(reply)

    def _handle(self, fields: list[str]) -> None:
        try:
            msg_id = int(fields[0])
        except (ValueError, IndexError):
            raise tws.ProtocolError(f"bad message {fields[:3]!r}") from None
        self.sim.note_request(msg_id, fields)
        handler = _HANDLERS.get(msg_id)
        if handler is None:
            log.debug("ignoring request %s", msg_id)
            return
        if msg_id != tws.Incoming.START_API and self.client_id is None:
            raise tws.ProtocolError(f"request {msg_id} before startApi")
        handler(self, fields)

    def _start_api(self, fields: list[str]) -> None:
        client_id = int(fields[2])
        if self.sim.client_id_taken(client_id, self):
            self.client_id = client_id
            self.queue(tws.error(-1, tws.CLIENT_ID_IN_USE, tws.CLIENT_ID_IN_USE_TEXT))
            log.info("refusing client id in use", extra={"client_id": client_id})
            self.close()
            return
        self.client_id = client_id
        self.ready = True
        self.connected_at = time.monotonic()
        self.sim.connections += 1
        self.queue(tws.next_valid_id(1))
        self.queue(tws.managed_accounts(self.sim.accounts))
        for code, text in tws.FARM_OK:
            self.queue(tws.error(-1, code, text))

    def _req_positions(self, fields: list[str]) -> None:
        self.positions_subscribed = True
        if self.sim.take_unanswered("positions"):
            return
        # The book as it is now, and, as IB answers, every contract closed today at 0.
        portfolio = self.sim.portfolio
        for holding in [*portfolio.holdings.values(), *portfolio.closed_today.values()]:
            self.send_position(holding)
        self.queue(tws.position_end())

    def _cancel_positions(self, fields: list[str]) -> None:
        self.positions_subscribed = False

    def _req_open_orders(self, fields: list[str]) -> None:
        if not self.sim.take_unanswered("open_orders"):
            self.queue(tws.open_order_end())

    def _req_completed_orders(self, fields: list[str]) -> None:
        if not self.sim.take_unanswered("completed_orders"):
            self.queue(tws.completed_orders_end())

    def _req_account_updates(self, fields: list[str]) -> None:
        subscribe, account = fields[2] in ("1", "true", "True"), fields[3]
        if not subscribe:
            self.portfolio_account = None
            return
        if account not in self.sim.accounts:
            self.queue(tws.error(-1, 321, f"Error validating request: unknown account {account}"))
            return
        # IB streams one account's portfolio at a time: a new request replaces the old.
        self.portfolio_account = account
        if self.sim.take_unanswered("account_updates"):
            return
        self.send_account_values(account)
        for holding in self.sim.portfolio.holdings_of(account):
            self.send_portfolio(holding)
        self.queue(tws.account_time(datetime.now(UTC)))
        self.queue(tws.account_download_end(account))

    def _req_account_updates_multi(self, fields: list[str]) -> None:
        req_id, account = int(fields[2]), fields[3]
        if self.sim.take_unanswered("account_updates_multi"):
            return
        accounts = self.sim.accounts if account in ("", "All") else [account]
        for name in accounts:
            self.account_multi[req_id] = name
            self.send_account_multi(req_id, name)
        self.queue(tws.account_update_multi_end(req_id))

    def _cancel_account_updates_multi(self, fields: list[str]) -> None:
        self.account_multi.pop(int(fields[2]), None)

    def _req_pnl(self, fields: list[str]) -> None:
        req_id, account = int(fields[1]), fields[2]
        self.account_pnl[req_id] = account
        self.send_account_pnl(req_id, account)

    def _cancel_pnl(self, fields: list[str]) -> None:
        self.account_pnl.pop(int(fields[1]), None)

    # --- account figures (gateway_sim/accounts.py) -------------------------------

    def send_account_values(self, account: str, download: bool = True) -> None:
        holdings = self.sim.portfolio.holdings_of(account)
        for key, value, currency in self.sim.book.values(account, holdings, download):
            self.queue(tws.account_value(key, value, currency, account))

    def send_account_multi(self, req_id: int, account: str, download: bool = True) -> None:
        holdings = self.sim.portfolio.holdings_of(account)
        for key, value, currency in self.sim.book.values(account, holdings, download):
            self.queue(tws.account_update_multi(req_id, account, key, value, currency))

    def send_account_pnl(self, req_id: int, account: str) -> None:
        holdings = self.sim.portfolio.holdings_of(account)
        self.queue(tws.pnl(req_id, *self.sim.book.pnl(account, holdings)))

    def send_account_figures(self) -> None:
        """Every account figure this connection is subscribed to, now (IB resends them
        about every 3 minutes)."""
        if self.portfolio_account:
            self.send_account_values(self.portfolio_account, download=False)
        for req_id, account in self.account_multi.items():
            self.send_account_multi(req_id, account, download=False)
        for req_id, account in self.account_pnl.items():
            self.send_account_pnl(req_id, account)

    def _req_executions(self, fields: list[str]) -> None:
        if self.sim.take_unanswered("executions"):
            return
        req_id = int(fields[2])
        for data in self.sim.executions_reply(req_id):
            self.queue(data)
        self.queue(tws.exec_details_end(req_id))

    def _req_current_time(self, fields: list[str]) -> None:
        if not self.sim.take_unanswered("current_time"):
            self.queue(tws.current_time(int(time.time())))

    def _req_ids(self, fields: list[str]) -> None:
        self.queue(tws.next_valid_id(1))

    def _req_account_summary(self, fields: list[str]) -> None:
        self.queue(tws.account_summary_end(int(fields[2])))

    def _req_pnl_single(self, fields: list[str]) -> None:
        req_id, account, conid = int(fields[1]), fields[2], int(fields[4])
        key = (account, conid)
        self.pnl_by_key[key] = req_id
        self.pnl_by_req[req_id] = key
        holding = self.sim.portfolio.holdings.get(key)
        if holding is not None:
            self.send_pnl_single(req_id, holding)

    def _cancel_pnl_single(self, fields: list[str]) -> None:
        key = self.pnl_by_req.pop(int(fields[1]), None)
        if key is not None:
            self.pnl_by_key.pop(key, None)

    # --- market data (gateway_sim/market_data.py) -------------------------------

    def _req_mkt_data(self, fields: list[str]) -> None:
        self.sim.market_data.request(self, fields)

    def _cancel_mkt_data(self, fields: list[str]) -> None:
        self.sim.market_data.cancel(self, int(fields[2]))

    def _req_market_data_type(self, fields: list[str]) -> None:
        self.sim.market_data.set_type(self, int(fields[2]))

    def forget_subscriptions(self) -> None:
        """What IB's 1101 (restored, data lost) means: every subscription must be redone,
        market-data lines included."""
        self.portfolio_account = None
        self.positions_subscribed = False
        self.pnl_by_key.clear()
        self.pnl_by_req.clear()
        self.sim.market_data.forget(self)


def serialize(holding: Holding) -> tuple[bytes, bytes]:
    """The holding's portfolio and position messages, kept on it until it changes."""
    instrument = holding.instrument
    holding.wire_portfolio = tws.update_portfolio(
        instrument.wire_contract(exchange=_primary(instrument)),
        holding.position,
        holding.market_price,
        holding.market_value,
        holding.average_cost,
        holding.unrealized_pnl,
        holding.realized_pnl,
        holding.account,
    )
    holding.wire_position = tws.position(
        holding.account, instrument.wire_contract(), holding.position, holding.average_cost
    )
    return holding.wire_portfolio, holding.wire_position


def prerender(holdings: Iterable[Holding]) -> None:
    """Serialize the book's messages ahead, so the first snapshot streams at full speed
    (a gateway's cost to serialize is not what the producer's benchmark measures)."""
    for holding in holdings:
        serialize(holding)


def _primary(instrument: Instrument) -> str:
    # Portfolio messages carry the primary exchange; options trade on SMART/many.
    return instrument.exchange if instrument.sec_type == "STK" else "AMEX"


_HANDLERS = {
    tws.Incoming.START_API: ClientSession._start_api,
    tws.Incoming.REQ_POSITIONS: ClientSession._req_positions,
    tws.Incoming.CANCEL_POSITIONS: ClientSession._cancel_positions,
    tws.Incoming.REQ_OPEN_ORDERS: ClientSession._req_open_orders,
    tws.Incoming.REQ_COMPLETED_ORDERS: ClientSession._req_completed_orders,
    tws.Incoming.REQ_ACCOUNT_UPDATES: ClientSession._req_account_updates,
    tws.Incoming.REQ_ACCOUNT_UPDATES_MULTI: ClientSession._req_account_updates_multi,
    tws.Incoming.REQ_EXECUTIONS: ClientSession._req_executions,
    tws.Incoming.REQ_CURRENT_TIME: ClientSession._req_current_time,
    tws.Incoming.REQ_IDS: ClientSession._req_ids,
    tws.Incoming.REQ_ACCOUNT_SUMMARY: ClientSession._req_account_summary,
    tws.Incoming.REQ_PNL_SINGLE: ClientSession._req_pnl_single,
    tws.Incoming.REQ_PNL: ClientSession._req_pnl,
    tws.Incoming.CANCEL_PNL: ClientSession._cancel_pnl,
    tws.Incoming.CANCEL_ACCOUNT_UPDATES_MULTI: ClientSession._cancel_account_updates_multi,
    tws.Incoming.CANCEL_PNL_SINGLE: ClientSession._cancel_pnl_single,
    tws.Incoming.REQ_MKT_DATA: ClientSession._req_mkt_data,
    tws.Incoming.CANCEL_MKT_DATA: ClientSession._cancel_mkt_data,
    tws.Incoming.REQ_MARKET_DATA_TYPE: ClientSession._req_market_data_type,
}
