"""Delivery rate per sink and lane, and the time a backlog needs to drain at that rate.

The delivery loops count what each sink acknowledged; maintenance samples the
counts every few seconds into a smoothed rate (exponentially weighted, about a
minute's memory), so ``/status`` can say "this backlog drains in 4 min" and an
operator sees a sink that delivers slower than events arrive.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Hashable


class DeliveryRate:
    """Smoothed events per second per key (a ``(sink, lane)`` pair)."""

    def __init__(self, *, smoothing: float = 0.2) -> None:
        self._smoothing = smoothing
        self._counts: Counter[Hashable] = Counter()
        self._rates: dict[Hashable, float] = {}
        self._sampled_at = time.monotonic()

    def record(self, key: Hashable, count: int) -> None:
        """``count`` events for ``key`` were acknowledged just now."""
        self._counts[key] += count

    def sample(self) -> None:
        """Fold the counts since the last sample into the rates (call every few seconds)."""
        now = time.monotonic()
        elapsed = now - self._sampled_at
        if elapsed <= 0:
            return
        self._sampled_at = now
        counts, self._counts = self._counts, Counter()
        for key in set(self._rates) | set(counts):
            current = counts.get(key, 0) / elapsed
            previous = self._rates.get(key)
            self._rates[key] = current if previous is None else previous + self._smoothing * (current - previous)

    def rate(self, key: Hashable) -> float:
        """Events per second lately (0.0 before the first sample)."""
        return self._rates.get(key, 0.0)

    def drain_seconds(self, key: Hashable, depth: int) -> float | None:
        """Seconds until ``depth`` events are delivered at the current rate: 0 when empty, None when stalled."""
        if depth <= 0:
            return 0.0
        rate = self.rate(key)
        return depth / rate if rate > 0.01 else None
