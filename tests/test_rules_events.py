"""Transaction rules fired by a source's event (a scan, an MES event): ``when_event``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.cli import main
from agent.events import CloudEvent, Quantity, Reading, make_event, stable_id
from agent.rules import Rules, map_event, mapping_caused, replayable
from agent.settings import ConfigError, parse_settings

AT = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)

BASE = """
[agent]
site = "plant-01"
id = "gw"

[[sources.opcua]]
name = "press7"
endpoint = "opc.tcp://127.0.0.1:4840"
  [[sources.opcua.tags]]
  tag = "press7.line"
  node = "ns=2;s=Line"
  kind = "value"
  [[sources.opcua.tags]]
  tag = "press7.state"
  node = "ns=2;s=State"
  kind = "state"
  states = {{ "1" = "running", "2" = "stopped" }}

[[sources.barcode]]
name = "dock1"
mode = "tcp-server"
listen = "127.0.0.1:7001"
station = "receiving-dock-1"
event = "goods.received"

[[sources.barcode]]
name = "dock2"
mode = "tcp-server"
listen = "127.0.0.1:7002"
station = "receiving-dock-2"
event = "goods.received"

[mappings.items]
"LOCAL-9" = "MAT-9"

[mappings.uom]
"stk" = "EA"

{rules}
"""

MOVE = """
[[transactions]]
name = "putaway"
when_event = "goods.received"
when_source = "dock1"
type = "inventory.moved"
partitionkey = { event = "lot" }
  [transactions.fields]
  item = { event = "gtin" }
  lot = { event = "lot" }
  quantity = { event = "quantity" }
  from_location = { literal = "DOCK-1" }
  to_location = { template = "{press7.line}-STORE-{event.lot}" }
"""


def scan(source: str, data: dict[str, Any], *, at: datetime = AT, name: str = "goods.received") -> CloudEvent:
    """A scan as a barcode source hands it over (data a plain dict)."""
    uri = f"plantgate/plant-01/gw/{source}"
    return make_event(
        name,
        id=stable_id(source, msgspec.json.encode(data).decode(), at.isoformat()),
        source=uri,
        time=at,
        site="plant-01",
        subject=data.get("lot") or source,
        data=data,
    )


RECEIPT = {
    "station": "receiving-dock-1",
    "gtin": "05012345678900",
    "lot": "LOT-42",
    "quantity": {"value": "24", "uom": "EA"},
}


def rules_with(text: str) -> Rules:
    rules = Rules(parse_settings(BASE.format(rules=text)))
    rules.process("press7", [Reading("press7.line", "L3", AT), Reading("press7.state", 1, AT)])
    return rules


def test_a_scan_gives_its_own_event_and_the_rules_transaction_with_a_stable_id() -> None:
    rules = rules_with(MOVE)
    trigger = scan("dock1", RECEIPT)
    out = rules.accept_events("dock1", [trigger])
    assert not out.dead_letters
    received, moved = sorted(out.events, key=lambda event: event.type)
    assert received.type == "io.plantgate.goods.received" and received.data == RECEIPT
    assert moved.type == "io.plantgate.inventory.moved" and moved.lane == "transaction"
    assert moved.data == {
        "item": "05012345678900",
        "lot": "LOT-42",
        "quantity": Quantity(value="24", uom="EA"),
        "from_location": "DOCK-1",
        "to_location": "L3-STORE-LOT-42",
    }
    assert moved.source == "plantgate/plant-01/gw/dock1" and moved.time == AT
    assert moved.partitionkey == "LOT-42" and moved.subject == "LOT-42"
    assert moved.id != trigger.id and moved.traceparent is not None
    # The scanner retries the same scan: the same transaction id (the buffer's dedupe drops it).
    again = rules_with(MOVE).accept_events("dock1", [scan("dock1", RECEIPT)])
    assert [event.id for event in again.events] == [event.id for event in out.events]
    other = rules_with(MOVE).accept_events("dock1", [scan("dock1", {**RECEIPT, "lot": "LOT-43"})])
    assert {event.id for event in other.events}.isdisjoint(event.id for event in out.events)


def test_only_the_named_source_and_the_named_type_fire_the_rule() -> None:
    rules = rules_with(MOVE)
    out = rules.accept_events("dock2", [scan("dock2", RECEIPT)])
    assert [event.type for event in out.events] == ["io.plantgate.goods.received"]
    out = rules.accept_events("dock1", [scan("dock1", RECEIPT, name="material.consumed")])
    assert [event.type for event in out.events] == ["io.plantgate.material.consumed"]


def test_an_mes_event_fires_a_rule_with_its_data_units_converted_and_items_mapped() -> None:
    rules = rules_with(
        """
