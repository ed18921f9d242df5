"""capi's log handler for servers: the lines of one turn of the event loop go out in one
write, in order, and none waits past a flush (or the end of the process)."""

from __future__ import annotations

import asyncio
import io
import logging
import sys

import pytest

from capi import logs
from capi.fingerprint import fingerprint
from capi.logs import JsonFormatter, TurnHandler


class Writes(io.StringIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def handler_on(stream: Writes) -> logging.Logger:
    handler = TurnHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger(f"capi.test.turns.{id(stream)}")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log


def test_the_lines_of_one_turn_are_written_together_at_its_end_in_order() -> None:
    stream = Writes()
    log = handler_on(stream)

    async def serve() -> tuple[int, int]:
        for i in range(20):  # twenty requests answered in one turn
            log.info("request %d", i)
        before = stream.writes
        await asyncio.sleep(0)  # the turn ends
        await asyncio.sleep(0)
        return before, stream.writes

    before, after = asyncio.run(serve())
    assert (before, after) == (0, 1)
    lines = stream.getvalue().splitlines()
    assert [line.split('"message":"')[1].split('"')[0] for line in lines] == [
        f"request {i}" for i in range(20)
    ]


def test_without_a_loop_a_line_is_written_at_once_and_a_flush_leaves_nothing_waiting() -> None:
    stream = Writes()
    log = handler_on(stream)
    log.info("no loop here")
    assert stream.writes == 1 and "no loop here" in stream.getvalue()

    loop = asyncio.new_event_loop()

    def last_words() -> None:
        log.info("said as the loop stops")
        loop.stop()  # the turn's callbacks run, not the ones they schedule: not the write

    loop.call_soon(last_words)
    loop.run_forever()
    loop.close()
    assert "said as the loop stops" not in stream.getvalue()
    for handler in log.handlers:
        handler.flush()  # as logging.shutdown() does at exit
    assert "said as the loop stops" in stream.getvalue()


def test_a_line_left_by_a_loop_that_stopped_goes_out_with_the_next_loops_lines() -> None:
    """A loop stopped before the turn that writes: the next loop wrote nothing either (its
    lines waited behind the first, whose write was never to run)."""
    stream = Writes()
    log = handler_on(stream)
    loop = asyncio.new_event_loop()
    loop.call_soon(lambda: (log.info("first loop"), loop.stop()))
    loop.run_forever()
    loop.close()

    async def later() -> str:
        log.info("second loop")
        await asyncio.sleep(0.01)
        return stream.getvalue()

    written = asyncio.run(later())
    assert "first loop" in written and "second loop" in written
    assert written.index("first loop") < written.index("second loop")


class Broken(io.StringIO):
    """A stream whose reader is gone (a closed pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def write(self, text: str) -> int:
        self.calls += 1
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        self.calls += 1
        raise BrokenPipeError(32, "Broken pipe")


def test_a_broken_stream_is_said_once_and_the_loop_does_not_spin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The end of a turn raised from its flush: asyncio logged "Exception in callback"
    through the same handler, which scheduled another flush, every turn (1,500 flushes in
    half a second of an idle loop)."""
    stream = Broken()
    said = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", said)
    handler = TurnHandler(stream)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])

    async def serve() -> None:
        logging.getLogger("capi.test.broken").warning("a line nobody reads")
        await asyncio.sleep(0.3)

    asyncio.run(serve())
    assert stream.calls <= 4, stream.calls
    assert said.getvalue().count("could not write log lines") == 1, said.getvalue()


@pytest.mark.parametrize("json", [True, False], ids=["json", "text"])
def test_the_key_in_an_exceptions_text_or_an_extra_field_is_shown_as_its_fingerprint(
    json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """The message filter cannot reach a traceback's text or an extra field: the handler
    scrubs each line it writes (a key an exception quotes, as JSON escapes it too)."""
    key = "sk-svcacct-Scrub/me-" + "k" * 30
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure(json=json, key=key)
        log = logging.getLogger("capi.test.scrub")
        try:
            raise RuntimeError(f"the endpoint echoed {key}")
        except RuntimeError:
            log.exception("send failed")
        log.warning("held", extra={"reason": f"key {key} refused", "event_ids": [key]})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "send failed" in err and "held" in err and "RuntimeError" in err
    assert key not in err and key.replace("/", "\\/") not in err
    assert f"<key {fingerprint(key)}>" in err
