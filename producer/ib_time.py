"""IB's execution times, read in UTC whatever the machine's time zone.

IB writes an execution's time in one of three forms (``../shared/notes``):

- ``yyyymmdd-hh:mm:ss``: UTC (real TWS and Gateway; ib_async reads it as local time);
- ``yyyymmdd hh:mm:ss <zone>``: the zone an IANA name (``US/Eastern``) or an
  abbreviation (``EDT``, ``JST``; ib_async fails on these and loses the fill);
- ``yyyymmdd  hh:mm:ss`` (two spaces, no zone): TWS's own zone, which the API does
  not say; ``POSLAKE_IB_TIMEZONE`` names it (default UTC).

An epoch-seconds form (all digits) is read too. Nothing here reads the machine's zone.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class TimeFormatError(ValueError):
    """An execution time in no form IB uses."""


# The abbreviations IB's servers and TWS time zone settings produce, as fixed offsets
# (an abbreviation already says whether daylight saving time applies).
ABBREVIATIONS: dict[str, timedelta] = {
    "UTC": timedelta(0), "GMT": timedelta(0), "Z": timedelta(0),
    "EST": timedelta(hours=-5), "EDT": timedelta(hours=-4),
    "CST": timedelta(hours=-6), "CDT": timedelta(hours=-5),
    "MST": timedelta(hours=-7), "MDT": timedelta(hours=-6),
    "PST": timedelta(hours=-8), "PDT": timedelta(hours=-7),
    "BST": timedelta(hours=1), "WET": timedelta(0), "WEST": timedelta(hours=1),
    "CET": timedelta(hours=1), "CEST": timedelta(hours=2),
    "MET": timedelta(hours=1), "MEST": timedelta(hours=2),
    "EET": timedelta(hours=2), "EEST": timedelta(hours=3), "MSK": timedelta(hours=3),
    "HKT": timedelta(hours=8), "SGT": timedelta(hours=8), "JST": timedelta(hours=9),
    "KST": timedelta(hours=9), "AEST": timedelta(hours=10), "AEDT": timedelta(hours=11),
    "NZST": timedelta(hours=12), "NZDT": timedelta(hours=13),
}  # fmt: skip


@functools.lru_cache(maxsize=64)
def zone_named(name: str) -> tzinfo:
    """An IANA zone or a known abbreviation; raises :class:`TimeFormatError`."""
    offset = ABBREVIATIONS.get(name.upper())
    if offset is not None:
        return timezone(offset, name.upper())
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise TimeFormatError(f"unknown time zone {name!r}") from exc


def parse_execution_time(text: str, naive_zone: tzinfo = UTC) -> datetime:
    """An execution's time as an aware UTC datetime."""
    text = text.strip()
    try:
        if text.isdigit() and len(text) > 8:
            return datetime.fromtimestamp(int(text), UTC)
        if len(text) == 17 and text[8] == "-":  # yyyymmdd-hh:mm:ss, UTC
            return datetime.strptime(text, "%Y%m%d-%H:%M:%S").replace(tzinfo=UTC)
        day, _, rest = text.partition(" ")
        clock, _, zone = rest.strip().partition(" ")
        moment = datetime.strptime(day + clock, "%Y%m%d%H:%M:%S")
    except ValueError as exc:
        raise TimeFormatError(f"execution time {text!r} is in no form IB uses") from exc
    local = zone_named(zone.strip()) if zone.strip() else naive_zone
    return moment.replace(tzinfo=local).astimezone(UTC)
