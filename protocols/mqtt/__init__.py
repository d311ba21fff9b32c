"""MQTT sink: canonical events to a broker, acknowledged by the broker's PUBACK.

Wire mapping (contract): each event body (the structured-mode CloudEvent, as the
buffer stored it) is published with the configured QoS (default 1), not retained,
to ``{topic_prefix}/{lane}/{type without "io.plantgate."}``. On every connect the
agent publishes ``{"state": "online", "agent", "site", "version", "time"}``
retained to ``{topic_prefix}/status/{agent_id}``; ``offline`` is its last will,
and is also published before a clean disconnect. An event is ``ACKED`` only after
its PUBACK (for QoS 0: once written to the socket).

This package's ``__init__`` holds only the config model (``MqttSinkConfig``), so the
settings can validate an ``[[sinks.mqtt]]`` entry without importing paho-mqtt;
``protocols.mqtt.sink`` holds the sink itself (``MqttSink``) and is imported by
``MqttSinkConfig.build``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from agent.config_types import BuildContext, Duration, mask_secret, server_url
from agent.events import LANES, Lane
from agent.sink import SinkConfig

if TYPE_CHECKING:
    from agent.preflight import Finding
    from protocols.mqtt.sink import MqttSink

__all__ = ["DEFAULT_PORTS", "MqttSinkConfig"]

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class MqttSinkConfig(SinkConfig):
    """One ``[[sinks.mqtt]]`` entry: the broker, the topics and the delivery limits."""

    name: str = Field(
        min_length=1,
        description="Name of this sink; the buffer keys its backlog by it, so renaming starts a new backlog",
    )
    url: str = Field(
        description='Broker address: "mqtt://host:port" for plain TCP, "mqtts://host:port" for TLS '
        "(default ports 1883 and 8883). No credentials in the url: use username and password_file",
        examples=["mqtts://broker.example.com:8883"],
    )
    client_id: str | None = Field(
        None,
        min_length=1,
        description='MQTT client id, unique on the broker; default "plantgate-{agent id}"',
    )
    topic_prefix: str | None = Field(
        None,
        min_length=1,
        description='Topic prefix; events go to "{topic_prefix}/{lane}/{type}", status to '
        '"{topic_prefix}/status/{agent id}". Default "plantgate/{site}"',
    )
    qos: int = Field(
        1, ge=0, le=1, description="MQTT QoS of event publishes: 1 (PUBACK, at-least-once) or 0 (fire and forget)"
    )
    lanes: list[Lane] = Field(
        default_factory=lambda: list(LANES),
        min_length=1,
        description="Lanes this sink forwards: transaction, operational, telemetry",
    )
    window: int = Field(
        500,
        ge=1,
        le=10000,
        description="Maximum number of published events waiting for their PUBACK at once",
    )
    keepalive: Duration = Field(
        30.0,
        ge=1,
        le=65535,
        description="MQTT keepalive: idle time before a PINGREQ; no answer within it drops the connection",
    )
    connect_timeout: Duration = Field(10.0, gt=0, description="Time allowed for TCP connect, TLS handshake and CONNACK")
    ack_timeout: Duration = Field(
        30.0,
        gt=0,
        description="Time without any PUBACK while publishes are pending after which the connection is "
        "considered dead: the unacknowledged events are retried on a new connection",
    )
    status_interval: Duration = Field(
        60.0,
        ge=0,
        description="How often the retained status message on the status topic is refreshed with the agent's key "
        "figures (backlog, oldest age, drain estimate, dead letters, headroom); 0 = only on connect",
    )
    reconnect_max_backoff: Duration = Field(
        4.0,
        gt=0,
        description="Upper bound of the jittered exponential wait between reconnect attempts: a broker that "
        "comes back is found within about this long (the jitter spreads a fleet's reconnects over it)",
    )
    ca_file: Path | None = Field(
        None, description="mqtts: PEM file of the CA(s) that sign the broker's certificate (default: system CAs)"
    )
    cert_file: Path | None = Field(None, description="mqtts: client certificate (PEM) for mutual TLS; needs key_file")
    key_file: Path | None = Field(None, validate_default=True, description="mqtts: private key (PEM) of cert_file")
    username: str | None = Field(None, min_length=1, description="MQTT username")
    password_file: Path | None = Field(
        None, description="File holding the MQTT password (e.g. a systemd credential); wins over password"
    )
    password: SecretStr | None = Field(
        None, description="MQTT password, from the environment only (never write it in the file)"
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.strip()
        parts = server_url(value, tuple(DEFAULT_PORTS), credentials_hint="; use username and password_file")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError('an MQTT url is only "scheme://host:port", without path or query')
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _check_prefix(cls, value: str | None) -> str | None:
        if value is not None:
            if "+" in value or "#" in value or "\x00" in value:
                raise ValueError("a topic prefix cannot contain the wildcards + or # (or NUL)")
            if value.endswith("/"):
                raise ValueError('a topic prefix does not end with "/"')
        return value

    @field_validator("lanes")
    @classmethod
    def _unique_lanes(cls, value: list[Lane]) -> list[Lane]:
        if len(set(value)) != len(value):
            raise ValueError("each lane may be listed once")
        return value

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _needs_tls(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        url = info.data.get("url")  # absent when the url itself was invalid
        if value is not None and url is not None and urlsplit(url).scheme != "mqtts":
            raise ValueError("TLS files need an mqtts:// url")
        return value

    @field_validator("key_file")
    @classmethod
    def _key_with_cert(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if (value is None) != (info.data.get("cert_file") is None) and "cert_file" in info.data:
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        return value

    @field_validator("password_file", "password")
    @classmethod
    def _password_needs_username(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("username") is None:
            raise ValueError("a password needs a username (MQTT 3.1.1)")
        return value

    @property
    def tls(self) -> bool:
        """True for ``mqtts://``."""
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None  # validated
        return host

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or DEFAULT_PORTS[parts.scheme]

    @property
    def credentials_in_clear(self) -> bool:
        """True when a username/password would travel unencrypted (``mqtt://``); ``plantgate check`` warns."""
        has_credentials = self.username is not None or self.password_file is not None or self.password is not None
        return has_credentials and not self.tls

    def describe(self, context: BuildContext) -> list[str]:
        """Broker, QoS, lanes and rate; the password masked."""
        user = ""
        if self.username:
            user = f" user={self.username} password={mask_secret(self.password, self.password_file)}"
        return [f"{self.name} {self.url} qos={self.qos} lanes={','.join(self.lanes)} max_rate={self.max_rate:g}{user}"]

    def warnings(self) -> list[str]:
        """Credentials over plain TCP."""
        if self.credentials_in_clear:
            return [f"sinks.mqtt.{self.name}: username/password travel unencrypted over mqtt://; use mqtts://"]
        return []

    def build(self, context: BuildContext) -> MqttSink:
        """The sink this entry describes (``MqttSinkConfig`` / ``MqttSink``, as Vector pairs them).

        paho-mqtt is imported here, not with the config: a site without an MQTT sink never loads it.
        """
        from protocols.mqtt.sink import MqttSink

        return MqttSink(
            self, agent_id=context.agent_id, site=context.site, version=context.version, data_dir=context.data_dir
        )

    async def preflight(self, context: BuildContext) -> list[Finding]:
        """Connect with the configured TLS and credentials under a separate client id; the CONNACK."""
        from protocols.mqtt.preflight import preflight

        return await preflight(self, context)
