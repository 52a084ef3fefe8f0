"""A stop request that arrives before a program is ready for it.

``python -m consumer`` and ``python -m producer`` import this first, before
deltalake, pyarrow or ib_async (a second or more of imports), and install
:func:`install_early`: a SIGTERM or SIGINT during the imports or the start-up is
remembered instead of killing the process, and the program's own handler,
once installed, acts on it (see :func:`take_early`).

That leaves the interpreter's own start, before any of poslake runs (tens of
milliseconds), when SIGTERM still has its default action. A launcher closes it
with :func:`spawn_holding_stops`: the child starts with SIGTERM and SIGINT
blocked (a signal mask survives exec), so one sent that early waits, pending,
until :func:`install_early` has installed the handler and unblocks them.
``poslake run`` starts its parts that way; each of them (the gateway simulator
too) calls :func:`release_held_stops` once its handler is in.
"""

from __future__ import annotations

import signal
import subprocess
from types import FrameType
from typing import Any

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})

_received: list[int] = []


def _remember(signum: int, _frame: FrameType | None) -> None:
    _received.append(signum)


def install_early() -> None:
    """Remember SIGTERM/SIGINT until the program installs its own handlers."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _remember)
    release_held_stops()


def release_held_stops() -> None:
    """Unblock SIGTERM/SIGINT (held by :func:`spawn_holding_stops`); call once a
    handler is installed: a signal held meanwhile is delivered to it now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def spawn_holding_stops(args: list[str], **popen: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` of a poslake program, its stop signals held until it is ready.

    The child inherits the blocked mask (only this thread's mask changes, and only
    for the fork); a stop for this process meanwhile stays pending, not lost.
    """
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return subprocess.Popen(args, **popen)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def take_early() -> int:
    """The first signal remembered so far (0 for none)."""
    return _received[0] if _received else 0
