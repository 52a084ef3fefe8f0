"""The server side of the TWS API socket protocol, as much as the gateway simulator speaks.

After a handshake (``API\\0`` and the client's version range, answered with the
server version and connection time), every message in either direction is a
4-byte big-endian length followed by NUL-terminated text fields. The first field
is the message ID; most messages carry a version field next, which clients skip.
Field layouts follow ``../shared/notes/ib-tws-protocol.md`` and ib_async's decoder:
a wrong field count there is dropped silently, so each builder here is exact.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from datetime import UTC, datetime

SERVER_VERSION = 178
MIN_CLIENT_VERSION = 157
HANDSHAKE_PREFIX = b"API\0"
_LENGTH = struct.Struct(">I")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

UNSET_DOUBLE = 1.7976931348623157e308  # IB's "no value" for doubles
# The same as IB writes it in a field: render() sends UNSET_DOUBLE as '', which the
# messages that need all their numbers (commissionReport, tickOptionComputation) refuse.
UNSET_DOUBLE_TEXT = "1.7976931348623157E308"


class Incoming:
    """Message IDs the client sends that the simulator answers."""

    REQ_MKT_DATA = 1
    CANCEL_MKT_DATA = 2
    REQ_OPEN_ORDERS = 5
    REQ_ACCOUNT_UPDATES = 6
    REQ_EXECUTIONS = 7
    REQ_IDS = 8
    REQ_CURRENT_TIME = 49
    REQ_MARKET_DATA_TYPE = 59
    REQ_ACCOUNT_SUMMARY = 62
    REQ_POSITIONS = 61
    CANCEL_POSITIONS = 64
    START_API = 71
    REQ_ACCOUNT_UPDATES_MULTI = 76
    CANCEL_ACCOUNT_UPDATES_MULTI = 77
    REQ_PNL = 92
    CANCEL_PNL = 93
    REQ_PNL_SINGLE = 94
    CANCEL_PNL_SINGLE = 95
    REQ_COMPLETED_ORDERS = 99


class ProtocolError(Exception):
    """The peer broke the framing or the handshake; the connection is closed."""


def frame(payload: bytes) -> bytes:
    """Length-prefix one payload."""
    return _LENGTH.pack(len(payload)) + payload


def message(*fields: object) -> bytes:
    """One framed message from its fields, each rendered by :func:`render`."""
    return frame(b"".join(render(f).encode() + b"\0" for f in fields))


def render(value: object) -> str:
    """A field as TWS writes it: ``repr`` for floats (round-trips exactly), '' for None."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if value == UNSET_DOUBLE:
            return ""
        return repr(value)
    return str(value)


def split_frames(buffer: bytearray) -> list[list[str]]:
    """Pop every complete message off ``buffer``; each becomes its list of fields."""
    messages: list[list[str]] = []
    offset = 0
    while len(buffer) - offset >= 4:
        (length,) = _LENGTH.unpack_from(buffer, offset)
        if length > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {length} bytes is over the limit")
        end = offset + 4 + length
        if len(buffer) < end:
            break
        text = bytes(buffer[offset + 4 : end]).decode(errors="backslashreplace")
        fields = text.split("\0")
        if fields and fields[-1] == "":
            fields.pop()
        messages.append(fields)
        offset = end
    del buffer[:offset]
    return messages


def parse_version_range(text: str) -> tuple[int, int]:
    """The client's ``v<min>..<max>[ options]`` announcement."""
    head = text.split(" ", 1)[0]
    if not head.startswith("v") or ".." not in head:
        raise ProtocolError(f"bad version announcement {text!r}")
    low, _, high = head[1:].partition("..")
    try:
        return int(low), int(high)
    except ValueError:
        raise ProtocolError(f"bad version announcement {text!r}") from None


def handshake_reply(client_max: int, now: datetime) -> tuple[int, bytes]:
    """The server version to use with this client and the 2-field reply."""
    version = min(SERVER_VERSION, client_max)
    stamp = now.astimezone(UTC).strftime("%Y%m%d %H:%M:%S UTC")
    return version, frame(f"{version}\0{stamp}\0".encode())


# --- messages the server sends (exact layouts) --------------------------------


def next_valid_id(order_id: int) -> bytes:
    return message(9, 1, order_id)


def managed_accounts(accounts: Sequence[str]) -> bytes:
    return message(15, 1, ",".join(accounts))


def error(req_id: int, code: int, text: str) -> bytes:
    # From server version 166 the message ends with advancedOrderRejectJson.
    return message(4, 2, req_id, code, text, "")


def current_time(epoch_s: int) -> bytes:
    return message(49, 1, epoch_s)


def position_end() -> bytes:
    return message(62, 1)


def open_order_end() -> bytes:
    return message(53, 1)


def completed_orders_end() -> bytes:
    return message(102)  # no version field


def account_download_end(account: str) -> bytes:
    return message(54, 1, account)


def account_value(key: str, value: str, currency: str, account: str) -> bytes:
    return message(6, 2, key, value, currency, account)


def account_time(now: datetime) -> bytes:
    return message(8, 1, now.strftime("%H:%M"))


def account_update_multi(req_id: int, account: str, key: str, value: str, currency: str) -> bytes:
    return message(73, 1, req_id, account, "", key, value, currency)


def account_update_multi_end(req_id: int) -> bytes:
    return message(74, 1, req_id)


