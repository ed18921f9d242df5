"""capi's log handler for servers: the lines of one turn of the event loop go out in one
write, in order, and none waits past a flush (or the end of the process)."""

from __future__ import annotations

import asyncio
import io
import logging

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

    async def last_words() -> None:
        log.info("said as the loop ends")

    asyncio.run(last_words())  # the loop closes before its next turn
    for handler in log.handlers:
        handler.flush()  # as logging.shutdown() does at exit
    assert "said as the loop ends" in stream.getvalue()
