"""The source interface: what every protocol that reads the shop floor implements.

A source is built from its config model (``SourceConfig.build``), then ``run`` is
started as one task of the agent. ``run`` connects, reconnects with capped
jittered backoff when the peer goes away (a PLC that is away is retried, never
fatal), and hands what it reads to the agent in batches: tag ``readings`` (OPC UA,
Modbus) that the rules turn into events, or canonical ``events`` (MES ingest,
barcode scans) that the agent maps, validates and stores as they are. Both calls
return once what the batch produced is committed to the buffer, so a source
acknowledges its peer (a 202, an OPC UA notification, a scanner's beep) only after
that. ``run`` returns only when cancelled, closing its connections on the way out.
Static config problems are raised by the config model, not in ``run``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import Field

from agent.config_types import BuildContext, ConfigModel, TagConfig
from agent.events import CloudEvent, Reading
from agent.health import ComponentStatus


class SourceOutput(Protocol):
    """Where a source delivers what it read; implemented by the agent's pipeline."""

    async def readings(self, batch: Sequence[Reading]) -> None:
        """Take one batch of readings (all from one notification or poll, in source order).

        Returns once the events the batch produced are committed (at once when it
        produced none). Waits while the buffer refuses writes: that is the
        back-pressure on the source. Call it once per batch, never once per value.
        Raises ``BufferUnavailable`` when the batch could not be committed; the
        source must then not acknowledge it to its peer.
        """

    async def events(self, batch: Sequence[CloudEvent]) -> None:
        """Take canonical events the source built itself (MES, scans), in source order.

        The agent sets ``source`` (and keeps the original as ``originsource``),
        applies the mappings and validation (a failing event becomes a dead letter,
        which counts as stored), drops an id it already holds (acknowledged again,
        stored once) and returns once everything is committed. Raises
        ``BufferUnavailable`` like ``readings``.
        """


    async def load_state(self, key: str) -> str | None:
        """A value this source saved with ``save_state`` (in this or an earlier run), or None.

        Keys are per source. Kept in the buffer database, so it survives restarts
        and ``kill -9`` exactly as events do (e.g. OPC UA subscription ids to take over).
        """

    async def save_state(self, key: str, value: str | None) -> None:
        """Keep ``value`` under ``key`` (None removes it); returns once it is committed."""


class BufferUnavailable(Exception):
    """What a source handed over could not be committed (disk full, corrupt buffer, stopping)."""


class Source(Protocol):
    """A protocol source: OPC UA, Modbus, barcode, MES, ..."""

    name: str
    status: ComponentStatus

    def tags(self) -> Sequence[str]:
        """The tag names this source produces (and may write, see ``write``)."""

    async def run(self, output: SourceOutput) -> None:
        """Read until cancelled; reconnect on failure; report state in ``status``."""

    async def write(self, tag: str, value: Any) -> None:
        """Write ``value`` to ``tag`` on the device (the PLC handshake ``ack``).

        Raises ``SourceError`` when the device is unreachable or refuses the write.
        """


class SourceError(Exception):
    """A source could not do what was asked (unreachable, refused write, bad node)."""


class SourceConfig(ConfigModel):
    """What every source's config shares: a unique name, its tags, and how to build the source.

    A protocol module subclasses it beside its code and registers it in
    ``agent.registry``. ``build`` imports the protocol's library (a plain import
    inside the method), so a site that does not use the protocol never loads it.
    """

    name: str = Field(min_length=1, description="Source name: part of each event's source and of /status")

    def tag_configs(self) -> Sequence[TagConfig]:
        """The tags this source defines (rules and cross-reference checks use them); none by default."""
        return ()

    def describe(self, context: BuildContext) -> list[str]:
        """``plantgate check``'s summary of this source: one line, then detail lines; secrets masked."""
        return [self.name]

    def warnings(self) -> list[str]:
        """What ``plantgate check`` should warn about (valid, but probably not meant)."""
        return []

    def build(self, context: BuildContext) -> Source:
        """The source this config describes."""
        raise NotImplementedError


if TYPE_CHECKING:  # pragma: no cover
    __all__ = ["BufferUnavailable", "Source", "SourceConfig", "SourceError", "SourceOutput"]
