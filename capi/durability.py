"""What an acknowledged enqueue promises (``CAPI_ENQUEUE_DURABILITY``), and how it is checked.

- ``memory``: Redis answered, so it holds the event in memory.
- ``aof``: the event is fsynced to Redis's append-only file. Confirmed with ``WAITAOF 1 0``,
  which is true only under ``appendfsync always``: under ``everysec``, Valkey (9.1.2
  measured) and Redis 7.2.2-7.4 mark data as fsynced that the next fsync has not yet
  reached, and answer ``WAITAOF`` at once (Redis pull request 13793 fixed it in later
  Redis). A power-loss test (``tests/test_power_loss.py``) lost thousands of events so
  confirmed. So each confirmation also reads ``appendfsync`` (``CONFIG GET``), and anything
  but ``always`` is refused with a ConfigError that names the setting.
- ``replica``: a replica has the event (``WAIT 1``).

``WAIT`` and ``WAITAOF`` wait for the last write of the connection they are sent on. So the
producer sends the write and the wait in one pipeline on one connection
(:meth:`Durability.commands`); if that connection drops, redis-py sends the whole pipeline
again on a new one, and the enqueue script writes there even for a duplicate (it counts
it), so the wait still covers the event. A wait that Redis cuts short because the server
stopped being a master (a switchover) is :class:`~capi.errors.QueueUnavailable`, not a
configuration error: enqueueing again, on the new master, is safe.
"""

from __future__ import annotations

from typing import Any

import redis.exceptions

from capi.errors import ConfigError, QueueUnavailable

# The one fsync policy under which WAITAOF's local answer is true on every server capi knows.
SAFE_FSYNC = "always"
# How the refusals of a server that cannot confirm writes end (an enqueue's: its calls ran).
QUEUED_IN_MEMORY = " The event is queued, in memory only."


class Durability:
    """The commands that confirm an enqueue's writes, and the reading of their answers."""

    def __init__(self, mode: str, timeout_ms: int) -> None:
        self.mode = mode
        self.timeout_ms = timeout_ms

    @property
    def waits(self) -> bool:
        """Whether an enqueue waits for more than Redis's answer."""
        return self.mode in ("aof", "replica")

    def commands(self) -> list[tuple[Any, ...]]:
        """Commands to send after the writes, on the same connection, in the same pipeline."""
        if self.mode == "aof":
            return [("CONFIG", "GET", "appendfsync"), ("WAITAOF", 1, 0, self.timeout_ms)]
        if self.mode == "replica":
            return [("WAIT", 1, self.timeout_ms)]
        return []

    def check(self, answers: list[Any]) -> None:
        """Raise unless the answers to :meth:`commands` confirm the writes before them."""
        if self.mode == "aof":
            self._check_fsync_policy(answers[0])
        answer = answers[-1]
        if isinstance(answer, Exception):
            raise self._refused(answer)
        confirmed = answer[0] if isinstance(answer, list) else answer
        if int(confirmed) < 1:
            where = "in the append-only file" if self.mode == "aof" else "on a replica"
            raise QueueUnavailable(
                f"the event reached Redis but was not confirmed {where} within "
                f"CAPI_DURABILITY_TIMEOUT_MS={self.timeout_ms}; it may be lost if Redis fails "
                "now. Enqueueing it again is safe (the event id dedups)."
            )

    def _check_fsync_policy(self, answer: Any) -> None:
        if isinstance(answer, Exception):
            raise ConfigError(
                "CAPI_ENQUEUE_DURABILITY=aof must read the server's appendfsync to know that "
                f"WAITAOF's answer is true, and CONFIG GET was refused ({str(answer)[:120]}); "
                "allow it to capi's Redis user (ACL: +config|get), or set "
                "CAPI_ENQUEUE_DURABILITY=memory." + QUEUED_IN_MEMORY
            )
        policy = _policy(answer)
        if policy != SAFE_FSYNC:
            raise ConfigError(
                f"CAPI_ENQUEUE_DURABILITY=aof needs appendfsync always on the server (it is "
                f"{policy or 'not reported'}): under everysec, Valkey and Redis 7.2-7.4 "
                "confirm WAITAOF before the fsync, so a power loss would lose acknowledged "
                "events. Set appendfsync always in the server's configuration, or set "
                "CAPI_ENQUEUE_DURABILITY=memory." + QUEUED_IN_MEMORY
            )

    def _refused(self, exc: Exception) -> Exception:
        """A wait answered with an error: the server cannot wait (ConfigError), or it stopped
        being a master meanwhile (QueueUnavailable: enqueueing again is safe)."""
        text = str(exc)
        lowered = text.lower()
        if "unknown command" in lowered:
            need = "Redis 7.2+ or Valkey 7.2+" if self.mode == "aof" else "Redis"
            return ConfigError(
                f"CAPI_ENQUEUE_DURABILITY={self.mode} needs {need} (the server said: {text[:120]})"
            )
        if "appendonly is disabled" in lowered:
            return ConfigError(
                "CAPI_ENQUEUE_DURABILITY=aof cannot be honoured: the server runs without an "
                "append-only file; set appendonly yes and appendfsync always on it "
                f"(the server said: {text[:120]})"
            )
        if isinstance(exc, redis.exceptions.NoPermissionError) or text.startswith("NOPERM"):
            command = "WAITAOF" if self.mode == "aof" else "WAIT"
            return ConfigError(
                f"CAPI_ENQUEUE_DURABILITY={self.mode} needs {command}, which capi's Redis user "
                f"may not run ({text[:120]}); allow it (ACL: +{command.lower()})"
            )
        if not isinstance(exc, redis.exceptions.RedisError):
            return exc
        return QueueUnavailable(
            f"the event reached Redis but its durability ({self.mode}) could not be confirmed: "
            f"{text[:160]} (a switchover or failover in progress?). Enqueueing it again is "
            "safe (the event id dedups)."
        )


def _policy(answer: Any) -> str:
    """``appendfsync`` from a CONFIG GET answer (a dict from redis-py, or a flat list)."""
    if not isinstance(answer, dict):
        answer = dict(zip(answer[::2], answer[1::2], strict=False))
    pairs: dict[Any, Any] = answer
    for name, value in pairs.items():
        if _text(name) == "appendfsync":
            return _text(value)
    return ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
