"""Canonical events: the CloudEvents 1.0 envelope, the typed payloads, stable ids.

Everything here is a msgspec Struct so an event is built and encoded once, fast,
and ``plantgate schema events`` can print the JSON Schema the cloud side relies on.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import msgspec

Lane = Literal["transaction", "operational", "telemetry"]
LANES: tuple[Lane, ...] = ("transaction", "operational", "telemetry")
"""Lanes in drain order: transactions always drain before telemetry."""

Quality = Literal["good", "uncertain", "bad"]

TYPE_PREFIX = "io.plantgate."
SCHEMA_BASE = "https://plantgate.io/schemas/events"

TRANSACTION_TYPES = (
    "workorder.released",
    "workorder.started",
    "workorder.paused",
    "workorder.completed",
    "material.consumed",
    "goods.received",
    "production.completed",
    "scrap.declared",
    "quality.hold.placed",
    "quality.hold.released",
    "inventory.moved",
    "inventory.adjusted",
    "shipment.confirmed",
)
OPERATIONAL_TYPES = (
    "machine.state.changed",
    "alarm.raised",
    "alarm.cleared",
    "barcode.scanned",
    "barcode.rejected",
    "telemetry.gap",
    "agent.started",
    "agent.buffer.quarantined",
    "reconciliation.summary",
)
TELEMETRY_TYPES = ("telemetry.samples", "telemetry.aggregates")

LANE_OF_TYPE: dict[str, Lane] = {
    **{name: "transaction" for name in TRANSACTION_TYPES},
    **{name: "operational" for name in OPERATIONAL_TYPES},
    **{name: "telemetry" for name in TELEMETRY_TYPES},
}
"""Canonical type name (without ``io.plantgate.``) -> its lane."""


# --- what sources hand to the agent -------------------------------------------------------------


class Reading(msgspec.Struct, gc=False):
    """One value of one tag as a source saw it. Sources produce these in batches."""

    tag: str
    value: Any  # bool | int | float | str | None
    time: datetime  # source timestamp, aware UTC
    quality: Quality = "good"


# --- payloads ------------------------------------------------------------------------------------


class Quantity(msgspec.Struct, frozen=True):
    """An exact decimal quantity with its UN/ECE Rec 20 unit code, e.g. ``{"value": "12.5", "uom": "KGM"}``."""

    value: str
    uom: str


class Sample(msgspec.Struct, gc=False):
    """One process value in a ``telemetry.samples`` event."""

    tag: str
    time: datetime
    value: bool | int | float | str | None
    quality: Quality = "good"


class TelemetrySamples(msgspec.Struct):
    """``io.plantgate.telemetry.samples``: values of one source that changed together."""

    samples: list[Sample]


class Aggregate(msgspec.Struct):
    """min/max/mean/last of one tag over one window ``[start, end)``."""

    tag: str
    start: datetime
    end: datetime
    count: int
    min: float
    max: float
    mean: float
    last: float


class TelemetryAggregates(msgspec.Struct):
    """``io.plantgate.telemetry.aggregates``."""

    aggregates: list[Aggregate]


class MachineStateChanged(msgspec.Struct):
    """``io.plantgate.machine.state.changed``; ``previous`` is null for the first reading after start."""

    tag: str
    state: str
    previous: str | None
    value: bool | int | float | str | None
    previous_duration_s: float | msgspec.UnsetType = msgspec.UNSET


class AlarmChanged(msgspec.Struct, omit_defaults=True):
    """``io.plantgate.alarm.raised`` / ``alarm.cleared``."""

    tag: str
    alarm: str
    value: bool | int | float | str | None
    severity: int | None = None
    message: str | None = None


class BarcodeScanned(msgspec.Struct, omit_defaults=True):
    """``io.plantgate.barcode.scanned`` and a station's configured transaction (GS1 AIs parsed).

    ``raw`` is the code as scanned (AIM prefix and GS separators included); the
    other fields are left out when the code does not carry them: ``gtin`` (AI 01,
    else 02, as 14 digits), ``lot`` (10), ``serial`` (21), ``expiry`` (17, ISO
    date), ``quantity`` (30/37 in ``EA``, else a variable measure 310n-316n),
    ``sscc`` (00), and ``work_order`` (the station's current one, from a tag).
    """

    station: str
    raw: str
    gtin: str | None = None
    lot: str | None = None
    serial: str | None = None
    expiry: str | None = None
    quantity: Quantity | None = None
    sscc: str | None = None
    work_order: str | None = None


class BarcodeRejected(msgspec.Struct):
    """``io.plantgate.barcode.rejected``: a scan that could not be parsed.

    ``raw`` is the frame as it arrived, with every byte outside printable ASCII
    written as ``\\xNN`` (GS is ``\\x1d``) and a backslash doubled, so it can be
    read back byte for byte.
    """

    station: str
    raw: str
    reason: str


class TelemetryGap(msgspec.Struct):
    """``io.plantgate.telemetry.gap``: telemetry evicted from a full buffer, reported not silent."""

    source: str
    tags: list[str]
    evicted_events: int
    evicted_samples: int
    start: datetime
    end: datetime


class AgentStarted(msgspec.Struct):
    """``io.plantgate.agent.started``."""

    agent: str
    site: str
    version: str
    sources: list[str]
    sinks: list[str]


class BufferQuarantined(msgspec.Struct):
    """``io.plantgate.agent.buffer.quarantined``: a corrupt buffer file moved aside, byte for byte."""

    path: str
    moved_to: str
    reason: str
    size_bytes: int


class ReconciliationCounts(msgspec.Struct):
    """One type's figures in a reconciliation summary."""

    delivered: int
    digest: str
    confirmed: int
    rejected: int


class ReconciliationSummary(msgspec.Struct, kw_only=True):
    """``io.plantgate.reconciliation.summary``: what the agent delivered in one window, per transaction type.

    ``types`` maps a type name (``production.completed``) to the events of that type
    first acknowledged by a sink in ``[from, to)``: how many (``delivered``), the
    SHA-256 (hex) of their ids sorted and joined by ``\\n`` (``digest``, see
    ``agent.lineage.digest``), and how many of them the ERP has posted
    (``confirmed``) or rejected (``rejected``) so far. A window with no delivery
    still gives a summary (``types`` empty): the cloud side can tell "nothing sent"
    from "summary lost".
    """

    from_: datetime = msgspec.field(name="from")
    to: datetime
    types: dict[str, ReconciliationCounts]


TransactionValue = str | Quantity | int | float | bool | None
TransactionData = dict[str, TransactionValue]
"""A transaction's ``data``: the keys of its rule's ``fields``; quantities as ``Quantity``."""

PAYLOAD_OF_TYPE: dict[str, Any] = {
    **{name: TransactionData for name in TRANSACTION_TYPES},
    "machine.state.changed": MachineStateChanged,
    "alarm.raised": AlarmChanged,
    "alarm.cleared": AlarmChanged,
    "barcode.scanned": BarcodeScanned,
    "barcode.rejected": BarcodeRejected,
    "telemetry.gap": TelemetryGap,
    "agent.started": AgentStarted,
    "agent.buffer.quarantined": BufferQuarantined,
    "reconciliation.summary": ReconciliationSummary,
    "telemetry.samples": TelemetrySamples,
    "telemetry.aggregates": TelemetryAggregates,
}
"""Canonical type name -> the Python type of its ``data`` (for the schema and for validation)."""


# --- the envelope --------------------------------------------------------------------------------


class CloudEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A CloudEvents 1.0 event in JSON structured mode, with plantgate's extensions.

    Build it with ``make_event``. ``sequence`` is assigned by the buffer when the
    event is appended, so it is strictly increasing per agent across restarts;
    everything else is fixed when the event is made and never changes on retry or
    replay. Unset optional attributes are left out of the JSON, never ``null``.
    """

    specversion: str
    id: str
    source: str
    type: str
    subject: str | None = None
    time: datetime
    datacontenttype: str
    dataschema: str | None = None
    lane: Lane
    site: str
    partitionkey: str
    sequence: str | None = None
    correlationid: str | None = None
    traceparent: str | None = None
    originsource: str | None = None
    data: Any


def make_event(
    name: str,
    *,
    id: str,
    source: str,
    time: datetime,
    site: str,
    data: Any,
    subject: str | None = None,
    partitionkey: str | None = None,
    correlationid: str | None = None,
    traceparent: str | None = None,
    originsource: str | None = None,
) -> CloudEvent:
    """A canonical event of type ``io.plantgate.{name}``; its lane follows from the name."""
    return CloudEvent(
        specversion="1.0",
        id=id,
        source=source,
        type=TYPE_PREFIX + name,
        subject=subject,
        time=time,
        datacontenttype="application/json",
        dataschema=dataschema_for(name),
        lane=LANE_OF_TYPE[name],
        site=site,
        partitionkey=partitionkey if partitionkey is not None else (subject or source),
        correlationid=correlationid,
        traceparent=traceparent,
        originsource=originsource,
        data=data,
    )


_encoder = msgspec.json.Encoder(decimal_format="string")
encode_event = _encoder.encode
"""Encode a ``CloudEvent`` (structured mode, UTF-8 JSON bytes)."""


def decode_event(body: bytes) -> dict[str, Any]:
    """Decode a structured-mode CloudEvent into plain JSON values (for tests, CLI, replay)."""
    result: dict[str, Any] = msgspec.json.decode(body)
    return result


# --- identity and formatting ---------------------------------------------------------------------

_ID_NAMESPACE = uuid.UUID("5b1f1c1e-6a0e-4f37-9c55-7d1c3e0b9a01")
_ID_NAMESPACE_BYTES = _ID_NAMESPACE.bytes


def stable_id(*parts: object) -> str:
    """A deterministic UUID (v5) from the parts that identify one business fact.

    The same fact (source, tag or rule, source timestamp, source sequence) always
    gives the same id, so every retry and replay carries it and the cloud dedupes.
    Equal to ``uuid.uuid5(namespace, "\x1f".join(parts))``, computed without the
    ``UUID`` object (a third of the cost on the hot path).
    """
    digest = bytearray(hashlib.sha1(_ID_NAMESPACE_BYTES + "\x1f".join(map(str, parts)).encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def traceparent_for(event_id: str) -> str:
    """A W3C ``traceparent`` that starts a trace at this event, derived from its id.

    The same id always gives the same trace, so a retry or a replay continues it and
    the middleware's traces line up with the agent's logs (which carry the event id).
    """
    digest = hashlib.sha256(b"traceparent\0" + event_id.encode()).hexdigest()
    trace_id, span_id = digest[:32], digest[32:48]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:  # forbidden by the spec; 2**-64 at worst
        trace_id, span_id = trace_id[:-1] + "1", span_id[:-1] + "1"
    return f"00-{trace_id}-{span_id}-01"


def format_sequence(seq: int) -> str:
    """The CloudEvents ``sequence`` extension: 20 zero-padded digits, orders lexicographically."""
    return f"{seq:020d}"


def event_type(name: str) -> str:
    """``production.completed`` -> ``io.plantgate.production.completed``."""
    return TYPE_PREFIX + name


def dataschema_for(name: str) -> str:
    """The versioned schema URI of a canonical type's ``data``."""
    return f"{SCHEMA_BASE}/{name}/v1"


def utc_now() -> datetime:
    return datetime.now(UTC)


def decimal_string(value: object) -> str:
    """An exact decimal string for a quantity: ``12.5`` -> ``"12.5"``, ``100.0`` -> ``"100"``.

    Floats go through ``repr`` (their shortest round-trip form), never through binary
    expansion, so ``0.1`` stays ``"0.1"``.
    """
    if isinstance(value, bool):
        raise ValueError("a quantity cannot be a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"a quantity must be finite, got {value}")
        dec = Decimal(repr(value))
    elif isinstance(value, Decimal):
        dec = value
    elif isinstance(value, str):
        try:
            dec = Decimal(value.strip())
        except ArithmeticError as exc:
            raise ValueError(f"{value!r} is not a decimal number") from exc
    else:
        raise ValueError(f"a quantity must be a number, got {type(value).__name__}")
    if not dec.is_finite():
        raise ValueError(f"{value!r} is not a finite decimal number")
    # Plain positional notation, exact, whatever the magnitude (no context precision involved).
    text = format(dec, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def identifier_string(value: object) -> str:
    """Identifiers (work order, item, lot, ...) are strings; ``4711.0`` becomes ``"4711"``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return value.strip()
    return str(value)


def events_json_schema() -> dict[str, Any]:
    """JSON Schema of the envelope and of each canonical type's ``data`` (``plantgate schema events``)."""
    names = list(PAYLOAD_OF_TYPE)
    types = [CloudEvent, *(PAYLOAD_OF_TYPE[name] for name in names)]
    schemas, components = msgspec.json.schema_components(types, ref_template="#/$defs/{name}")
    envelope, payloads = schemas[0], schemas[1:]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "plantgate canonical events (CloudEvents 1.0, structured mode)",
        "envelope": envelope,
        "types": {
            TYPE_PREFIX + name: {"lane": LANE_OF_TYPE[name], "dataschema": dataschema_for(name), "data": payload}
            for name, payload in zip(names, payloads, strict=True)
        },
        "$defs": components,
    }
