"""A stop request that arrives before a program is ready for it.

``python -m consumer`` and ``python -m producer`` import this first, before
deltalake, pyarrow or ib_async (a second or more of imports), and install
:func:`install_early`: a SIGTERM or SIGINT during the imports or the start-up is
remembered instead of killing the process, and the program's own handler,
once installed, acts on it (see :func:`take_early`). The remaining window is the
interpreter's own start, before any of poslake runs (tens of milliseconds).
"""

from __future__ import annotations

import signal
from types import FrameType

_received: list[int] = []


def _remember(signum: int, _frame: FrameType | None) -> None:
    _received.append(signum)


def install_early() -> None:
    """Remember SIGTERM/SIGINT until the program installs its own handlers."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _remember)


def take_early() -> int:
    """The first signal remembered so far (0 for none)."""
    return _received[0] if _received else 0
