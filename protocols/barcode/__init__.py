"""Barcode scanners: the ``[[sources.barcode]]`` config model.

The source lives in ``protocols.barcode.source``, the GS1 reading (biip) in
``protocols.barcode.gs1`` and the framing in ``protocols.barcode.framing``; biip and
pyserial are imported only when ``BarcodeSourceConfig.build`` is called.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from agent.config_types import BuildContext, Duration, format_duration
from agent.events import TRANSACTION_TYPES
from agent.source import SourceConfig

if TYPE_CHECKING:
    from agent.preflight import Finding
    from protocols.barcode.source import BarcodeSource

__all__ = ["SCAN_EVENTS", "BarcodeSourceConfig", "parse_address", "terminator_bytes"]

SCAN_EVENTS = (*TRANSACTION_TYPES, "barcode.scanned")
"""What a scan at a station may mean: a transaction type, or just ``barcode.scanned``."""

_NAMED_TERMINATORS = {"CR": b"\r", "LF": b"\n", "CRLF": b"\r\n"}
_GS = 0x1D
_PARITY = {"none": "N", "even": "E", "odd": "O", "mark": "M", "space": "S"}

Mode = Literal["tcp-server", "tcp-client", "serial"]
Parity = Literal["none", "even", "odd", "mark", "space"]


def terminator_bytes(text: str) -> bytes:
    """``"CR"``, ``"LF"``, ``"CRLF"``, or custom bytes with Python escapes (``'\\x03'``, ``'\\r\\n'``).

    Raises ValueError for an empty terminator, one longer than 8 bytes, one that is not
    Latin-1, or one holding GS (0x1D): GS separates GS1 fields inside a scan.
    """
    named = _NAMED_TERMINATORS.get(text.strip().upper())
    if named is not None:
        return named
    try:
        # TOML literal strings keep '\x03' as four characters; basic strings give the byte itself.
        decoded = codecs.decode(text, "unicode_escape") if "\\" in text else text
        value = decoded.encode("latin-1")
    except (UnicodeError, ValueError) as exc:
        raise ValueError(f"{text!r} is not CR, LF, CRLF or bytes written as '\\x03'") from exc
    if not 1 <= len(value) <= 8:
        raise ValueError(f"{text!r}: a terminator is 1 to 8 bytes")
    if _GS in value:
        raise ValueError(f"{text!r}: GS (0x1D) separates GS1 fields inside a scan and cannot end one")
    return value


def parse_address(text: str, *, key: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:9101"`` for IPv6) -> (host, port); ValueError naming ``key`` otherwise."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{key} {text!r} is not host:port, e.g. \"0.0.0.0:9101\"")
    return host, int(port_text)


class BarcodeSourceConfig(SourceConfig):
    """``[[sources.barcode]]``: one scanning station, with its scanners on TCP or a serial port.

    Each scan becomes the station's ``event`` (GS1 element strings parsed into GTIN,
    lot, serial, expiry, quantity), a garbled one an operational ``barcode.rejected``.
    """

    name: str = Field(..., min_length=1, description="Name of this source, used in events, /status and metrics")
    mode: Mode = Field(
        ...,
        description="tcp-server: scanners connect to the agent (several at once); tcp-client: the agent "
        "connects to the scanner and reconnects; serial: a scanner on a serial port",
    )
    listen: str | None = Field(
        None, description="tcp-server: host:port to listen on", examples=["0.0.0.0:9101"]
    )
    connect: str | None = Field(
        None, description="tcp-client: the scanner's host:port", examples=["10.1.3.40:51236"]
    )
    device: Path | None = Field(None, description="serial: the port's device path", examples=["/dev/ttyACM0"])
    baudrate: int = Field(9600, gt=0, description="serial: bits per second")
    bytesize: Literal[5, 6, 7, 8] = Field(8, description="serial: data bits")
    parity: Parity = Field("none", description="serial: none | even | odd | mark | space")
    stopbits: float = Field(1, description="serial: stop bits, 1, 1.5 or 2")
    rtscts: bool = Field(False, description="serial: RTS/CTS hardware flow control")
    station: str = Field(..., min_length=1, description="The station the scanners belong to (in every event)")
    event: str = Field(
        "barcode.scanned",
        description="What a scan here means: a canonical transaction type (goods.received, "
        "material.consumed, ...) or barcode.scanned (operational)",
    )
    work_order_tag: str | None = Field(
        None,
        min_length=1,
        description="A tag of another source holding the station's current work order; its value at scan "
        "time goes into the event's work_order (and subject)",
    )
    terminator: str = Field(
        "CR",
        description="What ends a scan: CR, LF, CRLF, or custom bytes written with escapes ('\\x03'); "
        "spaces, CR and LF around a scan are stripped, so CR also takes CRLF",
    )
    max_length: int = Field(
        4096,
        ge=16,
        le=1 << 20,
        description="Longest scan in bytes; a longer frame becomes barcode.rejected and reading resumes "
        "after the next terminator",
    )
    duplicate_window: Duration = Field(
        1.0,
        description="The same code on this station again within this time (measured from its last read) is "
        "a double read: suppressed and counted; 0s turns suppression off",
    )
    max_connections: int = Field(
        16, ge=1, le=1024, description="tcp-server: scanners connected at once; more are refused and logged"
    )
    connect_timeout: Duration = Field(5.0, gt=0, description="tcp-client: timeout of one connection attempt")
    reconnect_max_backoff: Duration = Field(
        5.0, gt=0, description="Longest wait between reconnect (or re-listen, reopen) attempts, with jitter"
    )

    @field_validator("event")
    @classmethod
    def _canonical_event(cls, value: str) -> str:
        name = value.strip().removeprefix("io.plantgate.")
        if name not in SCAN_EVENTS:
            raise ValueError(f"{value!r} is not a scan event; use one of {', '.join(SCAN_EVENTS)}")
        return name

    @field_validator("stopbits")
    @classmethod
    def _valid_stopbits(cls, value: float) -> float:
        if value not in (1, 1.5, 2):
            raise ValueError("stopbits is 1, 1.5 or 2")
        return value

    @field_validator("terminator")
    @classmethod
    def _valid_terminator(cls, value: str) -> str:
        terminator_bytes(value)
        return value

    @model_validator(mode="after")
    def _mode_settings(self) -> BarcodeSourceConfig:
        needs = {"tcp-server": "listen", "tcp-client": "connect", "serial": "device"}
        for mode, key in needs.items():
            given = getattr(self, key) is not None
            if mode == self.mode and not given:
                raise ValueError(f"mode {self.mode!r} needs {key}")
            if mode != self.mode and given:
                raise ValueError(f"{key} applies only to mode {mode!r}, not {self.mode!r}")
        if self.listen is not None:
            parse_address(self.listen, key="listen")
        if self.connect is not None:
            _, port = parse_address(self.connect, key="connect")
            if port == 0:
                raise ValueError(f"connect {self.connect!r} needs the scanner's port")
        return self

    def referenced_tags(self) -> dict[str, str]:
        """Config key -> tag of another source this one reads (for the settings' cross-reference check)."""
        return {"work_order_tag": self.work_order_tag} if self.work_order_tag else {}

    def terminator_bytes(self) -> bytes:
        """The terminator as bytes."""
        return terminator_bytes(self.terminator)

    def serial_options(self) -> dict[str, Any]:
        """The keyword arguments pyserial's ``Serial`` takes for this port."""
        return {
            "baudrate": self.baudrate,
            "bytesize": self.bytesize,
            "parity": _PARITY[self.parity],
            "stopbits": self.stopbits,
            "rtscts": self.rtscts,
        }

    def describe(self, context: BuildContext) -> list[str]:
        """One line: where the scanners are, the station, what a scan means."""
        where = {"tcp-server": f"listen {self.listen}", "tcp-client": f"connect {self.connect}"}.get(
            self.mode, f"{self.device} {self.baudrate} {self.bytesize}{_PARITY[self.parity]}{self.stopbits:g}"
        )
        extra = f" work_order<-{self.work_order_tag}" if self.work_order_tag else ""
        return [
            f"{self.name} {self.mode} {where} station={self.station} event={self.event}{extra} "
            f"terminator={self.terminator} max_length={self.max_length} "
            f"duplicate_window={format_duration(self.duplicate_window)}"
        ]

    def warnings(self) -> list[str]:
        """Double reads of a transaction let through; consumption without a work order."""
        where = f"sources.barcode.{self.name}"
        found = []
        if self.duplicate_window == 0 and self.event != "barcode.scanned":
            found.append(f"{where}: duplicate_window 0s: a scanner's double read becomes a second {self.event}")
        if self.event in ("material.consumed", "scrap.declared") and self.work_order_tag is None:
            found.append(f"{where}: {self.event} without work_order_tag: its events carry no work order")
        return found

    def build(self, context: BuildContext) -> BarcodeSource:
        """The source this config describes; biip (and pyserial for serial) are imported here."""
        from protocols.barcode.source import BarcodeSource

        config = self if self.device is None else self.model_copy(update={"device": context.resolve(self.device)})
        uri = f"plantgate/{context.site}/{context.agent_id}/{self.name}"
        return BarcodeSource(config, source_uri=uri, site=context.site)

    async def preflight(self, context: BuildContext, *, ack_tags: frozenset[str] = frozenset()) -> list[Finding]:
        """tcp-client: the scanner accepts a connection; tcp-server: the port can be bound; serial: it opens."""
        from protocols.barcode.preflight import preflight

        return await preflight(self, context)
