"""Modbus: the ``[[sources.modbus]]`` config model.

The source lives in ``protocols.modbus.source`` and imports pymodbus, which is loaded
only when ``ModbusSourceConfig.build`` is called: a site without Modbus never loads
it. Addressing, value types and read planning are pure (``protocols.modbus.registers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, field_validator, model_validator

from agent.config_types import BuildContext, Duration, TagConfig, format_duration
from agent.counters import CounterSpec
from agent.source import SourceConfig
from protocols.modbus.registers import (
    BIT_TABLES,
    MAX_ADDRESS,
    MAX_BITS_PER_READ,
    MAX_REGISTERS_PER_READ,
    Order,
    Table,
    ValueType,
    parse_register,
    parse_type,
)

if TYPE_CHECKING:
    from agent.preflight import Finding
    from protocols.modbus.source import ModbusSource

__all__ = ["Endpoint", "ModbusSourceConfig", "ModbusTagConfig", "parse_endpoint"]

DEFAULT_TCP_PORT = 502
_PARITIES = {"N", "E", "O", "M", "S"}


@dataclass(frozen=True)
class Endpoint:
    """Where a Modbus device is: a TCP host and port, or a serial line and its settings."""

    scheme: Literal["tcp", "rtu"]
    host: str = ""
    port: int = DEFAULT_TCP_PORT
    device: str = ""
    baudrate: int = 19200
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8

    @property
    def line_key(self) -> tuple[str, ...]:
        """What identifies the line (a serial port, a TCP peer): sources on one line share its worker."""
        if self.scheme == "rtu":
            return ("modbus-serial", self.device)
        return ("modbus-tcp", self.host.lower(), str(self.port))

    def __str__(self) -> str:
        if self.scheme == "rtu":
            return f"rtu://{self.device}?baudrate={self.baudrate}&parity={self.parity}&stopbits={self.stopbits}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """``tcp://host[:port]`` or ``rtu:///dev/ttyX?baudrate=19200&parity=E&stopbits=1&bytesize=8``."""
    value = text.strip()
    parts = urlsplit(value)
    hint = "write it as \"tcp://10.1.3.20:502\" or \"rtu:///dev/ttyUSB0?baudrate=19200&parity=E\""
    if parts.scheme == "tcp":
        if not parts.hostname:
            raise ValueError(f"{text!r} has no host; {hint}")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"{text!r}: a TCP endpoint takes only host and port; {hint}")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{text!r} has an invalid port") from exc
        return Endpoint("tcp", host=parts.hostname, port=port if port is not None else DEFAULT_TCP_PORT)
    if parts.scheme == "rtu":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError(f"{text!r}: name the serial device by its absolute path (three slashes); {hint}")
        options: dict[str, str] = {}
        for key, option in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            options[key] = option
        unknown = set(options) - {"baudrate", "parity", "stopbits", "bytesize"}
        if unknown:
            first = sorted(unknown)[0]
            raise ValueError(f"{text!r}: unknown serial option {first!r}; baudrate, parity, stopbits, bytesize")
        try:
            baudrate = int(options.get("baudrate", "19200"))
            stopbits = int(options.get("stopbits", "1"))
            bytesize = int(options.get("bytesize", "8"))
        except ValueError as exc:
            raise ValueError(f"{text!r}: baudrate, stopbits and bytesize are integers") from exc
        parity = options.get("parity", "N").upper()
        if baudrate <= 0:
            raise ValueError(f"{text!r}: baudrate must be positive")
        if parity not in _PARITIES:
            raise ValueError(f"{text!r}: parity is N, E or O")
        if stopbits not in (1, 2):
            raise ValueError(f"{text!r}: stopbits is 1 or 2")
        if bytesize not in (7, 8):
            raise ValueError(f"{text!r}: bytesize is 7 or 8")
        return Endpoint(
            "rtu", device=parts.path, baudrate=baudrate, parity=parity, stopbits=stopbits, bytesize=bytesize
        )
    raise ValueError(f"{text!r} is not a Modbus endpoint; {hint}")


