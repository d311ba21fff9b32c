"""The sink interface: what every protocol that forwards events implements.

A sink is built from its config model; ``run`` keeps its connection up (connect,
reconnect with capped jittered backoff) until cancelled, and on cancellation
closes cleanly. The agent calls ``deliver`` with batches taken from the buffer, in
buffer order, one call at a time; the buffer forgets an event for this sink only
after ``deliver`` reported it ``ACKED`` or ``Delivered`` (or rejected it into a dead letter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgspec
from pydantic import Field, field_validator

from agent.config_types import BuildContext, ConfigModel
from agent.events import LANES, Lane
from agent.health import ComponentStatus

if TYPE_CHECKING:
    from agent.preflight import Finding


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


class Delivered(msgspec.Struct, frozen=True):
    """Acknowledged, like ``ACKED``, with the receiver's own reference for the event (the delivery journal keeps it)."""

    reference: str | None = None


class RetryLater(msgspec.Struct, frozen=True):
    """Not delivered now; the same event is handed out again later, same id.

    ``after`` is the peer's own hint in seconds (HTTP ``Retry-After``, a broker's
    quota); ``None`` leaves the delay to the agent's backoff. ``reason`` says why
    (``HTTP 503``, ``timeout``, ``disconnected``): the delivery journal records it as
    the attempt's status.
    """

    after: float | None = None
    reason: str | None = None


ACKED = _Acked()
"""The peer acknowledged the event (PUBACK, 2xx, 409): the buffer may forget it for this sink."""
RETRY = RetryLater()
"""Not delivered now (peer down, timeout): the same event is retried later, same id."""

Outcome = _Acked | Delivered | RetryLater | Rejected


class Sink(Protocol):
    """A protocol sink: MQTT, HTTPS, a JSON Lines file, ..."""

    name: str
    lanes: frozenset[Lane]
    status: ComponentStatus
    batch_max: int
    """The most events one ``deliver`` call takes (a broker window, an API's batch limit)."""

    async def run(self) -> None:
        """Keep the connection up until cancelled; close cleanly when cancelled."""

    async def deliver(self, batch: Sequence[BufferedEvent]) -> Sequence[Outcome]:
        """Send ``batch`` and return one outcome per event, in the same order.

        Never raises for peer trouble: a disconnected peer gives ``RETRY`` for
        everything it has not acknowledged. Should return promptly (bounded by the
        sink's own timeouts) so the agent can back off and stop.
        """


@runtime_checkable
class PublishesStatus(Protocol):
    """A sink that also carries the agent's heartbeat to where monitoring reads it (MQTT's status topic)."""

    def publish_status(self, figures: Mapping[str, Any]) -> None:
        """The agent's key figures, handed every few seconds; the sink publishes them on its own schedule."""


class SinkConfig(ConfigModel):
    """What every sink's config shares: a unique name, the lanes it takes, how to build it.

    The buffer keys a sink's backlog by ``name``: renaming or removing a sink never
    deletes its backlog (it shows as orphaned). A protocol module subclasses this
    beside its code and registers it in ``agent.registry``; ``build`` imports the
    protocol's library, so an unused protocol is never loaded.
    """

    name: str = Field(min_length=1, description="Sink name; the buffer keys this sink's backlog by it")
    lanes: list[Lane] = Field(default_factory=lambda: list(LANES), description="Lanes this sink takes")
    max_rate: float = Field(
        0,
        ge=0,
        description="Ceiling in events per second, so a backlog replay does not flood the broker or the API "
        "(0 = unlimited); paced by the agent in bursts of a tenth of a second",
    )

    @field_validator("lanes")
    @classmethod
    def _lanes_unique(cls, lanes: list[Lane]) -> list[Lane]:
        if not lanes or len(set(lanes)) != len(lanes):
            raise ValueError("lanes must be a non-empty list without repeats")
        return lanes

    def describe(self, context: BuildContext) -> list[str]:
        """``plantgate check``'s summary of this sink: one line, then detail lines; secrets masked."""
        return [self.name]

    def warnings(self) -> list[str]:
        """What ``plantgate check`` should warn about (valid, but probably not meant)."""
        return []

    def warnings_at(self, context: BuildContext) -> list[str]:
        """Warnings that need the files this sink reads, resolved against ``data_dir`` (an empty trust list)."""
        return []

    def build(self, context: BuildContext) -> Sink:
        """The sink this config describes."""
        raise NotImplementedError

    async def preflight(self, context: BuildContext) -> list[Finding]:
        """``plantgate check --connect``: reach the peer once (connect, authenticate), one finding per check.

        Sends no event. By default: no pre-flight for this protocol.
        """
        from agent.preflight import ok

        return [ok("no pre-flight for this protocol (config and files checked)")]
