"""Per-sink delivery pacing: ``max_rate`` events per second, for every sink alike.

A backlog replayed at full speed after an outage gets a gateway disconnected by a
cloud broker or throttled by an API, and would take the sink's whole capacity.
The agent paces each sink's deliveries to its ``max_rate`` (0 = unlimited) in
small bursts, at most a tenth of a second's worth each, so the peer sees a steady
rate. Lane order is the buffer's (transactions, then operational, then
telemetry), so a transaction that arrives during a paced telemetry backlog goes
out in the next burst instead of waiting behind the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class RatePacer:
    """A token bucket: ``rate`` events per second on average, bursts of a tenth of a second."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1, int(rate * 0.1))
        """The most events one delivery may carry: larger batches would be a burst above the rate."""
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def delay(self, count: int) -> float:
        """Seconds until ``count`` events (at most ``burst``) may go."""
        self._refill()
        want = min(count, self.burst)
        return max(0.0, (want - self._tokens) / self.rate)

    async def acquire(self, count: int, stop: asyncio.Event | None = None) -> bool:
        """Wait until ``count`` events may go and take them; False when ``stop`` was set first."""
        delay = self.delay(count)
        if delay > 0:
            if stop is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return False
            self._refill()
        self._tokens -= min(count, self.burst)
        return True