class ModbusTagConfig(TagConfig):
    """One Modbus value: the common tag settings plus its register, type, byte/word order, scale and offset."""

    # ``register`` is the config key; the attribute name avoids ABCMeta.register, which BaseModel inherits.
    register_text: str = Field(
        ...,
        alias="register",
        description="Table and address: coil | discrete | input | holding, then the address 0-65535 "
        "(protocol addresses, as sent on the wire: holding register 40101 in 1-based notation is holding:100)",
        examples=["holding:100"],
    )
    type: str | None = Field(
        None,
        description="bool | int16 | uint16 | int32 | uint32 | float32 | float64 | string:N "
        "(N registers, high byte first, trailing NULs and spaces stripped); default: bool on coils and "
        "discrete inputs (the only type there), uint16 on registers",
    )
    byte_order: Order = Field("big", description="big | little: byte order inside each register")
    word_order: Order = Field(
        "big", description="big | little: register order of 32/64-bit values (little: low word first)"
    )
    scale: float = Field(1.0, description="value = raw * scale + offset (numeric types)")
    offset: float = Field(0.0, description="value = raw * scale + offset (numeric types)")
    unit: int | None = Field(
        None, ge=0, le=255, description="Unit id (slave address) of this tag, when it differs from the source's"
    )

    @field_validator("register_text")
    @classmethod
    def _valid_register(cls, value: str) -> str:
        table, address = parse_register(value)
        return f"{table}:{address}"

    @field_validator("type")
    @classmethod
    def _valid_type(cls, value: str | None) -> str | None:
        return parse_type(value).name if value is not None else None

    @model_validator(mode="after")
    def _fits(self) -> ModbusTagConfig:
        table, address = self.location
        vtype = self.value_type
        if table in BIT_TABLES and vtype.name != "bool":
            raise ValueError(f"type {vtype.name} does not fit a {table}: coils and discrete inputs are bool")
        if address + vtype.registers - 1 > MAX_ADDRESS:
            raise ValueError(f"{vtype.name} at {self.register_text} runs past address 65535")
        numeric = vtype.name not in ("bool",) and not vtype.is_string
        if not numeric and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"scale and offset apply only to numeric types, not {vtype.name}")
        if self.scale == 0:
            raise ValueError("scale 0 makes every value the offset")
        if self.kind == "counter" and not vtype.integer:
            raise ValueError(f"a counter is an integer register (int16, uint16, int32, uint32), not {vtype.name}")
        if self.kind == "telemetry" and vtype.is_string and self.deadband is not None:
            raise ValueError("deadband applies to numbers, not strings")
        return self

    @property
    def location(self) -> tuple[Table, int]:
        """(table, address) of this tag."""
        return parse_register(self.register_text)

    @property
    def value_type(self) -> ValueType:
        """The parsed ``type`` (its default for the tag's table when not set)."""
        if self.type is not None:
            return parse_type(self.type)
        return parse_type("bool" if self.location[0] in BIT_TABLES else "uint16")

    @property
    def writable(self) -> bool:
        """A coil or holding register can be written (a PLC handshake ack); inputs cannot."""
        return self.location[0] in ("coil", "holding")

    def counter_spec(self) -> CounterSpec:
        """How this counter wraps: at its register width, in its scaled units."""
        return CounterSpec(bits=self.value_type.bits, scale=self.scale, offset=self.offset)


