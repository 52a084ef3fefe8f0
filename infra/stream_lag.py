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


def group_lag(
    client: Any, stream: str, group: dict[str, Any], count_up_to: int | None = PAGE
) -> Lag:
    """The lag of ``group`` (an ``XINFO GROUPS`` entry) on ``stream``; ``count_up_to``
    None counts every entry after the group's position."""
    last_delivered = group["last-delivered-id"]
    # XRANGE only (a consumer's ACL has it): nothing after the position is a lag of 0.
    after = "(" + (last_delivered.decode() if isinstance(last_delivered, bytes) else last_delivered)
    counted = 0
    while True:
        page = PAGE if count_up_to is None else min(PAGE, count_up_to - counted)
        found = client.xrange(stream, min=after, max="+", count=page)
        counted += len(found)
        if len(found) < page:
            return Lag(counted)
        if count_up_to is not None and counted >= count_up_to:
            break
        after = "(" + found[-1][0].decode()
    return Lag(counted, at_least=True)
