"""A consumer group's lag that is true when Redis's own figure is not.

Redis derives ``lag`` from ``entries-read``, which it does not keep across
everything: after a replica's promotion (XREADGROUP replicates as XCLAIM, which
carries no entries-read) and after an AOF restart it is nil, and a lag computed
from a stale entries-read can be far off (240,000 shown for a drained group).
So the lag is taken from the stream: the entries after the group's
last-delivered ID are counted (none: 0), up to ``count_up_to``
(status: 100,000). Past that bound the count is returned flagged as a lower
bound: Redis's figure cannot be told sound from stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PAGE = 1_000


@dataclass(frozen=True, slots=True)
class Lag:
    entries: int
    at_least: bool = False  # counted up to a bound: there are this many or more

    def __str__(self) -> str:
        return f">={self.entries}" if self.at_least else str(self.entries)


def count_entries(
    client: Any, stream: str, after: str, up_to: str = "+", limit: int | None = None
) -> Lag:
    """Entries with ``after`` < ID <= ``up_to`` (``after`` "0": from the start), counted
    by paging XRANGE; with ``limit``, counting stops there (a lower bound)."""
    start = f"({after}" if after != "0" else "-"
    counted = 0
    while True:
        page = PAGE if limit is None else min(PAGE, limit - counted)
        found = client.xrange(stream, min=start, max=up_to, count=page)
        counted += len(found)
        if len(found) < page:
            return Lag(counted)
        if limit is not None and counted >= limit:
            return Lag(counted, at_least=True)
        start = "(" + found[-1][0].decode()


def group_lag(
    client: Any, stream: str, group: dict[str, Any], count_up_to: int | None = PAGE
) -> Lag:
    """The lag of ``group`` (an ``XINFO GROUPS`` entry) on ``stream``; ``count_up_to``
    None counts every entry after the group's position. XRANGE only: a consumer's ACL
    has it."""
    last_delivered = group["last-delivered-id"]
    after = last_delivered.decode() if isinstance(last_delivered, bytes) else last_delivered
    return count_entries(client, stream, after, limit=count_up_to)
