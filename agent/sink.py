"""The sink interface: what every protocol that forwards events implements.

A sink is built from its config model; ``run`` keeps its connection up (connect,
reconnect with capped jittered backoff) until cancelled, and on cancellation
closes cleanly. The agent calls ``deliver`` with batches taken from the buffer, in
buffer order, one call at a time; the buffer forgets an event for this sink only
after ``deliver`` reported it ``ACKED`` (or rejected it into a dead letter).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec

from agent.events import Lane
from agent.health import ComponentStatus


class BufferedEvent(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One event as the buffer hands it to a sink: already encoded, encode once."""

    seq: int
    lane: Lane
    type: str  # full CloudEvents type, e.g. "io.plantgate.production.completed"
    id: str
    body: bytes  # the structured-mode CloudEvent, UTF-8 JSON
    enqueued: float = 0.0  # when the buffer took it (Unix time), for the delivery latency histogram


class Rejected(msgspec.Struct, frozen=True):
    """The peer refused this event for good: it becomes a dead letter with ``reason``."""

    reason: str


class _Acked(msgspec.Struct, frozen=True):
    pass


class _RetryLater(msgspec.Struct, frozen=True):
    pass


ACKED = _Acked()
"""The peer acknowledged the event (PUBACK, 2xx, 409): the buffer may forget it for this sink."""
RETRY = _RetryLater()
"""Not delivered now (peer down, timeout, 429/503): the same event is retried later, same id."""

Outcome = _Acked | _RetryLater | Rejected


class Sink(Protocol):
    """A protocol sink: MQTT, HTTPS, a JSON Lines file, ..."""

    name: str
    lanes: frozenset[Lane]
    status: ComponentStatus

    async def run(self) -> None:
        """Keep the connection up until cancelled; close cleanly when cancelled."""

    async def deliver(self, batch: Sequence[BufferedEvent]) -> Sequence[Outcome]:
        """Send ``batch`` and return one outcome per event, in the same order.

        Never raises for peer trouble: a disconnected peer gives ``RETRY`` for
        everything it has not acknowledged. Should return promptly (bounded by the
        sink's own timeouts) so the agent can back off and stop.
        """
