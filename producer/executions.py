"""The executions subscriber: every fill of every account of the login, with commissions.

The producer decodes IB's execDetails (11) and commissionReport (59) itself, in
ib_async's decoder table, always (not only with ``POSLAKE_IB_FAST_DECODE``),
because ib_async's own path loses what the record needs (``../shared/notes``):

- a read-only client gets no ``execDetailsEvent``/``commissionReportEvent`` for
  orders it did not place (TWS's or other clients'): here every message counts;
- a commissionReport that comes before its execDetails is dropped by ib_async;
  here it is published as it comes, and the consumer joins the two by exec_id;
- ib_async reads IB's UTC form ``yyyymmdd-hh:mm:ss`` as local time and fails on
  zone abbreviations (the fill is lost); here producer/ib_time.py reads them;
- ib_async turns the unset realizedPNL into 0.0; here it is null.

Each message becomes one ``execution`` entry (shared/executions.py): the
details, or the commission. IB answers the reqExecutions that ib_async sends on
every connect (and this module after a 1101) with the day's fills again: the
ones already published are not published twice (the consumer would drop them
anyway). Combo (BAG) orders: the legs are booked; the combo's own report, which
repeats them, is left out and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import msgspec
from ib_async.util import UNSET_DOUBLE

from producer.ib_mapping import MappingError, UpdateClock, map_contract, number
from producer.ib_time import TimeFormatError, parse_execution_time
from shared.executions import CommissionDetails, ExecutionDetails, ExecutionEntry

log = logging.getLogger(__name__)
decoder_log = logging.getLogger("ib_async.Decoder")

EXEC_DETAILS = 11
COMMISSION_REPORT = 59
_EXEC_DETAILS_FIELDS = 31  # up to lastLiquidity; pendingPriceRevision (178+) and later ignored
_REMEMBERED = 200_000  # exec IDs kept to skip reqExecutions' repeats (a day is far fewer)


class EntrySink(Protocol):
    def put(self, stamp_us: int, update: msgspec.Struct) -> None: ...


@dataclass
class ExecutionStats:
    fills: int = 0
    commissions: int = 0
    repeats_skipped: int = 0
    combo_reports_skipped: int = 0
    unreadable: int = 0


def _integer(text: str) -> int | None:
    if not text:
        return None
    value = int(float(text)) if "." in text or "e" in text.lower() else int(text)
    return None if value in (2**31 - 1, 2**63 - 1) else value  # IB's unset integers


class ExecutionFeed:
    """Turns execDetails and commissionReport messages into ``execution`` entries."""

    def __init__(
        self,
        outbox: EntrySink,
        clock: UpdateClock,
        naive_zone: str = "UTC",
        request_timeout_s: float = 10.0,
    ) -> None:
        self._ib: Any = None
        self.request_timeout_s = request_timeout_s
        self.outbox = outbox
        self.clock = clock
        self.zone = ZoneInfo(naive_zone)
        self.stats = ExecutionStats()
        self._published: OrderedDict[tuple[str, str], None] = OrderedDict()

    def install(self, ib: Any) -> None:
        """Register the two decoders in ib_async's decoder table (messages 11 and 59)."""
        self._ib = ib
        ib.client.decoder.handlers.update(self.decoders())

    # --- the connection's life (producer/ib_connection.py) --------------------------

    def on_connecting(self) -> None:
        pass

    async def on_connected(self) -> None:
        pass  # ib_async's startup sends reqExecutions: the day's fills come in with it

    async def on_link_restored(self) -> None:
        # Fills made while the link was down: the day's executions again (repeats skipped).
        await asyncio.wait_for(self._ib.reqExecutionsAsync(), self.request_timeout_s)

    def on_disconnected(self) -> None:
        pass  # the exec IDs published stay remembered: a reconnect's replies repeat them

    async def serve(self) -> None:
        pass

    def decoders(self) -> dict[int, Callable[[list[str]], None]]:
        return {EXEC_DETAILS: self.on_exec_details, COMMISSION_REPORT: self.on_commission_report}

    def _first_time(self, part: str, exec_id: str) -> bool:
        key = (part, exec_id)
        if key in self._published:
            self.stats.repeats_skipped += 1
            return False
        self._published[key] = None
        if len(self._published) > _REMEMBERED:
            self._published.popitem(last=False)
        return True

    def _publish(self, entry: ExecutionEntry) -> None:
        self.outbox.put(self.clock.stamp_us(), entry)

    def on_exec_details(self, fields: list[str]) -> None:
        try:
            if len(fields) < _EXEC_DETAILS_FIELDS:
                raise ValueError(f"{len(fields)} fields, expected at least {_EXEC_DETAILS_FIELDS}")
            (
                _, _req_id, order_id, conid, symbol, sec_type, expiry, strike, right,
                multiplier, _contract_exchange, currency, _local_symbol, _trading_class,
                exec_id, time_text, account, exchange, side, shares, price, perm_id,
                client_id, liquidation, cum_qty, avg_price, order_ref, *_rest,
            ) = fields  # fmt: skip
            if sec_type == "BAG":
                self.stats.combo_reports_skipped += 1
                return
            if not self._first_time("details", exec_id):
                return
            contract = map_contract(
                conid, symbol, sec_type, expiry, strike, right, multiplier, currency
            )
            details = ExecutionDetails(
                account=account,
                conid=contract.conid,
                symbol=contract.symbol,
                sec_type=contract.sec_type,
                currency=contract.currency,
                right=contract.right,  # type: ignore[arg-type]
                strike=contract.strike,
                expiry=contract.expiry,
                multiplier=contract.multiplier,
                side=side,  # type: ignore[arg-type]
                shares=float(shares),
                price=float(price),
                time=parse_execution_time(time_text, self.zone),
                exchange=exchange or None,
                order_id=_integer(order_id),
                perm_id=_integer(perm_id),
                client_id=_integer(client_id),
                order_ref=order_ref or None,
                cum_qty=number(cum_qty),
                avg_price=number(avg_price),
                liquidation=_integer(liquidation),
            )
            # The structs check on decode, not on construction: check as the consumer will.
            entry = msgspec.convert(
                msgspec.to_builtins(ExecutionEntry(exec_id=exec_id, execution=details)),
                ExecutionEntry,
            )
        except (MappingError, TimeFormatError, ValueError, msgspec.ValidationError) as exc:
            self._published.pop(("details", fields[14] if len(fields) > 14 else ""), None)
            self.stats.unreadable += 1
            decoder_log.error("execDetails not publishable: %s: %s", exc, fields[:20])
            return
        self.stats.fills += 1
        self._publish(entry)

    def on_commission_report(self, fields: list[str]) -> None:
        try:
            _, _version, exec_id, commission, currency, realized_pnl, *_rest = fields
            amount = float(commission)
            if amount == UNSET_DOUBLE:
                return  # no commission known yet: IB sends the real one later
            if not self._first_time("commission", exec_id):
                return
            entry = msgspec.convert(
                msgspec.to_builtins(
                    ExecutionEntry(
                        exec_id=exec_id,
                        commission=CommissionDetails(
                            commission=amount,
                            currency=currency,
                            realized_pnl=number(realized_pnl),
                        ),
                    )
                ),
                ExecutionEntry,
            )
        except (ValueError, msgspec.ValidationError) as exc:
            self.stats.unreadable += 1
            decoder_log.error("commissionReport not publishable: %s: %s", exc, fields)
            return
        self.stats.commissions += 1
        self._publish(entry)
