"""The explicit registry of protocols: config section -> the config model that builds it.

Adding a protocol is adding its module under ``protocols/`` (a ``SourceConfig`` or
``SinkConfig`` subclass beside its code) and one line here. Settings, rules,
``plantgate check``, the CLI summary and the demo iterate these tables. Only the
config models are imported here: a protocol's library (asyncua, paho, pymodbus,
httpx) is imported by its ``build`` method, so an unused protocol is never loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent import __version__
from agent.config_types import BuildContext
from agent.sink import Sink, SinkConfig
from agent.source import Source, SourceConfig
from protocols.jsonl import JsonlSinkConfig
from protocols.mqtt import MqttSinkConfig
from protocols.opcua import OpcUaSourceConfig

if TYPE_CHECKING:
    from agent.settings import Settings

SOURCES: dict[str, type[SourceConfig]] = {
    "opcua": OpcUaSourceConfig,
}
"""``[[sources.<key>]]`` -> its config model, in the order sources are built."""

SINKS: dict[str, type[SinkConfig]] = {
    "mqtt": MqttSinkConfig,
    "jsonl": JsonlSinkConfig,
}
"""``[[sinks.<key>]]`` -> its config model, in the order sinks are built."""


def build_context(settings: Settings) -> BuildContext:
    """The context every protocol instance of one agent is built with."""
    agent = settings.agent
    return BuildContext(agent_id=agent.id, site=agent.site, version=__version__, data_dir=agent.data_dir)


def build_sources(settings: Settings, context: BuildContext | None = None) -> list[Source]:
    """Every configured source, in registry then config order."""
    context = context or build_context(settings)
    return [config.build(context) for config in settings.source_configs()]


def build_sinks(settings: Settings, context: BuildContext | None = None) -> list[Sink]:
    """Every configured sink, in registry then config order."""
    context = context or build_context(settings)
    return [config.build(context) for config in settings.sink_configs()]