def exec_details_end(req_id: int) -> bytes:
    return message(55, 1, req_id)


def pnl(req_id: int, daily: float, unrealized: float, realized: float) -> bytes:
    """An account's P&L (94), for reqPnL: no version field."""
    return message(94, req_id, daily, unrealized, realized)


def exec_details(
    req_id: int,
    order_id: int,
    contract: bytes,
    exec_id: str,
    time: str,
    account: str,
    exchange: str,
    side: str,
    shares: float,
    price: float,
    perm_id: int,
    client_id: int,
    cum_qty: float,
    avg_price: float,
    order_ref: str,
) -> bytes:
    """execDetails (11) at server version 178: no version field, 32 fields; live fills
    have req_id -1. ``contract`` is :func:`contract_fields`' eleven fields."""
    head = b"11\x00%d\x00%d\x00" % (req_id, order_id)
    tail = b"".join(
        render(f).encode() + b"\0"
        for f in (exec_id, time, account, exchange, side, shares, price, perm_id, client_id,
                  0, cum_qty, avg_price, order_ref, "", "", "", 0, 0)
    )  # fmt: skip
    return frame(head + contract + tail)


def commission_report(
    exec_id: str, commission: float, currency: str, realized_pnl: float | None
) -> bytes:
    """commissionReport (59): realized P&L and yield as IB's unset double when unknown."""
    unset = UNSET_DOUBLE_TEXT
    realized = unset if realized_pnl is None else realized_pnl
    return message(59, 1, exec_id, commission, currency, realized, unset, "")


# --- market data (gateway_sim/market_data.py) -----------------------------------


def tick_price(req_id: int, tick_type: int, price: float, size: int) -> bytes:
    """tickPrice (1): 7 fields, attribute mask 0; ib_async ignores an empty price."""
    return message(1, 6, req_id, tick_type, price, size, 0)


def tick_option_computation(
    req_id: int,
    tick_type: int,
    implied_vol: float,
    delta: float,
    opt_price: float,
    pv_dividend: float | str,
    gamma: float,
    vega: float,
    theta: float,
    und_price: float | str,
) -> bytes:
    """tickOptionComputation (21): no version field, exactly 12 fields, tick attribute 0.
    Every number must be non-empty: pass :data:`UNSET_DOUBLE_TEXT` for IB's unset."""
    return message(21, req_id, tick_type, 0, implied_vol, delta, opt_price, pv_dividend,
                   gamma, vega, theta, und_price)  # fmt: skip


def market_data_type(req_id: int, data_type: int) -> bytes:
    return message(58, 1, req_id, data_type)


def tick_req_params(req_id: int, min_tick: float, bbo_exchange: str, permissions: int) -> bytes:
    return message(81, req_id, min_tick, bbo_exchange, permissions)  # no version field


def tick_snapshot_end(req_id: int) -> bytes:
    return message(57, 1, req_id)


def account_summary_end(req_id: int) -> bytes:
    return message(64, 1, req_id)


def contract_fields(
    conid: int,
    symbol: str,
    sec_type: str,
    expiry: str,
    strike: float,
    right: str,
    multiplier: str,
    exchange: str,
    currency: str,
    local_symbol: str,
    trading_class: str,
) -> bytes:
    """The eleven contract fields shared by position and portfolio messages, rendered
    once (a simulator sends the same contract many times)."""
    fields = (conid, symbol, sec_type, expiry, strike, right, multiplier, exchange, currency,
              local_symbol, trading_class)  # fmt: skip
    return b"".join(render(f).encode() + b"\0" for f in fields)


def position(account: str, contract: bytes, quantity: float, average_cost: float) -> bytes:
    # Hot in a snapshot: one str format, one encode (floats render as repr via !r).
    tail = f"{quantity!r}\0{average_cost!r}\0".encode()
    return frame(b"61\x003\x00%s\x00%s%s" % (account.encode(), contract, tail))


def update_portfolio(
    contract: bytes,
    quantity: float,
    market_price: float,
    market_value: float,
    average_cost: float,
    unrealized_pnl: float,
    realized_pnl: float,
    account: str,
) -> bytes:
    tail = (
        f"{quantity!r}\0{market_price!r}\0{market_value!r}\0{average_cost!r}\0"
        f"{unrealized_pnl!r}\0{realized_pnl!r}\0{account}\0"
    ).encode()
    return frame(b"7\x008\x00%s%s" % (contract, tail))


def pnl_single(
    req_id: int,
    quantity: float,
    daily_pnl: float,
    unrealized_pnl: float,
    realized_pnl: float,
    value: float,
) -> bytes:
    return message(95, req_id, quantity, daily_pnl, unrealized_pnl, realized_pnl, value)


# Texts IB uses for the link codes and the client-ID refusal.
LINK_TEXTS = {
    1100: "Connectivity between IB and Trader Workstation has been lost.",
    1101: "Connectivity between IB and TWS has been restored- data lost.",
    1102: "Connectivity between IB and TWS has been restored- data maintained.",
}
CLIENT_ID_IN_USE = 326
CLIENT_ID_IN_USE_TEXT = (
    "Unable to connect as the client id is already in use. Retry with a unique client id."
)
FARM_OK = (
    (2104, "Market data farm connection is OK:usfarm"),
    (2106, "HMDS data farm connection is OK:ushmds"),
    (2158, "Sec-def data farm connection is OK:secdefnj"),
)
