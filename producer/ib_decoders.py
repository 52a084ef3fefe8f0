"""Direct decoders for the three position-bearing TWS messages.

ib_async's generic path for a portfolio or position message costs about 50 µs
(dataclass reflection, ``Contract.recreate``, an f-string log line of every
position whatever the log level), which caps a 20,000-position snapshot near
10,000 updates/s (bench/producer_burst.py). With ``POSLAKE_IB_FAST_DECODE``
(the default) the producer registers these functions in ib_async's decoder
table for messages 7 (updatePortfolio), 61 (position) and 95 (pnlSingle); they
unpack the exact field layouts of the protocol (``../shared/notes``) into
:class:`PositionSink` calls. Everything else (handshake, startup sync,
errors, requests) stays ib_async's. A message with a wrong field count is
logged on ib_async's own ``ib_async.Decoder`` logger, as ib_async does, and
skipped. ib_async's ``portfolio()``/``positions()`` caches and the matching
events are not fed in this mode; the producer keeps its own state.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any, Protocol

from ib_async.util import UNSET_DOUBLE

from producer.ib_mapping import ContractInfo, MappingError, map_contract

decoder_log = logging.getLogger("ib_async.Decoder")
log = logging.getLogger(__name__)


class PositionSink(Protocol):
    """What the decoders hand their messages to (the producer's IB source)."""

    def on_portfolio(
        self,
        account: str,
        contract: ContractInfo,
        position: float,
        market_price: float | None,
        market_value: float | None,
        average_cost: float | None,
        unrealized_pnl: float | None,
        realized_pnl: float | None,
    ) -> None: ...

    def on_position(
        self, account: str, contract: ContractInfo, position: float, average_cost: float | None
    ) -> None: ...

    def on_pnl_single(
        self,
        req_id: int,
        position: float,
        daily_pnl: float | None,
        unrealized_pnl: float | None,
        realized_pnl: float | None,
        value: float | None,
    ) -> None: ...

    def on_unmappable(self, error: MappingError) -> None: ...

    def wants_positions_of(self, account: str) -> bool: ...


def _value(text: str) -> float | None:
    # '' and IB's unset double mean "no value"; non-finite values are not prices.
    if not text:
        return None
    number = float(text)
    if number == UNSET_DOUBLE or number - number != 0.0:
        return None
    return number


class ContractCache:
    """Mapped contracts by their raw fields: a contract is mapped once, not per update.

    Bounded: two generations of ``generation`` contracts each (~650 bytes a contract);
    when the newer is full it becomes the older and the older is dropped, so contracts
    in use stay and the ones a churning book left behind go (unbounded, it grew by every
    contract ever held). A miss costs one mapping, about a microsecond.
    """

    def __init__(self, generation: int = 2048) -> None:
        self._generation = generation
        self._mapped: dict[tuple[str, ...], ContractInfo] = {}
        self._older: dict[tuple[str, ...], ContractInfo] = {}

    def __len__(self) -> int:
        return len(self._mapped) + len(self._older)

    def get(self, *raw: str) -> ContractInfo:
        mapped = self._mapped.get(raw)
        if mapped is None:
            mapped = self._older.get(raw) or map_contract(*raw)
            if len(self._mapped) >= self._generation:
                self._older = self._mapped
                self._mapped = {}
            self._mapped[raw] = mapped
        return mapped


def make_decoders(sink: PositionSink) -> dict[int, Callable[[list[str]], None]]:
    """Handlers for ib_async's ``Decoder.handlers`` table, keyed by message ID."""
    contracts = ContractCache()

    def update_portfolio(fields: list[str]) -> None:
        try:
            (
                _,
                _,
                conid,
                symbol,
                sec_type,
                expiry,
                strike,
                right,
                multiplier,
                primary_exchange,
                currency,
                _local_symbol,
                _trading_class,
                position,
                market_price,
                market_value,
                average_cost,
                unrealized_pnl,
                realized_pnl,
                account,
            ) = fields
            contract = contracts.get(
                conid, symbol, sec_type, expiry, strike, right, multiplier, currency,
                primary_exchange,
            )  # fmt: skip
            values = [
                _value(text)
                for text in (market_price, market_value, average_cost, unrealized_pnl, realized_pnl)
            ]
            sink.on_portfolio(account, contract, float(position or 0), *values)
        except MappingError as exc:
            sink.on_unmappable(exc)
        except Exception:
            decoder_log.exception("Error handling fields: %s", fields)

    def position(fields: list[str]) -> None:
        try:
            (
                _,
                _,
                account,
                conid,
                symbol,
                sec_type,
                expiry,
                strike,
                right,
                multiplier,
                exchange,
                currency,
                _local_symbol,
                _trading_class,
                quantity,
                average_cost,
            ) = fields
            if not sink.wants_positions_of(account):
                return  # e.g. the portfolio account, covered by updatePortfolio
            contract = contracts.get(
                conid, symbol, sec_type, expiry, strike, right, multiplier, currency, exchange
            )
            sink.on_position(account, contract, float(quantity or 0), _value(average_cost))
        except MappingError as exc:
            sink.on_unmappable(exc)
        except Exception:
            decoder_log.exception("Error handling fields: %s", fields)

    def pnl_single(fields: list[str]) -> None:
        try:
            _, req_id, quantity, daily, unrealized, realized, value = fields
            sink.on_pnl_single(
                int(req_id),
                float(quantity or 0),
                _value(daily),
                _value(unrealized),
                _value(realized),
                _value(value),
            )
        except Exception:
            decoder_log.exception("Error handling fields: %s", fields)

    return {7: update_portfolio, 61: position, 95: pnl_single}


def install(ib: Any, sink: PositionSink) -> FrameDemux:
    """Register the direct decoders on an ``ib_async.IB`` instance.

    They go into ib_async's decoder table and, so that a snapshot does not pay
    ib_async's per-message framing (it re-slices its whole receive buffer after
    every message: quadratic in the 256 KiB reads asyncio delivers), into a
    :class:`FrameDemux` in front of the client.
    """
    decoders = make_decoders(sink)
    ib.client.decoder.handlers.update(decoders)
    demux = FrameDemux(ib.client, decoders, sink.wants_positions_of)
    demux.attach()
    return demux  # keep it: eventkit holds bound-method slots weakly


_LENGTH = struct.Struct(">I")


class FrameDemux:
    """Splits the socket stream into messages; the direct decoders' messages are decoded
    here, every other message goes on to ib_async's client unchanged and in order.

    ``skip_positions_of`` lets position messages of accounts the producer does not
    follow through this way (the portfolio account's, covered by updatePortfolio)
    be dropped after reading only their account field: in a snapshot they are
    half of all messages.
    """

    def __init__(
        self,
        client: Any,
        decoders: dict[int, Callable[[list[str]], None]],
        wants_positions_of: Callable[[str], bool] | None = None,
    ) -> None:
        self._client = client
        self._forward = client._onSocketHasData
        self._portfolio = decoders[7]
        self._position = decoders[61]
        self._pnl_single = decoders[95]
        self._wants_positions_of = wants_positions_of
        self._buffer = bytearray()

    def attach(self) -> None:
        connection = self._client.conn
        connection.hasData -= self._forward
        connection.hasData += self.feed
        connection.disconnected += self.reset

    def reset(self, *_: object) -> None:
        # A partial message of a dropped connection must not prefix the next one's.
        self._buffer.clear()

    def feed(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        size = len(buffer)
        offset = 0
        passthrough: list[bytes] = []
        wants = self._wants_positions_of
        # Until the handshake is done the first message is the server version and time.
        handshaken = bool(self._client.serverVersion())
        while size - offset >= 4:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            start = offset + 4
            end = start + length
            if end > size:
                break
            handler: Callable[[list[str]], None] | None = None
            if handshaken:
                if buffer.startswith(b"7\x00", start):
                    handler = self._portfolio
                elif buffer.startswith(b"61\x00", start):
                    handler = self._position
                    if wants is not None:  # "61\03\0<account>\0..."
                        account_end = buffer.find(b"\x00", start + 5, end)
                        if not wants(buffer[start + 5 : account_end].decode()):
                            offset = end
                            continue
                elif buffer.startswith(b"95\x00", start):
                    handler = self._pnl_single
            if handler is None:
                passthrough.append(bytes(buffer[offset:end]))
            else:
                if passthrough:
                    self._forward(b"".join(passthrough))
                    passthrough.clear()
                fields = buffer[start:end].decode(errors="backslashreplace").split("\0")
                fields.pop()  # the empty string after the last NUL
                handler(fields)
            offset = end
            if not handshaken and passthrough:
                # Let the client see the handshake before deciding on the next message.
                self._forward(b"".join(passthrough))
                passthrough.clear()
                handshaken = bool(self._client.serverVersion())
        del buffer[:offset]
        if passthrough:
            self._forward(b"".join(passthrough))
