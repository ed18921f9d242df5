"""Logging: readable lines on a terminal, JSON lines when asked; never the key.

Sender log records carry ``event_ids``, ``request_id``, ``reason`` and ``count`` as extra
fields: the JSON formatter emits them as keys, the text formatter appends them. A filter
replaces any occurrence of the key in a record's message by its fingerprint, and the
handler does the same to each formatted line (an exception's text, extra fields), as a
last line of defence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from capi.fingerprint import fingerprint, redact

EXTRA_FIELDS = (
    "destination",
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
    """Replace each key by its fingerprint in every record (message and arguments)."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.keys = [key] if key else []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.keys:
            message = record.getMessage()
            if any(k in message for k in self.keys):
                for key in self.keys:
                    message = redact(message, key)
                record.msg, record.args = message, ()
        return True

    def scrub(self, line: str) -> str:
        """A formatted line with each key, as written or as JSON escapes it, replaced by its
        fingerprint: what :meth:`filter` cannot reach (an exception's text, extra fields)."""
        for key in self.keys:
            for form in {key, orjson.dumps(key)[1:-1].decode()}:
                if form in line:
                    line = line.replace(form, f"<key {fingerprint(key)}>")
        return line


class ScrubbingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose every formatted line goes through its :class:`RedactKey`
    filters' :meth:`~RedactKey.scrub` (the last line of defence behind the filter)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        for f in self.filters:
            if isinstance(f, RedactKey) and f.keys:
                line = f.scrub(line)
        return line


def redact_also(key: str) -> None:
    """Redact another key (a destination's) from every log line from now on."""
    for handler in logging.getLogger().handlers:
        for f in handler.filters:
            if isinstance(f, RedactKey) and key and key not in f.keys:
                f.keys.append(key)


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


_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_VALUE_LIMIT = 80


def one_line(text: str) -> str:
    """Text with line breaks and other control characters escaped (``\\n``), so that a
    value (an event id, a message) can never start a forged log line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def _short(value: object) -> str:
    text = one_line(str(value))
    return text if len(text) <= _VALUE_LIMIT else text[:_VALUE_LIMIT] + "…"


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``, one line per record (control characters
    in the message and values are escaped); long id lists and long values are shortened."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = []
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is None or name == "count":
                continue
            if isinstance(value, list):
                text = ",".join(map(_short, value[:5])) + (
                    f",…(+{len(value) - 5})" if len(value) > 5 else ""
                )
            else:
                text = _short(value)
            extras.append(f"{name}={text}")
        return line + ("  " + " ".join(extras) if extras else "")


class TurnHandler(ScrubbingHandler):
    """A stream handler that, on a thread running an asyncio event loop, writes the lines of
    one turn of the loop together, at the end of that turn (``call_soon``): a server
    answering many requests a turn makes one write of their access lines, not one each.
    Elsewhere (no running loop) it writes at once; :meth:`flush` (logging's shutdown too)
    writes what waits. A stream that fails (a closed pipe) is reported once on Python's own
    stderr, not through logging, and never stops the loop."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None  # the loop to write them
        self._failing = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_waiting()
            super().emit(record)
            return
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._waiting.append(line)
        if self._scheduled is not loop:  # none yet, or on a loop that stopped before it ran
            self._scheduled = loop
            loop.call_soon(self._end_turn)

    def _end_turn(self) -> None:
        self.acquire()
        try:
            self._scheduled = None
            self._write_waiting()
            with contextlib.suppress(Exception):  # a failing stream was reported by the write
                super().flush()
        finally:
            self.release()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_waiting()
            super().flush()
        finally:
            self.release()

    def _write_waiting(self) -> None:
        if self._waiting:
            waiting, self._waiting = self._waiting, []
            try:
                self.stream.write("".join(waiting))
            except Exception as exc:  # the log itself is broken: say so where Python would
                if not self._failing:
                    with contextlib.suppress(Exception):
                        sys.__stderr__.write(f"capi: could not write log lines: {exc!r}\n")  # type: ignore[union-attr]
                self._failing = True
            else:
                self._failing = False


def configure(
    *, json: bool, level: int = logging.INFO, key: str = "", per_turn: bool = False
) -> None:
    """Send capi's (and arq's) logs to stderr, as JSON or text, with the key redacted; with
    ``per_turn`` a turn of the event loop writes its lines together (:class:`TurnHandler`)."""
    handler = TurnHandler(sys.stderr) if per_turn else ScrubbingHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(RedactKey(key))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # arq's own CLI gives the "arq" logger a handler of its own; its records also reach
    # ours, so each line would print twice: let them go through this handler only.
    logging.getLogger("arq").handlers.clear()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
