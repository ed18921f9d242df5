"""Typing help for redis-py's asyncio client, whose stubs say ``Awaitable[T] | T``."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def aw(value: Awaitable[T] | T) -> T:
    """Await a redis-py asyncio result (typed as a union) and return it."""
    if inspect.isawaitable(value):
        return await value
    return value
