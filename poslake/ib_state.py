"""What IB says an account holds now: read once, read-only, with a client ID of its own.

``poslake reconcile`` compares this with the lake (poslake/drift.py). It connects
with ib_async to the producer's gateway (``POSLAKE_IB_HOST``/``_PORT``) under
``POSLAKE_RECONCILE_CLIENT_ID``, so it runs beside the producer; ib_async's own
start-up requests bring what is needed: every account's values
(``reqAccountUpdatesMulti`` per account, up to 50 accounts), the day's executions
with their commission reports (``reqExecutions``); then a fresh ``reqPositions``
gives every position, contracts closed today at 0 included.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ib_async import IB

from shared.errors import PoslakeError
from shared.executions import split_exec_id
from shared.settings import Settings

log = logging.getLogger(__name__)

BAG = "BAG"  # a combo's own execution: its legs are the executions (as the producer books)


class IbUnreachable(PoslakeError):
    """The gateway did not answer, refused the client ID, or closed the connection."""


@dataclass(frozen=True, slots=True)
class IbPosition:
    symbol: str
    sec_type: str
    position: float
    average_cost: float | None


@dataclass(frozen=True, slots=True)
class IbExecution:
    exec_id: str  # the newest revision's
    revision: int
    account: str
    conid: int
    symbol: str
    signed_shares: float
    commission: float | None  # None: no report yet


@dataclass(slots=True)
class IbState:
    accounts: list[str]
    positions: dict[tuple[str, int], IbPosition] = field(default_factory=dict)
    values: dict[tuple[str, str, str], str] = field(default_factory=dict)
    executions: dict[str, IbExecution] = field(default_factory=dict)  # by exec_id base
    read_at: float = 0.0  # time.time() when IB's answers were in


def _commission(report: Any) -> float | None:
    if report is None or not report.execId:
        return None
    value = float(report.commission)
    return value if math.isfinite(value) and abs(value) < 1e300 else None


async def read_ib(settings: Settings, client_id: int) -> IbState:
    """Connect, read, disconnect. Raises :class:`IbUnreachable` when IB does not answer."""
    ib = IB()
    timeout = settings.ib_connect_timeout_s
    refused: list[str] = []

    def on_error(req_id: int, code: int, text: str, contract: Any = None) -> None:
        if code == 326:  # client ID in use
            refused.append(text)

    ib.errorEvent += on_error
    try:
        await ib.connectAsync(
            settings.ib_host,
            settings.ib_port,
            clientId=client_id,
            timeout=timeout,
            readonly=True,
            raiseSyncErrors=True,
        )
        login = list(ib.managedAccounts())
        accounts = [a for a in (settings.ib_accounts or login) if a in login]
        positions = await asyncio.wait_for(ib.reqPositionsAsync(), timeout)
        state = IbState(accounts)
        for item in positions:
            if item.account in accounts:
                cost = float(item.avgCost) if math.isfinite(item.avgCost) else None
                state.positions[(item.account, int(item.contract.conId))] = IbPosition(
                    item.contract.symbol, item.contract.secType, float(item.position), cost
                )
        for value in ib.accountValues():
            if value.account in accounts and not value.modelCode:
                state.values[(value.account, value.tag, value.currency)] = str(value.value)
        for fill in ib.fills():
            execution = fill.execution
            if fill.contract.secType == BAG or execution.acctNumber not in accounts:
                continue
            base, revision = split_exec_id(execution.execId)
            seen = state.executions.get(base)
            if seen is not None and seen.revision >= revision:
                continue
            sign = 1.0 if execution.side == "BOT" else -1.0
            state.executions[base] = IbExecution(
                execution.execId,
                revision,
                execution.acctNumber,
                int(fill.contract.conId),
                fill.contract.symbol,
                sign * float(execution.shares),
                _commission(fill.commissionReport),
            )
        state.read_at = time.time()
        return state
    except (TimeoutError, ConnectionError, OSError) as exc:
        why = f"client ID {client_id} in use" if refused else (str(exc) or type(exc).__name__)
        raise IbUnreachable(
            f"IB at {settings.ib_host}:{settings.ib_port} did not answer: {why}"
        ) from None
    finally:
        ib.disconnect()