class ModbusSourceConfig(SourceConfig):
    """``[[sources.modbus]]``: one Modbus device (a unit id on a TCP endpoint or serial line), polled."""

    name: str = Field(..., min_length=1, description="Name of this source, used in events, /status and metrics")
    endpoint: str = Field(
        ...,
        description="tcp://host[:port] (port 502 by default) or "
        "rtu:///dev/ttyUSB0?baudrate=19200&parity=N|E|O&stopbits=1&bytesize=8; every source naming "
        "the same serial device shares one worker that owns the port",
        examples=["tcp://10.1.3.20:502", "rtu:///dev/ttyUSB0?baudrate=19200&parity=E"],
    )
    unit: int = Field(1, ge=0, le=255, description="Unit id (slave address) of the device; 1-247 on a serial line")
    poll_interval: Duration = Field(1.0, gt=0, description="How often every tag is read (fixed schedule, no drift)")
    timeout: Duration = Field(0.5, gt=0, description="How long to wait for each response")
    retries: int = Field(
        0, ge=0, le=5, description="Times a request that got no answer is sent again before it counts as failed"
    )
    gap_max: int = Field(
        8,
        ge=0,
        le=MAX_REGISTERS_PER_READ,
        description="Unused registers between two tags that one read may bridge (x16 for coils and inputs); "
        "0 reads only contiguous tags together",
    )
    max_registers: int = Field(
        MAX_REGISTERS_PER_READ,
        ge=1,
        le=MAX_REGISTERS_PER_READ,
        description="Most registers per read (some devices take fewer than the protocol's 125)",
    )
    max_bits: int = Field(
        MAX_BITS_PER_READ, ge=1, le=MAX_BITS_PER_READ, description="Most coils or inputs per read"
    )
    reconnect_max_backoff: Duration = Field(
        5.0, gt=0, description="Longest wait between attempts to reach a device that does not answer"
    )
    error_max_backoff: Duration = Field(
        30.0, gt=0, description="Longest wait before a read that failed (exception code, timeout) is tried again"
    )
    tags: list[ModbusTagConfig] = Field(..., min_length=1, description="The values to read")

    @field_validator("endpoint")
    @classmethod
    def _valid_endpoint(cls, value: str) -> str:
        parse_endpoint(value)
        return value.strip()

    @field_validator("tags")
    @classmethod
    def _unique_tags(cls, tags: list[ModbusTagConfig]) -> list[ModbusTagConfig]:
        names: set[str] = set()
        for tag in tags:
            if tag.tag in names:
                raise ValueError(f"tag {tag.tag!r} appears twice")
            names.add(tag.tag)
        return tags

    @model_validator(mode="after")
    def _limits(self) -> ModbusSourceConfig:
        for index, tag in enumerate(self.tags):
            if tag.value_type.registers > self.max_registers and tag.location[0] not in BIT_TABLES:
                raise ValueError(
                    f"tags.{index}: {tag.value_type.name} spans {tag.value_type.registers} registers, "
                    f"more than max_registers = {self.max_registers}"
                )
        return self

    @property
    def parsed_endpoint(self) -> Endpoint:
        """``endpoint`` parsed."""
        return parse_endpoint(self.endpoint)

    def tag_configs(self) -> Sequence[TagConfig]:
        """The values read from this device."""
        return self.tags

    def describe(self, context: BuildContext) -> list[str]:
        """One line for the device, one per tag."""
        endpoint = self.parsed_endpoint
        lines = [
            f"{self.name} {endpoint} unit={self.unit} poll_interval={format_duration(self.poll_interval)} "
            f"tags={len(self.tags)}"
        ]
        for tag in self.tags:
            extra = [f"type={tag.value_type.name}"]
            if tag.value_type.registers > 1 and not tag.value_type.is_string and tag.word_order != "big":
                extra.append(f"word_order={tag.word_order}")
            if tag.byte_order != "big":
                extra.append(f"byte_order={tag.byte_order}")
            if tag.scale != 1.0 or tag.offset != 0.0:
                extra.append(f"scale={tag.scale:g} offset={tag.offset:g}")
            if tag.unit is not None:
                extra.append(f"unit={tag.unit}")
            lines.append(f"  tag    {tag.tag} <- {tag.register_text} kind={tag.kind} {' '.join(extra)}")
        return lines

    def warnings(self) -> list[str]:
        """A timeout that cannot fit the poll interval; a serial unit id outside 1-247."""
        found = []
        where = f"sources.modbus.{self.name}"
        if self.timeout * (self.retries + 1) >= self.poll_interval:
            found.append(
                f"{where}: timeout x (retries + 1) is not shorter than poll_interval; a device that stops "
                "answering makes polls overrun (they are skipped, not queued)"
            )
        endpoint = self.parsed_endpoint
        units = {self.unit} | {tag.unit for tag in self.tags if tag.unit is not None}
        if endpoint.scheme == "rtu" and any(not 1 <= unit <= 247 for unit in units):
            found.append(f"{where}: unit ids on a serial line are 1-247 (0 is broadcast, unanswered)")
        return found

    def build(self, context: BuildContext) -> ModbusSource:
        """The source this config describes; sources naming one serial device (or TCP peer) share its line.

        pymodbus is imported here, not when the config is read.
        """
        from protocols.modbus.source import ModbusLine, ModbusSource

        endpoint = self.parsed_endpoint
        line = context.shared(
            endpoint.line_key, lambda: ModbusLine(endpoint, timeout=self.timeout, retries=self.retries)
        )
        return ModbusSource(self, line=line)

    async def preflight(self, context: BuildContext, *, ack_tags: frozenset[str] = frozenset()) -> list[Finding]:
        """Connect and read every tag's register(s) once; exception codes named."""
        from protocols.modbus.preflight import preflight

        return await preflight(self, context, ack_tags)
