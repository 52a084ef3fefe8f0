"""What a process knows about its Redis right now, for ``/healthz`` and the metrics.

The consumer and the producer retry transient Redis failures (infra/redis_errors.py)
and, once running, a password that stopped working. While such a failure lasts the
process stays up but is unhealthy: ``/healthz`` answers 503 with the reason, the
gauge ``..._redis_ok`` is 0, and ``..._redis_errors_total{code=...}`` counts the
failures by their code (``OOM``, ``LOADING``, ``WRONGPASS``, ``CONNECTION``...).
"""

from __future__ import annotations

import threading
from collections import Counter

from infra.redis_errors import error_code

_MAX_REASON_CHARS = 300


class RedisHealth:
    """Failures in progress, by the call that has them; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failing: dict[str, str] = {}  # call -> reason (one line)
        self.errors: Counter[str] = Counter()  # code -> failures seen

    def failed(self, where: str, exc: BaseException | str, code: str | None = None) -> str:
        """Note a failure of ``where``; returns its code."""
        code = code or (error_code(exc) if isinstance(exc, BaseException) else "ERR")
        text = " ".join(str(exc).split())[:_MAX_REASON_CHARS] or type(exc).__name__
        with self._lock:
            self.errors[code] += 1
            self._failing[where] = f"{code}: {text}" if not text.startswith(code) else text
        return code

    def recovered(self, where: str) -> None:
        with self._lock:
            self._failing.pop(where, None)

    @property
    def ok(self) -> bool:
        with self._lock:
            return not self._failing

    def reason(self) -> str:
        """``""`` while healthy, else what fails, e.g. ``redis XADD: OOM command not...``."""
        with self._lock:
            return "; ".join(f"redis {where}: {why}" for where, why in self._failing.items())

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.errors)
