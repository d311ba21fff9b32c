"""The explicit registry of protocols: config section -> the config model that builds it.

Adding a protocol is adding its module under ``protocols/`` (a ``SourceConfig`` or
``SinkConfig`` subclass beside its code) and one line here. Settings, rules,
``plantgate check``, the CLI summary and the demo iterate these tables. Only the
config models are imported here: a protocol's library (asyncua, paho, pymodbus,
httpx) is imported by its ``build`` method, so an unused protocol is never loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from agent import __version__
from agent.config_types import BuildContext
from agent.sink import Sink, SinkConfig
from agent.source import Source, SourceConfig
from protocols.barcode import BarcodeSourceConfig
from protocols.https import HttpsSinkConfig
from protocols.jsonl import JsonlSinkConfig
from protocols.mes import MesSourceConfig
from protocols.modbus import ModbusSourceConfig
from protocols.mqtt import MqttSinkConfig
from protocols.opcua import OpcUaSourceConfig

if TYPE_CHECKING:
    from agent.settings import Settings

_Built = TypeVar("_Built")

SOURCES: dict[str, type[SourceConfig]] = {
    "opcua": OpcUaSourceConfig,
    "modbus": ModbusSourceConfig,
    "barcode": BarcodeSourceConfig,
    "mes": MesSourceConfig,
}
"""``[[sources.<key>]]`` -> its config model, in the order sources are built."""

SINKS: dict[str, type[SinkConfig]] = {
    "mqtt": MqttSinkConfig,
    "https": HttpsSinkConfig,
    "jsonl": JsonlSinkConfig,
}
"""``[[sinks.<key>]]`` -> its config model, in the order sinks are built."""


def build_context(settings: Settings) -> BuildContext:
    """The context every protocol instance of one agent is built with."""
    agent = settings.agent
    return BuildContext(
        agent_id=agent.id,
        site=agent.site,
        version=__version__,
        data_dir=agent.data_dir,
        ingest_token_file=(
            settings.data_path(settings.http.ingest_token_file) if settings.http.ingest_token_file else None
        ),
    )


def build_sources(settings: Settings, context: BuildContext | None = None) -> list[Source]:
    """Every configured source, in registry then config order.

    Raises ``ConfigError`` naming the source's key path (``sources.opcua.0``) when
    one cannot be built, e.g. its ``password_file`` cannot be read.
    """
    context = context or build_context(settings)
    sources: list[Source] = []
    for key in SOURCES:
        for index, config in enumerate(getattr(settings.sources, key)):
            sources.append(_build(f"sources.{key}.{index}", config.build, context))
    return sources


def build_sinks(settings: Settings, context: BuildContext | None = None) -> list[Sink]:
    """Every configured sink, in registry then config order (``ConfigError`` as ``build_sources``)."""
    context = context or build_context(settings)
    sinks: list[Sink] = []
    for key in SINKS:
        for index, config in enumerate(getattr(settings.sinks, key)):
            sinks.append(_build(f"sinks.{key}.{index}", config.build, context))
    return sinks


def _build(where: str, build: Callable[[BuildContext], _Built], context: BuildContext) -> _Built:
    from agent.settings import ConfigError

    try:
        return build(context)
    except ValueError as exc:  # a file it needs (a secret, a certificate) cannot be read or is invalid
        message = str(exc)
        field, sep, rest = message.partition(": ")
        if sep and all(part.isidentifier() for part in field.split(".")):
            # "password_file: cannot read ..." or "oauth2.client_secret_file: ...": name the key itself
            raise ConfigError(None, f"{where}.{field}", rest) from exc
        raise ConfigError(None, where, message) from exc
