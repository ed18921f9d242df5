"""Logging: readable lines on a terminal, JSON lines when asked; never the key.

Sender log records carry ``event_ids``, ``request_id``, ``reason`` and ``count`` as extra
fields: the JSON formatter emits them as keys, the text formatter appends them. A filter
replaces any occurrence of the key by its fingerprint, as a last line of defence.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from capi.fingerprint import redact

EXTRA_FIELDS = (
    "count",
    "event_ids",
    "request_id",
    "reason",
    "status",
    "delay_s",
    "attempt",
    "first_id",
    "last_id",
    "latency_ms",
    "accepted_events",
)


class RedactKey(logging.Filter):
    """Replace the key by its fingerprint in every record (message and arguments)."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def filter(self, record: logging.LogRecord) -> bool:
        if self.key:
            message = record.getMessage()
            if self.key in message:
                record.msg, record.args = redact(message, self.key), ()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            if hasattr(record, name):
                data[name] = getattr(record, name)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``; long id lists are shortened."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = []
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is None or name == "count":
                continue
            if isinstance(value, list):
                value = ",".join(map(str, value[:5])) + (
                    f",…(+{len(value) - 5})" if len(value) > 5 else ""
                )
            extras.append(f"{name}={value}")
        return line + ("  " + " ".join(extras) if extras else "")


def configure(*, json: bool, level: int = logging.INFO, key: str = "") -> None:
    """Send capi's (and arq's) logs to stderr, as JSON or text, with the key redacted."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(RedactKey(key))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
