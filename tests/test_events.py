"""Canonical events: stable ids, exact decimals, identifier strings, the CloudEvents envelope, lanes."""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from agent import events
from agent.events import (
    LANE_OF_TYPE,
    LANES,
    OPERATIONAL_TYPES,
    PAYLOAD_OF_TYPE,
    TELEMETRY_TYPES,
    TRANSACTION_TYPES,
    Quantity,
    decimal_string,
    decode_event,
    encode_event,
    events_json_schema,
    format_sequence,
    identifier_string,
    make_event,
    stable_id,
)
from buffer import Buffer

# The lane table of DESIGN.md ("Canonical events (contract)"), transcribed.
DESIGN_LANES = {
    "transaction": [
        "workorder.released", "workorder.started", "workorder.paused", "workorder.completed",
        "material.consumed", "goods.received", "production.completed", "scrap.declared",
        "quality.hold.placed", "quality.hold.released", "inventory.moved", "inventory.adjusted",
        "shipment.confirmed",
    ],
    "operational": [
        "machine.state.changed", "alarm.raised", "alarm.cleared", "barcode.scanned", "barcode.rejected",
        "telemetry.gap", "agent.started", "agent.buffer.quarantined", "reconciliation.summary",
    ],
    "telemetry": ["telemetry.samples", "telemetry.aggregates"],
}  # fmt: skip

T0 = datetime(2024, 5, 1, 10, 0, 5, tzinfo=UTC)


# --- stable ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parts",
    [
        ("plantgate/plant-01/gw/press7", "press7-completion", "2024-05-01T10:00:05+00:00"),
        ("plantgate/plant-01/gw/saw3", "saw3-scrap", "2024-05-01T10:00:05+00:00", 7),
        ("only-one",),
        ("ümlaut", 4711, 12.5, None, True),
    ],
)
def test_stable_id_is_uuid5_of_the_joined_parts(parts: tuple[object, ...]) -> None:
    expected = uuid.uuid5(events._ID_NAMESPACE, "\x1f".join(map(str, parts)))
    assert stable_id(*parts) == str(expected)
    assert uuid.UUID(stable_id(*parts)).version == 5


def test_stable_id_is_deterministic_and_tells_facts_apart() -> None:
    a = stable_id("src", "rule", "2024-05-01T10:00:05+00:00")
    assert a == stable_id("src", "rule", "2024-05-01T10:00:05+00:00")
    assert a != stable_id("src", "rule", "2024-05-01T10:00:06+00:00")
    assert a != stable_id("src", "other-rule", "2024-05-01T10:00:05+00:00")
    # the separator keeps ("ab", "c") and ("a", "bc") apart
    assert stable_id("ab", "c") != stable_id("a", "bc")


# --- decimals and identifiers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.1, "0.1"),
        (100.0, "100"),
        ("12.50", "12.5"),
        (12.5, "12.5"),
        (0.1 + 0.2, "0.30000000000000004"),  # the float's shortest repr, never its binary expansion
        (7, "7"),
        (-3.25, "-3.25"),
        ("1e3", "1000"),
        (" 42 ", "42"),
        (Decimal("5.000"), "5"),
        (1e20, "100000000000000000000"),
        (1.5e-7, "0.00000015"),
    ],
)
def test_decimal_string(value: object, expected: str) -> None:
    assert decimal_string(value) == expected


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, "NaN", "inf", "-Infinity", True, False, "twelve", "", None, [1]],
)
def test_decimal_string_rejects_what_is_not_a_finite_number(value: object) -> None:
    with pytest.raises(ValueError):
        decimal_string(value)


@pytest.mark.parametrize("value", [Decimal("NaN"), Decimal("Infinity"), 3.4e38, "1e30"])
def test_decimal_string_rejects_or_formats_extreme_values(value: object) -> None:
    try:
        text = decimal_string(value)
    except ValueError:
        return  # a clear refusal is fine
    assert Decimal(text).is_finite()
    assert Decimal(text) == Decimal(str(value))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(4711.0, "4711"), (4711, "4711"), ("4711", "4711"), (" WO-9 ", "WO-9"), (12.5, "12.5"), (True, "true")],
)
def test_identifier_string(value: object, expected: str) -> None:
    assert identifier_string(value) == expected


# --- the envelope ---------------------------------------------------------------------------------