[[transactions]]
name = "started-here"
when_event = "io.plantgate.workorder.started"
type = "material.consumed"
uom_to = "KGM"
condition = { tag = "press7.state", equals = "running" }
fields = { work_order = { event = "work_order" }, item = { event = "item" }, quantity = { event = "quantity" } }
"""
    )
    started = make_event(
        "workorder.started",
        id="mes-1",
        source="https://mes.example/orders",
        time=AT,
        site="plant-01",
        subject="WO-1",
        correlationid="corr-7",
        data={"work_order": "WO-1", "item": "LOCAL-9", "quantity": {"value": "2500", "uom": "GRM"}},
    )
    out = rules.accept_events("mes", [started])
    consumed = next(event for event in out.events if event.type.endswith("material.consumed"))
    assert consumed.data == {"work_order": "WO-1", "item": "MAT-9", "quantity": Quantity(value="2.5", uom="KGM")}
    assert consumed.partitionkey == "WO-1" and consumed.correlationid == "corr-7"
    assert consumed.source == "plantgate/plant-01/gw/mes"
    # Stopped machine: the condition does not hold, no transaction, counted.
    rules.process("press7", [Reading("press7.state", 2, AT)])
    again = make_event("workorder.started", id="mes-2", source="x", time=AT, site="plant-01", data=dict(started.data))
    out = rules.accept_events("mes", [again])
    assert [event.type for event in out.events] == ["io.plantgate.workorder.started"] and out.unmet == 1


def test_missing_event_data_makes_the_transaction_a_dead_letter_and_keeps_the_scan() -> None:
    rules = rules_with(MOVE)
    out = rules.accept_events("dock1", [scan("dock1", {"station": "receiving-dock-1", "raw": "X"})])
    assert [event.type for event in out.events] == ["io.plantgate.goods.received"]
    [letter] = out.dead_letters
    assert letter.type == "io.plantgate.inventory.moved" and letter.sink == "-"
    assert "field item: the event has no gtin" in letter.reason
    assert "field to_location: the event has no lot" in letter.reason


def test_a_quantity_in_an_unknown_unit_is_a_dead_letter_naming_it() -> None:
    rules = rules_with(MOVE.replace('type = "inventory.moved"', 'type = "inventory.moved"\nuom_to = "KGM"'))
    out = rules.accept_events("dock1", [scan("dock1", RECEIPT)])
    [letter] = out.dead_letters
    assert "field quantity: cannot convert EA" in letter.reason


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ('name = "r"\ntype = "inventory.moved"', "exactly one trigger"),
        ('name = "r"\nwhen = "press7.line"\nwhen_event = "goods.received"\ntype = "inventory.moved"', "exactly one"),
        ('name = "r"\nwhen_event = "goods.received"\non = "rising"\ntype = "inventory.moved"', "`on` goes with"),
        ('name = "r"\nwhen_event = "goods.received"\nack = "press7.line"\ntype = "inventory.moved"', "`ack` goes"),
        ('name = "r"\nwhen = "press7.line"\nwhen_source = "dock1"\ntype = "inventory.moved"', "when_source"),
        ('name = "r"\nwhen_event = "telemetry.samples"\ntype = "inventory.moved"', "not an event type"),
        ('name = "r"\nwhen_event = "goods.received"\nwhen_source = "dock9"\ntype = "inventory.moved"', "dock9"),
        ('name = "r"\nwhen = "press7.line"\ntype = "inventory.moved"\nfields = { lot = { event = "lot" } }', "needs"),
        (
            'name = "r"\nwhen = "press7.line"\ntype = "inventory.moved"\n'
            'fields = { to = { template = "{event.lot}" } }',
            "tag 'event.lot' is not defined",
        ),
        (
            'name = "r"\nwhen_event = "goods.received"\ntype = "inventory.moved"\nfields = { lot = "press7.nope" }',
            "tag 'press7.nope'",
        ),
    ],
)
def test_trigger_settings_are_checked_with_clear_errors(rule: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings(BASE.format(rules=f"[[transactions]]\n{rule}\n"))


EXAMPLE = Path(__file__).parent.parent / "config" / "rules" / "events" / "inventory.moved.toml"
MINIMAL = """[agent]
site = "plant-01"
id = "line3-gw"
data_dir = "/tmp/plantgate-examples"

[[sinks.mqtt]]
name = "cloud"
url = "mqtt://127.0.0.1:1883"
topic_prefix = "plantgate/plant-01"

