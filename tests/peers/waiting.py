"""Waiting for a condition with a deadline: the only way tests synchronise with peers."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def wait_for(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = 10.0,  # noqa: ASYNC109 - a deadline for a polled condition, with a message on failure
    interval: float = 0.02,
    *,
    message: str | Callable[[], str] | None = None,
) -> Any:
    """Wait until ``predicate()`` is truthy and return its value; AssertionError after ``timeout`` seconds.

    ``predicate`` may be a plain or an async callable. ``message`` (a string, or a callable
    evaluated at the deadline to show the state then) says what was expected.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            name = getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"not true within {timeout}s: {what or name}")
        await asyncio.sleep(interval)
