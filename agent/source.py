"""The source interface: what every protocol that reads the shop floor implements.

A source is built from its config model, then ``run`` is started as one task of
the agent. ``run`` connects, reconnects with capped jittered backoff when the peer
goes away (a PLC that is away is retried, never fatal), and hands readings to the
agent in batches. It returns only when cancelled, closing its connections on the
way out. Static config problems are raised at construction, not in ``run``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from agent.events import Reading
from agent.health import ComponentStatus


class ReadingSink(Protocol):
    """Where a source delivers what it read; implemented by the agent's pipeline."""

    async def readings(self, batch: Sequence[Reading]) -> None:
        """Take one batch of readings (all from one notification or poll, in source order).

        Returns quickly; awaits only to back-pressure the source when the buffer
        refuses writes. Call it once per batch, never once per value.
        """


class Source(Protocol):
    """A protocol source: OPC UA, Modbus, barcode, MES, ..."""

    name: str
    status: ComponentStatus

    def tags(self) -> Sequence[str]:
        """The tag names this source produces (and may write, see ``write``)."""

    async def run(self, output: ReadingSink) -> None:
        """Read until cancelled; reconnect on failure; report state in ``status``."""

    async def write(self, tag: str, value: Any) -> None:
        """Write ``value`` to ``tag`` on the device (the PLC handshake ``ack``).

        Raises ``SourceError`` when the device is unreachable or refuses the write.
        """


class SourceError(Exception):
    """A source could not do what was asked (unreachable, refused write, bad node)."""
