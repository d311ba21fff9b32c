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

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

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

    async def events(self, batch: Sequence[CloudEvent], *, state: Mapping[str, str | None] | None = None) -> None:
        """Take canonical events the source built itself (MES, scans), in source order.

        The agent sets ``source`` (and keeps the original as ``originsource``),
        applies the mappings and validation (a failing event becomes a dead letter,
        which counts as stored), drops an id it already holds (acknowledged again,
        stored once) and returns once everything is committed. ``state`` is saved as
        ``save_state`` would, in the same commit as the events (a poll cursor moves
        only together with what the poll produced). Raises ``BufferUnavailable`` like
        ``readings``.
        """

    def tag_value(self, tag: str) -> Reading | None:
        """The latest reading of ``tag``, from any source (a scanner station's current work order)."""

    def refusing(self) -> str | None:
        """Why the buffer refuses writes right now (disk full, size cap), or None while it accepts.

        A source whose peer can be told to come back later (a webhook's 503 with
        ``Retry-After``) answers at once instead of holding the caller.
        """

    async def load_state(self, key: str) -> str | None:
        """A value this source saved with ``save_state`` (in this or an earlier run), or None.

        Keys are per source. Kept in the buffer database, so it survives restarts
        and ``kill -9`` exactly as events do (e.g. OPC UA subscription ids to take over).
        """

    async def save_state(self, key: str, value: str | None) -> None:
        """Keep ``value`` under ``key`` (None removes it); returns once it is committed."""


@runtime_checkable
class ServesHttp(Protocol):
    """A source that takes its input on the agent's HTTP server (the MES webhook).

    The agent calls ``routes`` once, before the server starts, with the output the
    routes hand their input to; the routes share ``[http].listen``, its body limit
    and its TLS.
    """

    def routes(self, output: SourceOutput) -> Sequence[Any]:
        """Starlette routes (``starlette.routing.Route``) to add to the agent's HTTP server."""


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

    def referenced_tags(self) -> dict[str, str]:
        """Config key -> a tag of another source this one reads (a scanner's ``work_order_tag``).

        The settings check that each names a defined tag, as they do for rules.
        """
        return {}

    def describe(self, context: BuildContext) -> list[str]:
        """``plantgate check``'s summary of this source: one line, then detail lines; secrets masked."""
        return [self.name]

    def warnings(self) -> list[str]:
        """What ``plantgate check`` should warn about (valid, but probably not meant)."""
        return []

    def warnings_at(self, context: BuildContext) -> list[str]:
        """Warnings that need the files this source reads, resolved against ``data_dir`` (an empty trust list)."""
        return []

    def build(self, context: BuildContext) -> Source:
        """The source this config describes."""
        raise NotImplementedError

    async def preflight(self, context: BuildContext, *, ack_tags: frozenset[str] = frozenset()) -> list[Finding]:
        """``plantgate check --connect``: reach the peer once and report, one finding per check.

        ``ack_tags`` are the tags the rules write (PLC handshake), to be checked for
        writability. Reads only, never writes; the runner bounds it in time and turns an
        exception into an error finding. By default: no pre-flight for this protocol.
        """
        from agent.preflight import ok

        return [ok("no pre-flight for this protocol (config and files checked)")]


if TYPE_CHECKING:  # pragma: no cover
    from agent.preflight import Finding

    __all__ = ["BufferUnavailable", "ServesHttp", "Source", "SourceConfig", "SourceError", "SourceOutput"]
