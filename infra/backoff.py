"""The one backoff rule every retry loop uses (Redis calls, Delta commits, IB
reconnects, the producer's outbox, the publisher)."""

from __future__ import annotations

import random


def backoff_s(attempt: int, initial_s: float, max_s: float, *, jitter: bool = True) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first): ``initial_s``
    doubled per attempt up to ``max_s``, then, with ``jitter``, scaled by a random
    factor in [0.5, 1] so that clients failing together do not retry together."""
    base = min(max_s, initial_s * 2.0 ** min(attempt, 62))
    return float(base * random.uniform(0.5, 1.0)) if jitter else float(base)
