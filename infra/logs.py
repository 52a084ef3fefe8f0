"""Logging setup for the entry points (nothing else configures logging).

Records carry structured fields through ``extra=``; the text format appends
them as ``key=value`` and the JSON format emits them as keys. Both formatters
pass everything they emit (message, fields, traceback) through
:func:`infra.redaction.scrub`: the last line of defence against a library
error that quotes a password, a URL's credentials or a storage option.
"""

from __future__ import annotations

import json
import logging
import sys

from infra.redaction import scrub, scrub_value

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        return scrub(f"{base} {extra}" if extra else base)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        # Scrub the values before encoding (JSON escapes would hide a secret from
        # the text pass), and the encoded line again.
        cleaned = {key: scrub_value(value) for key, value in payload.items()}
        return scrub(json.dumps(cleaned, default=str))


def configure_logging(level: str = "INFO", as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if as_json
        else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
