"""New ``[mappings]`` for running rules (a SIGHUP reload), and which dead letters they fix."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.events import Reading, make_event
from agent.rules import Rules, mapping_caused, replayable
from agent.settings import ConfigError, load_mappings, parse_settings

CONFIG = """
[agent]
site = "plant-01"
id = "gw"

[[sources.opcua]]
name = "press7"
endpoint = "opc.tcp://127.0.0.1:4840"
  [[sources.opcua.tags]]
  tag = "press7.cycle_done"
  node = "ns=2;s=CycleDone"
  kind = "value"
  [[sources.opcua.tags]]
  tag = "press7.item"
  node = "ns=2;s=Item"
  kind = "value"
  [[sources.opcua.tags]]
  tag = "press7.qty"
  node = "ns=2;s=Qty"
  kind = "value"

[[transactions]]
name = "done"
when = "press7.cycle_done"
type = "production.completed"
fields = { item = "press7.item", quantity = "press7.qty" }
uom = "gram"
uom_to = "kilo"

[mappings]
unknown_items = "dead-letter"

[mappings.items]
"OLD-1" = { obsolete = true }

[mappings.uom]
"gram" = "GRM"
"kilo" = "KGM"
"""

AT = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


def test_new_mappings_apply_to_the_next_batch_and_count_what_they_fix(tmp_path: Path) -> None:
    settings = parse_settings(CONFIG)
    rules = Rules(settings)
    letters = []
    for second, item in enumerate(["OLD-1", "NEW-9", "OLD-1"]):
        out = rules.process(
            "press7",
            [
                Reading("press7.item", item, AT.replace(second=2 * second)),
                Reading("press7.qty", 1500, AT.replace(second=2 * second)),
                Reading("press7.cycle_done", True, AT.replace(second=2 * second, microsecond=1)),
            ],
        )
        letters.extend(out.dead_letters)
        rules.process("press7", [Reading("press7.cycle_done", False, AT.replace(second=2 * second + 1))])
    assert [letter.reason for letter in letters] == [
        "item: item code 'OLD-1' is obsolete",
        "item: item code 'NEW-9' is not in [mappings.items]",
        "item: item code 'OLD-1' is obsolete",
    ]
    path = tmp_path / "plantgate.toml"
    path.write_text(CONFIG.replace('"OLD-1" = { obsolete = true }', '"OLD-1" = "4001"'), encoding="utf-8")
    mappings = load_mappings(path, settings, environ={})
    assert [letter.id for letter in replayable(mappings, letters)] == [letters[0].id, letters[2].id]
    rules.use_mappings(mappings)
    out = rules.process(
        "press7",
        [
            Reading("press7.item", "OLD-1", AT.replace(second=30)),
            Reading("press7.cycle_done", True, AT.replace(second=31)),
        ],
    )
    [event] = out.events
    assert isinstance(event.data, dict)
    assert event.data["item"] == "4001"
    assert event.data["quantity"].uom == "KGM"


def test_only_item_mapping_reasons_can_be_fixed_by_a_mapping() -> None:
    assert mapping_caused("item: item code 'X' is obsolete")
    assert mapping_caused("item: item code 'X' is obsolete; to_item: item code 'Y' is not in [mappings.items]")
    assert not mapping_caused("field quantity: tag press7.qty has no good value yet")
    assert not mapping_caused("item: item code 'X' is obsolete; field lot: tag t is null")


def test_a_reload_that_breaks_a_rules_unit_conversion_is_refused(tmp_path: Path) -> None:
    settings = parse_settings(CONFIG)
    path = tmp_path / "plantgate.toml"
    path.write_text(CONFIG.replace('"kilo" = "KGM"', '"kilo" = "MTR"'), encoding="utf-8")
    refused = r"plantgate.toml:\d+: mappings.uom: transactions.0.uom_to no longer converts"
    with pytest.raises(ConfigError, match=refused):
        load_mappings(path, settings, environ={})


def test_environment_overrides_of_mappings_apply_on_reload_and_others_are_ignored(tmp_path: Path) -> None:
    settings = parse_settings(CONFIG)
    path = tmp_path / "plantgate.toml"
    path.write_text(CONFIG, encoding="utf-8")
    environ = {"PLANTGATE__MAPPINGS__UNKNOWN_ITEMS": "pass", "PLANTGATE__SOURCES__OPCUA__7__ENDPOINT": "x"}
    assert load_mappings(path, settings, environ=environ).unknown_items == "pass"
    environ = {"PLANTGATE__MAPPINGS__UNKNOWN_ITEMS": "drop"}
    with pytest.raises(ConfigError, match="set by PLANTGATE__MAPPINGS__UNKNOWN_ITEMS"):
        load_mappings(path, settings, environ=environ)


def test_a_reload_brings_new_line_ids_and_counts_the_dead_letters_they_fix(tmp_path: Path) -> None:
    strict = CONFIG.replace("[mappings]\n", '[mappings]\nunknown_ids = "dead-letter"\n')
    rules = Rules(parse_settings(strict))
    event = make_event(
        "workorder.started", id="mes-1", source="mes", time=AT, site="plant-01", data={"line": "L3", "work_order": "1"}
    )
    [letter] = rules.accept_events("mes", [event]).dead_letters
    assert letter.reason == "line: line code 'L3' is not in [mappings.lines]"
    path = tmp_path / "plantgate.toml"
    path.write_text(strict + '\n[mappings.lines]\n"L3" = "MUC-LINE-3"\n', encoding="utf-8")
    mappings = load_mappings(path, parse_settings(strict), environ={})
    assert replayable(mappings, [letter]) == [letter]
    rules.use_mappings(mappings)
    again = make_event(
        "workorder.started", id="mes-2", source="mes", time=AT, site="plant-01", data={"line": "L3", "work_order": "1"}
    )
    [mapped] = rules.accept_events("mes", [again]).events
    assert mapped.data == {"line": "MUC-LINE-3", "work_order": "1"}