"""


def test_the_shipped_event_rule_example_is_accepted_and_moves_the_scanned_lot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "plantgate.toml"
    config.write_text(MINIMAL + EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    assert main(["check", "-c", str(config)]) == 0, capsys.readouterr().err
    assert "warning" not in capsys.readouterr().err
    rules = Rules(parse_settings(config.read_text(encoding="utf-8")))
    out = rules.accept_events("dock1", [scan("dock1", RECEIPT)])
    [moved] = [event for event in out.events if event.type == "io.plantgate.inventory.moved"]
    assert moved.partitionkey == "LOT-42" and moved.data["to_location"] == "STORE-LOT-42"


IDS = """
[mappings]
unknown_ids = "dead-letter"

[mappings.plants]
"P01" = "DE-MUC-01"

[mappings.lines]
"3" = "MUC-LINE-3"

[mappings.work_centers]
"WC-7" = "WC-PRESS-7"
"""


def test_mes_events_get_plant_line_and_work_center_ids_mapped_or_dead_lettered() -> None:
    settings = parse_settings(BASE.format(rules="").replace("[mappings.items]", IDS + "\n[mappings.items]"))
    rules = Rules(settings)
    released = make_event(
        "workorder.released",
        id="mes-10",
        source="https://mes.example/orders",
        time=AT,
        site="plant-01",
        subject="WO-1",
        data={"work_order": "WO-1", "plant": "P01", "line": 3, "work_center": "WC-7", "from_line": "MUC-LINE-3"},
    )
    out = rules.accept_events("mes", [released])
    [event] = out.events
    assert event.data == {
        "work_order": "WO-1",
        "plant": "DE-MUC-01",
        "line": "MUC-LINE-3",
        "work_center": "WC-PRESS-7",
        "from_line": "MUC-LINE-3",
    }
    unknown = make_event(
        "workorder.started",
        id="mes-11",
        source="https://mes.example/orders",
        time=AT,
        site="plant-01",
        subject="WO-1",
        data={"work_order": "WO-1", "plant": "P02", "to_work_center": "WC-8"},
    )
    out = rules.accept_events("mes", [unknown])
    assert not out.events
    [letter] = out.dead_letters
    assert letter.id == "mes-11" and letter.sink == "-"
    assert letter.reason == (
        "plant: plant code 'P02' is not in [mappings.plants]; "
        "to_work_center: work-center code 'WC-8' is not in [mappings.work_centers]"
    )
    assert mapping_caused(letter.reason)
    # Once the mapping knows the codes, the replay maps the dead letter's event.
    fixed = IDS.replace('"WC-7" = "WC-PRESS-7"', '"WC-7" = "WC-PRESS-7"\n"WC-8" = "WC-PRESS-8"').replace(
        '"P01" = "DE-MUC-01"', '"P01" = "DE-MUC-01"\n"P02" = "DE-MUC-02"'
    )
    mappings = parse_settings(BASE.format(rules="").replace("[mappings.items]", fixed + "\n[mappings.items]")).mappings
    assert replayable(mappings, [letter]) == [letter]
    replayed = map_event(mappings, msgspec.json.decode(letter.body))
    assert replayed["data"]["plant"] == "DE-MUC-02" and replayed["data"]["to_work_center"] == "WC-PRESS-8"


def test_unknown_ids_pass_by_default() -> None:
    rules = rules_with("")
    event = make_event(
        "workorder.started", id="mes-12", source="x", time=AT, site="plant-01", data={"line": "L9", "plant": "P9"}
    )
    out = rules.accept_events("mes", [event])
    assert not out.dead_letters and out.events[0].data == {"line": "L9", "plant": "P9"}


def test_a_trigger_that_becomes_a_dead_letter_still_gives_the_rules_transaction() -> None:
    text = BASE.format(rules=MOVE.replace('item = { event = "gtin" }', "")).replace(
        "[mappings.items]", '[mappings]\nunknown_items = "dead-letter"\n\n[mappings.items]'
    )
    rules = Rules(parse_settings(text))
    rules.process("press7", [Reading("press7.line", "L3", AT)])
    out = rules.accept_events("dock1", [scan("dock1", {**RECEIPT, "item": "NOT-MAPPED"})])
    [letter] = out.dead_letters
    assert letter.type == "io.plantgate.goods.received" and "NOT-MAPPED" in letter.reason
    [moved] = out.events
    assert moved.type == "io.plantgate.inventory.moved" and moved.data["lot"] == "LOT-42"
