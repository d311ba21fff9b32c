"""The explicit registry of protocols: config section -> the class it builds.

Adding a protocol is adding its module under ``protocols/``, its config list to
``agent.settings`` and one line here; nothing else changes.
"""

from __future__ import annotations

from agent import __version__
from agent.settings import Settings
from agent.sink import Sink
from agent.source import Source
from protocols.jsonl import JsonlSink
from protocols.mqtt import MqttSink
from protocols.opcua import OpcUaSource


def build_sources(settings: Settings) -> list[Source]:
    """Every configured source, in config order."""
    data_dir = settings.agent.data_dir
    sources: list[Source] = []
    sources.extend(OpcUaSource(config, data_dir=data_dir) for config in settings.sources.opcua)
    return sources


def build_sinks(settings: Settings) -> list[Sink]:
    """Every configured sink, in config order."""
    agent = settings.agent
    sinks: list[Sink] = []
    sinks.extend(
        MqttSink(config, agent_id=agent.id, site=agent.site, version=__version__, data_dir=agent.data_dir)
        for config in settings.sinks.mqtt
    )
    sinks.extend(JsonlSink(config, data_dir=agent.data_dir) for config in settings.sinks.jsonl)
    return sinks
