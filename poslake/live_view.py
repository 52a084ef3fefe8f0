"""The live terminal view of ``poslake run`` (rich), or plain lines when not on a terminal.

Rates come from successive status snapshots: updates/s in is the growth of the
stream's entries, out is the growth of the table's rows.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.table import Table

from poslake.status import Status, TableStatus, book_summary
from shared.kinds import POSITIONS, kind_of_table


class LiveView:
    def __init__(self, live: bool) -> None:
        self._live = Live(console=Console(), refresh_per_second=2) if live else None
        self._last: tuple[float, int, int] | None = None
        self._last_print = 0.0

    def __enter__(self) -> LiveView:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(kind, error, trace)

    def _rates(self, status: Status) -> tuple[float, float]:
        now = time.monotonic()
        rows = _history_rows(status)
        previous, self._last = self._last, (now, status.length, rows)
        if previous is None or now <= previous[0]:
            return 0.0, 0.0
        elapsed = now - previous[0]
        return (status.length - previous[1]) / elapsed, (rows - previous[2]) / elapsed

    def update(self, status: Status) -> None:
        rate_in, rate_out = self._rates(status)
        if self._live is not None:
            self._live.update(render(status, rate_in, rate_out))
            return
        if time.monotonic() - self._last_print >= 5:
            self._last_print = time.monotonic()
            tables = " | ".join(
                f"{name} v{table.version} {table.rows} rows"
                for name, table in _tables(status).items()
                if table is not None
            )
            print(
                f"in {rate_in:.0f}/s out {rate_out:.0f}/s | stream {status.length} | "
                f"pending {sum(g.pending for g in status.groups)} | dead letters "
                f"{status.dead_letters} | {tables or 'no table yet'}"
                + (f" | book: {book_summary(status.book)}" if status.book is not None else ""),
                flush=True,
            )


def render(status: Status, rate_in: float, rate_out: float) -> Table:
    grid = Table(title="poslake run", show_header=False, expand=False)
    grid.add_column("what", style="bold")
    grid.add_column("value")
    grid.add_row("updates/s in -> out", f"{rate_in:,.0f} -> {rate_out:,.0f}")
    grid.add_row("stream", f"{status.stream}: {status.length} entries (last {status.last_id})")
    for group in status.groups:
        lag = "?" if group.lag is None else f"{group.lag}"
        grid.add_row(f"group {group.name}", f"lag {lag}, pending {group.pending}")
        for consumer in group.consumers:
            grid.add_row(
                f"  {consumer.name}",
                f"pending {consumer.pending}, idle {consumer.idle_ms / 1000:.1f}s",
            )
    grid.add_row("dead letters", str(status.dead_letters))
    if status.book is not None:
        grid.add_row("strategy book", book_summary(status.book))
    for name, table in _tables(status).items():
        if table is None:
            grid.add_row(name, "not created yet")
        else:
            grid.add_row(
                name, f"version {table.version}, {table.rows:,} rows, {table.active_files} files"
            )
    return grid


def _tables(status: Status) -> dict[str, TableStatus | None]:
    """Every kind's tables (shared/kinds.py), or just the positions' history."""
    return status.tables or {POSITIONS.table: status.table}


def _history_rows(status: Status) -> int:
    """Rows of every kind's history: what "out" counts."""
    tables = _tables(status)
    return sum(t.rows for name, t in tables.items() if t is not None and kind_history(name))


def kind_history(name: str) -> bool:
    kind = kind_of_table(name)
    return kind is not None and kind.table == name
