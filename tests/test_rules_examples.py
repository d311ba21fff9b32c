"""The shipped rule examples (``config/rules/<type>.toml``): one per canonical transaction type.

Each is a config fragment that ``plantgate check`` accepts when appended to a
minimal config, and each, run through the rules with readings a plant would
send, makes its type with the fields and subject its comment promises.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.events import TRANSACTION_TYPES, TYPE_PREFIX, Reading, decode_event, encode_event
from agent.rules import Rules
from agent.settings import parse_settings

EXAMPLES = Path(__file__).parent.parent / "config" / "rules"
MINIMAL = """[agent]
site = "plant-01"
id = "line3-gw"
data_dir = "/tmp/plantgate-examples"

[[sinks.mqtt]]
name = "cloud"
url = "mqtt://127.0.0.1:1883"
topic_prefix = "plantgate/plant-01"

"""
T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def batch(second: float, **values: Any) -> list[Reading]:
    """Readings at one source time; ``a__b=1`` is tag ``a.b``."""
    return [Reading(tag.replace("__", "."), value, at(second)) for tag, value in values.items()]


# type -> (batches of readings, expected subject, partitionkey, data); the last batch triggers.
SCENARIOS: dict[str, tuple[list[list[Reading]], str, str, dict[str, Any]]] = {
    "workorder.released": (
        [
            batch(
                0, line3__order_loaded=False, line3__work_order=4711.0, line3__item="FILL-500", line3__planned_qty=1200
            ),
            batch(1, line3__order_loaded=True),
        ],
        "4711",
        "4711",
        {"work_order": "4711", "item": "FILL-500", "planned_quantity": {"value": "1200", "uom": "EA"}},
    ),
    "workorder.started": (
        [
            batch(0, press7__state=0, press7__work_order="4711"),
            batch(1, press7__state=2),  # a fault is no start
            batch(2, press7__state=1),
        ],
        "4711",
        "4711",
        {"work_order": "4711", "work_center": "PRESS-7"},
    ),
    "workorder.paused": (
        [
            batch(0, press7__running=True, press7__work_order="4711", press7__pause_reason="material"),
            batch(1, press7__running=False),
        ],
        "4711",
        "4711",
        {"work_order": "4711", "reason": "material"},
    ),
    "workorder.completed": (
        [
            batch(
                0,
                filler2__order_done=False,
                filler2__order_ack=False,
                filler2__work_order=4711,
                filler2__good_count=1000,
            ),
            batch(1, filler2__good_count=1480, filler2__order_done=True),
        ],
        "4711",
        "4711",
        {"work_order": "4711", "quantity": {"value": "480", "uom": "EA"}},
    ),
    "material.consumed": (
        [
            batch(
                0,
                mixer1__dose_done=False,
                mixer1__work_order="4711",
                mixer1__component="RM-SUGAR",
                mixer1__component_lot="L-2024-118",
                mixer1__dosed_grams=12500.5,
            ),
            batch(1, mixer1__dose_done=True),
        ],
        "4711",
        "4711",
        {"work_order": "4711", "item": "RM-SUGAR", "lot": "L-2024-118", "quantity": {"value": "12.5005", "uom": "KGM"}},
    ),
    "goods.received": (
        [
            batch(0, dock1__unload_done=False, dock1__item="RM-FLOUR", dock1__lot="S-77", dock1__net_weight=24000),
            batch(1, dock1__unload_done=True),
        ],
        "S-77",
        "S-77",
        {"item": "RM-FLOUR", "lot": "S-77", "quantity": {"value": "24000", "uom": "KGM"}, "location": "RM-DOCK1"},
    ),
    "production.completed": (
        [
            batch(0, filler2__good_count=65530, filler2__work_order=4711),
            batch(1, filler2__good_count=4),  # a 16-bit wrap-around: ten parts
        ],
        "4711",
        "4711",
        {"work_order": "4711", "quantity": {"value": "10", "uom": "EA"}},
    ),
    "scrap.declared": (
        [
            batch(0, filler2__reject_count=7, filler2__work_order=4711),
            batch(1, filler2__reject_count=9),
        ],
        "4711",
        "4711",
        {"work_order": "4711", "scrap_quantity": {"value": "2", "uom": "EA"}, "reason": "underfill"},
    ),
    "quality.hold.placed": (
        [
            batch(0, oven2__over_temperature=False, oven2__lot="L-88", oven2__zone=3),
            batch(1, oven2__over_temperature=True),
        ],
        "L-88",
        "L-88",
        {"lot": "L-88", "reason": "over temperature in zone 3"},
    ),
    "quality.hold.released": (
        [
            batch(0, oven2__lot_released=False, oven2__lot="L-88"),
            batch(1, oven2__lot_released=True),
        ],
        "L-88",
        "L-88",
        {"lot": "L-88"},
    ),
    "inventory.moved": (
        [
            batch(
                0,
                agv1__transfer_done=False,
                agv1__item="FG-12",
                agv1__lot="P-5",
                agv1__pieces=48,
                agv1__from="LINE3-OUT",
                agv1__to="WH-A-01",
            ),
            batch(1, agv1__transfer_done=True),
        ],
        "P-5",
        "P-5",
        {
            "item": "FG-12",
            "lot": "P-5",
            "quantity": {"value": "48", "uom": "PCE"},
            "from_location": "LINE3-OUT",
            "to_location": "WH-A-01",
        },
    ),
    "inventory.adjusted": (
        [
            batch(0, silo4__count_done=False, silo4__item="RM-CEMENT", silo4__correction_t=-1.25),
            batch(1, silo4__count_done=True),
        ],
        "silo4.count_done",
        "SILO-4",
        {"item": "RM-CEMENT", "quantity": {"value": "-1250", "uom": "KGM"}, "location": "SILO-4"},
    ),
    "shipment.confirmed": (
        [
            batch(0, dock2__truck_loaded=False, dock2__shipment_no=90017, dock2__pallets=33),
            batch(1, dock2__truck_loaded=True),
        ],
        "dock2.truck_loaded",
        "SHP-90017",
        {"shipment": "SHP-90017", "quantity": {"value": "33", "uom": "EA"}},
    ),
}


def test_every_transaction_type_has_an_example_and_a_scenario() -> None:
    shipped = sorted(path.stem for path in EXAMPLES.glob("*.toml"))
    assert shipped == sorted(TRANSACTION_TYPES)
    assert sorted(SCENARIOS) == sorted(TRANSACTION_TYPES)


@pytest.mark.parametrize("name", TRANSACTION_TYPES)
def test_plantgate_check_accepts_the_example(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "plantgate.toml"
    config.write_text(MINIMAL + (EXAMPLES / f"{name}.toml").read_text(encoding="utf-8"), encoding="utf-8")
    assert main(["check", "-c", str(config)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    assert "warning" not in printed.err, printed.err
    assert f"type={name}" in printed.out or name in printed.out


@pytest.mark.parametrize("name", TRANSACTION_TYPES)
def test_the_example_makes_its_transaction(name: str) -> None:
    settings = parse_settings(MINIMAL + (EXAMPLES / f"{name}.toml").read_text(encoding="utf-8"))
    [rule] = settings.transactions
    assert rule.type == name
    source = settings.source_configs()[0].name
    rules = Rules(settings)
    batches, subject, partitionkey, data = SCENARIOS[name]
    for readings in batches[:-1]:
        output = rules.process(source, readings)
        assert not [e for e in output.events if e.lane == "transaction"], "fired before its trigger"
        assert not output.dead_letters
    output = rules.process(source, batches[-1])
    assert not output.dead_letters, [d.reason for d in output.dead_letters]
    [event] = [decode_event(encode_event(e)) for e in output.events if e.lane == "transaction"]
    assert event["type"] == TYPE_PREFIX + name
    assert event["subject"] == subject
    assert event["partitionkey"] == partitionkey
    assert event["time"] == batches[-1][0].time.isoformat().replace("+00:00", "Z")
    assert event["source"] == f"plantgate/plant-01/line3-gw/{source}"
    assert event["data"] == data
    # The same readings again, in a fresh agent: the same fact, the same id.
    again = Rules(settings)
    for readings in batches:
        last = again.process(source, readings)
    assert [e.id for e in last.events if e.lane == "transaction"] == [event["id"]]
