"""Capped exponential backoff with full jitter, for every reconnect and retry loop."""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """Delays of ``uniform(minimum, min(cap, base * factor**attempt))``; ``reset()`` after a success.

    Full jitter keeps a fleet of agents from reconnecting to a restarted broker in step.
    """

    def __init__(self, *, base: float = 0.2, factor: float = 2.0, cap: float = 30.0, minimum: float = 0.05):
        if base <= 0 or cap < base or factor < 1:
            raise ValueError("backoff needs base > 0, cap >= base and factor >= 1")
        self.base = base
        self.factor = factor
        self.cap = cap
        self.minimum = minimum
        self.attempt = 0

    def next_delay(self) -> float:
        """The next delay: never above ``cap``, however many attempts failed."""
        ceiling = min(self.cap, self.base * self.factor ** min(self.attempt, 32))
        self.attempt = min(self.attempt + 1, 64)  # the ceiling stopped growing long before
        return random.uniform(min(self.minimum, ceiling), ceiling)

    def reset(self) -> None:
        self.attempt = 0

    async def wait(self, stop: asyncio.Event | None = None) -> bool:
        """Sleep the next delay; returns True early (and at once) if ``stop`` is set."""
        delay = self.next_delay()
        if stop is None:
            await asyncio.sleep(delay)
            return False
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return True
        except TimeoutError:
            return False