def _event(**overrides: object) -> events.CloudEvent:
    arguments: dict[str, object] = {
        "id": stable_id("plantgate/plant-01/gw/press7", "press7-completion", T0.isoformat()),
        "source": "plantgate/plant-01/gw/press7",
        "time": T0,
        "site": "plant-01",
        "subject": "4711",
        "data": {"work_order": "4711", "quantity": Quantity(value="12.5", uom="KGM")},
    }
    arguments.update(overrides)
    return make_event("production.completed", **arguments)  # type: ignore[arg-type]


def test_an_encoded_event_is_a_structured_cloudevent_without_nulls() -> None:
    body = decode_event(encode_event(_event()))
    assert body["specversion"] == "1.0"
    assert body["type"] == "io.plantgate.production.completed"
    assert body["datacontenttype"] == "application/json"
    assert body["dataschema"] == "https://plantgate.io/schemas/events/production.completed/v1"
    assert body["lane"] == "transaction"
    assert body["site"] == "plant-01"
    assert body["subject"] == "4711"
    assert body["partitionkey"] == "4711"
    assert body["time"] == "2024-05-01T10:00:05Z"
    assert body["data"] == {"work_order": "4711", "quantity": {"value": "12.5", "uom": "KGM"}}
    assert None not in body.values()
    for absent in ("sequence", "correlationid", "traceparent", "originsource"):
        assert absent not in body


def test_no_null_attribute_even_without_subject() -> None:
    body = decode_event(encode_event(_event(subject=None)))
    assert "subject" not in body
    assert None not in body.values()
    assert body["partitionkey"] == "plantgate/plant-01/gw/press7"


def test_format_sequence_is_twenty_digits_and_orders_as_text() -> None:
    assert format_sequence(1) == "00000000000000000001"
    assert len(format_sequence(2**63 - 1)) == 20
    numbers = [1, 9, 10, 99, 100, 123456789]
    assert sorted(format_sequence(n) for n in numbers) == [format_sequence(n) for n in sorted(numbers)]


async def test_the_buffer_gives_each_event_a_twenty_digit_sequence(tmp_path: Path) -> None:
    buffer = Buffer(tmp_path / "buffer.db", synchronous="NORMAL")
    await buffer.open()
    try:
        cursor = buffer.cursor("cloud", LANES)
        made = [_event(id=f"e-{n}", subject=f"WO-{n}") for n in range(3)]
        await buffer.append(made)
        batch = await cursor.next_batch(1000, wait=False)
    finally:
        await buffer.close()
    sequences = [decode_event(item.body)["sequence"] for item in batch]
    assert sequences == [event.sequence for event in made]
    assert all(len(seq) == 20 and seq.isdigit() for seq in sequences)
    assert [int(seq) for seq in sequences] == [item.seq for item in batch]
    assert sequences == sorted(sequences)
    assert len(set(sequences)) == 3


# --- lanes ----------------------------------------------------------------------------------------


def test_every_canonical_type_maps_to_its_design_lane() -> None:
    assert {lane: list(names) for lane, names in DESIGN_LANES.items()} == {
        "transaction": list(TRANSACTION_TYPES),
        "operational": list(OPERATIONAL_TYPES),
        "telemetry": list(TELEMETRY_TYPES),
    }
    expected = {name: lane for lane, names in DESIGN_LANES.items() for name in names}
    assert expected == LANE_OF_TYPE
    for name, lane in expected.items():
        event = make_event(name, id="x", source="s", time=T0, site="p", data={})
        assert event.lane == lane
        assert event.type == "io.plantgate." + name


def test_every_canonical_type_has_a_payload_and_a_schema() -> None:
    assert set(PAYLOAD_OF_TYPE) == set(LANE_OF_TYPE)
    schema = events_json_schema()
    assert set(schema["types"]) == {"io.plantgate." + name for name in LANE_OF_TYPE}
    for name, lane in LANE_OF_TYPE.items():
        assert schema["types"]["io.plantgate." + name]["lane"] == lane


def test_traceparent_for_an_event_is_w3c_and_the_same_on_every_retry() -> None:
    from agent.events import traceparent_for

    first = traceparent_for("6f0c-4711")
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", first)
    assert traceparent_for("6f0c-4711") == first
    assert traceparent_for("6f0c-4712").split("-")[1] != first.split("-")[1]
